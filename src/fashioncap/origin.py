"""Stage `init`: what fine-tuning starts from (`model.init`), resolved and pinned.

model.init is `scratch`, a Hub id, a local directory, or a registry version: `models:/NAME/N`, or
`models:/NAME@ALIAS`, whose alias resolves to its version number when the stage runs. The stage writes
the record (models/init.json: the version, its run, its model digest and the digest of the weights it
fetched) that prepare, train and evaluate depend on, and fetches a registry version's weights into a
local folder (models/init/). The stage always runs (it is cheap); when the alias still names the same
version, the record is unchanged and DVC re-runs nothing after it. A re-run of a result reads the
record of its commit and fetches that very version, wherever the alias points by then.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .runtime import FashioncapError, run_stage

log = logging.getLogger(__name__)

REGISTRY_INIT = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
RECORD = "init.json"  # beside a fetched version's weights: which version they are
BLIP_ARTIFACT = "blip"  # the registered pyfunc model's artifact holding the BLIP directory (register.py)


class InitError(FashioncapError):
    """model.init cannot be resolved or fetched; the message says which and what to do."""


def kind_of(init: str) -> str:
    """'scratch', 'registry', 'local' (a directory here) or 'hub' (anything else: a Hub id)."""
    if init == "scratch":
        return "scratch"
    if init.startswith("models:"):
        if not REGISTRY_INIT.match(init):
            raise InitError(f"model.init '{init}' is not a registry version: write models:/NAME/VERSION or "
                            "models:/NAME@ALIAS")
        return "registry"
    return "local" if Path(init).is_dir() else "hub"


def weights_digest(directory: Path) -> str:
    """sha256 over a model directory's files (relative path and content), in name order."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        if path.name == RECORD:
            continue
        h.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def registry_uri() -> str:
    """The registry that model.init's versions live in: MLFLOW_REGISTRY_URI if set, else the tracking store."""
    from .tracking import tracking_uri

    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def registry_client():
    import mlflow

    uri = registry_uri()
    return mlflow.MlflowClient(uri, registry_uri=uri)


def resolve(init: str, client=None) -> dict:
    """The record of model.init: for a registry version its number (an alias resolved now), run and model
    digest; for a local directory the digest of its files; for a Hub id, the id (the Hub pins no more here)."""
    kind = kind_of(init)
    if kind == "scratch":
        return {"init": init, "kind": kind}
    if kind == "local":
        return {"init": init, "kind": kind, "weights": weights_digest(Path(init))}
    if kind == "hub":
        return {"init": init, "kind": kind}
    from mlflow.exceptions import MlflowException

    match = REGISTRY_INIT.match(init)
    name, version, alias = match["name"], match["version"], match["alias"]
    client = client or registry_client()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        hint = "; `fashioncap promote` points @champion at the candidate" if alias == "champion" else ""
        raise InitError(f"model.init '{init}': no such version in the registry at {registry_uri()} "
                        f"({str(error).splitlines()[0][:200]}). The MLflow UI's Models page lists its versions"
                        + hint) from None
    return {"init": init, "kind": kind, "name": name, "version": str(mv.version), "alias": alias,
            "run_id": mv.run_id, "model_digest": (mv.tags or {}).get("model_digest"),
            "method": (mv.tags or {}).get("method", "full"), "uri": f"models:/{name}/{mv.version}"}


