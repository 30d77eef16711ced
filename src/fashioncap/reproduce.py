"""`fashioncap reproduce REF`: re-run what produced a result in a separate git worktree and compare.

REF is an MLflow run id, a model URI (models:/name@alias, models:/name/N), a DVC experiment name or a
git revision. The user's work tree is never touched: the code and params of REF are checked out in a
temporary `git worktree` that shares the repository's DVC cache and remote.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from . import fingerprint, lineage, origin
from .tracking import mlflow_metrics, run_fingerprint
from .runtime import FashioncapError

log = logging.getLogger(__name__)

# bf16 autocast and non-deterministic GPU kernels move metrics slightly between runs on the same card.
GPU_RELATIVE_TOLERANCE = 0.02
# Machines that compute differently (other kernels, threads, versions, device) train other weights: the
# metrics then agree only within a band. Measured: the offline profile's test CIDEr-D moved by ~1% between
# two CPUs; after 150 steps settings spread it by up to 9%, so 5% is a sanity band, not a proof.
CROSS_MACHINE_TOLERANCE = 0.05
STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) loss")
REPORT_EVERY_S = 10.0


class ReproduceError(FashioncapError):
    """REF cannot be reproduced; the message says why."""


@dataclass(frozen=True)
class Target:
    """What to check out, what it was, and the metrics it originally reached."""

    revision: str
    what: str
    original: dict[str, float]
    machine: dict[str, str]  # the original's fingerprint ({}: made before fingerprints were recorded)
    model_digest: str | None = None  # DVC's md5 of the trained model when the result was made
    init: dict | None = None  # the run's model.init record (origin.py), when a run says which it was


@dataclass(frozen=True)
class Rule:
    """How close the re-run must come, and why."""

    tolerance: float  # relative; 0: bit-identical
    reason: str


def git(args: list[str], cwd: Path, check: bool = True) -> str | None:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        if check:
            raise ReproduceError(f"git {' '.join(args)} failed: {proc.stderr.strip()[:300]}")
        return None
    return proc.stdout.strip()


def exp_revision(repo: Path, name: str) -> str | None:
    """The commit of the DVC experiment called `name` (its ref lives under refs/exps)."""
    refs = git(["for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], repo, check=False) or ""
    for line in refs.splitlines():
        refname, sha = line.split()
        if refname.rsplit("/", 1)[-1] == name:
            return sha
    return None


# where revisions older than `paths.eval_metrics` in dvc.yaml kept them
LEGACY_PATHS = {"model": "models/best", "eval_metrics": "metrics/eval.json", "fingerprint": "metrics/fingerprint.json"}


def paths_at(repo: Path, revision: str) -> dict[str, str]:
    """The pipeline's paths as dvc.yaml named them at a revision."""
    return {**LEGACY_PATHS, **lineage.pipeline_paths(git(["show", f"{revision}:dvc.yaml"], repo, check=False) or "")}


def model_digest_at(repo: Path, revision: str) -> str | None:
    """The md5 that dvc.lock recorded for the trained model at a revision."""
    text, model = git(["show", f"{revision}:dvc.lock"], repo, check=False), paths_at(repo, revision).get("model")
    if not text or not model:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dvc.lock").write_text(text)
        return lineage.lock_digests(Path(tmp) / "dvc.lock").get(model)


def compared_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a reproduction compares: the test set's (test_*), whichever way they were recorded."""
    return {k: v for k, v in metrics.items() if k.startswith("test_")}


def machine_at(repo: Path, revision: str) -> dict[str, str]:
    """The fingerprint the train stage committed at a revision ({} before fingerprints were recorded)."""
    text = git(["show", f"{revision}:{paths_at(repo, revision)['fingerprint']}"], repo, check=False)
    return json.loads(text) if text else {}


