"""Pipeline overhead: `dvc repro` when nothing changed, in a fresh clone after a tiny offline run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Result

REPO = Path(__file__).resolve().parents[1]


def _sh(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the clone's own store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def _time_repro(clone: Path, repeats: int) -> list[float]:
    # the init stage is always "changed" (it re-resolves model.init); nothing after it re-runs while its record holds
    stale = {k: v for k, v in json.loads(_sh(["dvc", "status", "--json"], clone)).items() if v != ["always changed"]}
    if stale:
        raise RuntimeError(f"the pipeline in {clone} is not up to date: {sorted(stale)}")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        _sh(["dvc", "repro"], clone)
        times.append(time.perf_counter() - started)
    return sorted(times)


def run(level: str, clone: Path | None = None) -> list[Result]:
    """Times `dvc repro` in `clone` (an up-to-date one), or in a fresh clone after a tiny offline run."""
    from tests.conftest import TINY_OVERRIDES  # the test suite's tiny offline config: seconds, not minutes

    repeats = {"full": 10, "quick": 3, "smoke": 1}[level]
    if clone is not None:
        times = _time_repro(clone, repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            clone = Path(tmp) / "clone"
            _sh(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], Path(tmp))
            _sh(["dvc", "exp", "run", *[a for o in TINY_OVERRIDES for a in ("-S", o)]], clone)
            times = _time_repro(clone, repeats)
    return [Result("pipeline overhead", "`dvc repro`, nothing changed (5 stages)", "s", times[len(times) // 2],
                   2.0, "the 2 s budget", target=1.0, higher_is_better=False,
                   note=f"min {times[0]:.2f} s, max {times[-1]:.2f} s")]
