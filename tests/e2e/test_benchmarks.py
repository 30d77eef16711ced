"""The benchmark suite runs and reports every figure beside its baseline (no speed is asserted here:
speed is measured by `python -m benchmarks`, not by tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.__main__ import BENCHMARKS, table
from benchmarks.common import Result
from tests.conftest import REPO, copy_repo


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
