"""Stage `prepare`: read the catalogue, clean and resize it, split it by item key, save it as Arrow."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

from .runtime import progress, run_stage, stage_args
from .config import Params, load_params
from .data import SPLITS, DataSourceError, clean_caption, read_source, split_of
from .imaging import encode_image, to_model_image

log = logging.getLogger(__name__)


def build_splits(params: Params) -> tuple[dict[str, list[dict]], Counter]:
    """Reads the source and returns the rows of each split and the counts of dropped items."""
    cfg = params.data
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    dropped: Counter = Counter()
    for item in progress(read_source(cfg, params.seed), desc="prepare", unit="img"):
        caption = clean_caption(item.caption)
        if not caption:
            dropped["empty_caption"] += 1
            continue
        image = to_model_image(item.image, params.model.image_size)
        split = split_of(item.key, cfg.split_salt, cfg.val_fraction, cfg.test_fraction)
        rows[split].append({
            "key": item.key,
            "image": {"bytes": encode_image(image, cfg.image_format), "path": None},
            "caption": caption,
            "category": item.category or "",
        })
    return rows, dropped


def summarise(rows: dict[str, list[dict]], dropped: Counter) -> dict:
    """Counts per split and category, and how many test captions also occur in training."""
    train_captions = {r["caption"] for r in rows["train"]}
    test = rows["test"]
    overlap = sum(r["caption"] in train_captions for r in test)
    return {
        "items": sum(len(v) for v in rows.values()),
        **{f"{s}_items": len(rows[s]) for s in SPLITS},
        "dropped": dict(sorted(dropped.items())),
        "categories": dict(sorted(Counter(r["category"] for v in rows.values() for r in v if r["category"]).items())),
        "test_captions_seen_in_train": overlap,
        "test_caption_overlap": overlap / len(test) if test else 0.0,
    }


def save(rows: dict[str, list[dict]], out: Path) -> None:
    """Writes the splits as a DatasetDict with embedded image bytes."""
    import datasets

    features = datasets.Features({
        "key": datasets.Value("string"),
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "category": datasets.Value("string"),
    })
    dd = datasets.DatasetDict({
        s: datasets.Dataset.from_list(rows[s], features=features) for s in SPLITS
    })
    if out.exists():
        shutil.rmtree(out)
    dd.save_to_disk(str(out))


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__, argv, out="data/prepared", metrics="metrics/prepare.json")
    params = load_params(args.params)
    rows, dropped = build_splits(params)
    empty = [s for s in SPLITS if not rows[s]]
    if empty:
        raise DataSourceError(f"split(s) {empty} are empty: the source holds too few items for the split "
                              "fractions (data.val_fraction, data.test_fraction)")
    save(rows, args.out)
    summary = summarise(rows, dropped)
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("prepared %d items (%s); %.1f%% of test captions also in train", summary["items"],
             ", ".join(f"{s}={summary[f'{s}_items']}" for s in SPLITS), 100 * summary["test_caption_overlap"])


if __name__ == "__main__":
    run_stage(main)
