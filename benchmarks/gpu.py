"""GPU figures (run by benchmarks/gpu.sh): BLIP-base train-step throughput in bf16 and fp32 against the
original recipe, model FLOPs utilisation and peak GPU memory at batch 8 and 32. Prints a table and,
last, one JSON object."""

from __future__ import annotations

import json

import torch

from fashioncap.runtime import gpu_peak_tflops

from .common import machine
from .train_step import measure



LEVERS = {  # each changes one thing of the default recipe (bf16, SDPA, the whole batch at once, not deterministic)
    "micro-batch 8 (8 x 4 accumulation)": {"micro": 8},
    "deterministic": {"deterministic": True},
    "eager attention": {"attention": "eager"},
    "torch.compile": {"compile": True},
    "fp16 + gradient scaler": {"precision": "fp16"},
    "fp32": {"precision": "no"},
}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: benchmarks/gpu.sh is for a machine with an NVIDIA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the original recipe's numbers
    name = torch.cuda.get_device_name(0)
    peak = gpu_peak_tflops(name)
    batch, rows = 32, []
    ours = measure("base", batch, repeats=10, precision="bf16", flops=True, baseline=True)
    flops = ours["ours_flops_per_step"]

    def row(label: str, m: dict) -> dict:
        r = {"setting": label, "samples_s": batch / m["ours_s"], "model_samples_s": batch / m["model_s"],
             "collate_samples_s": batch / m["collate_s"], "peak_gib": m["ours_peak_gib"],
             "mfu": flops / m["model_s"] / (peak * 1e12) if peak else None}
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"batch {batch}, {label}: {r['samples_s']:.1f} samples/s (model alone {r['model_samples_s']:.1f}, "
              f"MFU {mfu}, input pipeline {r['collate_samples_s']:.0f}), {r['peak_gib']:.1f} GiB", flush=True)
        return r

    rows.append(row("default recipe (bf16, SDPA, batch at once)", ours))
    for label, change in LEVERS.items():
        rows.append(row(label, measure("base", batch, repeats=10, **{"precision": "bf16", "baseline": False, **change})))
    original = batch / ours["original_s"]
    print(f"original recipe: {original:.1f} samples/s; the default recipe is {rows[0]['samples_s'] / original:.2f}x")
    print(json.dumps({"machine": machine(), "peak_tflops": peak, "flops_per_step": flops,
                      "original_samples_s": original, "train": rows}))


if __name__ == "__main__":
    main()
