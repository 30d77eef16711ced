"""Memory: peak RSS of BLIP-base-size training steps with and without the memory options (gradient
checkpointing, frozen vision encoder), each in a fresh process so the peaks don't mix."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from .common import Result


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to the process's own address space; getrusage's
    maxrss would also count the parent's peak at the time it forked this process."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(batch: int, freeze_vision: bool, checkpointing: bool, steps: int, size: str = "base",
          method: str = "full") -> dict:
    """Train steps (the first allocates the optimizer state, so one holds both peaks: activations in the
    backward pass, then weights + gradients + optimizer state); returns the process's peak RSS. `method`
    lora: with train.lora's default adapters; the bytes a best model and a checkpoint then take are measured
    by writing them as train does."""
    import time

    import torch

    from fashioncap.modeling import Collator, apply_memory_options
    from fashioncap.train import make_optimizer

    from .common import offline_params
    from .train_step import build_model, catalogue_batches, make_processor, ours_step

    params = offline_params()
    items = catalogue_batches(batch, 384 if size == "base" else params.model.image_size)
    processor = make_processor(size, [r["caption"] for r in items])
    model = apply_memory_options(build_model(size, processor), freeze_vision, checkpointing)
    if method == "lora":
        from fashioncap.adapters import add_lora

        model = add_lora(model, params.train.lora.model_copy(update={"targets": ["query", "value"]}), freeze_vision)
    model.train()
    collate = Collator(processor, params.model.max_caption_tokens, model.config.text_config.bos_token_id)
    optimizer = make_optimizer(model, params.train)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    started = time.perf_counter()
    for _ in range(steps):
        ours_step(model, processor, optimizer, accelerator, collate, items, params.train.clip_grad_norm)
    seconds = (time.perf_counter() - started) / steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = peak_rss_mib()  # before the writes below (they map files, not the training's memory)
    return {"peak_mib": peak, "step_s": seconds, "trainable": trainable, "threads": torch.get_num_threads(),
            **saved_bytes(model, processor, optimizer, params)}


def saved_bytes(model, processor, optimizer, params) -> dict:
    """What one experiment writes, as train writes it: the best model (the DVC-cached output; the registered
    version's artifact is the same files) and a full-state checkpoint (weights or adapter, AdamW's moments)."""
    import tempfile
    from pathlib import Path

    import torch

    from fashioncap import adapters
    from fashioncap.modeling import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, processor, Path(tmp) / "best", params.generate)
        if adapters.is_adapted(model):
            adapters.save_base(Path(tmp) / "best", {"init": "models:/fashion-captioner/1", "kind": "registry"})
        torch.save({"model": adapters.trainable_state(model), "optimizer": optimizer.state_dict()},
                   Path(tmp) / "state.pt")
        best = sum(f.stat().st_size for f in (Path(tmp) / "best").rglob("*") if f.is_file())
        return {"best_bytes": best, "checkpoint_bytes": (Path(tmp) / "state.pt").stat().st_size}


def measure(batch: int, freeze_vision: bool, checkpointing: bool, steps: int, size: str = "base",
            method: str = "full") -> dict:
    args = [sys.executable, "-m", "benchmarks.memory", "--batch", str(batch), "--steps", str(steps), "--size", size,
            "--method", method]
    args += ["--freeze-vision"] if freeze_vision else []
    args += ["--gradient-checkpointing"] if checkpointing else []
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"memory benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(level: str) -> list[Result]:
    batch, steps = {"full": (8, 2), "quick": (2, 1), "smoke": (2, 1)}[level]
    size = "offline" if level == "smoke" else "base"  # the smoke level proves the code path, not the figure
    name = "BLIP-base" if size == "base" else "offline BLIP"
    plain = measure(batch, False, False, steps, size)
    results = []
    for label, freeze, ckpt in (("gradient checkpointing", False, True), ("frozen vision encoder", True, False),
                                ("both", True, True)):
        if level != "full" and label != "both":
            continue
        m = measure(batch, freeze, ckpt, steps, size)
        results.append(Result("memory", f"{name} train step, batch {batch}, {label}", "MiB peak RSS",
                              m["peak_mib"], plain["peak_mib"], "no memory options", target=1 / 0.6,
                              higher_is_better=False,
                              note=f"{1 - m['peak_mib'] / plain['peak_mib']:.0%} lower; step {m['step_s']:.1f} s "
                                   f"vs {plain['step_s']:.1f} s"))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--freeze-vision", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", choices=["base", "offline"], default="base")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    a = parser.parse_args()
    print(json.dumps(child(a.batch, a.freeze_vision, a.gradient_checkpointing, a.steps, a.size, a.method)))
