"""GPU figures (run by benchmarks/gpu.sh): BLIP-base train-step throughput in bf16 and fp32 against the
original recipe, model FLOPs utilisation and peak GPU memory at batch 8 and 32. Prints a table and,
last, one JSON object."""

from __future__ import annotations

import json

import torch

from fashioncap.runtime import gpu_peak_tflops

from .common import machine
from .train_step import measure



def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: benchmarks/gpu.sh is for a machine with an NVIDIA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the original recipe's numbers
    name = torch.cuda.get_device_name(0)
    peak = gpu_peak_tflops(name)
    rows = []
    for batch in (8, 32):
        bf16 = measure("base", batch, repeats=10, precision="bf16", flops=True)
        fp32 = measure("base", batch, repeats=10, precision="no", baseline=True)
        row = {"batch": batch, "bf16_samples_s": batch / bf16["ours_s"], "fp32_samples_s": batch / fp32["ours_s"],
               "original_samples_s": batch / fp32["original_s"], "bf16_peak_gib": bf16["ours_peak_gib"],
               "fp32_peak_gib": fp32["ours_peak_gib"], "flops_per_step": bf16["ours_flops_per_step"]}
        row["speedup_vs_original"] = row["bf16_samples_s"] / row["original_samples_s"]
        row["mfu"] = bf16["ours_flops_per_step"] / bf16["ours_s"] / (peak * 1e12) if peak else None
        rows.append(row)
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(f"batch {batch}: bf16 {row['bf16_samples_s']:.1f} samples/s ({row['bf16_peak_gib']:.1f} GiB), "
              f"fp32 {row['fp32_samples_s']:.1f} ({row['fp32_peak_gib']:.1f} GiB), original recipe "
              f"{row['original_samples_s']:.1f}; {row['speedup_vs_original']:.2f}x the original; MFU {mfu}",
              flush=True)
    print(json.dumps({"machine": machine(), "peak_tflops": peak, "train": rows}))


if __name__ == "__main__":
    main()