def hub_commit(repo_id: str, cache_dir: str | None = None) -> str | None:
    """The commit of a Hub model in the local Hugging Face cache (what from_pretrained just loaded), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except ValueError:  # not a repo id
        return None
    return Path(path).parent.name if isinstance(path, str) else None


def record_from_tags(tags: dict[str, str]) -> dict | None:
    """The init record a run was trained from, rebuilt from its init.* tags (Init.tags); None for a run from
    before they were recorded."""
    if "init" not in tags or "init.kind" not in tags:
        return None
    record = {"init": tags["init"], "kind": tags["init.kind"],
              **{k: tags[f"init.{k}"] for k in ("uri", "version", "run_id", "model_digest", "weights", "method")
                 if f"init.{k}" in tags}}
    if record["kind"] == "registry":
        match = REGISTRY_INIT.match(record["init"])
        record.update(name=match["name"], alias=match["alias"])
    return record


@dataclass(frozen=True)
class Init:
    """model.init as the stages use it: what from_pretrained takes, and how messages name it."""

    record: dict
    source: str  # a Hub id, a local directory, or 'scratch'

    @property
    def label(self) -> str:
        r = self.record
        return f"model.init '{r['init']}'" + (f" (version {r['version']})" if r["kind"] == "registry" else "")

    @property
    def tags(self) -> dict[str, str]:
        """The lineage a run records of its init model."""
        r = self.record
        keys = ("kind", "uri", "version", "run_id", "model_digest", "weights", "method")
        return {"init": r["init"], **{f"init.{k}": str(r[k]) for k in keys if r.get(k) is not None}}


def fetch(record: dict, cache: Path, client=None) -> Path:
    """A registry version's BLIP directory in `cache`: fetched from the registry unless the cache already
    holds exactly that version (its record and the digest of its files agree). Returns the directory."""
    from mlflow.exceptions import MlflowException

    cache = Path(cache)
    held = cache / RECORD
    if held.is_file():
        kept = json.loads(held.read_text())
        if kept.get("uri") == record["uri"] and (
                record.get("weights") is None or kept.get("weights") == record.get("weights")) \
                and kept.get("weights") == weights_digest(cache):
            return cache
    client = client or registry_client()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".init-") as tmp:
        try:
            got = download_blip(client, record["name"], record["version"], Path(tmp))
        except (MlflowException, OSError, KeyError) as error:
            raise InitError(f"cannot fetch {record['uri']} (model.init '{record['init']}') from the registry at "
                            f"{registry_uri()}: {str(error).splitlines()[0][:300]}") from None
        digest = weights_digest(got)
        if record.get("weights") not in (None, digest):
            raise InitError(f"{record['uri']} holds other weights than when it was pinned (sha256 {digest[:12]}, "
                            f"recorded {record['weights'][:12]}): the registry's artifacts were changed")
        (got / RECORD).write_text(json.dumps({**record, "weights": digest}, indent=2) + "\n")
        if cache.exists():
            shutil.rmtree(cache)
        got.rename(cache)
    log.info("fetched %s (model.init '%s') into %s", record["uri"], record["init"], cache)
    return cache


def download_blip(client, name: str, version: str, dest: Path) -> Path:
    """Downloads a registered version's BLIP directory (the pyfunc model's `blip` artifact, wherever its
    MLmodel file says it lies) into dest; returns where it landed."""
    import yaml
    from mlflow.artifacts import download_artifacts

    source = client.get_model_version_download_uri(name, version).rstrip("/")
    uri = registry_uri()
    mlmodel = download_artifacts(artifact_uri=f"{source}/MLmodel", dst_path=str(dest / "meta"), tracking_uri=uri)
    path = yaml.safe_load(Path(mlmodel).read_text())["flavors"]["python_function"]["artifacts"][BLIP_ARTIFACT]["path"]
    return Path(download_artifacts(artifact_uri=f"{source}/{path}", dst_path=str(dest / "blip"), tracking_uri=uri))


def read_record(path: Path) -> dict:
    if not Path(path).is_file():
        raise InitError(f"no init record at {path}: run the init stage first (dvc repro)")
    return json.loads(Path(path).read_text())


def record_of(init: str, record_path: Path | None = None) -> dict:
    """The init stage's record of model.init, or, without one, model.init resolved now (nothing fetched)."""
    record = read_record(record_path) if record_path is not None else resolve(init)
    if record["init"] != init:
        raise InitError(f"the init record {record_path} is of model.init '{record['init']}', not '{init}': "
                        "run the init stage again (dvc repro)")
    return record


def describe(record: dict) -> str:
    """How a model card names the init: `models:/NAME/N` (and the alias it was reached by), or model.init."""
    if record["kind"] != "registry":
        return f"`{record['init']}`"
    return f"`{record['uri']}`" + (f" (then `@{record['alias']}`)" if record.get("alias") else "")


def load(init: str, record_path: Path | None = None, cache: Path | None = None) -> Init:
    """model.init for a stage: the record the init stage wrote (its pinned version, the weights it fetched),
    or, for a stage run on its own without one, model.init resolved now."""
    record = record_of(init, record_path)
    if record["kind"] != "registry":
        return Init(record, init)
    cache = cache or (Path(record_path).with_suffix("") if record_path else Path(tempfile.mkdtemp(prefix="init-")))
    return Init(record, str(fetch(record, cache)))


def main(argv: list[str] | None = None) -> None:
    from .config import load_params

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    record = resolve(params.model.init)
    cache = args.out.with_suffix("")  # models/init.json -> models/init/
    if record["kind"] == "registry":
        record["weights"] = json.loads((fetch(record, cache) / RECORD).read_text())["weights"]
        log.info("model.init '%s' is %s (run %s)", record["init"], record["uri"], record["run_id"])
    elif cache.exists():
        shutil.rmtree(cache)  # another init's weights
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if not args.out.is_file() or args.out.read_text() != text:
        args.out.write_text(text)


if __name__ == "__main__":
    run_stage(main)
