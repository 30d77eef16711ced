"""Replay: a share of the init version's own training data mixed into the new training set, so that adapting
the champion to new products does not forget the products it describes today (experience replay).

The init's training data is found through its lineage, never in the work tree: the registry version's run
recorded the DVC digest of the prepared data it trained on (`data.digest`); a commit of this repository whose
dvc.lock holds that digest (a branch, a tag or a DVC experiment) names it, and DVC reads it at that commit from
the project's cache or its remote. Which items replay is decided by their keys and the seed alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tempfile
from pathlib import Path

from .config import AUTO_REPLAY, DataParams
from .data import DataSourceError, RawItem

log = logging.getLogger(__name__)
RECORD = "replay.json"  # beside the prepared splits: what was replayed, and from where
PREPARED = "data/prepared"  # where dvc.lock names the prepared data (dvc.yaml's paths.prepared)


class ReplayError(DataSourceError):
    """The init's training data cannot be found or read; the message names what was looked for."""


def fraction(cfg: DataParams, init: dict) -> float:
    """data.replay resolved: `auto` replays AUTO_REPLAY for an init from the registry, nothing otherwise."""
    if cfg.replay == "auto":
        return AUTO_REPLAY if init.get("kind") == "registry" else 0.0
    return cfg.replay


def draw(keys: list[str], count: int, seed: int) -> list[int]:
    """The indices of `count` keys, chosen by a hash of each key and the seed: the same items whatever the
    order the data is read in, on a re-run and on a reproduction."""
    rank = sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}:replay:{keys[i]}".encode()).hexdigest())
    return sorted(rank[:count])


def lineage(init: dict, client) -> tuple[str, str]:
    """The init version's run and the DVC digest of the prepared data it trained on."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(init["run_id"])
    except MlflowException as error:
        raise ReplayError(f"data.replay: the run of {init['uri']} ({init['run_id']}) is not in the tracking store "
                          f"({str(error).splitlines()[0][:200]}); set data.replay=0 to train without replay") from None
    digest = run.data.tags.get("data.digest")
    if not digest:
        raise ReplayError(f"data.replay: the run of {init['uri']} ({init['run_id']}) recorded no data digest "
                          "(tag data.digest), so its training data cannot be found; set data.replay=0 to train "
                          "without replay")
    return run.info.run_id, digest


def commit_holding(digest: str, repo: Path) -> str | None:
    """The newest commit of any branch, tag or DVC experiment whose dvc.lock names `digest`. git's pickaxe finds
    the commits that add the digest to dvc.lock or take it out; the newest whose dvc.lock holds it is the one."""
    found = subprocess.run(["git", "log", "--all", "--format=%H", f"-S{digest}", "--", "dvc.lock"], cwd=repo,
                           capture_output=True, text=True)
    for commit in found.stdout.split() if found.returncode == 0 else []:
        lock = subprocess.run(["git", "show", f"{commit}:dvc.lock"], cwd=repo, capture_output=True, text=True)
        if lock.returncode == 0 and digest in lock.stdout:
            return commit
    return None


def fetch(digest: str, repo: Path, dest: Path, source: str) -> str:
    """Reads the prepared data of `digest` into `dest` with DVC (its cache, else its remote); returns the
    commit that names it."""
    from dvc.api import DVCFileSystem

    commit = commit_holding(digest, repo)
    if commit is None:
        raise ReplayError(
            f"data.replay: {source} trained on prepared data {digest}, and no commit of this repository names it in "
            "its dvc.lock (every branch, tag and DVC experiment searched). Commit the results of the run that "
            "trained it (`git add dvc.lock && git commit`), or fetch its experiment (`dvc exp pull REMOTE EXP`); "
            "or set data.replay=0 to train without replay")
    try:
        DVCFileSystem(str(repo), rev=commit).get(PREPARED, str(dest), recursive=True)
    except Exception as error:  # DVC's own errors (missing in cache and remote, remote unreachable) vary
        raise ReplayError(f"data.replay: the prepared data {digest} that {source} trained on (named by commit "
                          f"{commit[:10]}) is neither in DVC's cache nor in its remote ({type(error).__name__}: "
                          f"{str(error)[:300]}); `dvc pull` at that commit on a machine that has it, or set "
                          "data.replay=0") from None
    return commit


def replay_items(init: dict, count: int, seed: int, repo: Path, exclude: set[str], client) -> tuple[list, dict]:
    """`count` items of the init version's training split, as RawItems for prepare (skipping keys the new data
    holds), and the record of where they came from."""
    import datasets

    run_id, digest = lineage(init, client)
    with tempfile.TemporaryDirectory() as tmp:
        commit = fetch(digest, repo, Path(tmp) / "prepared", f"{init['uri']} (run {run_id})")
        train = datasets.load_from_disk(str(Path(tmp) / "prepared"))["train"]
        keys = list(train["key"])
        candidates = [i for i in range(len(keys)) if keys[i] not in exclude]
        chosen = [candidates[i] for i in draw([keys[i] for i in candidates], count, seed)]
        rows = train.cast_column("image", datasets.Image(decode=False)).select(chosen)
        items = [RawItem(r["key"], r["image"]["bytes"], r["caption"], r["category"] or None, f"replay:{init['uri']}")
                 for r in rows]
    # what was replayed, by content alone (the commit that named it may differ on a re-run: logged, not recorded)
    record = {"version": init["uri"], "run_id": run_id, "digest": digest, "items": len(items),
              "keys": sorted(r.key for r in items)}
    log.info("replay: %d items of %s's training data (%s, commit %s)", len(items), init["uri"], digest, commit[:10])
    return items, record


def read_record(prepared: Path) -> dict | None:
    """What prepare replayed into this prepared data, or None (no replay)."""
    path = prepared / RECORD
    return json.loads(path.read_text()) if path.is_file() else None
