"""Registering, promoting, rolling back and loading the captioner through a real MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest
from PIL import Image

from fashioncap import promotion
from fashioncap.register import register
from tests.conftest import new_run, png_b64, table

NAME = "fashion-captioner"


def test_register_is_idempotent_and_tags_the_version(registry_env, tiny_params):
    client, model_dir, data_dir = registry_env
    run_id = new_run(tiny_params)
    v1 = register(tiny_params, run_id, model_dir, data_dir, table(1.5))
    again = register(tiny_params, run_id, model_dir, data_dir, table(1.5))
    assert again == v1 == "1"
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
    mv = client.get_model_version_by_alias(NAME, promotion.CANDIDATE)
    assert str(mv.version) == "1"
    assert mv.tags[promotion.CIDER_TAG] == "1.5" and mv.tags[promotion.DIGEST_TAG] == "d1"
    assert mv.tags[promotion.RUN_TAG] == run_id and mv.tags[promotion.COMMIT_TAG]
    assert "Test CIDEr-D 0.010 -> 1.500" in mv.description and "Limitations" in mv.description


def test_register_makes_a_new_version_when_the_served_config_or_the_evaluation_changed(registry_env, tiny_params):
    import mlflow

    client, model_dir, data_dir = registry_env
    run_id = new_run(tiny_params)
    assert register(tiny_params, run_id, model_dir, data_dir, table(1.5)) == "1"
    wider = tiny_params.model_copy(update={"registry": tiny_params.registry.model_copy(update={"batch_wait_ms": 77})})
    assert register(wider, run_id, model_dir, data_dir, table(1.5)) == "2"  # served config changed
    assert register(wider, run_id, model_dir, data_dir, table(1.7)) == "3"  # a new evaluation
    assert register(wider, run_id, model_dir, data_dir, table(1.7)) == "3"  # nothing changed: no new version
    assert register(tiny_params, run_id, model_dir, data_dir, table(1.5)) == "1"  # back to the first: it again
    versions = {str(mv.version): mv for mv in client.search_model_versions(f"name = '{NAME}'")}
    assert sorted(versions, key=int) == ["1", "2", "3"]
    assert versions["3"].tags[promotion.CIDER_TAG] == "1.7" and versions["2"].tags[promotion.CIDER_TAG] == "1.5"
    served = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/2")) / "artifacts" / "serving_config.json"
    assert json.loads(served.read_text())["batch_wait_ms"] == 77
    assert str(client.get_model_version_by_alias(NAME, promotion.CANDIDATE).version) == "1"


def test_registry_model_loads_by_alias_and_captions_a_batch(registry_env, tiny_params):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    client, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(1.0))
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{promotion.CANDIDATE}")
    captions = model.predict(pd.DataFrame({"image": [png_b64(), png_b64((0, 0, 200))]}))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    short = model.predict(pd.DataFrame({"image": [png_b64()]}), params={"max_new_tokens": 3})
    assert len(short[0].split()) <= 3  # less work than registered: taken
    with pytest.raises(MlflowException, match=f"num_beams 2 is above the registered {tiny_params.generate.num_beams}"):
        model.predict(pd.DataFrame({"image": [png_b64()]}), params={"num_beams": 2})
    with pytest.raises(MlflowException, match="image 1: invalid base64"):
        model.predict(pd.DataFrame({"image": [png_b64(), "%%%not base64"]}))
    requirements = mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}/1")
    assert any(line.startswith("pillow==") for line in open(requirements).read().splitlines())


def test_promote_needs_a_better_score_on_the_same_test_set(registry_env, tiny_params):
    client, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(2.0))
    assert promotion.promote(client, NAME).moved == [f"{NAME}@champion: nothing -> version 1"]
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(1.0))  # version 2, worse
    with pytest.raises(promotion.RegistryError, match=r"(?s)does not pass 2 of its 4 promotion gates against champion "
                                                      r"version 1:\n  FAIL    cider_d on the candidate's test split.*"
                                                      r"FAIL    cider_d on the champion's test split"):
        promotion.promote(client, NAME)
    assert client.get_model_version(NAME, "2").tags[promotion.PROMOTION_TAG] == "refused against version 1"
    assert promotion.promote(client, NAME, force=True).moved == [
        f"{NAME}@previous: nothing -> version 1", f"{NAME}@champion: version 1 -> version 2"]
    assert client.get_model_version(NAME, "2").tags[promotion.PROMOTION_TAG] == "forced against version 1"
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(9.0, digest="other"))  # version 3
    with pytest.raises(promotion.RegistryError, match="champion version 2 was never scored on version 3's test split"):
        promotion.promote(client, NAME, "3")
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(3.0))  # version 4, better
    done = promotion.promote(client, NAME, "4")
    assert done.moved[-1] == f"{NAME}@champion: version 2 -> version 4"
    assert [v.outcome for v in done.verdicts] == ["pass"] * 4
    four = client.get_model_version(NAME, "4")
    assert four.tags["gate.candidate.cider_d"].startswith("pass candidate 3.0 champion 1.0 (beat")
    assert four.tags["gate.champion.garment_f1"].startswith("pass candidate 0.9 champion 0.9 (max_drop 0.02")
    assert "Promotion gates against champion version 2" in four.description and "accepted" in four.description
    assert "Test CIDEr-D 0.010 -> 3.000" in four.description  # the card itself stays


def test_a_model_adapted_from_the_champion_is_promoted_only_if_it_keeps_what_the_champion_knew(registry_env,
                                                                                               tiny_params):
    """Adapted to new products, a version is tested on them (its `before`: the champion's captions of them) and
    on the champion's own test split again: it must beat the champion on the first and hold on the second."""
    client, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(2.0, garment_f1=0.9))
    promotion.promote(client, NAME)
    adapt = tiny_params.model_copy(update={"profile": "offline-adapt"})  # a demonstration as the champion is
    from_champion = {"init": f"models:/{NAME}@champion", "kind": "registry", "uri": f"models:/{NAME}/1",
                     "version": "1", "alias": "champion"}

    def adapted(after: float, init: dict, old_after: float = 2.0, garment: float = 0.9, digest="new-season") -> str:
        scores = table(after, digest)
        scores["before"]["cider_d"] = 1.2  # the init's captions of the new products
        base = table(old_after, "d1", garment_f1=garment)
        scores["base_test"] = {**base, "items": 20, "before": {**base["before"], "cider_d": 2.0},
                               "attributes": {**base["attributes"], "before": table(2.0)["attributes"]["after"]}}
        return register(adapt, new_run(adapt), model_dir, data_dir, scores, init)

    assert adapted(0.9, from_champion) == "2"
    assert client.get_model_version(NAME, "2").tags[promotion.CIDER_BEFORE_TAG] == "1.2"
    with pytest.raises(promotion.RegistryError, match=r"FAIL    cider_d on the candidate's test split \(new-season\): "
                                                      r"0.9000 vs champion 1.2000"):
        promotion.promote(client, NAME)
    assert adapted(3.0, from_champion, old_after=1.0, garment=0.5) == "3"  # better on the new, forgot the old
    with pytest.raises(promotion.RegistryError) as refused:
        promotion.promote(client, NAME)
    assert "does not pass 2 of its 4 promotion gates" in str(refused.value)
    assert "FAIL    cider_d on the champion's test split (d1): 1.0000 vs champion 2.0000" in str(refused.value)
    assert "FAIL    garment_f1 on the champion's test split (d1): 0.5000 vs champion 0.9000" in str(refused.value)
    assert adapted(3.0, from_champion, old_after=1.99) == "4"  # within 2% on the old
    assert promotion.promote(client, NAME).moved[-1] == f"{NAME}@champion: version 1 -> version 4"
    # fine-tuned from a version that is not the champion: its `before` says nothing of the champion
    assert adapted(9.0, {**from_champion, "uri": f"models:/{NAME}/2", "version": "2"}, digest="other") == "5"
    with pytest.raises(promotion.RegistryError, match="fine-tuned from version 2, not from it"):
        promotion.promote(client, NAME, "5")


