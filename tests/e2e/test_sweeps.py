"""Parallel sweeps lose nothing: queued experiments run by two `dvc queue` workers at once, two against the
embedded sqlite store (two writers on one file, registering into one registry) and two against the team's
server on PostgreSQL (two workers creating the experiment on a fresh server at the same moment, and
PostgreSQL restarted while they train). Every experiment ends in `dvc exp show` with its metrics, as exactly
one finished MLflow run with its whole metric history, and as exactly one registered version."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import BIN, TINY_OVERRIDES, copy_repo, set_args, sh
from tests.services import Services, team_services

pytestmark = pytest.mark.slow
NAME = "fashion-captioner"
RATES = ("0.0015", "0.002", "0.003", "0.004")  # none is the committed run's 0.001: each one trains


def sweep(repo: Path, prefix: str, rates: tuple[str, ...] = RATES, while_running: Callable[[], None] | None = None,
          **env: str) -> list[str]:
    """README's sweep: queue one experiment per rate, then `dvc queue start -j 2`, and wait for it (with
    `while_running` called on a thread of its own as the workers start)."""
    names = [f"{prefix}-{rate}" for rate in rates]
    for name, rate in zip(names, rates):
        sh([str(BIN / "dvc"), "exp", "run", "--queue", "-n", name, *set_args([*TINY_OVERRIDES, f"train.lr={rate}"])],
           repo, **env)
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
    sh([str(BIN / "dvc"), "queue", "start", "-j", "2"], repo, **env)
    deadline = time.monotonic() + 900
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


def accounted_for(repo: Path, client, names: list[str], versions_before: int) -> None:
    shown = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], repo).stdout)
    metrics = {r["name"]: r["data"]["metrics"]["metrics/eval.json"]["data"]["after"]["cider_d"]
               for baseline in shown for e in baseline.get("experiments") or [] for r in e["revs"]
               if r.get("name") in names}
    assert sorted(metrics) == sorted(names), shown
    experiment = client.get_experiment_by_name("fashioncap")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
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
    versions = client.search_model_versions(f"name = '{NAME}'")
    numbers = sorted(int(v.version) for v in versions)
    assert numbers == list(range(1, versions_before + len(names) + 1)), numbers  # none missing, none twice
    registered = sorted(client.get_run(v.run_id).data.tags.get("dvc.exp_name", "") for v in versions
                        if int(v.version) > versions_before)
    assert registered == sorted(names)


def test_a_parallel_sweep_on_the_embedded_sqlite_store(tiny_repo, tmp_path):
    from mlflow import MlflowClient

    repo = copy_repo(tiny_repo, tmp_path / "repo")
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    before = len(client.search_model_versions(f"name = '{NAME}'"))
    names = sweep(repo, "lite", RATES[2:])
    accounted_for(repo, client, names, before)


def restart_postgres_mid_run(services: Services) -> Callable[[], None]:
    """Once a worker's run has started, PostgreSQL stops (fast shutdown), stays down RESTART seconds and
    starts again: the tracking server answers 503 meanwhile, MLflow's clients retry, and its connection pool
    (pool_pre_ping) reconnects."""
    from mlflow import MlflowClient

    def restart() -> None:
        client, deadline = MlflowClient(services.url), time.monotonic() + 600
        while True:
            experiment = client.get_experiment_by_name("fashioncap")
            running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") \
                if experiment else []
            if running:
                break
            assert time.monotonic() < deadline, "no worker's run ever started"
            time.sleep(0.1)
        services.pg.service.stop()
        time.sleep(RESTART)
        services.pg.service.start()

    return restart


RESTART = 5  # seconds PostgreSQL is down


def test_a_parallel_sweep_against_the_team_server_through_a_postgresql_restart(tiny_repo, tmp_path):
    from mlflow import MlflowClient

    repo = copy_repo(tiny_repo, tmp_path / "repo")
    with team_services(tmp_path / "services") as services:
        names = sweep(repo, "team", RATES[:2], restart_postgres_mid_run(services),
                      MLFLOW_TRACKING_URI=services.url)  # workers inherit the environment
        accounted_for(repo, MlflowClient(services.url), names, 0)
        assert "database system is shut down" in (services.root / "pg" / "postgres.log").read_text()
