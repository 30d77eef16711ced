"""Reading catalogues from their sources, and the pure steps that turn them into training items."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from PIL import Image

from .config import DataParams
from .captions import clean_caption as clean_text
from .runtime import FashioncapError
from .synthetic import catalogue, draw_product

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
TOKEN_LENGTHS = "caption_tokens.json"  # beside the prepared splits: caption lengths in the model's tokens
CORRECTIONS_RECORD = "corrections.json"  # beside them too: how many reviewers' corrections prepare used
OFFLINE_HINT = "dvc exp run -S profile=offline"


class DataSourceError(FashioncapError):
    """The configured data source cannot be read; the message says what to do."""


@dataclass(frozen=True)
class RawItem:
    """One catalogue entry as read from its source, before any cleaning."""

    key: str
    image: Image.Image | bytes
    caption: object
    category: str | None = None
    source: str = ""
    problem: str | None = None  # why the source could not even be read (missing file, broken metadata line)


def split_of(key: str, salt: str, val_fraction: float, test_fraction: float) -> str:
    """Assigns an item to a split from a hash of its key, so adding items never moves old ones."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def clean_caption(caption: object) -> str:
    """The caption as training target (digits, units and punctuation kept); '' for anything that is not text."""
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace").replace("\ufffd", "")
    return clean_text(caption) if isinstance(caption, str) else ""


def synthetic_key(seed: int, index: int, part: str = "base") -> str:
    """The item key of a synthetic product (the new part's keys never meet the base part's)."""
    return f"synthetic-{seed}-{index:06d}" if part == "base" else f"synthetic-{part}-{seed}-{index:06d}"


def _synthetic_items(cfg: DataParams, seed: int) -> Iterator[RawItem]:
    part = cfg.synthetic.part
    for index, product in enumerate(catalogue(seed, cfg.synthetic.items, cfg.synthetic.render_size, part)):
        yield RawItem(synthetic_key(seed, index, part), product.image, product.caption, product.category,
                      f"synthetic item {index}" if part == "base" else f"{part} synthetic item {index}")


def base_test_items(cfg: DataParams, seed: int) -> Iterator[RawItem]:
    """The test split of the synthetic base part's first data.synthetic.items items, with this config's split
    fractions and salt: what a model trained on the base part with the same ones was tested on. Only those items
    are drawn."""
    for index in range(cfg.synthetic.items):
        key = synthetic_key(seed, index)
        if split_of(key, cfg.split_salt, cfg.val_fraction, cfg.test_fraction) == "test":
            product = draw_product(seed, index, cfg.synthetic.render_size)
            yield RawItem(key, product.image, product.caption, product.category, f"synthetic item {index}")


def _check_hub(cfg: DataParams) -> None:
    """Fails fast, with the offline command, when the Hub cannot be reached."""
    if hub_offline():
        return  # the user asked for the local cache
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(cfg.hub_id, revision=cfg.revision, timeout=10)
    except Exception as error:  # noqa: BLE001 - any failure here means we cannot download
        raise DataSourceError(
            f"cannot reach the Hugging Face Hub for dataset '{cfg.hub_id}' at revision '{cfg.revision}' "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else 'no detail'}). "
            f"Check the network or the dataset id, set HF_HUB_OFFLINE=1 to use a local cache, "
            f"or run the whole pipeline offline with: {OFFLINE_HINT}"
        ) from None


def _hf_items(dataset, cfg: DataParams, origin: str) -> Iterator[RawItem]:
    import datasets

    columns = dataset.column_names
    missing = [c for c in (cfg.image_column, cfg.text_column, cfg.category_column) if c and c not in columns]
    if missing:
        raise DataSourceError(f"{origin} has no column(s) {missing}; its columns are {columns}. "
                              f"Set data.image_column / data.text_column / data.category_column.")
    dataset = dataset.cast_column(cfg.image_column, datasets.Image(decode=False))
    for index, row in enumerate(dataset):
        image = row[cfg.image_column] or {}
        data, path = image.get("bytes"), image.get("path")
        if data is None and path:
            with open(path, "rb") as f:
                data = f.read()
        key = hashlib.sha256(data or b"").hexdigest()[:24]
        category = str(row[cfg.category_column]) if cfg.category_column else None
        source = os.path.basename(path) if path and not image.get("bytes") else f"{origin} row {index}"
        yield RawItem(key, data or b"", row[cfg.text_column], category, source)


