"""What every benchmark shares: repeated timing with a median, result rows, small synthetic inputs."""

from __future__ import annotations

import gc
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Result:
    """One measured figure of this project beside its baseline; `ratio` is ours / baseline, or baseline /
    ours when lower is better, so a ratio above 1 always means this project is better."""

    benchmark: str
    setting: str
    unit: str
    ours: float
    baseline: float | None = None
    baseline_name: str = ""
    target: float | None = None  # the ratio the issue asks for
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0) or self.ours == 0:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours

    @property
    def met(self) -> bool | None:
        return None if self.target is None or self.ratio is None else self.ratio >= self.target

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median wall time of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def machine() -> dict:
    """What the figures were measured on: the machine's fingerprint (CPU, kernels, threads, versions) and
    its core count."""
    from pathlib import Path

    from fashioncap.fingerprint import fingerprint, mixed_precision

    # mixed_precision: what train.mixed_precision auto uses here (bf16 where the kernels compute it natively)
    machine = fingerprint(Path(__file__).resolve().parents[1], mixed_precision("auto"))
    keep = ("cpu", "cpu_flags", "aten_kernels", "onednn_isa", "mkl_cbwr", "threads", "mixed_precision", "device",
            "gpu", "cuda", "torch", "transformers", "numpy", "pillow", "python", "lock", "lock_installed")
    return {"cores": _cores(), **{k: machine[k] for k in keep}}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def jpeg(image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def products(n: int, size: int, seed: int = 7) -> list:
    """Synthetic catalogue products (category, caption, PIL image of `size` pixels)."""
    from fashioncap.synthetic import catalogue

    return list(catalogue(seed, n, size))


def offline_params(*overrides: str):
    """The project's params composed as `dvc exp run -S profile=offline` composes them."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fashioncap.config import parse_params

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base=None):
        raw = OmegaConf.to_container(compose(config_name="config", overrides=["profile=offline", *overrides]),
                                     resolve=True)
    return parse_params(raw)
