"""Replay: which of the init's training items are mixed in, decided by key and seed alone."""

import random

import pytest

from fashioncap.config import AUTO_REPLAY, parse_params
from fashioncap.replay import draw, fraction
from tests.conftest import compose

KEYS = [f"synthetic-{i:06d}" for i in range(500)]


def test_the_same_items_are_drawn_whatever_the_order_they_are_read_in():
    chosen = {KEYS[i] for i in draw(KEYS, 125, seed=42)}
    shuffled = random.Random(7).sample(KEYS, len(KEYS))
    assert {shuffled[i] for i in draw(shuffled, 125, seed=42)} == chosen and len(chosen) == 125
    assert {KEYS[i] for i in draw(KEYS, 125, seed=43)} != chosen  # the seed decides
    assert {KEYS[i] for i in draw(KEYS, 60, seed=42)} < chosen  # a smaller share is a subset of a larger one
    assert draw(KEYS, 0, seed=42) == [] and len(draw(KEYS, 10_000, seed=42)) == len(KEYS)


def test_auto_replays_only_for_an_init_from_the_registry():
    params = parse_params(compose(["profile=offline-adapt"]))
    assert params.data.replay == "auto"
    assert fraction(params.data, {"kind": "registry"}) == AUTO_REPLAY > 0
    for kind in ("scratch", "hub", "local"):
        assert fraction(params.data, {"kind": kind}) == 0.0
    explicit = parse_params(compose(["profile=offline-adapt", "data.replay=0.1"]))
    assert fraction(explicit.data, {"kind": "registry"}) == 0.1


def test_replay_from_an_init_outside_the_registry_is_a_params_error():
    from fashioncap.config import ConfigError

    with pytest.raises(ConfigError, match="data.replay 0.1 replays the training data of model.init's registry "
                                          "version, and model.init 'scratch' is none"):
        parse_params(compose(["profile=offline", "data.replay=0.1"]))
    assert parse_params(compose(["profile=offline", "data.replay=0"])).data.replay == 0.0
