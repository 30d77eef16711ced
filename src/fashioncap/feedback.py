"""Reviewers' corrections as data: `fashioncap feedback FILE` checks every line of a reviewers' JSONL file and,
only when all pass, writes them into the catalogue's corrections (data/corrections/reviewed, tracked by DVC).
`prepare` reads them: a correction replaces the catalogue's caption for its key, in whichever split the key
belongs to, and a new photo joins the catalogue (split by its key like any product).

A line is `{"key": ..., "caption": ...}` for a product of the catalogue, or `{"image": PATH, "caption": ...}`
for a new photo (PATH relative to the file). A worklist line of `fashioncap review` is one already: its other
fields are read past.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import DataParams
from .data import CORRECTIONS_RECORD, RawItem, clean_caption
from .imaging import ImageInputError, decode_image
from .runtime import FashioncapError

REVIEWED = "reviewed"  # the DVC-tracked folder inside the corrections folder
LINES = "corrections.jsonl"
PHOTOS = "photos"
WORKLIST_FIELDS = {"confidence", "split", "catalogue_caption", "photo"}  # review.py's, read past
MAX_PHOTO_BYTES = 50_000_000


class FeedbackError(FashioncapError):
    """A reviewers' file with bad lines: one error per line, with its number; nothing was applied."""


@dataclass(frozen=True)
class Correction:
    key: str
    caption: str
    photo: bytes | None = None  # a new product's photo; None: a correction of a catalogue product's caption


def photo_key(data: bytes) -> str:
    """A new photo's catalogue key: its content's, so the same photo sent twice is one product."""
    return f"photo-{hashlib.sha256(data).hexdigest()[:16]}"


def suffix(data: bytes) -> str:
    return ".png" if data.startswith(b"\x89PNG") else ".jpg" if data.startswith(b"\xff\xd8") else ".img"


def _caption(raw, cfg: DataParams) -> str:
    caption = clean_caption(raw)
    if not caption:
        raise ValueError("empty or missing caption")
    if len(caption.split()) > cfg.max_caption_words:
        raise ValueError(f"caption of {len(caption.split())} words (limit data.max_caption_words "
                         f"{cfg.max_caption_words})")
    return caption


def _photo(path: Path, cfg: DataParams) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_PHOTO_BYTES:
            raise ValueError(f"image '{path}' is {size} bytes (limit {MAX_PHOTO_BYTES})")
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read image '{path}': {error.strerror or error}") from None
    try:
        image = decode_image(data, cfg.max_pixels)
    except ImageInputError as error:
        raise ValueError(f"image '{path}': {error}") from None
    if min(image.size) < cfg.min_image_side:
        raise ValueError(f"image '{path}' of {image.width}x{image.height} pixels is below data.min_image_side "
                         f"({cfg.min_image_side})")
    return data


def _correction(line: str, folder: Path, keys: set[str], cfg: DataParams) -> Correction:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg})") from None
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(entry) - {"key", "image", "caption"} - WORKLIST_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    if ("key" in entry) == ("image" in entry):
        raise ValueError('needs either "key" (a product of the catalogue) or "image" (a new photo\'s path)')
    caption = _caption(entry.get("caption"), cfg)
    if "key" in entry:
        if not isinstance(entry["key"], str) or entry["key"] not in keys:
            raise ValueError(f"unknown key {entry['key']!r}: no product of the prepared catalogue has it")
        return Correction(entry["key"], caption)
    if not isinstance(entry["image"], str) or not entry["image"]:
        raise ValueError('"image" must be a path')
    data = _photo(folder / entry["image"], cfg)
    return Correction(photo_key(data), caption, data)


def check(lines: list[str], folder: Path, keys: set[str], cfg: DataParams) -> list[Correction]:
    """Every line of a reviewers' file as a correction, or FeedbackError listing each bad line (numbered from
    1): nothing is returned unless every line passes."""
    corrections, errors, first = [], [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            correction = _correction(line, folder, keys, cfg)
        except ValueError as error:
            errors.append(f"line {number}: {error}")
            continue
        if correction.key in first:
            errors.append(f"line {number}: {correction.key!r} is corrected again (first on line {first[correction.key]})")
            continue
        first[correction.key] = number
        corrections.append(correction)
    if errors:
        raise FeedbackError(f"{len(errors)} bad line(s); nothing was applied:\n" + "\n".join(errors))
    if not corrections:
        raise FeedbackError("the file holds no correction; nothing was applied")
    return corrections


def stored(corrections_dir: Path) -> dict[str, dict]:
    """The corrections the catalogue holds, by key: {"caption", "photo" (a new product's, relative) or None}."""
    path = corrections_dir / REVIEWED / LINES
    if not path.is_file():
        return {}
    return {e["key"]: e for e in map(json.loads, path.read_text().splitlines()) if e}


def apply(corrections: list[Correction], corrections_dir: Path) -> dict[str, int]:
    """Merges the corrections into the stored ones (a newer caption for a key replaces the older), written as a
    whole new folder that then replaces the old one: a crash leaves the old corrections or the new, never half."""
    reviewed = corrections_dir / REVIEWED
    corrections_dir.mkdir(parents=True, exist_ok=True)
    if not reviewed.exists() and (left := sorted(corrections_dir.glob(".old-*"))):
        left[-1].rename(reviewed)  # an apply that crashed between its two renames: its old corrections again
    merged = stored(corrections_dir)
    staging = Path(tempfile.mkdtemp(prefix=".reviewed-", dir=corrections_dir))
    (staging / PHOTOS).mkdir()
    for entry in merged.values():
        if entry.get("photo"):
            shutil.copy2(reviewed / entry["photo"], staging / entry["photo"])
    for c in corrections:
        photo = None
        if c.photo is not None:
            photo = f"{PHOTOS}/{c.key}{suffix(c.photo)}"
            (staging / photo).write_bytes(c.photo)
        merged[c.key] = {"key": c.key, "caption": c.caption, "photo": photo}
    (staging / LINES).write_text("".join(json.dumps(merged[k]) + "\n" for k in sorted(merged)))
    if reviewed.exists():
        old = corrections_dir / f".old-{os.getpid()}"
        reviewed.rename(old)
        staging.rename(reviewed)
        shutil.rmtree(old)
    else:
        staging.rename(reviewed)
    return {"captions": sum(c.photo is None for c in corrections), "photos": sum(c.photo is not None for c in corrections),
            "stored": len(merged)}


def corrected(items, corrections: dict[str, dict], used: dict[str, int]):
    """The catalogue's items with each corrected key's caption replaced (`used["captions"]` counts them)."""
    for item in items:
        entry = corrections.get(item.key)
        if entry is not None and not entry.get("photo"):
            used["captions"] += 1
            item = RawItem(item.key, item.image, entry["caption"], item.category, item.source, item.problem)
        yield item


def new_photos(corrections_dir: Path, corrections: dict[str, dict]):
    """The new products' photos of the corrections, as catalogue items."""
    for entry in corrections.values():
        if entry.get("photo"):
            data = (corrections_dir / REVIEWED / entry["photo"]).read_bytes()
            yield RawItem(entry["key"], data, entry["caption"], None, "reviewers' correction")


def write_record(prepared: Path, used: dict[str, int]) -> None:
    (prepared / CORRECTIONS_RECORD).write_text(json.dumps(used, indent=2) + "\n")
