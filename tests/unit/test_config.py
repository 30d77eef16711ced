"""params.yaml stays the composed default; every bad value is reported with its key path."""

import copy
import subprocess

import pytest
import yaml

from fashioncap.config import ConfigError, parse_params
from tests.conftest import REPO, compose, default_params


def test_params_yaml_is_the_composed_default_profile():
    """DVC rewrites params.yaml from conf/ on `dvc exp run -S`: the committed file must not drift from it. An
    experiment applies its own params to the work tree's copy (and stages it), so either the committed one or the
    work tree's (regenerated, not committed yet) must be the composed default."""
    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout
    assert compose([]) in (yaml.safe_load(committed), yaml.safe_load((REPO / "params.yaml").read_text())), (
        "params.yaml differs from conf/ composed with the default profile; regenerate it")


def test_both_profiles_validate():
    default = parse_params(default_params())
    offline = parse_params(compose(["profile=offline"]))
    assert (default.profile, default.data.source, default.model.init) == (
        "default", "hub", "Salesforce/blip-image-captioning-base")
    assert (offline.profile, offline.data.source, offline.model.init) == ("offline", "synthetic", "scratch")


@pytest.mark.parametrize("key,value,message", [
    ("train.lr", "fast", "train.lr: Input should be a valid number"),
    ("train.lr", -1.0, "train.lr: Input should be greater than 0"),
    ("train.batch_size", 0, "train.batch_size: Input should be greater than 0"),
    ("train.batch_size", 2.5, "train.batch_size: Input should be a valid integer"),
    ("data.source", "ftp", "data.source: Input should be 'hub', 'imagefolder' or 'synthetic'"),
    ("data.test_fraction", 1.5, "data.test_fraction: Input should be less than 1"),
    ("train.eval_every", 10**6, "train.eval_every (1000000) exceeds train.max_steps"),
    ("generate.min_length", 500, "generate.min_length (500) exceeds generate.max_new_tokens"),
    ("model.scratch.text_heads", 3, "text_hidden (128) must be a multiple of text_heads (3)"),
    ("train.metric", "accuracy", "train.metric: Input should be 'val_cider_d' or 'val_loss'"),
    ("train.batch_size", 12800, "train.batch_size (12800) exceeds the about 7399 "
                               "training items that data.synthetic.items leaves"),
    ("train.micro_batch", 7, "train.micro_batch (7) must divide train.batch_size (32)"),
])
def test_bad_values_are_reported_with_their_key_path(key, value, message):
    raw = copy.deepcopy(compose(["profile=offline"]))
    section, _, leaf = key.rpartition(".")
    node = raw
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert message in str(error.value)


def test_a_scratch_vision_width_that_the_grid_positions_cannot_split_in_quarters_is_refused():
    raw = copy.deepcopy(compose(["profile=offline"]))
    raw["model"]["scratch"].update(vision_hidden=126, vision_heads=3)
    with pytest.raises(ConfigError, match=r"model.scratch.vision_hidden \(126\) must be a multiple of 4"):
        parse_params(raw)


def test_all_problems_are_reported_at_once_and_typos_are_errors():
    raw = copy.deepcopy(compose([]))
    raw["train"]["lr"] = "x"
    raw["train"]["batch_sise"] = 4
    raw["data"]["source"] = "nowhere"
    del raw["seed"]
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    text = str(error.value)
    assert "4 problem(s)" in text
    for fragment in ("train.lr", "train.batch_sise: Extra inputs are not permitted", "data.source", "seed: Field required"):
        assert fragment in text


def test_source_needs_its_fields():
    raw = copy.deepcopy(compose([]))
    raw["data"]["hub_id"] = None
    with pytest.raises(ConfigError, match="data.source 'hub' needs data.hub_id"):
        parse_params(raw)
