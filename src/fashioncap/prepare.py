"""Stage `prepare`: read the catalogue, clean and resize it, split it by item key, save it as Arrow."""

from __future__ import annotations

import functools
import itertools
import hashlib
import json
import logging
import shutil
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from . import faults
from .config import BASE_TEST, DataParams, ModelParams, Params, load_params
from .data import (SPLITS, TOKEN_LENGTHS, DataSourceError, check_source, RawItem, base_test_items, clean_caption,
                   read_source, split_of)
from .imaging import ImageInputError, decode_image, encode_image, to_model_image
from .modeling import build_processor
from .runtime import progress, project_root, run_stage, stage_args
from . import disk, feedback, origin, replay

log = logging.getLogger(__name__)
REJECTED_REPORT = "rejected.jsonl"  # one line per left-out item: key, source, reason, kind


class Rejected(ValueError):
    """An item the prepare stage leaves out; `kind` classifies the reason."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def screen(item: RawItem, cfg: DataParams, size: int) -> tuple[str, Image.Image]:
    """The cleaned caption and model-ready image of an item, or Rejected saying why it cannot be used."""
    if item.problem:
        raise Rejected(item.problem, "unreadable_entry")
    caption = clean_caption(item.caption)
    if not caption:
        raise Rejected("missing or empty caption", "empty_caption")
    if len(caption.split()) > cfg.max_caption_words:
        raise Rejected(f"caption of {len(caption.split())} words (limit {cfg.max_caption_words})", "long_caption")
    try:
        image = item.image if isinstance(item.image, Image.Image) else decode_image(item.image, cfg.max_pixels)
    except ImageInputError as error:
        raise Rejected(str(error), error.kind) from None
    if min(image.size) < cfg.min_image_side:
        raise Rejected(f"image of {image.width}x{image.height} pixels, below data.min_image_side "
                       f"({cfg.min_image_side})", "too_small")
    return caption, to_model_image(image, size)


def _content_digest(item: RawItem) -> str:
    data = item.image if isinstance(item.image, bytes) else item.image.tobytes()
    return hashlib.sha256(data).hexdigest()


def prepare_item(item: RawItem, cfg: DataParams, size: int) -> dict:
    """The per-item work (decode, check, resize, encode, digest), as a plain row a worker can send back;
    a rejected item comes back with its reason and kind instead."""
    try:
        caption, image = screen(item, cfg, size)
    except Rejected as error:
        return {"key": item.key, "source": item.source, "reason": str(error), "kind": error.kind}
    return {"key": item.key, "source": item.source, "caption": caption, "category": item.category or "",
            "digest": _content_digest(item), "bytes": encode_image(image, cfg.image_format)}


def prepare_items(items: Iterable[RawItem], cfg: DataParams, size: int) -> Iterator[dict]:
    """`prepare_item` over the items in `cfg.num_workers` threads (0: in this one), in the items' order, with
    at most a few items per thread in flight. Threads suffice: Pillow and hashlib release the GIL
    while they decode, resize, encode and hash, and nothing is pickled between processes."""
    work = functools.partial(prepare_item, cfg=cfg, size=size)
    if cfg.num_workers == 0:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(cfg.num_workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= 4 * cfg.num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def build_splits(params: Params, corrections_dir: Path | None = None,
                 used: dict[str, int] | None = None) -> tuple[dict[str, list[dict]], list[dict]]:
    """Reads the source, with the reviewers' corrections of `corrections_dir` applied (feedback.py: a corrected
    key's caption replaced, new photos added; `used` counts them); returns the rows of each split (and, for the
    synthetic new part, of the base part's test split, BASE_TEST) and a report of every rejected item."""
    cfg = params.data
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    rejected: list[dict] = []
    first_seen: dict[str, tuple[str, str]] = {}
    used = {"captions": 0, "photos": 0} if used is None else used
    reviewed = feedback.stored(corrections_dir) if corrections_dir is not None else {}
    source = feedback.corrected(read_source(cfg, params.seed), reviewed, used)
    photos = list(feedback.new_photos(corrections_dir, reviewed)) if reviewed else []
    used["photos"] = len(photos)
    items = progress(itertools.chain(source, photos), desc="prepare", unit="img")
    for row in prepare_items(items, cfg, params.model.image_size):
        if "kind" not in row and row["digest"] in first_seen:
            # the same photo twice: keep the first, whatever the captions say
            key, other = first_seen[row["digest"]]
            same = other == row["caption"]
            row = {**row, "reason": f"same image as {key}" + ("" if same else " with another caption"),
                   "kind": "duplicate_image" if same else "duplicate_image_other_caption"}
        if "kind" in row:
            rejected.append({k: row[k] for k in ("key", "source", "reason", "kind")})
            continue
        first_seen[row["digest"]] = (row["key"], row["caption"])
        split = split_of(row["key"], cfg.split_salt, cfg.val_fraction, cfg.test_fraction)
        rows[split].append(_stored(row))
    if cfg.source == "synthetic" and cfg.synthetic.part == "new":
        base = feedback.corrected(base_test_items(cfg, params.seed), reviewed, used)
        base_test = prepare_items(base, cfg, params.model.image_size)
        rows[BASE_TEST] = [_stored(row) for row in base_test if "kind" not in row]
    return rows, rejected


