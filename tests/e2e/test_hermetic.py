"""The suite never touches the user's world, nor depends on it: run with a shell that names a team's MLflow store,
an S3 remote, a Hugging Face cache and credentials (as the README's team setup has members export them), from a
checkout as the README's first command leaves it, the whole e2e pipeline module passes and every one of those
places stays exactly as it was."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_REPO_ENV, as_the_offline_run_leaves_it, clone_project

pytestmark = pytest.mark.slow

# The module run in the user's world; conftest.py runs it only from here when both are selected.
PIPELINE_MODULE = "tests/e2e/test_pipeline.py"


def snapshot(root: Path) -> dict[str, str]:
    """Every file below `root` with the digest of its bytes: what "untouched" is compared by."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def users_world(root: Path) -> dict[str, str]:
    """A user's world made of sentinels: an MLflow store with a registered champion, a Hugging Face cache,
    a home folder with git, DVC, AWS and MLflow configuration, and credentials for an S3 endpoint on a port
    that nothing listens on (loopback), so any use of them fails."""
    from mlflow import MlflowClient

    store = f"sqlite:///{root / 'team' / 'mlflow.db'}"
    (root / "team").mkdir()
    client = MlflowClient(store)
    experiment = client.create_experiment("team", artifact_location=(root / "team" / "artifacts").as_uri())
    run = client.create_run(experiment, run_name="production")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("fashion-captioner")
    client.create_model_version("fashion-captioner", f"runs:/{run.info.run_id}/captioner", run.info.run_id)
    client.set_registered_model_alias("fashion-captioner", "champion", "1")
    for name, text in {"home/.gitconfig": "[user]\n\tname = user\n\temail = user@example.invalid\n",
                       "home/.aws/credentials": "[default]\naws_access_key_id = AKIAUSERS\n",
                       "home/.mlflow/credentials": "[mlflow]\nmlflow_tracking_username = user\n",
                       "home/.config/dvc/config": "[core]\n    remote = team\n['remote \"team\"']\n    url = s3://team\n",
                       "hf/hub/version.txt": "1", "dvc-global/config": "[core]\n    remote = team\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return {"MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store, "MLFLOW_TRACKING_USERNAME": "user",
            "MLFLOW_TRACKING_PASSWORD": "users-password", "HF_HOME": str(root / "hf"), "HF_TOKEN": "hf_users_token",
            "HF_DATASETS_CACHE": str(root / "hf" / "datasets"), "HOME": str(root / "home"),
            "AWS_ACCESS_KEY_ID": "AKIAUSERS", "AWS_SECRET_ACCESS_KEY": "users-secret",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9",
            "DVC_GLOBAL_CONFIG_DIR": str(root / "dvc-global"), "GIT_CONFIG_GLOBAL": str(root / "home/.gitconfig")}


def test_the_pipeline_module_passes_in_the_users_world_and_leaves_it_untouched(tmp_path, tiny_repo):
    """The inner session copies this session's tiny project (built by the same `dvc repro` with the same
    credentials in its environment) instead of building it again; its own experiments, queued, in a
    temporary workspace and under `accelerate launch`, all run in the user's world. The module runs from a copy
    of this checkout that has been through `dvc exp run -S profile=offline` (tiny_repo's state standing in)."""
    world = tmp_path / "world"
    world.mkdir()
    used = as_the_offline_run_leaves_it(clone_project(tmp_path / "checkout"), tiny_repo)
    env = {**os.environ, **users_world(world), TINY_REPO_ENV: str(tiny_repo)}
    before = snapshot(world)
    report = tmp_path / "pipeline.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", PIPELINE_MODULE, "-p", "no:cacheprovider", "-q", "-n", "0",
                           f"--basetemp={tmp_path / 'basetemp'}", f"--junitxml={report}"],
                          cwd=used, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    suite = ET.parse(report).getroot().find("testsuite")
    declared = len(re.findall(r"^def test_", (REPO / PIPELINE_MODULE).read_text(), re.MULTILINE))
    assert int(suite.get("tests")) == declared, proc.stdout[-3000:]  # every test of the module ran here
    assert suite.get("failures") == suite.get("errors") == "0", proc.stdout[-3000:]
    assert snapshot(world) == before  # no run, no version, no alias moved, no cache entry, no config written
