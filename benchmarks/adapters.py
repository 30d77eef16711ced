"""LoRA against full fine-tuning at BLIP-base size: disk per experiment, peak memory and time per training step
(each method in a fresh process), and the images/s of a merged adapter against the full model it equals."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .common import Result, median_seconds, offline_params, products
from .memory import measure


def serving_rate(size: str, images: int, repeats: int) -> tuple[float, float]:
    """Images/s of captioning with a full model and with an adapter on it, loaded merged (modeling.load_model),
    greedy, one batch; the same random weights for both."""
    import torch

    from fashioncap import adapters
    from fashioncap.modeling import caption_batch, load_model, save_model

    from .train_step import build_model, make_processor

    params = offline_params()
    shots = [p.image.resize((384, 384) if size == "base" else (params.model.image_size,) * 2)
             for p in products(images, 384)]
    processor = make_processor(size, [p.caption for p in products(32, 64)])
    generate = params.generate.model_copy(update={"max_new_tokens": 20, "min_length": 20, "num_beams": 1})
    with tempfile.TemporaryDirectory() as tmp:
        full_dir, adapter_dir = Path(tmp) / "full", Path(tmp) / "adapter"
        model = build_model(size, processor, attention="sdpa")
        save_model(model, processor, full_dir, params.generate)
        lora = adapters.add_lora(load_model(full_dir, "sdpa"), params.train.lora, False)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # a trained adapter is not zero
        save_model(lora, processor, adapter_dir, params.generate)
        from fashioncap.origin import resolve

        adapters.save_base(adapter_dir, resolve(str(full_dir)))
        rates = []
        for directory in (full_dir, adapter_dir):
            started = time.perf_counter()
            m = load_model(directory, "sdpa").eval()
            load_s = time.perf_counter() - started
            seconds = median_seconds(lambda: caption_batch(m, processor, shots, generate), repeats)
            rates.append((images / seconds, load_s))
    return rates[0], rates[1]


def run(level: str) -> list[Result]:
    batch, steps = {"full": (4, 2), "quick": (2, 1), "smoke": (2, 1)}[level]
    size = "offline" if level == "smoke" else "base"  # the smoke level proves the code path, not the figure
    name = "BLIP-base" if size == "base" else "offline BLIP"
    full = measure(batch, False, False, steps, size, "full")
    results = []
    for label, freeze, method in (("LoRA r=8 query/value", False, "lora"), ("frozen vision encoder", True, "full")):
        if level == "smoke" and method == "full":
            continue  # the smoke level proves the code paths: the frozen encoder's is the memory benchmark's
        m = measure(batch, freeze, False, steps, size, method)
        disk, base_disk = m["best_bytes"] * 2 + m["checkpoint_bytes"], full["best_bytes"] * 2 + full["checkpoint_bytes"]
        results.append(Result("adapters", f"{name} experiment on disk, {label}", "MB (DVC cache + MLflow + checkpoint)",
                              disk / 1e6, base_disk / 1e6, "full fine-tuning", target=20.0 if method == "lora" else None,
                              higher_is_better=False,
                              note=f"{disk / base_disk:.1%} of full; {m['trainable'] / 1e6:.2f}M trainable parameters"))
        results.append(Result("adapters", f"{name} train step, batch {batch}, {label}", "MiB peak RSS", m["peak_mib"],
                              full["peak_mib"], "full fine-tuning", higher_is_better=False,
                              note=f"step {m['step_s']:.1f} s vs {full['step_s']:.1f} s full"))
    (full_rate, full_load), (merged_rate, merged_load) = serving_rate(size, 4 if level == "full" else 2,
                                                                      3 if level == "full" else 1)
    results.append(Result("adapters", f"{name} captioning, merged LoRA version", "images/s", merged_rate, full_rate,
                          "full version", target=0.95,
                          note=f"load {merged_load:.1f} s (base + adapter, merged) vs {full_load:.1f} s"))
    return results
