"""Training throughput: this project's train step against the original recipe on the same model and data.

Original recipe: the processor decodes and resizes the full-size photo inside the loop, every caption
is padded to 512 tokens, no attention mask, pads count in the loss, fp32, plain AdamW.
This project: images stored at the model's size (prepare did the resize once), captions padded to the
longest in the batch with an attention mask, Accelerate (`train.mixed_precision` auto: bf16 autocast on a GPU
and on a CPU that computes bf16 natively), AdamW without decay
on norms and biases (fused on a GPU).
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from .common import Result, jpeg, median_seconds, offline_params, products

RAW_SIDE = 1024  # catalogue photos as shops have them


def build_model(size: str, processor, seed: int = 0):
    """The same architecture for both recipes: the offline BLIP, or BLIP-base from its default config
    (random weights: speed does not depend on them). 512 text positions so the original padding fits."""
    from transformers import BlipConfig, BlipForConditionalGeneration, set_seed

    from fashioncap.modeling import scratch_config

    params = offline_params()
    set_seed(seed)
    if size == "base":
        config = BlipConfig()
    else:
        config = scratch_config(params.model, processor.tokenizer)
        config.text_config.max_position_embeddings = 512
    return BlipForConditionalGeneration(config)


def make_processor(size: str, captions: list[str]):
    from transformers import BlipImageProcessor, BlipProcessor

    from fashioncap.modeling import build_tokenizer

    side = 384 if size == "base" else offline_params().model.image_size
    return BlipProcessor(image_processor=BlipImageProcessor(size={"height": side, "width": side}),
                         tokenizer=build_tokenizer(captions))


def catalogue_batches(n: int, side: int):
    """n items: the raw photo (JPEG at RAW_SIDE) and the stored, pre-resized image (what prepare keeps)."""
    from fashioncap.imaging import encode_image, to_model_image

    items = []
    for p in products(n, RAW_SIDE):
        raw = jpeg(p.image)
        items.append({"raw": raw, "stored": encode_image(to_model_image(raw, side), "jpeg"), "caption": p.caption})
    return items


def ours_step(model, processor, optimizer, accelerator, collate, rows, clip: float):
    batch = collate([{"image": Image.open(io.BytesIO(r["stored"])), "caption": r["caption"]} for r in rows])
    batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
    loss = model(**batch).loss
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def original_step(model, processor, optimizer, device, rows):
    images = [Image.open(io.BytesIO(r["raw"])).convert("RGB") for r in rows]
    inputs = processor(images=images, text=[r["caption"] for r in rows], padding="max_length", max_length=512,
                       truncation=True, return_tensors="pt")
    input_ids = inputs["input_ids"].to(device)
    loss = model(input_ids=input_ids, pixel_values=inputs["pixel_values"].to(device), labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(size: str, batch: int, repeats: int, precision: str = "auto", baseline: bool = True,
            flops: bool = False, freeze_vision: bool = False) -> dict:
    """Samples/s of both recipes (and peak GPU memory, FLOPs per step where asked)."""
    from accelerate import Accelerator

    from fashioncap.modeling import Collator, apply_memory_options
    from fashioncap.train import make_optimizer, mixed_precision

    params = offline_params()
    side = 384 if size == "base" else params.model.image_size
    items = catalogue_batches(batch, side)
    processor = make_processor(size, [r["caption"] for r in items])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each measurement chooses its own precision
    accelerator = Accelerator(mixed_precision=mixed_precision(precision), cpu=not torch.cuda.is_available())
    device = accelerator.device
    out: dict = {"size": size, "batch": batch, "precision": accelerator.mixed_precision, "device": device.type}

    model = apply_memory_options(build_model(size, processor), freeze_vision, False)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    collate = Collator(processor, params.model.max_caption_tokens, model.config.text_config.bos_token_id)
    optimizer = make_optimizer(model, params.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def ours():
        ours_step(model, processor, optimizer, accelerator, collate, items, params.train.clip_grad_norm)
        _sync(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out["ours_s"] = median_seconds(ours, repeats)
    if device.type == "cuda":
        out["ours_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            ours()
        out["ours_flops_per_step"] = counter.get_total_flops()
    del model, optimizer
    accelerator.free_memory()

    if baseline:
        model = build_model(size, processor).to(device)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr)

        def original():
            original_step(model, processor, optimizer, device, items)
            _sync(device)

        out["original_s"] = median_seconds(original, repeats)
        del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run(level: str) -> list[Result]:
    results = []
    settings = {"full": [("offline", 32, 10), ("base", 8, 3)], "quick": [("offline", 16, 2), ("base", 1, 1)],
                "smoke": [("offline", 8, 1)]}[level]
    for size, batch, repeats in settings:
        m = measure(size, batch, repeats)
        precision = "bf16" if m["precision"] == "bf16" else "fp32"
        label = f"{'BLIP-base (224M)' if size == 'base' else 'offline BLIP (0.9M)'}, batch {batch}, {m['device']} {precision}"
        results.append(Result("train throughput", label, "samples/s", batch / m["ours_s"], batch / m["original_s"],
                              "original recipe", target=2.0 if size == "base" else None))
        if size == "base" and level == "full":  # another recipe: the text decoder only
            frozen = measure(size, batch, repeats, baseline=False, freeze_vision=True)
            results.append(Result("train throughput", f"{label}, train.freeze_vision", "samples/s",
                                  batch / frozen["ours_s"], batch / m["original_s"], "original recipe",
                                  note="trains the text decoder only"))
    return results