def decode_text(data: bytes) -> str:
    """UTF-8, or, for legacy files, Windows-1252/Latin-1 (which never fails) rather than losing the row."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def _metadata_rows(meta: Path) -> list[dict]:
    """Rows of a metadata.jsonl or metadata.csv, each line decoded on its own."""
    lines = [decode_text(line) for line in meta.read_bytes().splitlines()]
    if meta.suffix == ".csv":
        return list(csv.DictReader(lines))
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"file_name": f"{meta.name} line {number}", "__error__": "unparsable metadata line"})
    return rows


def _imagefolder_items(cfg: DataParams) -> Iterator[RawItem]:
    """A folder in the imagefolder layout: images plus metadata.csv/.jsonl files naming them (file_name)."""
    folder = Path(cfg.path)
    metas = sorted(p for p in folder.rglob("metadata.*") if p.suffix in (".csv", ".jsonl"))
    if not metas:
        raise DataSourceError(f"no metadata.csv or metadata.jsonl in '{cfg.path}' (imagefolder layout)")
    for meta in metas:
        rows = _metadata_rows(meta)
        columns = set().union(*(r.keys() for r in rows)) if rows else set()
        missing = [c for c in ("file_name", cfg.text_column, cfg.category_column) if c and c not in columns]
        if missing:
            raise DataSourceError(f"{meta} has no column(s) {missing}; its columns are {sorted(columns)}. "
                                  f"Set data.text_column / data.category_column.")
        for row in rows:
            name = str(row.get("file_name") or "")
            path, problem = _confined(folder, meta.parent, name)
            problem = row.get("__error__") or problem
            data = b"" if problem else path.read_bytes()
            key = hashlib.sha256(data).hexdigest()[:24] if data else f"unreadable:{meta.parent.name}/{name}"
            category = str(row[cfg.category_column]) if cfg.category_column and row.get(cfg.category_column) else None
            source = str(path.relative_to(folder)) if path is not None else name
            yield RawItem(key, data, row.get(cfg.text_column), category, source, problem)


def _confined(folder: Path, parent: Path, name: str) -> tuple[Path | None, str | None]:
    """The file a metadata row names, and None; or a problem: a name that is absolute, climbs out of the
    catalogue folder (`../`) or is a link to outside it names a file DVC does not hash as the dataset."""
    if not name:
        return None, "image file not found"
    if Path(name).is_absolute() or PureWindowsPath(name).is_absolute() or name.startswith("\\"):
        return None, f"file_name '{name}' is an absolute path: it must name a file inside the catalogue folder"
    path = parent / name
    if not path.resolve().is_relative_to(folder.resolve()):
        return None, f"file_name '{name}' points outside the catalogue folder"
    if not path.is_file():
        return path, "image file not found"
    return path, None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _cached_snapshot(cfg: DataParams) -> str | None:
    """The dataset repository's files in the local hub cache (as `huggingface-cli download` or an
    earlier download left them), or None."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(cfg.hub_id, repo_type="dataset", revision=cfg.revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not in the cache
        return None


def load_hub_dataset(cfg: DataParams):
    """`load_dataset(hub_id)`. Offline, `datasets` only finds a dataset in its own Arrow cache (left by an
    earlier online `load_dataset`); a cache filled by `huggingface-cli download`, or copied onto an
    air-gapped machine, holds the repository's files instead: those load with the same loader from the
    local snapshot folder."""
    import datasets

    try:
        return datasets.load_dataset(cfg.hub_id, revision=cfg.revision, split=cfg.hub_split)
    except (OSError, ValueError, ConnectionError) as error:  # offline without a cache, bad split, ...
        snapshot = _cached_snapshot(cfg) if hub_offline() else None
        if snapshot is None:
            raise DataSourceError(f"cannot load dataset '{cfg.hub_id}' (split '{cfg.hub_split}', revision "
                                  f"'{cfg.revision}'): {str(error).splitlines()[0][:300]}. "
                                  f"To run without the Hub: {OFFLINE_HINT}") from None
    log.info("dataset '%s' from the local hub cache: %s", cfg.hub_id, snapshot)
    try:
        return datasets.load_dataset(snapshot, split=cfg.hub_split)
    except (OSError, ValueError) as error:
        raise DataSourceError(f"the cached files of dataset '{cfg.hub_id}' in {snapshot} cannot be read: "
                              f"{str(error).splitlines()[0][:300]}") from None


def check_source(cfg: DataParams) -> None:
    """Fails in seconds when the source cannot be read: the Hub unreachable (unless offline mode asks for
    the cache), or the imagefolder missing."""
    if cfg.source == "hub":
        _check_hub(cfg)
    elif cfg.source == "imagefolder" and not os.path.isdir(cfg.path):
        raise DataSourceError(f"data.path '{cfg.path}' is not a folder")


def read_source(cfg: DataParams, seed: int) -> Iterator[RawItem]:
    """Yields the raw items of the configured source (at most data.max_items)."""
    if cfg.source == "synthetic":
        items = _synthetic_items(cfg, seed)
    elif cfg.source == "imagefolder":
        if not os.path.isdir(cfg.path):
            raise DataSourceError(f"data.path '{cfg.path}' is not a folder")
        items = _imagefolder_items(cfg)
    else:
        _check_hub(cfg)
        items = _hf_items(load_hub_dataset(cfg), cfg, f"dataset '{cfg.hub_id}'")
    for count, item in enumerate(items):
        if cfg.max_items is not None and count >= cfg.max_items:
            return
        yield item
