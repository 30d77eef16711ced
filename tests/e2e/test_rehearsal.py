"""The real job's code path without the Hub: the default profile, ids unchanged, on local stand-ins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO, clone_project, default_params, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """`fashioncap rehearse --size shrunk --serve --keep` in a fresh clone: stand-ins, dvc exp run, promote,
    serve, in a work tree of its own, from a shell whose MLFLOW_TRACKING_URI names a team's store (a sentinel
    here, holding a champion). Returns the rehearsal's work tree, its HF home, the figures and the clone."""
    import hashlib

    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("rehearsal")
    (root / "repo").mkdir()
    repo = clone_project(root / "repo")
    sentinel = f"sqlite:///{root / 'team.db'}"
    client = MlflowClient(sentinel)
    client.create_registered_model("fashion-captioner")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in [root / "team.db", *repo.rglob("*")]
              if p.is_file() and ".git" not in p.parts}
    proc = subprocess.run([str(BIN / "fashioncap"), "rehearse", "--size", "shrunk", "--serve", "--keep", "--port",
                           str(free_port()), "--hf-home", str(root / "hf")], cwd=repo, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                            "MLFLOW_TRACKING_URI": sentinel})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((repo / "reports" / "rehearsal-shrunk.json").read_text())
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before if p.is_file()}
    new = {p for p in [root / "team.db", *repo.rglob("*")] if p.is_file() and ".git" not in p.parts} - set(before)
    return Path(result["worktree"]), root / "hf", result, {"before": before, "after": after, "new": new, "repo": repo}


def test_the_rehearsal_leaves_the_users_work_tree_store_and_experiments_alone(rehearsal):
    """Its params, outputs, DVC experiment and MLflow store live in its own work tree: the clone gains only
    the figures' file, the team's store (MLFLOW_TRACKING_URI) is byte for byte what it was."""
    work, _, result, user = rehearsal
    assert user["after"] == user["before"]
    assert {p.relative_to(user["repo"]).as_posix() for p in user["new"]} == {"reports/rehearsal-shrunk.json"}
    assert work != user["repo"] and (work / "mlflow.db").is_file()
    refs = subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=user["repo"], capture_output=True, text=True)
    assert refs.stdout == ""  # the experiment is the work tree's, not in the user's `dvc exp show`
    from mlflow import MlflowClient

    versions = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_model_versions("name = 'fashion-captioner-rehearsal'")
    assert [str(v.version) for v in versions] == ["1"]


def test_a_hugging_face_home_with_other_content_or_the_users_own_is_refused(tmp_path):
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    (tmp_path / "hf" / "hub" / "models--someone--real").mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HOME": str(tmp_path / "mine")}
    for hf_home, message in ((tmp_path / "hf", "holds files the rehearsal did not make"),
                             (tmp_path / "mine", "is your Hugging Face cache")):
        proc = subprocess.run([str(BIN / "fashioncap"), "rehearse", "--build-only", "--size", "shrunk", "--hf-home",
                               str(hf_home)], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert [p.name for p in (tmp_path / "hf" / "hub").iterdir()] == ["models--someone--real"]


def test_default_profile_runs_end_to_end_on_the_cached_stand_ins(rehearsal):
    repo, hf_home, result, _ = rehearsal
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["profile"] == "default"
    assert params["model"]["init"] == "Salesforce/blip-image-captioning-base"  # the ids are the real job's
    assert params["data"]["hub_id"] == "tomytjandra/h-and-m-fashion-caption"
    assert params["model"]["image_size"] == 384 and params["generate"]["num_beams"] == 3
    assert [s["stage"] for s in result["stages"]] == ["init", "prepare", "train", "evaluate", "report", "register"]
    assert all(s["seconds"] > 0 and s["peak_rss_bytes"] > 50e6 for s in result["stages"][1:])  # init: a Hub id, no load
    train = json.loads((repo / "metrics/train.json").read_text())
    from fashioncap.standins import blip_config
    from transformers import BlipForConditionalGeneration

    assert train["parameters"] == BlipForConditionalGeneration(blip_config(shrunk=True)).num_parameters()
    assert json.loads((repo / "models/registered.json").read_text())["version"] == "1"
    assert (hf_home / "hub" / "datasets--tomytjandra--h-and-m-fashion-caption" / "refs" / "main").is_file()


def test_prepare_measures_caption_lengths_in_the_models_tokens(rehearsal):
    repo, _, _, _ = rehearsal
    tokens = json.loads((repo / "metrics/prepare.json").read_text())["caption_tokens"]
    assert tokens["tokenizer"] == "Salesforce/blip-image-captioning-base"
    assert 20 < tokens["p50"] <= tokens["p95"] <= tokens["p99"] <= tokens["max"] <= 64  # H&M-length copy
    caption = json.loads((repo / "reports/predictions.jsonl").read_text().splitlines()[0])["reference"]
    assert any(c in caption for c in ".,%") and any(c.isdigit() for c in caption)  # the text kept its text


def test_the_saved_model_carries_the_pipelines_generation_settings_and_no_loader_flags(rehearsal):
    repo, _, _, _ = rehearsal
    generation = json.loads((repo / "models/best/generation_config.json").read_text())
    assert generation["eos_token_id"] == 102 and "max_length" not in generation  # BLIP stops on [SEP]
    assert generation["max_new_tokens"] == 64 and generation["num_beams"] == 3
    for name in ("tokenizer_config.json", "processor_config.json"):
        path = repo / "models/best" / name
        assert not path.is_file() or "local_files_only" not in path.read_text()


def test_each_model_and_dataset_exists_once_in_work_tree_and_cache_and_once_in_mlflow(rehearsal):
    repo, _, _, _ = rehearsal
    for path in ("models/best/model.safetensors", *map(str, (repo / "data/prepared").glob("*/*.arrow"))):
        assert (repo / path).stat().st_nlink == 2, f"{path} is a copy of the DVC cache, not a link"
    assert len(list((repo / "mlruns").rglob("model.safetensors"))) == 1
    assert not list((repo / "checkpoints").glob("*/*"))  # the run finished: no checkpoint left


def test_a_maximum_size_request_to_the_served_model_answers_200(rehearsal):
    _, _, result, _ = rehearsal
    serving = result["serving"]
    assert serving["status"] == 200 and serving["images_per_request"] == 16  # registry.max_images: a fast model
    assert serving["first_caption"] and serving["request_seconds"] < serving["timeout_seconds"]


def test_without_the_stand_ins_in_the_cache_the_hub_dataset_is_a_clear_error(tmp_path, write_params):
    write_params(default_params())  # the default profile's Hub source, whatever a run left in the checkout
    code = ("from fashioncap.config import load_params; from fashioncap.data import read_source; "
            "list(read_source(load_params('params.yaml').data, 0))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
                                                      "HF_DATASETS_CACHE": str(tmp_path / "datasets")})
    assert proc.returncode != 0 and "DataSourceError" in proc.stderr
    assert "cannot load dataset 'tomytjandra/h-and-m-fashion-caption'" in proc.stderr
    assert "dvc exp run -S profile=offline" in proc.stderr
