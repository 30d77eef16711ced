"""The benchmark suite runs and reports every figure beside its baseline (no speed is asserted here:
speed is measured by `python -m benchmarks`, not by tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.__main__ import BENCHMARKS, table
from benchmarks.common import Result
from tests.conftest import REPO, clone_project, copy_repo


def test_ratio_is_above_one_when_this_project_is_better_either_way():
    faster = Result("b", "s", "s", ours=1.0, baseline=4.0, higher_is_better=False, target=2.0)
    more = Result("b", "s", "images/s", ours=6.0, baseline=2.0, target=5.0)
    assert (faster.ratio, faster.met) == (4.0, True) and (more.ratio, more.met) == (3.0, False)
    assert Result("b", "s", "x", ours=1.0).ratio is None and Result("b", "s", "x", ours=1.0).met is None
    text = table([faster.as_dict(), more.as_dict()])
    assert "4.00x" in text and "NO" in text and "yes" in text


@pytest.mark.slow
def test_smoke_benchmarks_report_every_figure_with_its_baseline_and_ratio(tiny_repo, tmp_path):
    clone = copy_repo(tiny_repo, tmp_path / "clone")  # its pipeline is up to date: no tiny run of its own
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--pipeline-repo", str(clone)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    results = report["results"]
    assert set(report["seconds"]) == set(BENCHMARKS) and report["level"] == "smoke"
    assert {r["benchmark"] for r in results} == {"train throughput", "caption generation", "metrics", "prepare",
                                                 "input pipeline", "memory", "adapters", "adaptation", "serving",
                                                 "catalogue", "pipeline overhead"}
    for r in results:
        assert r["ours"] > 0, r
        if r["baseline"] is not None:
            assert r["ratio"] is not None and r["ratio"] > 0, r
    targets = [r for r in results if r["target"] is not None]
    assert len(targets) >= 5 and all(r["met"] in (True, False) for r in targets)
    table_lines = "\n".join(line for line in lines[:-1] if not line.startswith("# "))
    assert all(r["setting"] in table_lines for r in results)  # the table shows every row
    # each benchmark's figures are printed as it ends, before the table: a later failure cannot lose them
    early = [json.loads(line.split(" s ", 1)[1]) for line in lines if line.startswith("# ")]
    assert [r for rows in early for r in rows] == results


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
