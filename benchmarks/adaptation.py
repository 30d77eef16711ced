"""Adapting the offline champion to products it never saw, as a user runs it: `dvc exp run -S profile=offline-adapt`
with full fine-tuning, LoRA and a frozen vision encoder, on the same data and the same steps, side by side: test
CIDEr-D and attribute F1 on the new products before and after, forgetting on the champion's own test split, the
training's time and its process's peak memory, and disk per experiment (the best model in the DVC cache and as
the MLflow artifact, and the largest checkpoint the run held). Then replay: full fine-tuning and LoRA with 0, 0.1,
0.25 (the default, `auto`) and 0.5 of the new training set drawn from the champion's own training data, each
beside the same method without replay (the new products) and beside the champion (its test split)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import Result

REPO = Path(__file__).resolve().parents[1]
# the experiment's overrides of each method (the profile's LoRA targets: query/value and the vision encoder's
# qkv); LoRA trains 3% of the weights and takes a larger step (docs/adapters.md has the sweep it comes from)
METHODS = {
    "full fine-tuning": ["train.method=full"],
    "LoRA r=8": ["train.method=lora", "train.lr=0.01"],
    "frozen vision encoder": ["train.method=full", "train.freeze_vision=true"],
}


# data.replay's sweep; the methods' own rows above run at the default (auto: AUTO_REPLAY for a registry init)
REPLAY_SWEEP = (0.0, 0.1, 0.5)
REPLAY_METHODS = ("full fine-tuning", "LoRA r=8")


def plan(level: str) -> dict[str, list[str]]:
    """Each experiment's label and overrides: the smoke level adapts with LoRA alone (at the default replay)."""
    if level == "smoke":
        return {"LoRA r=8": METHODS["LoRA r=8"]}
    sweep = {f"{m}, replay {r}": [*METHODS[m], f"data.replay={r}"] for m in REPLAY_METHODS for r in REPLAY_SWEEP}
    return {**METHODS, **sweep}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the clone's own store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _sh(args: list[str], cwd: Path) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=_env())
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class Watch:
    """Samples, while a command runs, the peak RSS of its training processes (`-m fashioncap.train`) and the
    size of the checkpoint folder."""

    def __init__(self, checkpoints: Path, every: float = 0.2):
        self.checkpoints, self.every = checkpoints, every
        self.peak_rss, self.peak_checkpoint = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = proc.info["cmdline"] or []
                if "fashioncap.train" in cmdline and proc.info["memory_info"] is not None:
                    self.peak_rss = max(self.peak_rss, proc.info["memory_info"].rss)
            self.peak_checkpoint = max(self.peak_checkpoint, _bytes(self.checkpoints))
            self._stop.wait(self.every)

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def experiment(clone: Path, overrides: list[str]) -> dict:
    """One `dvc exp run` in the clone: its evaluation, training summary, peak memory and disk."""
    started = time.perf_counter()
    with Watch(clone / "checkpoints" / "train") as watch:
        _sh(["dvc", "exp", "run", *[a for o in overrides for a in ("-S", o)]], clone)
    best = _bytes(clone / "models" / "best")
    return {"eval": json.loads((clone / "metrics/eval.json").read_text()),
            "prepared": json.loads((clone / "metrics/prepare.json").read_text()),
            "train": json.loads((clone / "metrics/train.json").read_text()),
            "registered": json.loads((clone / "models/registered.json").read_text()),
            "seconds": time.perf_counter() - started, "peak_mib": watch.peak_rss / 2**20,
            "disk": 2 * best + watch.peak_checkpoint}


def base_clone(tmp: Path, level: str, given: Path | None) -> tuple[Path, list[str]]:
    """A clone whose registry has an offline champion, and the overrides that adapt it: the offline profile run
    and promoted in a fresh clone; at the smoke level the tiny params' (of `given`, an up-to-date tiny clone,
    copied)."""
    from tests.conftest import TINY_OVERRIDES, copy_repo

    tiny = level == "smoke"
    if tiny and given is not None:
        clone = copy_repo(given, tmp / "clone")
    else:
        clone = tmp / "clone"
        _sh(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], tmp)
        _sh(["dvc", "exp", "run", *[a for o in (TINY_OVERRIDES if tiny else ["profile=offline"]) for a in ("-S", o)]],
            clone)
    _sh(["fashioncap", "promote"], clone)
    if tiny:
        return clone, ["profile=offline-adapt", *[o for o in TINY_OVERRIDES if not o.startswith("profile=")]]
    quick = ["train.max_steps=100", "train.eval_every=50"] if level == "quick" else []
    return clone, ["profile=offline-adapt", *quick]


def f1(table: dict, kind: str, when: str) -> float:
    return table["attributes"][when][kind]["f1"] or 0.0


