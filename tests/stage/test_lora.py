"""train.method lora: adapters on the layers asked for, trained alone, saved alone with their pinned base,
resumed bit for bit after a kill, merged at load, and registered as versions that serve like full ones."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import yaml

from fashioncap import adapters, origin, promotion
from fashioncap.config import ConfigError, parse_params
from fashioncap.register import register
from tests.conftest import new_run, png_b64, table, train_outputs

NAME = "fashion-captioner"


def lora_raw(tiny_raw, init: str, **train) -> dict:
    """The tiny params adapting `init` with LoRA, at a learning rate that moves the adapters in 12 steps."""
    return {**tiny_raw, "model": {**tiny_raw["model"], "init": init},
            "train": {**tiny_raw["train"], "method": "lora", "lr": 5e-3, **train}}


def test_adapters_go_on_the_text_decoders_query_and_value_and_on_vision_qkv_only_when_asked(tiny_params,
                                                                                           tiny_model):
    import re

    from fashioncap.modeling import load_model

    model = load_model(tiny_model[0], "sdpa")
    names = [n for n, _ in model.named_modules()]

    def targeted(targets, freeze):
        return {n for n in names if re.fullmatch(adapters.target_pattern(targets, freeze), n)}

    text = targeted(["query", "value"], False)
    assert text and all(n.startswith("text_decoder.") and n.endswith((".query", ".value")) for n in text)
    assert any(".crossattention." in n for n in text)  # cross-attention over the image too
    both = targeted(["query", "value", "qkv"], False)
    assert {n for n in both - text} and all(n.startswith("vision_model.") for n in both - text)
    assert targeted(["query", "value", "qkv"], True) == text  # a frozen vision encoder gets no adapters
    lora = tiny_params.train.lora.model_copy(update={"targets": ["nothing_here"]})
    with pytest.raises(adapters.AdapterError, match=r"train.lora.targets \['nothing_here'\] name no layer"):
        adapters.add_lora(model, lora, False)


def test_lora_needs_a_pretrained_init(tiny_raw):
    with pytest.raises(ConfigError, match="train.method lora adapts a pretrained model"):
        parse_params({**tiny_raw, "train": {**tiny_raw["train"], "method": "lora"}})


@pytest.fixture
def adapted(registry_env, tiny_raw, tmp_path):
    """Version 1: the tiny model (champion); an adapter trained on it, from model.init @champion."""
    from fashioncap.train import train

    client, model_dir, data_dir = registry_env
    base = parse_params(copy.deepcopy(tiny_raw))
    register(base, new_run(base), model_dir, data_dir, table(1.0))
    client.set_registered_model_alias(NAME, promotion.CHAMPION, "1")
    params = parse_params(lora_raw(tiny_raw, f"models:/{NAME}@champion"))
    init = origin.load(params.model.init, None, tmp_path / "init")
    summary = train(params, data_dir, train_outputs(tmp_path / "run"), init)
    return client, params, init, summary, tmp_path / "run" / "best", data_dir


def test_an_adapter_is_saved_alone_with_its_pinned_base_and_loads_merged(adapted):
    import torch
    from safetensors.torch import load_file

    from fashioncap.modeling import load_model

    client, params, init, summary, best, _ = adapted
    assert summary["method"] == "lora" and 0 < summary["trainable_parameters"] < summary["parameters"] / 10
    assert not (best / "model.safetensors").exists()
    assert json.loads((best / adapters.BASE_FILE).read_text()) == init.record
    assert init.record["version"] == "1" and init.record["alias"] == "champion"
    saved = load_file(best / "adapter_model.safetensors")
    assert all("lora_" in k for k in saved) and sum(v.numel() for v in saved.values()) == summary["trainable_parameters"]
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained: B starts at zero
    merged = load_model(best, "sdpa")  # the base fetched from the registry, not from `init`'s copy
    base = load_model(init.source, "sdpa")
    differs = [n for (n, a), (_, b) in zip(merged.state_dict().items(), base.state_dict().items()) if not torch.equal(a, b)]
    assert differs and all(n.endswith(("query.weight", "value.weight")) for n in differs)
    assert type(merged).__name__ == "BlipForConditionalGeneration"  # a plain BLIP: no adapter layers left
    assert not any("lora" in n for n, _ in merged.named_modules())


def test_an_adapter_version_registers_its_base_serves_and_fails_by_name_without_it(adapted):
    import base64
    import io
    from pathlib import Path

    import mlflow
    import pandas as pd
    from PIL import Image
    from transformers import BlipProcessor

    from fashioncap.fingerprint import mixed_precision
    from fashioncap.modeling import caption_batch, load_model

    client, params, init, summary, best, data_dir = adapted
    run_id = new_run(params)
    assert register(params, run_id, best, data_dir, table(1.5), init.record) == "2"
    mv = client.get_model_version(NAME, "2")
    assert (mv.tags["method"], mv.tags["base"], mv.tags["init_version"]) == ("lora", f"models:/{NAME}/1", "1")
    assert f"LoRA adapter (r={params.train.lora.r}" in mv.description and f"models:/{NAME}/1" in mv.description
    stored = mlflow.artifacts.download_artifacts(f"models:/{NAME}/2")
    sizes = {p.name: p.stat().st_size for p in Path(stored).rglob("*") if p.is_file()}
    assert "model.safetensors" not in sizes and "adapter_model.safetensors" in sizes  # never a copy of the base
    assert promotion.promote(client, NAME).moved == [f"{NAME}@previous: nothing -> version 1",
                                               f"{NAME}@champion: version 1 -> version 2"]

    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    image = png_b64((30, 160, 40))
    processor = BlipProcessor.from_pretrained(best)
    # in the precision the served model resolves on this CPU (bf16 where it is native): a tiny model's greedy
    # captions part ways under another rounding
    expected = caption_batch(load_model(best, params.model.attention), processor,
                             [Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")], params.generate,
                             mixed_precision(params.train.mixed_precision))
    assert list(served.predict(pd.DataFrame({"image": [image]}))) == expected  # the merged adapter serves

    client.delete_model_version(NAME, "1")  # the base is gone
    with pytest.raises(Exception, match=f"models:/{NAME}/1"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/2").predict(pd.DataFrame({"image": [image]}))


def test_an_adapter_on_a_local_directory_is_not_registered(registry_env, tiny_raw, tmp_path):
    from fashioncap.runtime import FashioncapError
    from fashioncap.train import train

    client, model_dir, data_dir = registry_env
    params = parse_params(lora_raw(tiny_raw, str(model_dir), max_steps=6, eval_every=6))
    train(params, data_dir, train_outputs(tmp_path / "run"))
    with pytest.raises(FashioncapError, match="must name a base that serving can load again.*local directory"):
        register(params, new_run(params), tmp_path / "run" / "best", data_dir, table(1.0))
    assert client.search_model_versions(f"name = '{NAME}'") == []


@pytest.mark.slow
def test_a_lora_training_resumes_after_a_kill_to_the_same_bits_and_runs_as_two_ddp_processes(
        tmp_path, tiny_raw, tiny_model, write_params):
    """One straight run; one killed after a checkpoint and resumed, to the same bits; and the same training
    under `accelerate launch` with two processes (gloo on the CPU), whose adapter gradients synchronise like a
    full model's over a model that is mostly frozen, to nearly the same losses."""
    import csv
    import os
    import subprocess

    import torch

    from fashioncap import checkpoint
    from tests.conftest import BIN, REPO, train_command
    from tests.stage.test_resume import killed_after_checkpoint, start

    model_dir, data_dir = tiny_model
    params = write_params(lora_raw(tiny_raw, str(model_dir), max_steps=12, eval_every=4, checkpoint_every=4,
                                   patience=10))
    straight, crashed, two = tmp_path / "straight", tmp_path / "crashed", tmp_path / "two"
    assert start(straight, params, data_dir).wait(timeout=600) == 0, (straight / "stderr.log").read_text()[-3000:]
    killed_after_checkpoint(crashed, params, data_dir, 4, poll=0.005)
    held = torch.load(crashed / "ckpt" / "state" / checkpoint.STATE_FILE, weights_only=True)["model"]
    assert held and all("lora_" in k for k in held)  # the checkpoint holds the adapter, not the base
    for output in ("best", "run.json"):
        shutil.rmtree(crashed / output) if (crashed / output).is_dir() else (crashed / output).unlink(missing_ok=True)
    assert start(crashed, params, data_dir).wait(timeout=600) == 0, (crashed / "stderr.log").read_text()[-3000:]
    assert "resuming from the checkpoint of step" in (crashed / "stderr.log").read_text()
    for name in ("train_log.csv", "val_log.csv", "best/adapter_model.safetensors"):
        assert (crashed / name).read_bytes() == (straight / name).read_bytes(), name

    two.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{two / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    launch = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "conf/accelerate/ddp_cpu.yaml")]
    ddp = subprocess.run([*launch, *train_command(two, params, data_dir)[1:]], cwd=two, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads((two / "train.json").read_text())["processes"] == 2
    assert (two / "best/adapter_model.safetensors").is_file() and not (two / "best/model.safetensors").exists()
    # the same global batch split over two processes: the same recipe, so nearly the same losses
    losses = {d: [float(r["loss"]) for r in csv.DictReader(open(d / "train_log.csv"))] for d in (straight, two)}
    assert len(losses[two]) == len(losses[straight]) == 12
    assert all(abs(a - b) / b < 0.01 for a, b in zip(losses[two], losses[straight])), losses
