"""What produced a run: the git commit and whether the tree was dirty, and the digests DVC recorded."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

# Paths the pipeline itself writes; their changes do not make a tree dirty.
PIPELINE_OUTPUTS = ("dvc.lock", "data/", "models/", "metrics/", "reports/")


def _git(args: list[str], cwd: Path, strip: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.strip() if strip else out


def dirty_paths(porcelain: str) -> list[str]:
    """Tracked files changed outside the pipeline's outputs, from `git status --porcelain` output."""
    paths = [line[3:].split(" -> ")[-1] for line in porcelain.splitlines() if line and not line.startswith("??")]
    return [p for p in paths if not p.startswith(PIPELINE_OUTPUTS)]


def git_state(root: Path) -> dict[str, str]:
    """The commit checked out at root and whether tracked files differ from it (outputs aside)."""
    commit = _git(["rev-parse", "HEAD"], root)
    if commit is None:
        return {}
    # unstripped: a porcelain line starts with its status columns, " M dvc.lock" for a change not staged
    changed = dirty_paths(_git(["status", "--porcelain", "--untracked-files=no"], root, strip=False) or "")
    return {"git.commit": commit, "git.dirty": str(bool(changed)).lower(),
            **({"git.dirty_paths": ",".join(changed)[:500]} if changed else {})}


def pipeline_paths(dvc_yaml: str) -> dict[str, str]:
    """The paths dvc.yaml names once in its `vars` (`paths.model`, ...), by name, from its text."""
    pipeline = yaml.safe_load(dvc_yaml) or {}
    return {k: v for part in pipeline.get("vars", []) if isinstance(part, dict) for k, v in part.get("paths", {}).items()}


def lock_digests(lock_file: Path) -> dict[str, str]:
    """The md5 digests dvc.lock holds for each stage output, by output path."""
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    digests = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("md5"):
                digests[out["path"]] = out["md5"]
    return digests


def dataset_digest(data_dir: Path) -> str:
    """A content fingerprint of a saved DatasetDict, for runs made outside DVC."""
    h = hashlib.sha256()
    for state in sorted(data_dir.glob("*/state.json")):
        h.update(state.read_bytes())
    return h.hexdigest()[:32]
