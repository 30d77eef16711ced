"""A team's setup, for real: PostgreSQL, an S3 server and `mlflow server` on both, started by the test.
Two clones ("two people") share a bare git remote, the tracking server and a DVC remote on the same S3
store: A runs an experiment and pushes it; B pulls it, finds A's run on the server, reproduces it,
promotes A's version and serves it with its artifacts coming from S3."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, TINY_OVERRIDES, copy_repo, git, pending, png_b64, set_args, sh
from tests.sweeps import accounted_for, sweep
from tests.services import DVC_BUCKET, MLFLOW_BUCKET, S3, Services, answers, free_port, mlflow_server, process, \
    team_services

pytestmark = pytest.mark.slow
NAME = "fashion-captioner"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with team_services(tmp_path_factory.mktemp("team-services")) as running:
        yield running


def api(base: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None, **query: str) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def dvc(args: list[str], repo: Path, **env: str) -> subprocess.CompletedProcess:
    return sh([str(BIN / "dvc"), *args], repo, **env)


def credentials(repo: Path, s3: S3) -> None:
    """A member's own S3 credentials, in the git-ignored .dvc/config.local (as docs/team.md says; `--` ends the
    options, so a key that starts with '-', as one in 64 of these do, is taken as the value)."""
    dvc(["remote", "modify", "--local", "team", "access_key_id", "--", s3.access_key], repo)
    dvc(["remote", "modify", "--local", "team", "secret_access_key", "--", s3.secret_key], repo)


@dataclass(frozen=True)
class Team:
    a: Path
    b: Path
    run_id: str
    services: Services
    outage: float  # seconds the tracking server was down while A trained
    push_without_s3: subprocess.CompletedProcess  # A's first `dvc push`, with the S3 server down
    register_without_s3: subprocess.CompletedProcess  # outage_register(), in the same outage


# seconds: MLflow's client retries after 0, 4, 12, 28, 60 … s (urllib3's backoff at its factor 2), so a server down
# 10 s (15 s with its restart) costs the run ~30 s; down 30 s it cost ~60 s
OUTAGE = 10


def train_through_an_outage(services: Services, command: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Runs `command` (a pipeline execution against the tracking server) and, once its run has logged its first
    training loss, stops the server for OUTAGE seconds and starts it again on the same port. Returns how long
    the server was down; the command must succeed."""
    import time

    from mlflow import MlflowClient

    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    proc = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client, deadline = MlflowClient(services.url), time.monotonic() + 600
    while True:
        assert proc.poll() is None, "the execution ended before the outage:\n" + proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        experiment = client.get_experiment_by_name("fashioncap")
        running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
        if any("train_loss" in run.data.metrics for run in running):
            break
        time.sleep(0.2)
    services.server.stop()
    down = time.monotonic()
    time.sleep(OUTAGE)
    services.server.start()
    outage = time.monotonic() - down
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    return outage


@pytest.fixture(scope="module")
def team(services, tiny_repo, tmp_path_factory) -> Team:
    """A commits the team's DVC remote (URLs only), runs an experiment against the tracking server, and
    pushes data, models and the experiment; B clones the shared git remote and pulls the experiment."""
    root = tmp_path_factory.mktemp("team")
    a = copy_repo(tiny_repo, root / "a")
    dvc(["remote", "add", "-d", "team", f"s3://{DVC_BUCKET}/store"], a)
    dvc(["remote", "modify", "team", "endpointurl", services.s3.endpoint], a)
    git(a, "commit", "-qam", "the team's DVC remote")
    credentials(a, services.s3)
    sh(["git", "clone", "-q", "--bare", str(a), str(root / "origin.git")], root)
    git(a, "remote", "add", "origin", str(root / "origin.git"))
    outage = train_through_an_outage(
        services, [str(BIN / "dvc"), "exp", "run", "-n", "team-run", *set_args([*TINY_OVERRIDES, "train.lr=0.002",
                                                                                   "train.log_every=1"])],
        a, {"MLFLOW_TRACKING_URI": services.url})
    run_id = json.loads((a / "models/run.json").read_text())["run_id"]
    # S3 down (once for both: a restart of the store takes ~20 s): the push and a register fail, saying so;
    # the tests below run them again once it is back
    services.s3.service.stop()
    try:
        push_without_s3 = subprocess.run([str(BIN / "dvc"), "push"], cwd=a, capture_output=True, text=True,
                                         timeout=600)
        register_without_s3 = outage_register(a, root, services)
    finally:
        services.s3.service.start()
    dvc(["push"], a)
    dvc(["exp", "push", "origin", "team-run"], a)

    sh(["git", "clone", "-q", str(root / "origin.git"), str(root / "b")], root)
    b = root / "b"
    credentials(b, services.s3)
    dvc(["exp", "pull", "origin", "team-run"], b)
    return Team(a, b, run_id, services, outage, push_without_s3, register_without_s3)


