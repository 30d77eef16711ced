"""Team setup: the pipeline against a real `mlflow server` (own backend store and artifact root), checked
through the server's REST API as another team member's tools would see it."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

import pytest

from tests.conftest import BIN, TINY_OVERRIDES, background_server, copy_repo, free_port, set_args, sh
from tests.conftest import png_b64

pytestmark = pytest.mark.slow
NAME = "fashion-captioner"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'backend.db'}", "--artifacts-destination", str(root / "artifacts")]
    with background_server(args, f"http://127.0.0.1:{port}/health", root / "server.log", root, env):
        yield f"http://127.0.0.1:{port}", root


def api(base: str, path: str, body: dict | None = None, **query: str) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def team_run(server, tiny_repo, tmp_path_factory):
    """A team member's copy of the committed tiny project runs an experiment (another learning rate:
    prepare's output comes from the DVC cache) against the server."""
    base, root = server
    repo = copy_repo(tiny_repo, tmp_path_factory.mktemp("team") / "clone")
    local_store = local_store_state(repo)
    sh([str(BIN / "dvc"), "exp", "run", "-n", "team-run", *set_args([*TINY_OVERRIDES, "train.lr=0.002"])], repo,
       MLFLOW_TRACKING_URI=base)
    assert local_store_state(repo) == local_store, "the experiment wrote to the local MLflow store"
    return base, root, repo


def local_store_state(repo) -> tuple:
    """The repository's own MLflow store (the committed run's): its database and artifact files."""
    files = sorted(p for p in (repo / "mlruns").rglob("*") if p.is_file())
    return (repo / "mlflow.db").read_bytes(), [(str(p), p.stat().st_size) for p in files]


def test_runs_metrics_and_params_reach_the_server(team_run):
    base, _, repo = team_run
    experiment = api(base, "experiments/get-by-name", experiment_name="fashioncap")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # the server's store, not a local path
    runs = api(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["run_id"] == json.loads((repo / "models/run.json").read_text())["run_id"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert tags["dvc.exp_name"] == "team-run" and params["train.max_steps"] == "12"
    history = api(base, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="train_loss")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, 13))
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["test_after_cider_d"] == pytest.approx(evaluation["after"]["cider_d"])


def test_artifacts_are_stored_by_the_server(team_run):
    base, root, repo = team_run
    run_id = json.loads((repo / "models/run.json").read_text())["run_id"]
    listed = {f["path"] for f in api(base, "artifacts/list", run_id=run_id)["files"]}
    assert {"report.html", "predictions_table.json", "loss_curve.png", "eval.json", "lineage"} <= listed
    stored = [p for p in (root / "artifacts").rglob("report.html")]
    assert len(stored) == 1 and stored[0].read_bytes() == (repo / "reports/report.html").read_bytes()
    url = f"{base}/get-artifact?{urllib.parse.urlencode({'path': 'report.html', 'run_uuid': run_id})}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read().startswith(b"<!doctype html>")


def test_registered_model_is_served_by_the_servers_registry(team_run):
    base, _, repo = team_run
    run_id = json.loads((repo / "models/run.json").read_text())["run_id"]
    candidate = api(base, "registered-models/alias", name=NAME, alias="candidate")["model_version"]
    assert candidate["version"] == "1" and candidate["run_id"] == run_id
    sh([str(BIN / "fashioncap"), "promote"], repo, MLFLOW_TRACKING_URI=base)
    champion = api(base, "registered-models/alias", name=NAME, alias="champion")["model_version"]
    assert champion["version"] == "1"
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(base)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")  # downloads through the server
    finally:
        mlflow.set_tracking_uri("")
    assert model.metadata.run_id == run_id
    captions = model.predict(pd.DataFrame({"image": [png_b64()]}))
    assert len(captions) == 1 and isinstance(captions[0], str)
