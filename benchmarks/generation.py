"""Caption generation: the evaluate stage's batched generate() (KV cache on, `train.mixed_precision` auto as
this process resolves it: bf16 autocast where the CPU computes bf16 natively) against one image at a time
in fp32."""

from __future__ import annotations

import torch

from .common import Result, median_seconds, offline_params, products
from .train_step import build_model, make_processor


def measure(size: str, n_images: int, beams: int, repeats: int, attention: str = "sdpa", single: bool = True,
            full_length: bool = False) -> dict:
    from fashioncap.fingerprint import mixed_precision
    from fashioncap.modeling import caption_all, caption_batch

    params = offline_params(f"generate.num_beams={beams}", "generate.min_length=0")
    if full_length:  # the served model's start-up check: every caption as long as the limit allows
        params = offline_params(f"generate.num_beams={beams}", "generate.max_new_tokens=64",
                                "model.max_caption_tokens=64", "generate.min_length=64")
    side = 384 if size == "base" else params.model.image_size
    items = products(n_images, side)
    processor = make_processor(size, [p.caption for p in items])
    model = build_model(size, processor, attention=attention).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    images = [p.image for p in items]
    precision = mixed_precision("auto")
    # random weights rarely say "stop": both ways generate max_new_tokens for every image
    batched = median_seconds(lambda: caption_all(model, processor, images, params.generate, quiet=True,
                                                 precision=precision), repeats)
    single = median_seconds(lambda: [caption_batch(model, processor, [im], params.generate) for im in images],
                            repeats) if single else None
    return {"batched_s": batched, "single_s": single, "batch_size": params.generate.batch_size,
            "max_new_tokens": params.generate.max_new_tokens, "precision": "bf16" if precision == "bf16" else "fp32"}


def run(level: str) -> list[Result]:
    results = []
    n = {"full": 64, "quick": 16, "smoke": 4}[level]
    settings = [("offline", n, 1), ("offline", n, 3)]
    if level == "full":
        settings += [("base", 8, 1), ("base", 8, 3)]
    for size, n, beams in settings:
        m = measure(size, n, beams, repeats={"smoke": 1, "quick": 2}.get(level, 3 if size == "base" else 5))
        name = "BLIP-base" if size == "base" else "offline BLIP"
        mode = "greedy" if beams == 1 else f"{beams} beams"
        label = f"{name}, {n} images, {mode}, batch {min(n, m['batch_size'])}, {m['precision']}"
        results.append(Result("caption generation", label, "images/s", n / m["batched_s"], n / m["single_s"],
                              "one image at a time", target=2.0))
        if size == "base":  # the same batched captioning with transformers' eager attention
            eager = measure(size, n, beams, 3, attention="eager", single=False)
            results.append(Result("caption generation", f"{label}, SDPA", "images/s", n / m["batched_s"],
                                  n / eager["batched_s"], "eager attention", target=2.0 if beams == 1 else None))
    if level == "full":  # one caption of 3 beams at the full 64 tokens, as the served model's start-up times it
        full, eager = (measure("base", 1, 3, 3, attention=a, single=False, full_length=True) for a in ("sdpa", "eager"))
        results.append(Result("caption generation", f"BLIP-base, 1 image, 3 beams x 64 tokens (warm), {full['precision']}",
                              "s", full["batched_s"], eager["batched_s"], "eager attention (warm)",
                              higher_is_better=False, target=3.0,
                              note="the target was set against a cold call on another CPU: see docs"))
    return results
