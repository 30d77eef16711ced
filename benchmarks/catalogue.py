"""Catalogue captioning: `fashioncap caption-catalogue` on Spark in local mode (local[2]: one task per core,
one torch thread each) against `fashioncap caption` (one process, the model's own batches) over the same
folder of product photos, with the same offline-size champion. Wall time of each command, start-up
(JVM, Python workers, model loads) included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Result, products
from .serving import champion


def _timed(args: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started, proc.stdout


def run(level: str) -> list[Result]:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return []  # the [spark] extra is not installed
    n = {"full": 1024, "quick": 256, "smoke": 16}[level]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, **champion(root, "offline")[0]}
        photos = root / "photos"
        photos.mkdir()
        for i, product in enumerate(products(n, 96)):
            product.image.save(photos / f"{i:05d}.png")
        cli = [sys.executable, "-m", "fashioncap.cli"]
        spark_s, out = _timed([*cli, "caption-catalogue", str(photos), "--output", str(root / "out"),
                               "--master", "local[2]"], root, env)
        job_s = float(re.search(r" in ([\d.]+) s", out).group(1))
        single_s, _ = _timed([*cli, "caption", str(photos), "--json"], root, env)
    return [Result("catalogue", f"offline BLIP, {n} photos of 96 px, Spark local[2] vs one process", "images/s",
                   n / spark_s, n / single_s, "fashioncap caption",
                   note=f"wall {spark_s:.1f} s vs {single_s:.1f} s, start-up included; the Spark job itself "
                        f"{job_s:.1f} s ({n / job_s:.1f} images/s)")]