def run(level: str, clone: Path | None = None) -> list[Result]:
    """Every method adapted from the same champion; the smoke level adapts a tiny clone's (`clone`) with LoRA
    alone (its code paths; the suite's e2e test adapts in full too), so its rows have no baseline."""
    with tempfile.TemporaryDirectory() as tmp:
        repo, adapt = base_clone(Path(tmp), level, clone)
        runs = {label: experiment(repo, [*adapt, *overrides]) for label, overrides in plan(level).items()}
        shutil.rmtree(repo, ignore_errors=True)
    full = runs.get("full fine-tuning")
    name = "tiny BLIP" if level == "smoke" else "offline BLIP"
    results = replay_results(runs, name) if level != "smoke" else []
    for label, m in runs.items():
        if ", replay " in label:
            continue
        e, base, t = m["eval"], m["eval"]["base_test"], m["train"]
        same = f"{name}, {label}"
        baseline = None if m is full else full  # full fine-tuning's run: beside every other method's figures

        def vs(figure):
            return None if baseline is None else figure(baseline)

        results.append(Result(
            "adaptation", f"{same}: new products, test CIDEr-D", "CIDEr-D", e["after"]["cider_d"],
            vs(lambda r: r["eval"]["after"]["cider_d"]), "full fine-tuning",
            target=0.9 if "LoRA" in label and baseline else None,
            note=f"before (the champion) {e['before']['cider_d']:.3f}; garment F1 {f1(e, 'garment', 'before'):.3f} -> "
                 f"{f1(e, 'garment', 'after'):.3f}, colour {f1(e, 'colour', 'before'):.3f} -> "
                 f"{f1(e, 'colour', 'after'):.3f}, pattern {f1(e, 'pattern', 'before'):.3f} -> "
                 f"{f1(e, 'pattern', 'after'):.3f}, detail {f1(e, 'detail', 'before'):.3f} -> "
                 f"{f1(e, 'detail', 'after'):.3f}"))
        results.append(Result(
            "adaptation", f"{same}: the champion's test split, CIDEr-D after (forgetting)", "CIDEr-D",
            base["after"]["cider_d"], vs(lambda r: r["eval"]["base_test"]["after"]["cider_d"]), "full fine-tuning",
            note=f"{base['before']['cider_d']:.3f} before; forgot {base['forgot']['cider_d']:.3f}; garment F1 "
                 f"{f1(base, 'garment', 'before'):.3f} -> {f1(base, 'garment', 'after'):.3f}"))
        results.append(Result(
            "adaptation", f"{same}: training", "s", t["train_seconds"], vs(lambda r: r["train"]["train_seconds"]),
            "full fine-tuning", higher_is_better=False,
            note=f"{t['steps']} steps (best {t['best_step']}), {t['trainable_parameters'] / 1e6:.3f}M trainable; "
                 f"peak RSS {m['peak_mib']:.0f} MiB" + (f" (full fine-tuning {baseline['peak_mib']:.0f})" if baseline
                                                       else "") + f"; experiment {m['seconds']:.0f} s; version "
                 f"{m['registered']['version']}"))
        results.append(Result(
            "adaptation", f"{same}: experiment on disk", "MB (DVC cache + MLflow + checkpoint)", m["disk"] / 1e6,
            vs(lambda r: r["disk"] / 1e6), "full fine-tuning", higher_is_better=False,
            note=f"{m['disk'] / baseline['disk']:.1%} of full fine-tuning's" if baseline else ""))
    return results


def replay_results(runs: dict[str, dict], name: str) -> list[Result]:
    """Per method and replay share: the new products beside the same method without replay (target 90%), and the
    champion's test split beside the champion itself (target 95% of its CIDEr-D and garment F1)."""
    results = []
    for method in REPLAY_METHODS:
        shares = {0.25: runs[method], **{r: runs[f"{method}, replay {r}"] for r in REPLAY_SWEEP}}
        none = shares[0.0]
        for share in sorted(shares):
            m = shares[share]
            e, base, t = m["eval"], m["eval"]["base_test"], m["train"]
            same = f"{name}, {method}, replay {share}"
            results.append(Result(
                "adaptation", f"{same}: new products, test CIDEr-D", "CIDEr-D", e["after"]["cider_d"],
                None if share == 0 else none["eval"]["after"]["cider_d"], "no replay", target=None if share == 0
                else 0.9, note=f"garment F1 {f1(e, 'garment', 'after'):.3f}, colour {f1(e, 'colour', 'after'):.3f}"))
            results.append(Result(
                "adaptation", f"{same}: the champion's test split, CIDEr-D", "CIDEr-D", base["after"]["cider_d"],
                base["before"]["cider_d"], "the champion", target=0.95,
                note=f"colour F1 {f1(base, 'colour', 'after'):.3f} (champion {f1(base, 'colour', 'before'):.3f})"))
            results.append(Result(
                "adaptation", f"{same}: the champion's test split, garment F1", "F1", f1(base, "garment", "after"),
                f1(base, "garment", "before"), "the champion", target=0.95))
            results.append(Result(
                "adaptation", f"{same}: training", "s", t["train_seconds"],
                None if share == 0 else none["train"]["train_seconds"], "no replay", higher_is_better=False,
                note=f"{t['steps']} steps (best {t['best_step']}); replayed items: "
                     f"{m['prepared'].get('replay', {}).get('items', 0)}"))
    return results