def test_a_runs_metrics_and_params_reach_the_server(team):
    """Also through an outage of the tracking server (OUTAGE seconds, plus its restart) in the middle of the
    training: MLflow's client retries, and the run finishes with its whole metric history."""
    assert team.outage >= OUTAGE
    base = team.services.url
    experiment = api(base, "experiments/get-by-name", experiment_name="fashioncap")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # the server's store, not a local path
    runs = api(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    parents = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]}.get("mlflow.parentRunId")
               for r in runs}
    assert [r for r, parent in parents.items() if parent is None] == [team.run_id]
    # and only the S3-outage register's own run beside it (its registry name differs), nested under it
    nested = [r for r in runs if parents[r["info"]["run_id"]]]
    assert [parents[r["info"]["run_id"]] for r in nested] == [team.run_id] * len(nested) and len(nested) <= 1
    assert all({p["key"]: p["value"] for p in r["data"]["params"]}["registry.name"] == OUTAGE_MODEL for r in nested)
    [run] = [r for r in runs if r["info"]["run_id"] == team.run_id]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert tags["dvc.exp_name"] == "team-run" and params["train.max_steps"] == "12"
    assert run["info"]["status"] == "FINISHED"
    history = api(base, "metrics/get-history", run_id=team.run_id, metric_key="train_loss")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, 13))
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    evaluation = json.loads((team.a / "metrics/eval.json").read_text())
    assert metrics["test_after_cider_d"] == pytest.approx(evaluation["after"]["cider_d"])


def test_artifacts_live_in_the_s3_store_and_come_back_through_the_server(team):
    base, s3 = team.services.url, team.services.s3
    listed = {f["path"] for f in api(base, "artifacts/list", run_id=team.run_id)["files"]}
    assert {"report.html", "predictions_table.json", "loss_curve.png", "eval.json", "lineage"} <= listed
    stored = [k for k in s3.keys(MLFLOW_BUCKET) if k.endswith(f"{team.run_id}/artifacts/report.html")]
    assert len(stored) == 1
    body = s3.client().get_object(Bucket=MLFLOW_BUCKET, Key=stored[0])["Body"].read()
    assert body == (team.a / "reports/report.html").read_bytes()
    url = f"{base}/get-artifact?{urllib.parse.urlencode({'path': 'report.html', 'run_uuid': team.run_id})}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read() == body


def test_a_third_clone_gets_a_s_data_models_and_experiment_from_the_shared_remotes(team, tmp_path):
    c = tmp_path / "c"
    sh(["git", "clone", "-q", str(team.a.parent / "origin.git"), str(c)], tmp_path)
    credentials(c, team.services.s3)
    assert any(k.startswith("store/files/md5/") for k in team.services.s3.keys(DVC_BUCKET))
    dvc(["exp", "pull", "origin", "team-run"], c)
    assert "team-run" in dvc(["exp", "list", "--name-only"], c).stdout.split()
    dvc(["exp", "apply", "team-run"], c)
    dvc(["pull"], c)
    assert pending(json.loads(dvc(["status", "--json"], c).stdout)) == {}
    for path in ("models/best/model.safetensors", "metrics/eval.json", "data/prepared/dataset_dict.json"):
        assert (c / path).read_bytes() == (team.a / path).read_bytes()


