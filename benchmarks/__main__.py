"""`python -m benchmarks [--quick | --smoke] [--only NAME ...] [--pipeline-repo CLONE]`: every benchmark beside its baseline, a table, and
as the last line one JSON object with every figure and ratio."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import time
from pathlib import Path

from .common import machine

BENCHMARKS = {  # name: module; cheapest first
    "metrics": "scoring",
    "generation": "generation",
    "prepare": "prepare",
    "loader": "loader",
    "train": "train_step",
    "memory": "memory",
    "adapters": "adapters",
    "adaptation": "adaptation",
    "serving": "serving",
    "catalogue": "catalogue",
    "pipeline": "pipeline",
}


def table(rows: list[dict]) -> str:
    head = ("benchmark", "setting", "ours", "baseline", "ratio", "target", "met", "unit / note")
    lines = [head]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        target = f"{r['target']:.2f}x" if r["target"] is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        base = f"{r['baseline']:.3g} ({r['baseline_name']})" if r["baseline"] is not None else "-"
        lines.append((r["benchmark"], r["setting"], f"{r['ours']:.3g}", base, ratio, target, met,
                      f"{r['unit']}" + (f"; {r['note']}" if r["note"] else "")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats and smaller settings (< 5 min on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="the cheapest settings: proves every benchmark runs "
                      "(what the test suite runs); its figures are not for quoting")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--pipeline-repo", type=Path, help="measure the pipeline overhead in this clone, whose "
                        "pipeline must be up to date, instead of building one with a tiny offline run (and, at the "
                        "smoke level, adapt a copy of its model)")
    args = parser.parse_args()
    from fashioncap.runtime import configure_environment

    configure_environment()
    os.environ.setdefault("FASHIONCAP_LOG", "WARNING")
    logging.basicConfig(level=logging.WARNING)
    level = "smoke" if args.smoke else "quick" if args.quick else "full"
    measured_on = machine()  # before any benchmark pins kernels or threads in this process
    rows, seconds = [], {}
    for name in args.only or BENCHMARKS:
        started = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")
        results = module.run(level, args.pipeline_repo) if name in ("pipeline", "adaptation") else module.run(level)
        seconds[name] = round(time.perf_counter() - started, 1)
        rows.extend(r.as_dict() for r in results)
        # each benchmark's figures as soon as they exist: a later benchmark that fails cannot lose them
        print(f"# {name}: {seconds[name]} s {json.dumps([r.as_dict() for r in results])}", flush=True)
    print(table(rows))
    print(json.dumps({"machine": measured_on, "level": level, "seconds": seconds, "results": rows}))


if __name__ == "__main__":
    main()
