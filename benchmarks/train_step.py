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
import time

import torch
from PIL import Image

from .common import Result, jpeg, median_seconds, offline_params, products

RAW_SIDE = 1024  # catalogue photos as shops have them


def build_model(size: str, processor, seed: int = 0, attention: str = "eager"):
    """The same architecture for both recipes: the offline BLIP, or BLIP-base from its default config
    (random weights: speed does not depend on them). 512 text positions so the original padding fits.
    `attention` as model.attention takes it (sdpa: this project's; eager: transformers' own)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, set_seed

    from fashioncap.modeling import scratch_config, with_attention

    params = offline_params()
    set_seed(seed)
    if size == "base":
        config = BlipConfig()
    else:
        config = scratch_config(params.model, processor.tokenizer)
        config.text_config.max_position_embeddings = 512
    return with_attention(BlipForConditionalGeneration(config), attention)


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


class ProcessorCollator:
    """The collator as it was before the vectorised pixel path: BLIP's image processor (PIL and numpy)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows):
        batch = self.collate(rows)
        batch["pixel_values"] = self.collate.processor.image_processor(
            [r["image"] for r in rows], return_tensors="pt")["pixel_values"]
        return batch


def stored_rows(rows):
    """The rows as the DataLoader hands them to the collator: the stored JPEG decoded by PIL."""
    return [{"image": Image.open(io.BytesIO(r["stored"])), "caption": r["caption"]} for r in rows]


def ours_step(model, processor, optimizer, accelerator, collate, rows, clip: float, batch=None, micro=None):
    """One training step as train runs it (decode + collate + forward/backward in micro-batches of `micro` +
    clip + AdamW); with `batch`, the model part alone on an already collated batch."""
    from fashioncap.train import token_loss_sum

    if batch is None:
        batch = collate(stored_rows(rows))
    batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
    tokens = (batch["labels"][:, 1:] != -100).sum()
    size = micro or len(batch["labels"])
    for start in range(0, len(batch["labels"]), size):
        loss = token_loss_sum(model, {k: v[start : start + size] for k, v in batch.items()}, 0.0) / tokens
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
            flops: bool = False, freeze_vision: bool = False, attention: str = "sdpa", compile: bool = False,
            pixels: str = "ours", micro: int | None = None, deterministic: bool = False,
            compile_backend: str = "inductor") -> dict:
    """Seconds per step of both recipes (and peak GPU memory, FLOPs per step where asked). Ours is timed
    whole (`ours_s`: decode, collate, step) and as its model part alone (`model_s`); `collate_s` is the
    input pipeline alone. `pixels="processor"` collates through BLIP's image processor, as before.
    `compile_backend` is torch.compile's (Inductor, as train.compile uses it)."""
    from accelerate import Accelerator

    from fashioncap.fingerprint import set_determinism
    from fashioncap.modeling import Collator, apply_memory_options
    from fashioncap.train import make_optimizer, mixed_precision

    set_determinism(deterministic)  # as train sets it: the CPU always, a GPU when asked

    params = offline_params()
    side = 384 if size == "base" else params.model.image_size
    items = catalogue_batches(batch, side)
    processor = make_processor(size, [r["caption"] for r in items])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each measurement chooses its own precision
    accelerator = Accelerator(mixed_precision=mixed_precision(precision), cpu=not torch.cuda.is_available())
    device = accelerator.device
    out: dict = {"size": size, "batch": batch, "precision": accelerator.mixed_precision, "device": device.type}

    model = apply_memory_options(build_model(size, processor, attention=attention), freeze_vision, False)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    collate = Collator(processor, params.model.max_caption_tokens, model.config.text_config.bos_token_id)
    if pixels == "processor":
        collate = ProcessorCollator(collate)
    optimizer = make_optimizer(model, params.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    step_model = torch.compile(model, dynamic=False, backend=compile_backend) if compile else model
    model.train()
    collated = collate(stored_rows(items))

    def ours(batch=None):
        ours_step(step_model, processor, optimizer, accelerator, collate, items, params.train.clip_grad_norm, batch,
                  micro)
        _sync(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if compile:  # the first step traces and compiles forward and backward: timed apart, as what compile costs
        started = time.perf_counter()
        ours(collated)
        out["first_step_s"] = time.perf_counter() - started
    out["ours_s"] = median_seconds(ours, repeats)
    out["model_s"] = median_seconds(lambda: ours(collated), repeats, warmup=0)
    out["collate_s"] = median_seconds(lambda: collate(stored_rows(items)), max(repeats, 5))
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
        # the same step before SDPA and the vectorised pixels: transformers' eager attention, the image processor
        before = measure(size, batch, repeats, baseline=False, attention="eager", pixels="processor")
        results.append(Result("train throughput", f"{label}, SDPA + vectorised pixels", "samples/s",
                              batch / m["ours_s"], batch / before["ours_s"], "eager attention, image processor",
                              target=1.5 if size == "base" else None,
                              note=f"model step alone {batch / m['model_s']:.3g} vs {batch / before['model_s']:.3g}"))
        if size == "base" and level == "full":  # another recipe: the text decoder only
            frozen = measure(size, batch, repeats, baseline=False, freeze_vision=True)
            results.append(Result("train throughput", f"{label}, train.freeze_vision", "samples/s",
                                  batch / frozen["ours_s"], batch / m["original_s"], "original recipe",
                                  note="trains the text decoder only"))
            # train.compile: Inductor's C++ code for forward and backward; its compile time is paid once per run
            compiled = measure(size, batch, repeats, baseline=False, compile=True)
            results.append(Result("train throughput", f"{label}, train.compile", "samples/s",
                                  batch / compiled["model_s"], batch / m["model_s"], "eager (train.compile false)",
                                  note=f"model step alone; first step (trace + compile) "
                                       f"{compiled['first_step_s']:.0f} s"))
    return results