def require_lock(repo: Path, revision: str, ref: str) -> None:
    """A revision without dvc.lock has no result to reproduce: says which revisions have one."""
    if git(["cat-file", "-e", f"{revision}:dvc.lock"], repo, check=False) is not None:
        return
    hints = []
    prefix = f"refs/exps/{revision[:2]}/{revision[2:]}/"
    exps = git(["for-each-ref", "--format=%(refname)", prefix], repo, check=False) or ""
    if names := [line.removeprefix(prefix) for line in exps.splitlines()]:
        hints.append("its DVC experiments: " + ", ".join(names[:8]))
    for commit in (git(["rev-list", "--max-count=200", revision], repo, check=False) or "").split()[1:]:
        if git(["cat-file", "-e", f"{commit}:dvc.lock"], repo, check=False) is not None:
            hints.append(f"the nearest earlier commit with a result: {commit[:10]}")
            break
    hints.append("or run it first (`dvc exp run`) and reproduce the experiment")
    raise ReproduceError(f"{ref} ({revision[:10]}) has no dvc.lock: nothing was run at that commit, so there is "
                         f"no result to reproduce. Reproduce " + "; ".join(hints))


def metrics_at(repo: Path, revision: str) -> dict[str, float]:
    """The test metrics committed at a revision, flattened as MLflow names them."""
    path = paths_at(repo, revision).get("eval_metrics")
    text = git(["show", f"{revision}:{path}"], repo, check=False) if path else None
    return compared_metrics(mlflow_metrics(json.loads(text))) if text else {}


def _from_run(client, run_id: str, repo: Path, what: str) -> Target:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReproduceError(f"no MLflow run {run_id} in this tracking store") from None
    tags = run.data.tags
    original = compared_metrics(run.data.metrics)
    # runs from before fingerprints say at least their device
    machine = run_fingerprint(tags) or ({"device": tags["device"]} if "device" in tags else {})
    exp = tags.get("dvc.exp_name")
    revision = exp_revision(repo, exp) if exp else None
    digest = tags.get("model.digest")
    init = origin.record_from_tags(tags)
    if revision:
        return Target(revision, f"{what} (DVC experiment '{exp}')", original, machine, digest, init)
    if tags.get("git.dirty") == "true":
        raise ReproduceError(f"run {run_id} was made from a tree with uncommitted changes "
                             f"({tags.get('git.dirty_paths', 'unknown paths')}): its code and params are not in git")
    commit = tags.get("git.commit") or tags.get("mlflow.source.git.commit")
    if not commit or git(["cat-file", "-e", f"{commit}^{{commit}}"], repo, check=False) is None:
        raise ReproduceError(f"commit {commit or '(none recorded)'} of run {run_id} is not in this repository; "
                             "fetch it first")
    return Target(commit, f"{what} (commit {commit[:10]})", original, machine, digest, init)


def resolve(ref: str, repo: Path, client) -> Target:
    """Turns REF into the revision to check out and the metrics to compare with."""
    from mlflow.exceptions import MlflowException

    if ref.startswith("models:/"):
        name, _, pick = ref.removeprefix("models:/").partition("@")
        try:
            if pick:
                version = client.get_model_version_by_alias(name, pick)
            else:
                name, _, number = ref.removeprefix("models:/").rpartition("/")
                version = client.get_model_version(name, number)
        except MlflowException:
            raise ReproduceError(f"{ref} is not in the model registry") from None
        return _from_run(client, version.run_id, repo, f"{name} version {version.version}, run {version.run_id}")
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return _from_run(client, ref, repo, f"MLflow run {ref}")
    revision = exp_revision(repo, ref)
    what = f"DVC experiment '{ref}'"
    if not revision:
        revision, what = git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], repo, check=False), \
            f"git revision {ref}"
    if revision:
        require_lock(repo, revision, ref)
        return Target(revision, f"{what} ({revision[:10]})", metrics_at(repo, revision), machine_at(repo, revision),
                      model_digest_at(repo, revision))
    raise ReproduceError(f"'{ref}' is neither an MLflow run id, a models:/ URI, a DVC experiment nor a git revision")