def test_b_reproduces_a_s_run_from_the_server(team):
    proc = subprocess.run([str(BIN / "fashioncap"), "reproduce", team.run_id], cwd=team.b, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "MLFLOW_TRACKING_URI": team.services.url,
                                                      "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DVC experiment 'team-run'" in proc.stdout
    assert "verdict: REPRODUCED (identical metrics, identical model weights)" in proc.stdout
    assert "prepared data fetched from the DVC cache/remote" in proc.stderr  # from S3, not rebuilt


def test_b_promotes_a_s_version_and_serves_it_from_s3(team, tmp_path):
    base = team.services.url
    candidate = api(base, "registered-models/alias", name=NAME, alias="candidate")["model_version"]
    assert candidate["run_id"] == team.run_id
    sh([str(BIN / "fashioncap"), "promote"], team.b, MLFLOW_TRACKING_URI=base)
    champion = api(base, "registered-models/alias", name=NAME, alias="champion")["model_version"]
    assert champion["version"] == candidate["version"]
    assert any("model.safetensors" in k for k in team.services.s3.keys(MLFLOW_BUCKET))
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": base}
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # B reaches S3 only through the server
    with process([str(BIN / "fashioncap"), "serve", "--port", str(port)], answers(f"http://127.0.0.1:{port}/ping"),
                 tmp_path / "serve.log", env=env, cwd=team.b):
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[png_b64()]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            captions = json.loads(response.read())["predictions"]
    assert len(captions) == 1 and isinstance(captions[0], str) and captions[0]


def test_no_credential_reaches_mlflow_git_or_the_logs(team):
    secrets_ = (team.services.s3.secret_key, team.services.pg.password)
    run = api(team.services.url, "runs/get", run_id=team.run_id)["run"]
    assert not any(s in json.dumps(run) for s in secrets_)
    for repo in (team.a, team.b):
        tracked = git(repo, "ls-files").split()
        for path in tracked:
            text = (repo / path).read_bytes() if (repo / path).is_file() else b""
            assert not any(s.encode() in text for s in secrets_), path
        assert ".dvc/config.local" not in tracked
    lineage = [k for k in team.services.s3.keys(MLFLOW_BUCKET) if "/lineage/" in k]
    for key in lineage:
        body = team.services.s3.client().get_object(Bucket=MLFLOW_BUCKET, Key=key)["Body"].read()
        assert not any(s.encode() in body for s in secrets_), key
    for log in team.services.root.rglob("*.log"):
        assert not any(s in log.read_text(errors="replace") for s in secrets_), log


@pytest.fixture(scope="module")
def auth_server(services, tmp_path_factory):
    """The same server with MLflow's basic-auth app, on databases of its own; the admin's password is
    made for this run and handed over in the environment only (MLflow refuses its old default)."""
    import secrets

    root = tmp_path_factory.mktemp("auth-server")
    backend = services.pg.create_database("mlflow_auth")
    users = services.pg.create_database("mlflow_users")
    (root / "auth.ini").write_text("[mlflow]\ndefault_permission = READ\nadmin_username = admin\n"
                                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                                   f"database_uri = {users}\n")
    password = secrets.token_urlsafe(16)
    env = {**os.environ, **services.s3.env(), **services.pg.env(), "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    with mlflow_server(root, backend, f"s3://{MLFLOW_BUCKET}/auth-artifacts", env, app="basic-auth") as url:
        yield url, ("admin", password)


def test_basic_auth_refuses_anonymous_clients_and_lets_members_log_and_promote(auth_server, tmp_path):
    url, admin = auth_server
    for path in ("experiments/search?max_results=1", "registered-models/search"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}", timeout=30)
        assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        api(url, "experiments/search", {"max_results": 1}, auth=("admin", "password1234"))
    assert wrong.value.code == 401  # MLflow's old default password
    script = f"""
import mlflow, os
from mlflow import MlflowClient
mlflow.set_tracking_uri({url!r})
with mlflow.start_run() as run:
    mlflow.log_metric("test_after_cider_d", 1.5)
    open("note.txt", "w").write("a logged artifact")
    mlflow.log_artifact("note.txt")
client = MlflowClient()
client.create_registered_model("{NAME}")
version = client.create_model_version("{NAME}", f"runs:/{{run.info.run_id}}/note.txt", run.info.run_id)
client.set_registered_model_alias("{NAME}", "champion", version.version)
print(client.get_model_version_by_alias("{NAME}", "champion").version)
"""
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": admin[0], "MLFLOW_TRACKING_PASSWORD": admin[1]}
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    proc = subprocess.run([str(BIN / "python"), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "1"
    anonymous = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_")}
    proc = subprocess.run([str(BIN / "python"), "-c", script.replace(f'client.create_registered_model("{NAME}")', "")],
                          cwd=tmp_path, env=anonymous, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "401" in proc.stderr


OUTAGE_MODEL = "outage-captioner"  # the registry of the S3-outage register, so the versions above stay as they are


def outage_register(repo: Path, root: Path, services: Services) -> subprocess.CompletedProcess:
    """The register stage of A's experiment, into OUTAGE_MODEL, against the team server."""
    import yaml

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["registry"]["name"] = OUTAGE_MODEL
    params = root / "outage-params.yaml"
    params.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "fashioncap.register", "--params", str(params), "--data", "data/prepared",
               "--model-dir", "models/best", "--run-ref", "models/eval_run.json", "--eval", "metrics/eval.json",
               "--out", str(root / "outage-registered.json")]
    env = {**os.environ, "PYTHONPATH": "src", "MLFLOW_TRACKING_URI": services.url,
           # no retries: each one waits on the server's own attempts to reach S3 (2 of them took 25 s)
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def test_register_with_s3_down_registers_nothing_and_its_rerun_registers_once(team):
    """S3 down during register's artifact upload: a clear error, no version, no run left RUNNING; once S3
    is back the same command registers exactly one version."""
    from mlflow import MlflowClient

    failed = team.register_without_s3
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Nothing was registered" in failed.stderr and "Traceback" not in failed.stderr
    client = MlflowClient(team.services.url)
    assert client.search_model_versions(f"name = '{OUTAGE_MODEL}'") == []
    models_before = [k for k in team.services.s3.keys(MLFLOW_BUCKET) if k.endswith("/MLmodel")]
    proc = outage_register(team.a, team.a.parent, team.services)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [version] = client.search_model_versions(f"name = '{OUTAGE_MODEL}'")
    assert version.status == "READY"
    models_after = [k for k in team.services.s3.keys(MLFLOW_BUCKET) if k.endswith("/MLmodel")]
    assert len(models_after) == len(models_before) + 1  # the re-run's model reached S3, whole
    experiment = client.get_experiment_by_name("fashioncap").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")


def test_dvc_push_with_s3_down_fails_clearly_and_the_next_push_completes(team):
    failed = team.push_without_s3
    assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert "Could not connect to the endpoint URL" in failed.stderr, failed.stderr[-2000:]  # DVC names the store
    assert json.loads(dvc(["status", "--cloud", "--json"], team.a).stdout) == {}  # everything is on the remote


# The PostgreSQL-restart sweep runs on this module's services (one service set for both): an experiment and a
# registered model of its own, so the versions and runs the tests above count are the team's alone.
SWEEP_EXPERIMENT, SWEEP_MODEL = "team-sweep", "sweep-captioner"
RESTART = 5  # seconds PostgreSQL is down


def restart_postgres_mid_run(services: Services) -> Callable[[], None]:
    """Once a worker's run has started, PostgreSQL stops (fast shutdown), stays down RESTART seconds and
    starts again: the tracking server answers 503 meanwhile, MLflow's clients retry, and its connection pool
    (pool_pre_ping) reconnects."""
    import time

    from mlflow import MlflowClient

    def restart() -> None:
        client, deadline = MlflowClient(services.url), time.monotonic() + 600
        while True:
            experiment = client.get_experiment_by_name(SWEEP_EXPERIMENT)
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


def test_a_parallel_sweep_against_the_team_server_through_a_postgresql_restart(services, tiny_repo, tmp_path):
    """Two `dvc queue` workers create the sweep's experiment on the server at the same moment, and PostgreSQL
    restarts while they train: both experiments end with one FINISHED run each (whole metric history) and one
    version each (tests/sweeps.py)."""
    from mlflow import MlflowClient

    repo = copy_repo(tiny_repo, tmp_path / "repo")
    client = MlflowClient(services.url)
    assert client.get_experiment_by_name(SWEEP_EXPERIMENT) is None  # the workers race to create it
    names = sweep(repo, "team", ("0.0015", "0.002"), restart_postgres_mid_run(services),
                  (f"tracking.experiment={SWEEP_EXPERIMENT}", f"registry.name={SWEEP_MODEL}"),
                  MLFLOW_TRACKING_URI=services.url)  # workers inherit the environment
    accounted_for(repo, client, names, 0, SWEEP_EXPERIMENT, SWEEP_MODEL)
    assert "database system is shut down" in (services.root / "pg" / "postgres.log").read_text()
