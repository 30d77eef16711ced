"""GPU figures (run by benchmarks/gpu.sh): BLIP-base train-step throughput, model FLOPs utilisation and peak GPU
memory at batch 8 and 32, for the default recipe (bf16, SDPA, the whole batch at once), each lever of it in turn
and the original recipe. Prints a line per setting and, last, one JSON object.

`--dry-run` runs every setting on the CPU with the offline model at batch 2 and 4, one repeat: the script's own
code end to end, on a machine without a GPU (CI runs it). The levers that need CUDA say so and are left out;
torch.compile runs there without Inductor (DRY_RUN_COMPILE_BACKEND)."""

from __future__ import annotations

import argparse
import json

import torch

from fashioncap.runtime import gpu_peak_tflops

from .common import machine
from .train_step import measure

BATCHES = {"gpu": (8, 32), "dry-run": (2, 4)}
REPEATS = {"gpu": 10, "dry-run": 1}
NEEDS_CUDA = {"fp16 + gradient scaler"}  # Accelerate's fp16 (its gradient scaler) is for a GPU
# the dry run compiles without Inductor: its C++ code for the CPU takes a minute a batch and is not the code a GPU
# runs (Triton); what the dry run proves is the script's own path through torch.compile
DRY_RUN_COMPILE_BACKEND = "eager"


def levers(batch: int) -> dict[str, dict]:
    """Each changes one thing of the default recipe (bf16, SDPA, the whole batch at once, not deterministic)."""
    micro = max(1, batch // 4)
    return {f"micro-batch {micro} ({micro} x {batch // micro} accumulation)": {"micro": micro},
            "deterministic": {"deterministic": True},
            "eager attention": {"attention": "eager"},
            "torch.compile": {"compile": True},
            "fp16 + gradient scaler": {"precision": "fp16"},
            "fp32": {"precision": "no"}}


def row(batch: int, label: str, m: dict, flops: float, peak_tflops: float | None) -> dict:
    """One setting's figures, printed as it ends (a later setting that fails cannot lose them)."""
    r = {"batch": batch, "setting": label, "samples_s": batch / m["ours_s"], "model_samples_s": batch / m["model_s"],
         "collate_samples_s": batch / m["collate_s"], "peak_gib": m.get("ours_peak_gib"),
         "first_step_s": m.get("first_step_s"),
         "mfu": flops / m["model_s"] / (peak_tflops * 1e12) if peak_tflops else None}
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    memory = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "no GPU memory"
    compiled = f", first step {r['first_step_s']:.1f} s" if r["first_step_s"] is not None else ""
    print(f"batch {batch}, {label}: {r['samples_s']:.1f} samples/s (model alone {r['model_samples_s']:.1f}, "
          f"MFU {mfu}, input pipeline {r['collate_samples_s']:.0f}), {memory}{compiled}", flush=True)
    return r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="the offline model on the CPU at tiny batches")
    args = parser.parse_args(argv)
    mode = "dry-run" if args.dry_run else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: benchmarks/gpu.sh is for a machine with an NVIDIA GPU (--dry-run: the CPU)")
    size, repeats = "offline" if args.dry_run else "base", REPEATS[mode]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the original recipe's numbers
    peak = gpu_peak_tflops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    rows, original, left_out = [], {}, []
    for batch in BATCHES[mode]:
        ours = measure(size, batch, repeats=repeats, precision="bf16", flops=True, baseline=True)
        flops = ours["ours_flops_per_step"]
        default = row(batch, "default recipe (bf16, SDPA, batch at once)", ours, flops, peak)
        rows.append(default)
        for label, change in levers(batch).items():
            if label in NEEDS_CUDA and not torch.cuda.is_available():
                left_out.append(f"batch {batch}, {label}")
                print(f"batch {batch}, {label}: left out (needs CUDA)", flush=True)
                continue
            if "compile" in change and args.dry_run:
                change = {**change, "compile_backend": DRY_RUN_COMPILE_BACKEND}
            m = measure(size, batch, repeats=repeats, **{"precision": "bf16", "baseline": False, **change})
            rows.append(row(batch, label, m, flops, peak))
        original[batch] = batch / ours["original_s"]
        print(f"batch {batch}, original recipe: {original[batch]:.1f} samples/s; the default recipe is "
              f"{default['samples_s'] / original[batch]:.2f}x", flush=True)
    print(json.dumps({"machine": machine(), "mode": mode, "size": size, "peak_tflops": peak,
                      "original_samples_s": original, "left_out": left_out, "train": rows}))


if __name__ == "__main__":
    main()
