"""Reviewers' corrections end to end, as a shop's team runs them: `fashioncap review` writes the worklist of the
champion's least sure captions, a reviewer corrects one, `fashioncap feedback` refuses a bad file whole and
applies a good one as a DVC-tracked part of the catalogue, and the next prepare trains on it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import BIN, copy_repo, git, sh

pytestmark = pytest.mark.slow
NAME = "fashion-captioner"


def fashioncap(repo, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "fashioncap"), *args], cwd=repo, capture_output=True, text=True, env=env,
                          timeout=600)


def test_a_reviewers_correction_goes_from_the_worklist_into_the_next_training_data(tiny_repo, tmp_path):
    from mlflow import MlflowClient

    repo = copy_repo(tiny_repo, tmp_path / "repo")
    assert not (repo / "data/prepared/corrections.json").exists()  # none used: the prepared data as it always was
    MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").set_registered_model_alias(NAME, "champion", "1")
    reviewed = fashioncap(repo, "review", "--count", "3", "--splits", "train", "test")
    assert reviewed.returncode == 0, reviewed.stderr[-2000:]
    worklist = [json.loads(line) for line in (repo / "reviews/worklist.jsonl").read_text().splitlines()]
    assert len(worklist) == 3 and worklist[0]["confidence"] <= worklist[-1]["confidence"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**worklist[0], "caption": "a fixed caption"}) + "\n"
                   + json.dumps({"key": "not-a-product", "caption": "x"}) + "\n")
    refused = fashioncap(repo, "feedback", str(bad))
    assert refused.returncode == 2 and "line 2: unknown key 'not-a-product'" in refused.stderr
    assert not (repo / "data/corrections/reviewed").exists()  # nothing applied

    fixed = {**worklist[0], "caption": "a corrected caption from the review"}
    (repo / "reviews/worklist.jsonl").write_text(json.dumps(fixed) + "\n")
    applied = fashioncap(repo, "feedback", "reviews/worklist.jsonl")
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert (repo / "data/corrections/reviewed.dvc").is_file()  # tracked by DVC; git keeps the pointer
    assert "/reviewed" in (repo / "data/corrections/.gitignore").read_text()
    status = json.loads(sh([str(BIN / "dvc"), "status", "--json"], repo).stdout)
    assert "prepare" in status  # the catalogue changed: what follows is stale

    sh([str(BIN / "dvc"), "repro", "--single-item", "prepare"], repo)
    import datasets

    prepared = datasets.load_from_disk(str(repo / "data/prepared"))
    split = worklist[0]["split"]
    captions = dict(zip(prepared[split]["key"], prepared[split]["caption"]))
    assert captions[fixed["key"]] == "a corrected caption from the review"
    assert json.loads((repo / "metrics/prepare.json").read_text())["corrections"] == {"captions": 1, "photos": 0}
    assert json.loads((repo / "data/prepared/corrections.json").read_text()) == {"captions": 1, "photos": 0}
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a reviewer's correction")
