"""Reading catalogues from their sources, and the pure steps that turn them into training items."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from .config import DataParams
from .metrics import normalize_caption
from .runtime import FashioncapError
from .synthetic import catalogue

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
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
    """Normalises a caption; returns '' for anything that is not usable text."""
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    return normalize_caption(caption) if isinstance(caption, str) else ""


def _synthetic_items(cfg: DataParams, seed: int) -> Iterator[RawItem]:
    for index, product in enumerate(catalogue(seed, cfg.synthetic.items, cfg.synthetic.render_size)):
        yield RawItem(f"synthetic-{seed}-{index:06d}", product.image, product.caption, product.category)


def _check_hub(cfg: DataParams) -> None:
    """Fails fast, with the offline command, when the Hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
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
    for row in dataset:
        image = row[cfg.image_column]
        data = image.get("bytes")
        if data is None and image.get("path"):
            with open(image["path"], "rb") as f:
                data = f.read()
        key = hashlib.sha256(data or b"").hexdigest()[:24]
        category = str(row[cfg.category_column]) if cfg.category_column else None
        yield RawItem(key, data or b"", row[cfg.text_column], category)


def read_source(cfg: DataParams, seed: int) -> Iterator[RawItem]:
    """Yields the raw items of the configured source (at most data.max_items)."""
    if cfg.source == "synthetic":
        items = _synthetic_items(cfg, seed)
    elif cfg.source == "imagefolder":
        if not os.path.isdir(cfg.path):
            raise DataSourceError(f"data.path '{cfg.path}' is not a folder")
        import datasets

        dataset = datasets.load_dataset("imagefolder", data_dir=cfg.path, split="train")
        items = _hf_items(dataset, cfg, f"imagefolder '{cfg.path}'")
    else:
        _check_hub(cfg)
        import datasets

        try:
            dataset = datasets.load_dataset(cfg.hub_id, revision=cfg.revision, split=cfg.hub_split)
        except (OSError, ValueError, ConnectionError) as error:  # offline without a cache, bad split, ...
            raise DataSourceError(f"cannot load dataset '{cfg.hub_id}' (split '{cfg.hub_split}', revision "
                                  f"'{cfg.revision}'): {str(error).splitlines()[0][:300]}. "
                                  f"To run without the Hub: {OFFLINE_HINT}") from None
        items = _hf_items(dataset, cfg, f"dataset '{cfg.hub_id}'")
    for count, item in enumerate(items):
        if cfg.max_items is not None and count >= cfg.max_items:
            return
        yield item
