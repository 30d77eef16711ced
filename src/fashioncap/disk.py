"""Free-space preflights: a stage that would fill the disk stops before it starts writing, and says how much it needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from .runtime import FashioncapError

CLEAN_UP_HINT = ("Free space, or remove old experiments' files: `dvc exp remove -A` then `dvc gc -w`, "
                 "`mlflow gc` for deleted MLflow runs, and `checkpoints/` of abandoned runs")


class DiskSpaceError(FashioncapError):
    """The disk lacks the space a stage needs."""


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or would hold it: its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def require(path: Path, needed: int, what: str) -> None:
    """Stops with a clear message when the file system of `path` has less than `needed` bytes free."""
    free = free_bytes(path)
    if free < needed:
        raise DiskSpaceError(f"{what} needs about {human(needed)} free at {path}, but only {human(free)} is free. "
                             + CLEAN_UP_HINT)


def training_bytes(parameters: int, trainable: int, checkpoints: bool, saved: int | None = None) -> int:
    """Disk a training run needs at its peak: the best model twice (being replaced) and, with checkpoints,
    two full states (fp32 weights + AdamW's two moments) while the new one replaces the old. `saved`: the
    parameters a checkpoint and the best model hold (an adapter's alone; all of them by default)."""
    model = 4 * (parameters if saved is None else saved)
    state = model + 8 * trainable
    return 2 * model + (2 * state if checkpoints else 0)