def test_a_version_is_held_to_the_gates_it_was_registered_with(registry_env, tiny_params):
    client, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(2.0))
    promotion.promote(client, NAME)
    lenient = [{"test_set": "candidate", "metric": "bleu_4", "max_drop": 0.5}]
    params = tiny_params.model_copy(update={"registry": tiny_params.registry.model_copy(update={
        "gates": [type(tiny_params.registry.gates[0]).model_validate(lenient[0])]})})
    register(params, new_run(params), model_dir, data_dir, table(1.0))  # worse CIDEr-D, held to BLEU-4 alone
    assert json.loads(client.get_model_version(NAME, "2").tags[promotion.GATES_TAG]) == lenient
    assert [v.line()[:20] for v in promotion.promote(client, NAME).verdicts] == ["PASS    bleu_4 on th"]
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(0.5))  # version 3, before gates were tagged
    client.delete_model_version_tag(NAME, "3", promotion.GATES_TAG)
    with pytest.raises(promotion.RegistryError, match="does not pass 2 of its 4 promotion gates"):  # the defaults
        promotion.promote(client, NAME)


def test_fashioncap_promote_prints_every_gate_refuses_by_name_and_records_a_forced_promotion(registry_env,
                                                                                              tiny_params, cli_env):
    client, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(2.0))
    assert promotion.promote(client, NAME).verdicts == []  # the first champion: no gate to pass
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(2.5, garment_f1=0.7))  # forgot garments
    refused = run_cli("promote", env=cli_env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: version 2 does not pass 1 of its 4 promotion gates against champion "
                                     "version 1:\n  PASS    cider_d on the candidate's test split (d1): 2.5000 vs "
                                     "champion 2.0000; must beat it\n"), refused.stderr
    assert ("\n  FAIL    garment_f1 on the champion's test split (d1): 0.7000 vs champion 0.9000; may fall at most 2%: "
            ">= 0.8820\n  PASS    colour_f1") in refused.stderr
    forced = run_cli("promote", "--force", env=cli_env)
    assert forced.returncode == 0, forced.stderr
    lines = forced.stdout.splitlines()
    assert [line.split()[1] for line in lines[:4]] == ["PASS", "PASS", "FAIL", "PASS"]
    assert lines[4:] == [f"{NAME}@previous: nothing -> version 1", f"{NAME}@champion: version 1 -> version 2"]
    assert client.get_model_version(NAME, "2").tags[promotion.PROMOTION_TAG] == "forced against version 1"
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(3.0, garment_f1=0.69))  # within 2% of 0.7
    accepted = promotion.promote(client, NAME)  # (the command prints these lines: Promotion.lines)
    assert [v.outcome for v in accepted.verdicts] == ["pass"] * 4
    assert accepted.lines()[-1] == f"{NAME}@champion: version 2 -> version 3"


