"""MLflow runs never go stale: a run whose process was killed is marked KILLED by the next run that starts,
while runs of live processes and of other hosts are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fashioncap import tracking

pytestmark = pytest.mark.slow  # a process that opens a run is started and killed

OPEN_A_RUN_AND_WAIT = """
import sys, time, mlflow
from fashioncap import tracking
mlflow.set_tracking_uri(sys.argv[1])
experiment = mlflow.set_experiment("fashioncap")
run = mlflow.start_run(experiment_id=experiment.experiment_id, tags={tracking.PROCESS_TAG: tracking.this_process()})
print(run.info.run_id, flush=True)
time.sleep(600)
"""


def test_a_killed_process_run_is_marked_killed_and_live_or_remote_ones_are_not(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    proc = subprocess.Popen([sys.executable, "-c", OPEN_A_RUN_AND_WAIT, uri], stdout=subprocess.PIPE, text=True)
    killed = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("fashioncap").experiment_id
    live = client.create_run(experiment, tags={tracking.PROCESS_TAG: tracking.this_process()}).info.run_id
    remote = client.create_run(experiment, tags={tracking.PROCESS_TAG: "another-host:1:1.00"}).info.run_id
    untagged = client.create_run(experiment).info.run_id  # made by hand, or before runs named their process

    assert tracking.reap_killed_runs("fashioncap") == [killed]
    status = {run_id: client.get_run(run_id).info.status for run_id in (killed, live, remote, untagged)}
    assert status == {killed: "KILLED", live: "RUNNING", remote: "RUNNING", untagged: "RUNNING"}
    assert tracking.reap_killed_runs("fashioncap") == []  # once
    assert tracking.reap_killed_runs("no-such-experiment") == []


def test_a_reused_pid_does_not_keep_a_dead_run_alive():
    """host:pid:start: the same pid started at another time is another process."""
    host, pid, created = tracking.this_process().rsplit(":", 2)
    assert tracking._alive(f"{host}:{pid}:{created}") is True
    assert tracking._alive(f"{host}:{pid}:{float(created) - 100:.2f}") is False
    assert tracking._alive(f"{host}:999999999:{created}") is False
    assert tracking._alive(f"elsewhere:{pid}:{created}") is None
