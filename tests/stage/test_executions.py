"""One MLflow run per pipeline execution: an experiment that changes only evaluate's or register's params
(DVC skips or restores `train`) logs into a run of its own, nested under the training run it reuses, and
never over the earlier execution's metrics, artifacts, params or registered version."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest

from fashioncap import evaluate, register, tracking
from fashioncap.config import parse_params
from tests.conftest import new_run

NAME = "fashion-captioner"


def execute(workdir: Path, params_file: Path, run_ref: Path, model_dir: Path, data_dir: Path,
            evaluated: Path | None = None) -> tuple[Path, dict]:
    """evaluate (unless `evaluated`: DVC restored its outputs) then register, as dvc.yaml runs them."""
    workdir.mkdir(exist_ok=True)
    if evaluated is None:
        evaluate.main(["--params", str(params_file), "--data", str(data_dir), "--model-dir", str(model_dir),
                       "--run-ref", str(run_ref), "--metrics", str(workdir / "eval.json"),
                       "--predictions", str(workdir / "predictions.jsonl"),
                       "--attributes", str(Path(__file__).parents[2] / "conf" / "attributes.yaml"),
                       "--eval-run-ref", str(workdir / "eval_run.json")])
        evaluated = workdir
    register.main(["--params", str(params_file), "--data", str(data_dir), "--model-dir", str(model_dir),
                   "--run-ref", str(evaluated / "eval_run.json"), "--eval", str(evaluated / "eval.json"),
                   "--out", str(workdir / "registered.json")])
    return evaluated, json.loads((workdir / "registered.json").read_text())


def logged_table(client, run_id: str, tmp_path: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, "eval.json", str(tmp_path))).read_text())


def test_experiments_that_change_only_later_stages_each_keep_their_own_run(registry_env, tiny_raw, write_params,
                                                                          tmp_path):
    client, model_dir, data_dir = registry_env
    raw_a = copy.deepcopy(tiny_raw)
    raw_a["evaluate"].update(max_items=3, meteor=False, table_images=0)
    raw_b = copy.deepcopy(raw_a)
    raw_b["evaluate"]["max_items"] = 5
    raw_c = copy.deepcopy(raw_a)
    raw_c["registry"]["max_images"] = raw_a["registry"]["max_images"] + 3
    params_a, params_b, params_c = (write_params(raw, f"{n}.yaml") for n, raw in zip("abc", (raw_a, raw_b, raw_c)))
    training = new_run(parse_params(copy.deepcopy(raw_a)))  # logs every param, as train does
    client.log_metric(training, "train_loss", 2.5, step=12)
    run_ref = tmp_path / "run.json"
    tracking.write_run_ref(run_ref, training, "fashioncap")

    eval_a, reg_a = execute(tmp_path / "a", params_a, run_ref, model_dir, data_dir)
    a_before_b = client.get_run(training)
    _, reg_b = execute(tmp_path / "b", params_b, run_ref, model_dir, data_dir)
    _, reg_c = execute(tmp_path / "c", params_c, run_ref, model_dir, data_dir, evaluated=eval_a)

    # A: the first execution logs into the training run, and B and C leave it as it was
    assert tracking.read_run_ref(eval_a / "eval_run.json") == training == reg_a["run_id"]
    a = client.get_run(training)
    assert a.data.metrics == a_before_b.data.metrics and a.data.params == a_before_b.data.params
    assert len(client.get_metric_history(training, "test_after_cider_d")) == 1
    assert logged_table(client, training, tmp_path / "dl-a")["test_items"] == 3
    assert a.data.params["evaluate.max_items"] == "3"
    assert client.get_model_version(NAME, reg_a["version"]).run_id == training

    # B: its own run, nested under the training run, with the training's params and B's evaluation
    b_id = tracking.read_run_ref(tmp_path / "b" / "eval_run.json")
    b = client.get_run(b_id)
    assert b_id != training and b.data.tags["mlflow.parentRunId"] == training
    assert b.data.params["evaluate.max_items"] == "5" and b.data.params["train.lr"] == a.data.params["train.lr"]
    assert logged_table(client, b_id, tmp_path / "dl-b")["test_items"] == 5
    b_table = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert b.data.metrics["test_after_cider_d"] == pytest.approx(b_table["after"]["cider_d"])
    assert b.data.metrics["train_loss"] == a.data.metrics["train_loss"]  # linked training figures, copied
    assert reg_b["run_id"] == b_id and client.get_model_version(NAME, reg_b["version"]).run_id == b_id

    # C: only registry params changed (evaluate's outputs restored): register's own run and version
    c = client.get_run(reg_c["run_id"])
    assert reg_c["run_id"] not in (training, b_id) and c.data.tags["mlflow.parentRunId"] == training
    assert c.data.params["registry.max_images"] == str(raw_c["registry"]["max_images"])
    assert a.data.params["registry.max_images"] == str(raw_a["registry"]["max_images"])
    assert c.data.metrics["test_after_cider_d"] == a.data.metrics["test_after_cider_d"]
    assert len({reg_a["version"], reg_b["version"], reg_c["version"]}) == 3

    # re-running an execution finds its own run again: no new run, no new version
    runs = {r.info.run_id for r in client.search_runs([a.info.experiment_id])}
    assert execute(tmp_path / "b2", params_b, run_ref, model_dir, data_dir)[1] == reg_b
    assert {r.info.run_id for r in client.search_runs([a.info.experiment_id])} == runs
    assert {r.info.status for r in client.search_runs([a.info.experiment_id])} == {"FINISHED"}


def test_parallel_executions_never_share_the_training_run(registry_env, tiny_params):
    """Workers whose evaluations differ claim a run that logged none of evaluate's params, all at once:
    exactly one gets it, the others each get a run of their own."""
    client = registry_env[0]
    training = client.create_run(tracking.experiment_id("fashioncap")).info.run_id
    found: dict[int | None, str] = {}

    def claim(i: int | None) -> None:
        params = tiny_params.model_copy(update={"evaluate": tiny_params.evaluate.model_copy(update={"max_items": i})})
        found[i] = tracking.stage_run(params, training, "evaluate")

    choices = (100, 101, 102, 103)
    threads = [threading.Thread(target=claim, args=(i,)) for i in choices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert list(found.values()).count(training) == 1 and len(set(found.values())) == 4