def test_a_demo_model_never_replaces_a_champion_of_another_profile(registry_env, tiny_params):
    client, model_dir, data_dir = registry_env
    real = tiny_params.model_copy(update={"profile": "default"})
    register(real, new_run(real), model_dir, data_dir, table(1.0))
    promotion.promote(client, NAME)
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(5.0))  # version 2: offline, scores higher
    assert client.get_model_version(NAME, "2").tags[promotion.PROFILE_TAG] == "offline"
    refused = "version 2 was trained by the 'offline' profile.*champion version 1 by the 'default' profile"
    with pytest.raises(promotion.RegistryError, match=refused):
        promotion.promote(client, NAME)
    client.delete_model_version_tag(NAME, "2", promotion.PROFILE_TAG)  # registered before the tag: its run's
    with pytest.raises(promotion.RegistryError, match=refused):
        promotion.promote(client, NAME)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert promotion.promote(client, NAME, force=True).moved[-1] == f"{NAME}@champion: version 1 -> version 2"


def test_rollback_restores_the_previous_champion_in_one_step(registry_env, tiny_params):
    client, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(1.0))
    promotion.promote(client, NAME)
    with pytest.raises(promotion.RegistryError, match="no 'previous' version"):
        promotion.rollback(client, NAME)
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(2.0))
    promotion.promote(client, NAME)
    assert promotion.rollback(client, NAME) == [f"{NAME}@champion: version 2 -> version 1",
                                               f"{NAME}@previous: version 1 -> version 2"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


def test_a_champion_set_by_hand_in_the_ui_is_honoured(registry_env, tiny_params):
    client, model_dir, data_dir = registry_env
    for cider in (1.0, 5.0, 3.0):
        register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(cider))
    client.set_registered_model_alias(NAME, "champion", "2")  # what the UI's alias editor does
    with pytest.raises(promotion.RegistryError, match="does not pass 2 of its 4 promotion gates against champion "
                                                      "version 2"):
        promotion.promote(client, NAME, "3")
    with pytest.raises(promotion.RegistryError, match="has no version 42"):
        promotion.promote(client, NAME, "42")


