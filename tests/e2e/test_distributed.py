"""Distributed training as two machines, for real: `accelerate launch --num_machines 2`, one rank each, on
loopback. It trains the tiny config to the single-process losses; when one machine is lost (its launcher
and rank SIGKILLed) the other stops within a bounded time with a clear message, and starting both again
resumes from the shared checkpoint into the same MLflow run."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, train_command
from tests.services import free_port

pytestmark = pytest.mark.slow
STEPS = 24
LOST_WITHIN = 60  # seconds from the kill to the surviving machine's exit


def machines(workdir: Path, params: Path, data_dir: Path, env: dict) -> list[subprocess.Popen]:
    """The train stage as two machines of one training: each its own `accelerate launch`, rank 0 the main."""
    port = free_port()
    stage = train_command(workdir, params, data_dir)[1:]  # -m fashioncap.train --params ...
    procs = []
    for rank in (0, 1):
        command = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "conf/accelerate/ddp_cpu.yaml"),
                   "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *stage]
        log = open(workdir / f"machine{rank}.log", "a")
        procs.append(subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def lose(launcher: subprocess.Popen) -> None:
    """A lost machine: its launcher and every process under it SIGKILLed (the elastic agent starts its ranks
    in sessions of their own, so a process group does not hold them)."""
    import psutil

    parent = psutil.Process(launcher.pid)
    for proc in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)


def test_two_machines_train_like_one_and_a_lost_machine_stops_the_other_and_resumes(tiny_model, tiny_raw,
                                                                                    write_params, tmp_path):
    from mlflow import MlflowClient

    raw = copy.deepcopy(tiny_raw)
    raw["train"].update(max_steps=STEPS, checkpoint_every=4, eval_every=12, log_every=1, patience=100)
    params = write_params(raw)
    data_dir = tiny_model[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    single = tmp_path / "single"
    single.mkdir()
    subprocess.run(train_command(single, params, data_dir), cwd=single, env=env, check=True, capture_output=True,
                   timeout=600)

    two = tmp_path / "two"
    two.mkdir()
    procs = machines(two, params, data_dir, env)
    deadline = time.monotonic() + 300
    while not (two / "ckpt" / "state" / "meta.json").is_file():  # the first checkpoint is written
        assert all(p.poll() is None for p in procs), (two / "machine0.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    lose(procs[1])
    killed = time.monotonic()
    procs[0].wait(timeout=LOST_WITHIN + 30)
    stopped_after = time.monotonic() - killed
    log0 = (two / "machine0.log").read_text()
    assert procs[0].returncode != 0 and stopped_after < LOST_WITHIN, (stopped_after, log0[-3000:])
    assert "lost another process of the training" in log0 and "start the stage again on every machine" in log0
    procs[1].wait(timeout=30)
    checkpoint_step = json.loads((two / "ckpt" / "state" / "meta.json").read_text())["step"]
    assert checkpoint_step < STEPS

    for proc in machines(two, params, data_dir, env):  # both machines again: resume from the shared checkpoint
        assert proc.wait(timeout=600) == 0, (two / "machine0.log").read_text()[-3000:]
    log0 = (two / "machine0.log").read_text()
    assert f"resuming from the checkpoint of step {checkpoint_step}" in log0

    client = MlflowClient(uri)
    trained = {name: json.loads((tmp_path / name / "train.json").read_text()) for name in ("single", "two")}
    assert trained["two"]["processes"] == 2 and trained["two"]["steps"] == STEPS == trained["single"]["steps"]
    run_single = json.loads((single / "run.json").read_text())["run_id"]
    run_two = json.loads((two / "run.json").read_text())["run_id"]
    experiment = client.get_run(run_two).info.experiment_id
    assert len(client.search_runs([experiment])) == 2  # the resume went on in the same run
    assert client.get_run(run_two).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_two, "train_loss")]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))  # every step logged, none lost
    assert all(step > checkpoint_step for step in steps if steps.count(step) > 1)  # re-logged: after the checkpoint
    # the same global batch split over two machines: the same recipe, so nearly the same losses
    for metric in ("train_loss", "val_loss"):
        a, b = client.get_run(run_two).data.metrics[metric], client.get_run(run_single).data.metrics[metric]
        assert abs(a - b) / b < 0.05, (metric, a, b)
