"""Prepare: images/s of the prepare stage's per-item work (decode, check, resize, encode, digest) with
`data.num_workers` threads against none, on the same folder of full-size photos."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from .common import Result, _cores, jpeg, median_seconds, offline_params, products


def photo_folder(folder: Path, n: int, side: int = 1024) -> None:
    """An imagefolder catalogue of n JPEG photos of `side` pixels with a metadata.csv."""
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for i, p in enumerate(products(n, side)):
            (folder / f"{i:05d}.jpg").write_bytes(jpeg(p.image))
            writer.writerow([f"{i:05d}.jpg", p.caption])


def run(level: str) -> list[Result]:
    from fashioncap.prepare import build_splits

    n = {"full": 600, "quick": 120, "smoke": 24}[level]
    workers = 2 * _cores()
    with tempfile.TemporaryDirectory() as tmp:
        photo_folder(Path(tmp), n)
        common = ["data.source=imagefolder", f"data.path={tmp}", "data.text_column=text", "data.image_format=jpeg",
                  "model.image_size=384"]
        serial = offline_params(*common, "data.num_workers=0")
        parallel = offline_params(*common, f"data.num_workers={workers}")
        assert build_splits(serial) == build_splits(parallel)  # the same rows, in the same order
        repeats = {"full": 5, "quick": 2, "smoke": 1}[level]
        one = median_seconds(lambda: build_splits(serial), repeats, warmup=0)
        many = median_seconds(lambda: build_splits(parallel), repeats, warmup=0)
    return [Result("prepare", f"{n} JPEG photos 1024 px -> 384 px, {workers} threads on {_cores()} cores", "images/s", n / many, n / one,
                   "one thread", target=1.7)]