def run_cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashioncap.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_cli_caption_reports_bad_files_and_fails_only_when_all_fail(registry_env, tiny_params, tmp_path, cli_env):
    client, model_dir, data_dir = registry_env
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (50, 40), (10, 200, 10)).save(folder / "a.png")
    Image.new("CMYK", (30, 30)).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    missing = run_cli("caption", str(folder), env=cli_env)
    assert missing.returncode == 2 and "no version with alias 'champion'" in missing.stderr
    assert "Traceback" not in missing.stderr

    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(1.0))
    promoted = run_cli("promote", env=cli_env)
    assert promoted.returncode == 0 and "champion: nothing -> version 1" in promoted.stdout
    out = run_cli("caption", str(folder), "--json", env=cli_env)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["file"].rsplit("/", 1)[1] for line in lines] == ["a.png", "b.jpg"]
    assert "broken.png" in out.stderr and "Traceback" not in out.stderr
    only_bad = run_cli("caption", str(folder / "broken.png"), env=cli_env)
    assert only_bad.returncode == 1
    unknown = run_cli("promote", "7", env=cli_env)
    assert unknown.returncode == 2 and "has no version 7" in unknown.stderr


def test_served_requirements_pin_what_is_installed_also_with_mlflow_skinny(monkeypatch):
    """A GPU image may carry mlflow-skinny rather than mlflow: registering must not fail on it."""
    from importlib import metadata

    from fashioncap import register

    real = metadata.version

    def skinny_only(name):
        if name == "mlflow":
            raise metadata.PackageNotFoundError(name)
        return "3.17.2" if name == "mlflow-skinny" else real(name)

    monkeypatch.setattr(register.metadata, "version", skinny_only)
    pins = register.pip_requirements()
    assert "mlflow-skinny==3.17.2" in pins and not any(p.startswith("mlflow==") for p in pins)
    assert any(p.startswith("pillow==") for p in pins) and len(pins) == len(register.SERVING_PACKAGES)


def test_requests_respect_both_the_image_and_the_byte_limit():
    from fashioncap.cli import requests_within

    items = [(Path(f"{i}.png"), "x" * size) for i, size in enumerate([10, 10, 10, 30, 5, 100, 1])]
    batches = requests_within(items, max_images=3, max_bytes=40)
    assert [[f.name for f, _ in b] for b in batches] == [["0.png", "1.png", "2.png"], ["3.png", "4.png"],
                                                         ["5.png"], ["6.png"]]
    assert requests_within([], 3, 40) == []


@pytest.mark.slow
def test_cli_captions_40_photos_under_tight_limits_in_several_requests(registry_env, tiny_params, tmp_path, cli_env):
    """registry.max_images 4 and max_request_bytes 60,000 in the tiny params: 40 photos need 10+ requests."""
    import numpy as np

    client, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(1.0))
    assert run_cli("promote", env=cli_env).returncode == 0
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
    Image.new("RGB", (200, 200), "red").save(folder / "huge.png")  # 40,000 pixels: above registry.max_pixels
    out = run_cli("caption", str(folder), "--json", env=cli_env)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    captioned = [json.loads(line)["file"].rsplit("/", 1)[1] for line in out.stdout.splitlines()]
    assert captioned == [f"p{i:02d}.png" for i in range(40)]
    assert "huge.png" in out.stderr and "exceeds the limit of 10000 pixels" in out.stderr


def test_a_sweep_worker_that_loses_the_race_to_create_the_experiment_uses_the_winners(registry_env, monkeypatch):
    import mlflow

    from fashioncap import tracking

    client = registry_env[0]
    real = mlflow.get_experiment_by_name
    calls = []

    def another_worker_got_there_first(name):
        calls.append(name)
        if len(calls) == 1:  # between this worker's look-up and its create, the other worker creates it
            client.create_experiment(name)
            return None
        return real(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", another_worker_got_there_first)
    created = tracking.experiment_id("sweep")
    assert created == client.get_experiment_by_name("sweep").experiment_id and len(calls) == 2
    assert [e.name for e in client.search_experiments()].count("sweep") == 1


def test_a_stage_whose_tracking_server_does_not_answer_stops_with_one_clear_paragraph(tmp_path, tiny_raw,
                                                                                     write_params):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "0" * 32, "experiment": "fashioncap"}))
    (tmp_path / "eval.json").write_text(json.dumps(table(1.0)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.run([sys.executable, "-m", "fashioncap.register", "--params", str(write_params(tiny_raw)),
                           "--data", str(tmp_path), "--model-dir", str(tmp_path), "--run-ref", str(tmp_path / "run.json"),
                           "--eval", str(tmp_path / "eval.json"), "--out", str(tmp_path / "out.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"tracking server at http://127.0.0.1:{port} did not answer" in proc.stderr
    assert "run it again once the server is back" in proc.stderr
