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

from . import lineage
from .tracking import mlflow_metrics
from .runtime import FashioncapError

log = logging.getLogger(__name__)

# bf16 autocast and non-deterministic GPU kernels move metrics slightly between runs.
GPU_RELATIVE_TOLERANCE = 0.02
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
    tolerance: float
    model_digest: str | None = None  # DVC's md5 of the trained model when the result was made


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
LEGACY_PATHS = {"model": "models/best", "eval_metrics": "metrics/eval.json"}


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


def metrics_at(repo: Path, revision: str) -> dict[str, float]:
    """The test metrics committed at a revision, flattened as MLflow names them."""
    path = paths_at(repo, revision).get("eval_metrics")
    text = git(["show", f"{revision}:{path}"], repo, check=False) if path else None
    return mlflow_metrics(json.loads(text)) if text else {}


def _from_run(client, run_id: str, repo: Path, what: str) -> Target:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReproduceError(f"no MLflow run {run_id} in this tracking store") from None
    tags = run.data.tags
    original = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    tolerance = GPU_RELATIVE_TOLERANCE if tags.get("device", "cpu") != "cpu" else 0.0
    exp = tags.get("dvc.exp_name")
    revision = exp_revision(repo, exp) if exp else None
    digest = tags.get("model.digest")
    if revision:
        return Target(revision, f"{what} (DVC experiment '{exp}')", original, tolerance, digest)
    if tags.get("git.dirty") == "true":
        raise ReproduceError(f"run {run_id} was made from a tree with uncommitted changes "
                             f"({tags.get('git.dirty_paths', 'unknown paths')}): its code and params are not in git")
    commit = tags.get("git.commit") or tags.get("mlflow.source.git.commit")
    if not commit or git(["cat-file", "-e", f"{commit}^{{commit}}"], repo, check=False) is None:
        raise ReproduceError(f"commit {commit or '(none recorded)'} of run {run_id} is not in this repository; "
                             "fetch it first")
    return Target(commit, f"{what} (commit {commit[:10]})", original, tolerance, digest)


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
    if revision:
        return Target(revision, f"DVC experiment '{ref}' ({revision[:10]})", metrics_at(repo, revision), 0.0,
                      model_digest_at(repo, revision))
    commit = git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], repo, check=False)
    if commit:
        return Target(commit, f"git revision {ref} ({commit[:10]})", metrics_at(repo, commit), 0.0,
                      model_digest_at(repo, commit))
    raise ReproduceError(f"'{ref}' is neither an MLflow run id, a models:/ URI, a DVC experiment nor a git revision")


def _dvc_bin() -> str:
    return shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))


def _dvc(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([_dvc_bin(), *args], cwd=cwd, env=env, capture_output=True, text=True)


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


def rerun(repo: Path, revision: str, keep: bool) -> tuple[dict[str, float], str | None, Path]:
    """Checks the revision out in a temporary worktree, fetches or rebuilds the data, re-trains, re-evaluates."""
    worktree = Path(tempfile.mkdtemp(prefix="fashioncap-reproduce-")) / "repo"
    git(["worktree", "add", "--detach", str(worktree), revision], repo)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(worktree / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)  # the re-run is tracked in the worktree's own store, not the original's
    try:
        if (repo / ".dvc" / "config.local").is_file():  # the user's remote and credentials settings
            shutil.copy2(repo / ".dvc" / "config.local", worktree / ".dvc" / "config.local")
        _dvc(["cache", "dir", "--local", str(repo / ".dvc" / "cache")], worktree, env)
        if _dvc(["pull", "prepare"], worktree, env).returncode == 0:
            log.info("prepared data fetched from the DVC cache/remote")
        else:
            log.info("prepared data not in the DVC cache or remote: rebuilding it from its source")
            built = _dvc(["repro", "prepare"], worktree, env)
            if built.returncode != 0:
                raise ReproduceError("the prepared data is missing from the DVC remote and rebuilding it failed:\n"
                                     + (built.stderr or built.stdout).strip()[-1500:])
        code, output = _dvc_with_progress(["repro", "--force", "--single-item", "train", "evaluate"], worktree, env)
        if code != 0:
            raise ReproduceError("re-running the pipeline failed:\n" + output.strip()[-2000:])
        paths = {**LEGACY_PATHS, **lineage.pipeline_paths((worktree / "dvc.yaml").read_text())}
        metrics = mlflow_metrics(json.loads((worktree / paths["eval_metrics"]).read_text()))
        return metrics, lineage.lock_digests(worktree / "dvc.lock").get(paths["model"]), worktree
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


def weights_verdict(original: str | None, reproduced: str | None, tolerance: float) -> tuple[str, bool]:
    """What the model digests say, and whether they allow the verdict REPRODUCED: on the CPU the weights
    must be bit-identical; on a GPU they differ in the last bits and the metrics' tolerance decides."""
    if not original or not reproduced:
        return "model digest: not recorded for the original, not compared", True
    if original == reproduced:
        return f"model digest: identical ({original})", True
    if tolerance:
        return f"model digest: differs ({original} -> {reproduced}), as expected of a GPU run", True
    return f"model digest: DIFFERS ({original} -> {reproduced}): the weights are not the same", False


def report(target: Target, rows: list[tuple], same: bool, weights: tuple[str, bool]) -> str:
    """The side-by-side table, the model digests and the verdict (which part matched)."""
    lines = [f"reproducing {target.what}", f"{'metric':<34}{'original':>14}{'reproduced':>14}  same"]
    lines += [f"{n:<34}{a:>14.6f}{b:>14.6f}  {'yes' if ok else 'NO'}" for n, a, b, ok in rows]
    lines.append(weights[0])
    identical_weights = weights[0].startswith("model digest: identical")
    if not rows:
        lines.append("verdict: no original metrics to compare with")
    elif same and weights[1]:
        rule = "identical metrics" if target.tolerance == 0 else f"metrics within {target.tolerance:.0%} (GPU run)"
        lines.append(f"verdict: REPRODUCED ({rule}{', identical model weights' if identical_weights else ''})")
    elif same:
        lines.append("verdict: NOT REPRODUCED (identical metrics, but the model weights differ)")
    else:
        lines.append(f"verdict: NOT REPRODUCED ({sum(not r[3] for r in rows)} of {len(rows)} metrics differ"
                     f"{'; model weights identical' if identical_weights else ''})")
    return "\n".join(lines)


def reproduce(ref: str, repo: Path, client, keep: bool = False) -> tuple[str, bool]:
    """Resolves, re-runs and compares; returns the report and whether the result was reproduced."""
    target = resolve(ref, repo, client)
    reproduced, digest, worktree = rerun(repo, target.revision, keep)
    rows, same = compare(target.original, reproduced, target.tolerance)
    weights = weights_verdict(target.model_digest, digest, target.tolerance)
    text = report(target, rows, same, weights)
    same = same and weights[1]
    if keep:
        text += f"\nthe re-run is kept in {worktree}"
    return text, same