def _dvc_bin() -> str:
    return shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))


def _dvc(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([_dvc_bin(), *args], cwd=cwd, env=env, capture_output=True, text=True)


def _stale(worktree: Path, env: dict, stage: str) -> bool:
    """Whether the stage's dvc.lock entry is not for its params and dependencies as they are in the worktree."""
    status = _dvc(["status", "--json", stage], worktree, env)
    return status.returncode != 0 or bool(json.loads(status.stdout or "{}").get(stage))


@dataclass
class Progress:
    """Turns the re-run's output into progress lines: each stage as it starts, and the training step
    with an ETA from the pace so far (at most every REPORT_EVERY_S seconds)."""

    stage: str | None = None
    first: tuple[int, float] | None = None
    reported: float = float("-inf")

    def update(self, line: str, now: float) -> str | None:
        if m := STAGE_LINE.search(line):
            self.stage, self.first = m.group(1), None
            return f"stage '{self.stage}' started"
        m = STEP_LINE.search(line)
        if not m:
            return None
        step, total = int(m.group(1)), int(m.group(2))
        if self.first is None:
            self.first = (step, now)
        if now - self.reported < REPORT_EVERY_S and step < total:
            return None
        self.reported = now
        done, since = step - self.first[0], now - self.first[1]
        eta = f", ETA {_clock((total - step) * since / done)}" if done > 0 else ""
        return f"stage '{self.stage or 'train'}': step {step}/{total} ({100 * step / total:.0f}%){eta}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _dvc_with_progress(args: list[str], cwd: Path, env: dict) -> tuple[int, str]:
    """Runs a long dvc command, logging its progress; returns the exit code and the end of its output."""
    proc = subprocess.Popen([_dvc_bin(), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: deque[str] = deque(maxlen=100)
    watcher = Progress()
    for line in proc.stdout:
        tail.append(line)
        if message := watcher.update(line, time.monotonic()):
            log.info("reproduce: %s", message)
    return proc.wait(), "".join(tail)


@dataclass(frozen=True)
class Rerun:
    metrics: dict[str, float]
    model_digest: str | None
    machine: dict[str, str]  # the re-run's fingerprint as its train stage recorded it
    worktree: Path


def rerun(repo: Path, revision: str, keep: bool, pins: dict[str, str] | None = None, init: dict | None = None) -> Rerun:
    """Checks the revision out in a temporary worktree, fetches or rebuilds the data, re-trains, re-evaluates,
    with the environment variables `pins` set (the original's kernels and threads) and model.init as the
    original run recorded it (`init`: a run's commit precedes the results commit that holds models/init.json)."""
    worktree = Path(tempfile.mkdtemp(prefix="fashioncap-reproduce-")) / "repo"
    git(["worktree", "add", "--detach", str(worktree), revision], repo)
    env = {**os.environ, **(pins or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(worktree / "src"), os.environ.get("PYTHONPATH")]))}
    # the re-run is tracked in the worktree's own store, not the original's; a registry model.init is read from
    # the original's registry, as the version its commit recorded (models/init.json), wherever the alias points now
    env["MLFLOW_REGISTRY_URI"] = origin.registry_uri()
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        if (repo / ".dvc" / "config.local").is_file():  # the user's remote and credentials settings
            shutil.copy2(repo / ".dvc" / "config.local", worktree / ".dvc" / "config.local")
        _dvc(["cache", "dir", "--local", str(repo / ".dvc" / "cache")], worktree, env)
        record = worktree / paths_at(repo, revision).get("init", "models/init.json")
        if "init" in lineage.pipeline_paths((worktree / "dvc.yaml").read_text()):
            if init is not None:
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps(init, indent=2, sort_keys=True) + "\n")
                log.info("model.init as the run had it: %s", origin.describe(init))
            elif not record.is_file():
                log.info("no init record committed at %s: resolving model.init now", revision[:12])
                _dvc(["repro", "--single-item", "init"], worktree, env)
        if _dvc(["pull", "prepare"], worktree, env).returncode == 0 and not _stale(worktree, env, "prepare"):
            log.info("prepared data fetched from the DVC cache/remote")
        else:
            # not stored, or stored for other params or init: the commit's dvc.lock is the results of the commit
            # before it when the run's results were committed after it, and its data params may have changed
            log.info("prepared data of these params not in the DVC cache or remote: rebuilding it from its source")
            built = _dvc(["repro", "--single-item", "prepare"], worktree, env)  # the committed init, not a new one
            if built.returncode != 0:
                raise ReproduceError("the prepared data is missing from the DVC remote and rebuilding it failed:\n"
                                     + (built.stderr or built.stdout).strip()[-1500:])
        code, output = _dvc_with_progress(["repro", "--force", "--single-item", "train", "evaluate"], worktree, env)
        if code != 0:
            raise ReproduceError("re-running the pipeline failed:\n" + output.strip()[-2000:])
        paths = {**LEGACY_PATHS, **lineage.pipeline_paths((worktree / "dvc.yaml").read_text())}
        metrics = mlflow_metrics(json.loads((worktree / paths["eval_metrics"]).read_text()))
        machine_file = worktree / paths["fingerprint"]
        machine = json.loads(machine_file.read_text()) if machine_file.is_file() else {}
        return Rerun(compared_metrics(metrics),
                     lineage.lock_digests(worktree / "dvc.lock").get(paths["model"]), machine, worktree)
    finally:
        if not keep:
            git(["worktree", "remove", "--force", str(worktree)], repo, check=False)
            shutil.rmtree(worktree.parent, ignore_errors=True)


