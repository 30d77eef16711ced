"""model.init from the registry: an alias resolved to its version and pinned, the weights fetched once and
checked, and every way it can go wrong named (a real MLflow store in the test's folder)."""

from __future__ import annotations

import json

import pytest
import yaml

from fashioncap import origin, promotion
from fashioncap.register import register
from tests.conftest import new_run, table

NAME = "fashion-captioner"


@pytest.fixture
def two_versions(registry_env, tiny_params):
    """Versions 1 and 2 of the tiny model (two runs), champion on 1."""
    client, model_dir, data_dir = registry_env
    runs = [new_run(tiny_params), new_run(tiny_params)]
    for run_id, cider in zip(runs, (1.0, 2.0)):
        register(tiny_params, run_id, model_dir, data_dir, table(cider))
    client.set_registered_model_alias(NAME, promotion.CHAMPION, "1")
    return client, model_dir, runs


def run_stage(tmp_path, tiny_raw, init: str) -> dict:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**tiny_raw, "model": {**tiny_raw["model"], "init": init}}))
    origin.main(["--params", str(params), "--out", str(tmp_path / "models" / "init.json")])
    return json.loads((tmp_path / "models" / "init.json").read_text())


def test_an_alias_is_resolved_when_the_stage_runs_and_its_version_pinned_with_its_run_and_weights(
        two_versions, tmp_path, tiny_raw):
    client, model_dir, runs = two_versions
    record = run_stage(tmp_path, tiny_raw, f"models:/{NAME}@champion")
    assert (record["version"], record["uri"], record["run_id"], record["alias"]) == ("1", f"models:/{NAME}/1", runs[0],
                                                                                    "champion")
    fetched = tmp_path / "models" / "init"
    assert record["weights"] == origin.weights_digest(fetched) == origin.weights_digest(model_dir)
    assert record["model_digest"] == client.get_model_version(NAME, "1").tags["model_digest"]
    text = (tmp_path / "models" / "init.json").read_text()

    client.set_registered_model_alias(NAME, promotion.CHAMPION, "2")
    assert run_stage(tmp_path, tiny_raw, f"models:/{NAME}@champion")["version"] == "2"  # the alias moved
    client.set_registered_model_alias(NAME, promotion.CHAMPION, "1")
    run_stage(tmp_path, tiny_raw, f"models:/{NAME}@champion")
    assert (tmp_path / "models" / "init.json").read_text() == text  # same version, same record: nothing re-runs
    pinned = run_stage(tmp_path, tiny_raw, f"models:/{NAME}/2")
    assert pinned["version"] == "2" and pinned["alias"] is None


def test_a_stage_uses_the_pinned_version_after_the_alias_moved_and_refetches_changed_weights(
        two_versions, tmp_path, tiny_raw):
    client, model_dir, runs = two_versions
    record_path = tmp_path / "models" / "init.json"
    run_stage(tmp_path, tiny_raw, f"models:/{NAME}@champion")
    client.set_registered_model_alias(NAME, promotion.CHAMPION, "2")
    init = origin.load(f"models:/{NAME}@champion", record_path)
    assert init.record["version"] == "1" and init.source == str(tmp_path / "models" / "init")
    assert init.tags["init.version"] == "1" and init.tags["init.run_id"] == runs[0]
    weights = tmp_path / "models" / "init" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    origin.load(f"models:/{NAME}@champion", record_path)
    assert weights.stat().st_mtime_ns == stamp  # the held copy is that version: not fetched again
    weights.write_bytes(b"not the weights")
    origin.load(f"models:/{NAME}@champion", record_path)
    assert origin.weights_digest(weights.parent) == init.record["weights"]  # tampered: fetched again
    with pytest.raises(origin.InitError, match="is of model.init 'models:/fashion-captioner@champion', not 'scratch'"):
        origin.load("scratch", record_path)


def test_a_missing_version_or_a_malformed_uri_is_named(registry_env, tmp_path, tiny_raw):
    with pytest.raises(origin.InitError, match=r"model.init 'models:/fashion-captioner/7': no such version"):
        run_stage(tmp_path, tiny_raw, f"models:/{NAME}/7")
    with pytest.raises(origin.InitError, match="no such version.*`fashioncap promote` points @champion"):
        run_stage(tmp_path, tiny_raw, f"models:/{NAME}@champion")  # the adaptation profile before any promote
    with pytest.raises(origin.InitError, match="write models:/NAME/VERSION or models:/NAME@ALIAS"):
        origin.kind_of("models:/fashion-captioner/latest/extra")
    assert [origin.kind_of(i) for i in ("scratch", "Salesforce/blip-image-captioning-base", str(tmp_path))] == [
        "scratch", "hub", "local"]


def test_a_version_whose_artifacts_changed_after_pinning_is_refused(two_versions, tmp_path, tiny_raw):
    run_stage(tmp_path, tiny_raw, f"models:/{NAME}/1")
    record = json.loads((tmp_path / "models" / "init.json").read_text())
    forged = {**record, "weights": "0" * 64}
    with pytest.raises(origin.InitError, match="holds other weights than when it was pinned"):
        origin.fetch(forged, tmp_path / "elsewhere")


def test_a_hub_init_is_pinned_to_the_commit_its_cache_holds(tmp_path):
    """What a LoRA version on a Hub base names as its base: the id at the commit training loaded."""
    repo = tmp_path / "models--Salesforce--blip-image-captioning-base"
    commit = "82a37760796d32b1411fe092ab5d4e227313294b"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert origin.hub_commit("Salesforce/blip-image-captioning-base", str(tmp_path)) == commit
    assert origin.hub_commit("Salesforce/not-cached", str(tmp_path)) is None
