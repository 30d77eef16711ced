"""Every test, and every process it starts, runs without the user's stores, remotes, caches and credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fashioncap.runtime import QUIET_ENV
from tests.conftest import USER_WORLD_PREFIXES, hermetic_environ

USERS = {"MLFLOW_TRACKING_URI": "https://mlflow.team.example", "MLFLOW_REGISTRY_URI": "https://mlflow.team.example",
         "MLFLOW_TRACKING_TOKEN": "token", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_PROFILE": "team",
         "HF_TOKEN": "hf_token", "HF_HOME": "/home/user/.cache/huggingface", "HUGGING_FACE_HUB_TOKEN": "hf_old",
         "TRANSFORMERS_CACHE": "/home/user/tf", "DVC_GLOBAL_CONFIG_DIR": "/home/user/dvc", "GIT_DIR": "/repo/.git",
         "GIT_CONFIG_GLOBAL": "/home/user/.gitconfig", "XDG_CACHE_HOME": "/home/user/.cache",
         "DATABRICKS_TOKEN": "dapi", "AZURE_STORAGE_CONNECTION_STRING": "conn",
         "GOOGLE_APPLICATION_CREDENTIALS": "/home/user/gcp.json"}


def test_the_users_stores_remotes_caches_and_credentials_are_left_out(tmp_path):
    env = hermetic_environ({**USERS, "PATH": "/usr/bin", "CI": "true", "HOME": "/home/user"}, tmp_path)
    assert env["PATH"] == "/usr/bin" and env["CI"] == "true"  # the rest of the shell is kept
    assert env["HOME"] == str(tmp_path) and env["HF_HOME"] == str(tmp_path / ".cache" / "huggingface")
    assert not set(USERS.values()) & set(env.values())
    assert {k: env[k] for k in QUIET_ENV} == QUIET_ENV


def test_this_session_and_the_processes_it_starts_see_only_their_own_world(_hermetic_world):
    own = {"HOME", "HF_HOME", "HF_DATASETS_CACHE", *QUIET_ENV}
    seen = subprocess.run([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
                          capture_output=True, text=True, check=True).stdout
    for environ in (dict(os.environ), json.loads(seen)):
        assert environ["HOME"] == str(_hermetic_world)
        assert [k for k in environ if k.startswith(USER_WORLD_PREFIXES) and k not in own] == []
        assert environ["HF_HOME"].startswith(str(_hermetic_world))
        assert environ["HF_DATASETS_CACHE"].startswith(str(_hermetic_world.parent))  # the session's own folder
    assert "fashioncap tests" in (_hermetic_world / ".gitconfig").read_text()  # git commits work in a bare HOME


def test_the_longest_modules_are_handed_to_the_workers_first(pytestconfig):
    """The schedule of a parallel run: LONGEST_FIRST's modules first, in its order, each module's tests kept in
    theirs, and pytest-xdist told to keep that order. A module renamed without the list would quietly lose its
    place."""
    from dataclasses import dataclass
    from pathlib import Path

    from tests.conftest import LONGEST_FIRST, REPO, pytest_collection_modifyitems

    assert all((REPO / path).is_file() for path in LONGEST_FIRST) and len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)

    @dataclass
    class Item:
        path: Path
        name: str

    items = [Item(REPO / "tests/unit/test_ptb.py", "a"), Item(REPO / LONGEST_FIRST[1], "b"),
             Item(REPO / LONGEST_FIRST[0], "c"), Item(REPO / LONGEST_FIRST[0], "d"),
             Item(REPO / "tests/unit/test_ptb.py", "e")]
    pytest_collection_modifyitems(pytestconfig, items)
    assert [i.name for i in items] == ["c", "d", "b", "a", "e"]
    assert "--no-loadscope-reorder" in pytestconfig.getini("addopts")
