"""Kill anywhere, lose nothing: one `dvc repro` of the tiny pipeline, SIGKILLed (the whole process group, DVC
included) at every stage's fault points of `fashioncap.faults` in turn, each re-run going on from what the
last one left. The pipeline ends with the metrics and the model digest of the uninterrupted run, no stage wedged, no
registry version doubled or missing and no MLflow run left RUNNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import yaml

from fashioncap import faults
from tests.conftest import BIN, copy_repo, pending
from tests.stage.test_resume import CHECKPOINT_POINTS

pytestmark = pytest.mark.slow
NAME = "fashion-captioner"
TIMING = ("train_seconds", "samples_per_second")  # wall-clock figures: the only fields that may differ
# the points of every stage's lifecycle; those inside a checkpoint's write are walked on train alone
# (tests/stage/test_resume.py), where a kill costs seconds instead of a DVC run
PIPELINE_POINTS = tuple(p for p in faults.POINTS if p not in CHECKPOINT_POINTS)


def test_every_fault_point_in_the_code_is_declared_and_walked():
    """A point placed in a stage and missing from faults.POINTS would never be killed at; a declared point
    that no code reaches would count as survived without a kill."""
    import re

    from tests.conftest import REPO

    placed = {m.group(1) for path in (REPO / "src" / "fashioncap").glob("*.py")
              for m in re.finditer(r'faults\.point\("([\w.]+)"\)', path.read_text())}
    assert placed == set(faults.POINTS)
    assert set(CHECKPOINT_POINTS) <= set(faults.POINTS) and len(faults.POINTS) == len(set(faults.POINTS))


def repro(repo, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`dvc repro` in a session of its own (a fault point kills its whole process group, DVC included);
    `--no-run-cache`: a stage runs again, as after a crash, instead of being restored from DVC's run cache."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop(faults.ENV, None)
    if kill_at:
        env[faults.ENV] = kill_at
    return subprocess.run([str(BIN / "dvc"), "repro", "--no-run-cache"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600, start_new_session=True)


def outcome(repo) -> dict:
    """What the pipeline produced: every stage's metrics (timings left out) and the outputs' DVC digests."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    digests = {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
               if out["path"] in ("data/prepared", "models/best")}
    metrics = {}
    for name in ("prepare.json", "train.json", "eval.json", "train_log.csv", "val_log.csv"):
        text = (repo / "metrics" / name).read_text()
        metrics[name] = ({k: v for k, v in json.loads(text).items() if k not in TIMING} if name.endswith(".json")
                         else text)
    return {"digests": digests, "metrics": metrics}


def test_a_pipeline_killed_at_every_fault_point_ends_as_if_never_killed(tiny_repo, tmp_path):
    from mlflow import MlflowClient

    expected = outcome(tiny_repo)
    repo = copy_repo(tiny_repo, tmp_path / "repo")
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions_before = len(client.search_model_versions(f"name = '{NAME}'"))
    (repo / "dvc.lock").unlink()  # every stage runs again, as in a new experiment

    survived = []
    for point in PIPELINE_POINTS:
        proc = repro(repo, kill_at=point)
        assert proc.returncode == -signal.SIGKILL, (
            f"the run was not killed at {point} (exit {proc.returncode}): {proc.stderr[-2000:]}")
        survived.append(point)
    final = repro(repo)
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"\nkill points tried and survived here: {len(survived)}: {', '.join(survived)}")

    assert outcome(repo) == expected  # the same bits as the uninterrupted run
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert pending(json.loads(status.stdout)) == {}, status.stdout  # nothing wedged, nothing left to run
    assert not (repo / "checkpoints" / "train").exists()  # the finished run's checkpoint is gone

    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))
    assert versions == list(range(1, versions_before + 2)), versions  # exactly one new version
    registered = json.loads((repo / "models" / "registered.json").read_text())
    assert registered["version"] == str(versions_before + 1)
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == registered["version"]

    runs = client.search_runs([client.get_experiment_by_name("fashioncap").experiment_id], max_results=1000)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], "a killed run was left RUNNING"
    finished = client.get_run(registered["run_id"])
    assert finished.info.status == "FINISHED" and finished.data.metrics["test_after_cider_d"] == pytest.approx(
        expected["metrics"]["eval.json"]["after"]["cider_d"])
    assert any(r.info.status == "KILLED" for r in runs)  # the runs the kills cut short say so