def compare(original: dict[str, float], reproduced: dict[str, float], tolerance: float) -> tuple[list[tuple], bool]:
    """Rows (metric, original, reproduced, ok) for the metrics both hold, and whether all agree."""
    rows = []
    for name in sorted(original.keys() & reproduced.keys()):
        a, b = original[name], reproduced[name]
        rows.append((name, a, b, a == b if tolerance == 0 else abs(a - b) <= tolerance * max(abs(a), 1e-12)))
    return rows, bool(rows) and all(ok for *_, ok in rows)


def rule(original: dict[str, str], rerun: dict[str, str], pins: dict[str, str]) -> Rule:
    """Bit-identical where both sides computed alike (after pinning); otherwise a band, naming the cause."""
    if "aten_kernels" not in original:  # made before machines were recorded: at most its device is known
        if original.get("device", "cpu") != "cpu":
            return Rule(GPU_RELATIVE_TOLERANCE, "a GPU run from before machines were recorded")
        return Rule(0.0, "the original's machine was not recorded: holding it to identical metrics")
    if not rerun:
        return Rule(CROSS_MACHINE_TOLERANCE, "the re-run's code records no machine: within a band")
    causes = fingerprint.numeric_differences(original, rerun)
    if causes:
        named = ", ".join(f"{k} {original.get(k, '?')} vs {rerun.get(k, '?')}" for k in causes)
        return Rule(CROSS_MACHINE_TOLERANCE, f"the machines compute differently ({named})")
    if rerun.get("device") != "cpu":
        return Rule(GPU_RELATIVE_TOLERANCE, "same card and versions, but GPU kernels are not all bit-deterministic")
    how = f"pinned to the original's: {', '.join(f'{k}={v}' for k, v in pins.items())}" if pins else "as the original"
    return Rule(0.0, f"same kernels, threads and versions ({how})")


def weights_verdict(original: str | None, reproduced: str | None, tolerance: float) -> tuple[str, bool]:
    """What the model digests say, and whether they allow the verdict REPRODUCED: computed alike, the weights
    must be bit-identical; computed differently, they differ in the last bits and the metrics decide."""
    if not original or not reproduced:
        return "model digest: not recorded for the original, not compared", True
    if original == reproduced:
        return f"model digest: identical ({original})", True
    if tolerance:
        return f"model digest: differs ({original} -> {reproduced}), as expected when the machines differ", True
    return f"model digest: DIFFERS ({original} -> {reproduced}): the weights are not the same", False


