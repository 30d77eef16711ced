"""Parallel sweeps, as the README runs them: queued experiments run by two `dvc queue` workers at once, and
what "nothing lost" means for them. Used by tests/e2e/test_pipeline.py (two workers on the embedded sqlite
store: two writers on one file, registering into one registry) and tests/e2e/test_team.py (two workers on
the team's server through a PostgreSQL restart). Every experiment ends in `dvc exp show` with its metrics,
as exactly one finished MLflow run with its whole metric history, and as exactly one registered version."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import BIN, TINY_OVERRIDES, set_args, sh, shell_env

NAME = "fashion-captioner"


def sweep(repo: Path, prefix: str, rates: tuple[str, ...], while_running: Callable[[], None] | None = None,
          overrides: tuple[str, ...] = (), **env: str) -> list[str]:
    """README's sweep: queue one experiment per rate (none the committed run's 0.001, so each one trains; with
    `overrides` on top), then `dvc queue start -j 2`, and wait for it (with `while_running` called on a thread
    of its own as the workers start)."""
    names = [f"{prefix}-{rate}" for rate in rates]
    for name, rate in zip(names, rates):
        sh([str(BIN / "dvc"), "exp", "run", "--queue", "-n", name,
            *set_args([*TINY_OVERRIDES, f"train.lr={rate}", *overrides])], repo, **env)
    # `dvc queue start` returns once its workers are up, by when the first experiments may be half done:
    # `while_running` watches from before it, on a thread of its own
    failed: list[BaseException] = []

    def watch() -> None:
        try:
            while_running()
        except BaseException as error:  # noqa: BLE001 - raised again in the test's thread
            failed.append(error)

    watcher = threading.Thread(target=watch, daemon=True) if while_running is not None else None
    if watcher is not None:
        watcher.start()
    start_workers(repo, **env)
    deadline = time.monotonic() + 1500  # two tiny experiments: 150 s alone, minutes on a loaded 2-core machine
    while True:
        status = sh([str(BIN / "dvc"), "queue", "status"], repo).stdout
        if not any(state in status for state in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    if watcher is not None:
        watcher.join(timeout=60)
        if failed:
            raise failed[0]
        assert not watcher.is_alive(), "while_running never returned"
    rows = {line.split()[1]: line.split()[-1] for line in status.splitlines() if line.split()[1:2] and
            line.split()[1] in names}
    assert rows == {name: "Success" for name in names}, status
    return names


def start_workers(repo: Path, **env: str) -> None:
    """`dvc queue start -j 2`. Its workers are forked from it and hold its standard output until the queue is
    empty: read through a pipe, the command would seem to run as long as the whole sweep, so its output goes to
    a file (shown if it fails) and the caller waits on `dvc queue status`."""
    log = repo.parent / f"{repo.name}-queue-start.log"
    with log.open("w") as out:
        proc = subprocess.run([str(BIN / "dvc"), "queue", "start", "-j", "2"], cwd=repo, stdout=out,
                              stderr=subprocess.STDOUT, timeout=120, env=shell_env(**env))
    assert proc.returncode == 0, log.read_text()[-3000:]


def accounted_for(repo: Path, client, names: list[str], versions_before: int, experiment: str = "fashioncap",
                  model: str = NAME) -> None:
    shown = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], repo).stdout)
    metrics = {r["name"]: r["data"]["metrics"]["metrics/eval.json"]["data"]["after"]["cider_d"]
               for baseline in shown for e in baseline.get("experiments") or [] for r in e["revs"]
               if r.get("name") in names}
    assert sorted(metrics) == sorted(names), shown
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    by_name = {}
    for run in runs:
        by_name.setdefault(run.data.tags.get("dvc.exp_name"), []).append(run)
    for name in names:
        assert len(by_name.get(name, [])) == 1, f"{name}: {len(by_name.get(name, []))} MLflow runs"
        run = by_name[name][0]
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
        assert steps == list(range(1, 13)), f"{name}: train_loss steps {steps}"
        assert run.data.metrics["test_after_cider_d"] == pytest.approx(metrics[name])
    versions = client.search_model_versions(f"name = '{model}'")
    numbers = sorted(int(v.version) for v in versions)
    assert numbers == list(range(1, versions_before + len(names) + 1)), numbers  # none missing, none twice
    registered = sorted(client.get_run(v.run_id).data.tags.get("dvc.exp_name", "") for v in versions
                        if int(v.version) > versions_before)
    assert registered == sorted(names)
