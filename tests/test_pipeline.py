"""End to end: the real `dvc` CLI runs the offline profile in a temporary git copy of the repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, TINY_OVERRIDES, clone_project, set_args, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return clone_project(tmp_path_factory.mktemp("clone"))


def mlflow_client(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


# Credentials a user may have in the environment; none may reach MLflow.
FAKE_SECRETS = {"HF_TOKEN": "hf_FAKEtoken0123456789", "AWS_SECRET_ACCESS_KEY": "FAKEawsSecret/0123456789",
                "MLFLOW_TRACKING_PASSWORD": "FAKEmlflowPassword0123", "AWS_ACCESS_KEY_ID": "AKIAFAKE0123456789"}


@pytest.fixture(scope="module")
def first_run(repo):
    sh([str(BIN / "dvc"), "exp", "run", "-n", "tiny-offline", *set_args(TINY_OVERRIDES)], repo, **FAKE_SECRETS)
    return repo


def test_credentials_in_the_environment_never_reach_mlflow(first_run):
    stored = [first_run / "mlflow.db", *(p for p in (first_run / "mlruns").rglob("*") if p.is_file())]
    assert len(stored) > 10
    for path in stored:
        content = path.read_bytes()
        for name, secret in FAKE_SECRETS.items():
            assert secret.encode() not in content, f"{name} leaked into {path}"


def test_exp_run_offline_writes_metrics_lock_and_predictions(first_run):
    repo = first_run
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["profile"] == "offline" and params["train"]["max_steps"] == 12
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "train", "evaluate", "register"}
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["max_steps"] == 12
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    for when in ("before", "after"):
        assert set(evaluation[when]) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "rouge_l"}
    prepared = json.loads((repo / "metrics/prepare.json").read_text())
    assert evaluation["test_items"] == prepared["test_items"]
    predictions = [json.loads(line) for line in (repo / "reports/predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == prepared["test_items"]
    assert {"key", "reference", "before", "after", "novel"} <= set(predictions[0])
    assert (repo / "models/best/model.safetensors").is_file()
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["steps"] == 12 and 1 <= train["best_step"] <= 12
    registered = json.loads((repo / "models/registered.json").read_text())
    assert registered == {"name": "fashion-captioner", "version": "1", "run_id": registered["run_id"]}


def test_registered_version_is_the_candidate_and_promotes(first_run):
    client = mlflow_client(first_run)
    candidate = client.get_model_version_by_alias("fashion-captioner", "candidate")
    run_ref = json.loads((first_run / "models/run.json").read_text())
    assert str(candidate.version) == "1" and candidate.run_id == run_ref["run_id"]
    evaluation = json.loads((first_run / "metrics/eval.json").read_text())
    assert float(candidate.tags["test_cider_d"]) == pytest.approx(evaluation["after"]["cider_d"])
    assert candidate.tags["data_digest"] == evaluation["test_digest"]
    promoted = sh([str(BIN / "fashioncap"), "promote"], first_run)
    assert "fashion-captioner@champion: nothing -> version 1" in promoted.stdout
    again = sh([str(BIN / "dvc"), "repro", "--force", "--single-item", "register"], first_run)  # re-run: no new version
    assert len(client.search_model_versions("name = 'fashion-captioner'")) == 1, again.stdout


def test_one_mlflow_run_with_params_loss_history_and_eval_metrics(first_run):
    client = mlflow_client(first_run)
    exp = client.get_experiment_by_name("fashioncap")
    assert exp.artifact_location.removeprefix("file://").startswith(str(first_run / "mlruns"))
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    run_ref = json.loads((first_run / "models/run.json").read_text())
    assert run.info.run_id == run_ref["run_id"]
    assert run.data.params["train.max_steps"] == "12" and run.data.params["profile"] == "offline"
    assert run.data.tags["dvc.exp_name"] == "tiny-offline"
    assert run.data.tags["mlflow.source.git.commit"]
    assert "tiny-offline" in run.info.run_name
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 13))
    assert len(client.get_metric_history(run.info.run_id, "val_cider_d")) == 2
    evaluation = json.loads((first_run / "metrics/eval.json").read_text())
    assert run.data.metrics["test_after_cider_d"] == pytest.approx(evaluation["after"]["cider_d"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "eval.json", "predictions.jsonl", "train.json"} <= artifacts
    assert list((first_run / "mlruns").rglob("loss_curve.png"))


def test_params_show_in_dvc_exp_show_and_params_diff(first_run):
    shown = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], first_run).stdout)
    text = json.dumps(shown)
    assert "tiny-offline" in text and '"profile": "offline"' in text
    diff = sh([str(BIN / "dvc"), "params", "diff", "--json"], first_run).stdout
    changed = json.loads(diff)["params.yaml"]
    assert changed["profile"] == {"old": "default", "new": "offline"}
    assert changed["train.max_steps"]["new"] == 12


def test_queued_experiment_lands_in_the_same_store(first_run):
    repo = first_run
    sh([str(BIN / "dvc"), "exp", "run", "--queue", "-n", "tiny-queued", *set_args([*TINY_OVERRIDES, "train.lr=0.001"])],
       repo)
    sh([str(BIN / "dvc"), "exp", "run", "--run-all"], repo)
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("fashioncap")
    names = {r.data.tags.get("dvc.exp_name") for r in client.search_runs([exp.experiment_id])}
    assert names == {"tiny-offline", "tiny-queued"}
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    assert len(list((repo / "mlruns").rglob("loss_curve.png"))) == 2
    assert str(client.get_model_version_by_alias("fashion-captioner", "candidate").version) == "2"
