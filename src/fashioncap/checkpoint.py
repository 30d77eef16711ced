"""Resumable training: a data order that can restart mid-epoch, and atomic full-state checkpoints.

A checkpoint holds everything the next step depends on (weights, optimizer and scheduler state, every
RNG, the position in the data, the best-so-far bookkeeping and the logs), so a run killed at any point
and resumed from its last checkpoint finishes exactly as an uninterrupted run would on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from . import faults

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles each epoch by a permutation that depends only on (seed, epoch), so any position can be
    restored; `start` skips the items already consumed in the current epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start, self.start = self.start, 0  # the offset applies once, to the epoch being resumed
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        return self.size - self.start


def fingerprint(*parts: object) -> str:
    """Identifies what a checkpoint belongs to; a checkpoint of other params or data is not resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": [v.tolist() if isinstance(v, np.ndarray) else v
                                                    for v in np.random.get_state()],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_for(directory: Path) -> Path:
    """An empty folder beside `directory` to write into before `swap_in`."""
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _old(directory: Path) -> Path:
    return directory.with_name(directory.name + ".old")


def recover(directory: Path) -> None:
    """Completes a swap that a kill interrupted between its two renames: `directory` is gone, its old
    version sits in `.old` and its complete replacement in `.tmp`; the replacement takes its place.
    A `.tmp` without an `.old` beside it may be half written and is left for `staging_for` to clear."""
    old, staging = _old(directory), directory.with_name(directory.name + ".tmp")
    if not directory.exists() and old.exists():
        (staging if staging.exists() else old).rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def swap_in(staging: Path, directory: Path) -> None:
    """Replaces `directory` by the complete folder `staging` with renames: a kill at any point leaves
    the old folder whole, or the new one whole, or both beside it for `recover` to finish the swap."""
    old = _old(directory)
    recover(directory)
    if directory.exists():
        directory.rename(old)
    faults.point("checkpoint.swap_between_renames")
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def save(directory: Path, tensors: dict, meta: dict) -> None:
    """Writes the checkpoint beside `directory` and swaps it in: a kill leaves the previous one whole."""
    staging = staging_for(directory)
    torch.save(tensors, staging / STATE_FILE)
    faults.point("checkpoint.state_written")
    (staging / META_FILE).write_text(json.dumps(meta))
    swap_in(staging, directory)


def load(directory: Path, expected_fingerprint: str) -> tuple[dict, dict] | None:
    """The checkpoint's tensors and metadata, or None when there is none or it belongs to another run."""
    recover(directory)
    if not (directory / META_FILE).is_file():
        return None
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("fingerprint") != expected_fingerprint:
        return None
    # weights_only: a checkpoint is data, never code
    return torch.load(directory / STATE_FILE, weights_only=True), meta


def publish(source: Path, directory: Path) -> None:
    """Puts a complete copy of `source` in place of `directory` (hard links where the file system allows,
    so no bytes are copied) and leaves `source` whole: a kill before the caller discards the checkpoint
    that holds `source` leaves both, and the re-run publishes again (a move would leave a checkpoint to
    resume from without the best model it must publish)."""
    staging = staging_for(directory)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, staging, copy_function=link, dirs_exist_ok=True)
    swap_in(staging, directory)


def discard(directory: Path) -> None:
    """Removes a checkpoint folder at once: renamed aside first (one atomic step), then deleted, so a kill
    never leaves a half-deleted checkpoint that looks resumable."""
    gone = directory.with_name(directory.name + ".discarded")
    if directory.exists():
        shutil.rmtree(gone, ignore_errors=True)
        directory.rename(gone)
        faults.point("checkpoint.discard_renamed")
    shutil.rmtree(gone, ignore_errors=True)  # also what a kill here left
