"""Continuing from the champion with LoRA, as a user runs it: `dvc repro` with model.init @champion pins the
version, trains an adapter, registers it as a version that names its base; moving the alias makes the init
stage's record change (and so what follows it); `fashioncap reproduce` re-runs against the pinned version."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from tests.conftest import BIN, copy_repo, git, pending, sh

pytestmark = pytest.mark.slow
NAME = "fashion-captioner"


def test_an_adapter_from_the_champion_is_pinned_registered_promoted_and_reproduced(tiny_repo, tmp_path):
    from mlflow import MlflowClient

    from fashioncap import promotion

    repo = copy_repo(tiny_repo, tmp_path / "repo")
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    client.set_registered_model_alias(NAME, promotion.CHAMPION, "1")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["init"] = f"models:/{NAME}@champion"
    params["train"].update(method="lora", lr=0.005)
    params["evaluate"]["meteor"] = False  # its Java, twice (here and in the re-run), adds nothing to what is tested
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "commit", "-qam", "adapt the champion with LoRA")
    sh([str(BIN / "dvc"), "repro"], repo)

    record = json.loads((repo / "models/init.json").read_text())
    assert (record["uri"], record["alias"]) == (f"models:/{NAME}/1", "champion")
    assert not (repo / "models/best/model.safetensors").exists() and (repo / "models/best/adapter_config.json").is_file()
    registered = json.loads((repo / "models/registered.json").read_text())
    mv = client.get_model_version(NAME, registered["version"])
    assert registered["version"] == "2" and (mv.tags["method"], mv.tags["base"]) == ("lora", f"models:/{NAME}/1")
    run = client.get_run(json.loads((repo / "models/run.json").read_text())["run_id"])
    assert (run.data.tags["init.version"], run.data.tags["init.weights"]) == ("1", record["weights"])
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "adapter results")
    assert git(repo, "ls-files", "models/init") == ""  # the fetched weights are not committed
    assert pending(json.loads(sh([str(BIN / "dvc"), "status", "--json"], repo).stdout)) == {}

    client.set_registered_model_alias(NAME, promotion.CHAMPION, "2")  # the adapter is the champion now
    sh([str(BIN / "dvc"), "repro", "--single-item", "init"], repo)
    assert json.loads((repo / "models/init.json").read_text())["version"] == "2"
    stale = pending(json.loads(sh([str(BIN / "dvc"), "status", "--json"], repo).stdout))
    assert {"prepare", "train"} <= set(stale)  # a moved alias is a new init: what follows it is stale
    git(repo, "checkout", "--", "models/init.json")

    proc = subprocess.run([str(BIN / "fashioncap"), "reproduce", f"models:/{NAME}/2"], cwd=repo, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"`models:/{NAME}/1` (then `@champion`)" in out  # version 1 as pinned, not the champion of today (2)
    assert "bit-identical" in out.lower() or "identical" in out.lower(), out[-2000:]