def machines_table(original: dict[str, str], rerun: dict[str, str]) -> list[str]:
    """The two fingerprints side by side; '*' marks a field that decides the bits and differs."""
    differ = set(fingerprint.numeric_differences(original, rerun)) if original and rerun else set()
    cut = lambda v: v if len(v) <= 36 else v[:35] + "…"  # noqa: E731
    lines = [f"{'machine':<18}{'original':<38}re-run"]
    for key in dict.fromkeys([*original, *rerun]):
        mark = " *" if key in differ else ""
        lines.append(f"{key:<18}{cut(original.get(key, '-')):<38}{cut(rerun.get(key, '-')):<38}{mark}".rstrip())
    return lines


def report(target: Target, rows: list[tuple], same: bool, weights: tuple[str, bool], rule: Rule,
           rerun_machine: dict[str, str] | None = None) -> str:
    """The machines, the side-by-side metrics, the model digests and the verdict (which part matched)."""
    lines = [f"reproducing {target.what}"]
    if target.machine or rerun_machine:
        lines += machines_table(target.machine, rerun_machine or {})
    lines.append(f"rule: {'identical metrics and weights' if rule.tolerance == 0 else f'metrics within {rule.tolerance:.0%}'}"
                 f", because {rule.reason}")
    lines.append(f"{'metric':<34}{'original':>14}{'reproduced':>14}  same")
    lines += [f"{n:<34}{a:>14.6f}{b:>14.6f}  {'yes' if ok else 'NO'}" for n, a, b, ok in rows]
    lines.append(weights[0])
    identical_weights = weights[0].startswith("model digest: identical")
    if not rows:
        lines.append("verdict: no original metrics to compare with")
    elif same and weights[1]:
        kind = "identical metrics" if rule.tolerance == 0 else f"metrics within {rule.tolerance:.0%}"
        lines.append(f"verdict: REPRODUCED ({kind}{', identical model weights' if identical_weights else ''})")
    elif same:
        lines.append("verdict: NOT REPRODUCED (identical metrics, but the model weights differ)")
    else:
        lines.append(f"verdict: NOT REPRODUCED ({sum(not r[3] for r in rows)} of {len(rows)} metrics differ"
                     f"{'; model weights identical' if identical_weights else ''})")
    return "\n".join(lines)


def local_machine(original: dict[str, str], repo: Path) -> dict[str, str]:
    """This machine's fingerprint as a re-run here would compute with, before anything is pinned."""
    return fingerprint.fingerprint(repo, original.get("mixed_precision", "no"))


def reproduce(ref: str, repo: Path, client, keep: bool = False) -> tuple[str, bool]:
    """Resolves, pins this machine to the original's kernels and threads where it can, re-runs and
    compares; returns the report and whether the result was reproduced."""
    target = resolve(ref, repo, client)
    pins, unpinnable = fingerprint.pins_to_match(target.machine, local_machine(target.machine, repo)) \
        if target.machine.get("aten_kernels") else ({}, [])
    if pins:
        log.info("re-running with the original's kernels and threads: %s", ", ".join(f"{k}={v}" for k, v in pins.items()))
    if unpinnable:
        log.info("this machine cannot match the original's %s: the metrics will be held to a band",
                 ", ".join(unpinnable))
    result = rerun(repo, target.revision, keep, pins, target.init)
    verdict_rule = rule(target.machine, result.machine, pins)
    rows, same = compare(target.original, result.metrics, verdict_rule.tolerance)
    weights = weights_verdict(target.model_digest, result.model_digest, verdict_rule.tolerance)
    text = report(target, rows, same, weights, verdict_rule, result.machine)
    same = same and weights[1]
    if keep:
        text += f"\nthe re-run is kept in {result.worktree}"
    return text, same
