"""benchmarks/gpu.sh, the GPU figures' script, on a machine without a GPU: it checks what it can and stops before
its first GPU step, and `--dry-run` runs every step on the CPU at tiny shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, clone_project


def test_gpu_script_checks_what_it_can_and_stops_before_its_first_gpu_step_without_one():
    import os
    import shutil

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpu.sh would run for real")
    env = {**os.environ, "PATH": f"{sys.executable.rsplit('/', 1)[0]}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device here" in proc.stderr and "stopping before the first GPU step" in proc.stderr
    assert f"git: {shutil.which('git')}" in proc.stdout  # it got as far as its checks
    assert "full-size rehearsal" not in proc.stdout  # nothing after the check ran


@pytest.mark.slow
def test_gpu_script_dry_run_runs_every_step_on_the_cpu_at_tiny_shapes(tmp_path):
    """`gpu.sh --dry-run`, in a clone of the project (the script writes reports/): the rehearsal, the training
    benchmark at both batches with every lever that does not need CUDA, and the offline pipeline, each to its
    figures. A GPU run then fails on the GPU's account only, not on the script's."""
    import os

    from benchmarks.gpu import BATCHES, NEEDS_CUDA, levers

    repo = clone_project(tmp_path / "repo")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PATH": f"{sys.executable.rsplit('/', 1)[0]}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path / "tmp")}  # the stand-ins' cache, the rehearsal's and the pipeline's clones
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    figures = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rehearsal = next(f["rehearsal_train"] for f in figures if "rehearsal_train" in f)
    assert rehearsal["steps"] > 0 and rehearsal["samples_per_second"] > 0
    train = next(f for f in figures if f.get("mode") == "dry-run")
    settings = {(batch, label) for batch in BATCHES["dry-run"]
                for label in ("default recipe (bf16, SDPA, batch at once)", *levers(batch)) if label not in NEEDS_CUDA}
    assert {(r["batch"], r["setting"]) for r in train["train"]} == settings
    assert all(r["samples_s"] > 0 and r["model_samples_s"] > 0 for r in train["train"])
    assert [r["first_step_s"] > 0 for r in train["train"] if r["setting"] == "torch.compile"] == [True, True]
    assert train["left_out"] == [f"batch {b}, {label}" for b in BATCHES["dry-run"] for label in NEEDS_CUDA]
    assert set(train["original_samples_s"]) == {str(b) for b in BATCHES["dry-run"]}
    pipeline = next(f["offline_pipeline"] for f in figures if "offline_pipeline" in f)
    assert pipeline["train_seconds"] > 0 and pipeline["test_after_cider_d"] >= 0
    assert "# offline pipeline (dry run, on the CPU)" in proc.stdout
