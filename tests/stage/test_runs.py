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


def test_a_dataset_another_run_inserted_at_the_same_moment_is_linked_not_an_error(tmp_path, monkeypatch):
    """Two sweep workers log the same prepared data at once: the store refuses the loser's insert with a
    unique-key error (as MLflow's server on PostgreSQL answers it); the loser links the winner's row."""
    import mlflow
    from mlflow.exceptions import RestException
    from mlflow.tracking.client import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", uri)  # the fluent API's, undone after
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "dataset_dict.json").write_text('{"splits": ["train"]}')
    real, calls = MlflowClient.log_inputs, []

    def winner_first(self, run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:  # the winner's row goes in, and this writer's insert is refused
            other = MlflowClient(uri).create_run(experiment).info.run_id
            real(self, other, datasets, models)
            raise RestException({"error_code": "BAD_REQUEST", "message": "(psycopg.errors.UniqueViolation) duplicate "
                                 "key value violates unique constraint \"dataset_pk\""})
        return real(self, run_id, datasets, models)

    monkeypatch.setattr(MlflowClient, "log_inputs", winner_first)
    # not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID to this process's environment
    experiment = MlflowClient(uri).create_experiment("fashioncap")
    with mlflow.start_run(experiment_id=experiment) as run:
        digest = tracking.log_dataset(data, context="train")
    inputs = MlflowClient(uri).get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("prepared", digest)] and len(calls) == 2
    with pytest.raises(RestException, match="not a race"):  # any other refusal is still an error
        monkeypatch.setattr(MlflowClient, "log_inputs", lambda *a, **k: (_ for _ in ()).throw(
            RestException({"error_code": "BAD_REQUEST", "message": "not a race"})))
        with mlflow.start_run(experiment_id=experiment):
            tracking.log_dataset(data, context="train")
