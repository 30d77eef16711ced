"""Shared fixtures: the repository's real params, shrunk so a model trains in seconds on a CPU."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# A tiny offline configuration: the same code paths as the real job, seconds instead of minutes.
TINY_OVERRIDES = [
    "profile=offline",
    "data.synthetic.items=150",
    "data.synthetic.render_size=64",
    "data.val_fraction=0.1",
    "data.test_fraction=0.15",
    "model.image_size=32",
    "model.scratch.patch_size=8",
    "model.scratch.vision_layers=1",
    "model.scratch.text_layers=1",
    "model.scratch.vision_hidden=32",
    "model.scratch.text_hidden=32",
    "model.scratch.vision_intermediate=64",
    "model.scratch.text_intermediate=64",
    "train.batch_size=8",
    "train.max_steps=12",
    "train.warmup_steps=2",
    "train.eval_every=6",
    "train.eval_samples=8",
    "train.num_workers=0",
    "train.log_every=4",
    "generate.max_new_tokens=12",
    "generate.batch_size=16",
]


def compose(overrides: list[str]) -> dict:
    """Composes conf/ exactly as `dvc exp run -S` does, returning the params mapping."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return OmegaConf.to_container(hydra_compose(config_name="config", overrides=overrides), resolve=True)


@pytest.fixture(scope="session")
def tiny_raw() -> dict:
    return compose(TINY_OVERRIDES)


@pytest.fixture
def tiny_params(tiny_raw):
    from fashioncap.config import parse_params

    return parse_params(copy.deepcopy(tiny_raw))


@pytest.fixture
def write_params(tmp_path):
    """Writes a params mapping to a file and returns its path."""

    def write(raw: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch, tmp_path_factory):
    """No telemetry, and a Hugging Face datasets cache inside the test's temporary folder."""
    from fashioncap.runtime import QUIET_ENV

    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    yield