def add_replay(params: Params, init: dict, rows: dict[str, list[dict]], repo: Path) -> dict | None:
    """Mixes data.replay of the new training set's size, drawn from the init version's own training data, into
    the training split (replay.py); returns the record of what was replayed, or None."""
    share = replay.fraction(params.data, init)
    if share == 0:
        return None
    count = round(share * len(rows["train"]))
    taken = {r["key"] for split in rows.values() for r in split}
    items, record = replay.replay_items(init, count, params.seed, repo, taken, origin.registry_client())
    kept = [_stored(row) for row in prepare_items(items, params.data, params.model.image_size) if "kind" not in row]
    rows["train"].extend(kept)
    return {"fraction": share, **record, "items": len(kept)}


def _stored(row: dict) -> dict:
    return {"key": row["key"], "image": {"bytes": row["bytes"], "path": None}, "caption": row["caption"],
            "category": row["category"]}


def check_rejections(kept: int, rejected: list[dict], limit: float) -> None:
    """Fails, naming the commonest reasons, when more than `limit` of the catalogue was rejected."""
    total = kept + len(rejected)
    if total == 0:
        raise DataSourceError("the data source holds no items")
    if len(rejected) / total > limit:
        worst = Counter(r["kind"] for r in rejected).most_common(3)
        raise DataSourceError(
            f"{len(rejected)} of {total} items rejected ({len(rejected) / total:.0%}, above "
            f"data.max_rejected_fraction {limit:.0%}); commonest reasons: "
            + ", ".join(f"{kind} ({n})" for kind, n in worst) + ". See the rejection report for each item.")


def summarise(rows: dict[str, list[dict]], rejected: list[dict]) -> dict:
    """Counts per split and category, and how many test captions also occur in training."""
    train_captions = {r["caption"] for r in rows["train"]}
    test = rows["test"]
    overlap = sum(r["caption"] in train_captions for r in test)
    return {
        "items": sum(len(rows[s]) for s in SPLITS),
        **{f"{s}_items": len(rows[s]) for s in rows},
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["kind"] for r in rejected).items())),
        "categories": dict(sorted(Counter(r["category"] for s in SPLITS for r in rows[s] if r["category"]).items())),
        "test_captions_seen_in_train": overlap,
        "test_caption_overlap": overlap / len(test) if test else 0.0,
    }


def percentile(sorted_values: list[int], q: float) -> int:
    """The nearest-rank percentile of sorted values (a length that q% of captions do not exceed)."""
    import math

    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def token_lengths(model: ModelParams, rows: dict[str, list[dict]], processor=None, init=None) -> dict:
    """Caption lengths in the model's tokens, [CLS]/bos and [SEP] included, as training sees them:
    p50/p95/p99/max over every kept caption, and how many captions have each length. `processor` is
    the model's, when already loaded (a scratch model's tokenizer is built from the training captions)."""
    tokenizer = (processor or build_processor(model, [r["caption"] for r in rows["train"]], init)).tokenizer
    captions = [r["caption"] for split in SPLITS for r in rows[split]]
    lengths = sorted(len(ids) for ids in tokenizer(captions, add_special_tokens=True)["input_ids"])
    counts = Counter(lengths)
    return {"p50": percentile(lengths, 50), "p95": percentile(lengths, 95), "p99": percentile(lengths, 99),
            "max": lengths[-1], "captions": len(lengths), "tokenizer": model.init,
            "counts": {str(k): counts[k] for k in sorted(counts)}}


def save(rows: dict[str, list[dict]], rejected: list[dict], out: Path, lengths: dict,
         replayed: dict | None = None) -> None:
    """Writes the splits as a DatasetDict with embedded image bytes, the rejection report, the caption token
    lengths and what was replayed (replay.RECORD) beside them."""
    import datasets

    stored = sum(len(r["image"]["bytes"]) + len(r["caption"]) for split in rows.values() for r in split)
    # Arrow adds little to the image bytes; the old output is removed only after this check
    disk.require(out.parent, int(stored * 1.1), f"the prepared dataset ({sum(map(len, rows.values()))} items)")
    features = datasets.Features({
        "key": datasets.Value("string"),
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "category": datasets.Value("string"),
    })
    dd = datasets.DatasetDict({
        s: datasets.Dataset.from_list(split, features=features) for s, split in rows.items()
    })
    if out.exists():
        shutil.rmtree(out)
    dd.save_to_disk(str(out))
    (out / REJECTED_REPORT).write_text("".join(json.dumps(r) + "\n" for r in rejected))
    (out / TOKEN_LENGTHS).write_text(json.dumps(lengths, indent=2) + "\n")
    if replayed:
        (out / replay.RECORD).write_text(json.dumps(replayed, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__, argv, "out", "metrics", "corrections")
    params = load_params(args.params)
    check_source(params.data)  # before the model's files are looked for: without the Hub, both would fail
    # a wrong model.init or model.image_size fails now, not after the images
    init = origin.load(params.model.init, args.init)
    processor = None if params.model.from_scratch else build_processor(params.model, [], init)
    used = {"captions": 0, "photos": 0}
    rows, rejected = build_splits(params, args.corrections, used)
    check_rejections(sum(len(rows[s]) for s in SPLITS), rejected, params.data.max_rejected_fraction)
    empty = [s for s in SPLITS if not rows[s]]
    if empty:
        raise DataSourceError(f"split(s) {empty} are empty: the source holds too few items for the split "
                              "fractions (data.val_fraction, data.test_fraction)")
    replayed = add_replay(params, init.record, rows, project_root())
    lengths = token_lengths(params.model, rows, processor, init)
    save(rows, rejected, args.out, lengths, replayed)
    if used["captions"] or used["photos"]:  # none used: the prepared data stays what it was without corrections
        feedback.write_record(args.out, used)
    faults.point("prepare.saved")
    summary = summarise(rows, rejected)
    summary["corrections"] = used
    if replayed:
        summary["replay"] = {k: v for k, v in replayed.items() if k != "keys"}
    summary["caption_tokens"] = {k: v for k, v in lengths.items() if k != "counts"}
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("prepared %d items (%s), rejected %d %s; %.1f%% of test captions also in train", summary["items"],
             ", ".join(f"{s}={summary[f'{s}_items']}" for s in SPLITS), len(rejected),
             summary["rejected_by_reason"], 100 * summary["test_caption_overlap"])
    log.info("caption length in %s tokens: p50 %d, p95 %d, p99 %d, max %d", params.model.init, lengths["p50"],
             lengths["p95"], lengths["p99"], lengths["max"])


if __name__ == "__main__":
    run_stage(main)
