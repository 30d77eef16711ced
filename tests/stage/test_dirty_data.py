"""A dirty catalogue prepares: every unusable item is left out with its reason, the rest converted."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

GOOD_CAPTION = "a red watch with black strap"


def png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return png(Image.new("RGB", (80, 40), (200, 0, 0)), "JPEG", exif=exif)


def dirty_catalogue(folder: Path) -> dict[str, str]:
    """Writes an imagefolder of good and bad items; returns the expected rejection kind per file."""
    good = {
        "rgb.png": png(Image.new("RGB", (64, 64), (10, 20, 30))),
        "rgba.png": png(Image.new("RGBA", (64, 64), (10, 20, 30, 0))),
        "grey.png": png(Image.new("L", (64, 64), 90)),
        "palette.png": png(Image.new("P", (64, 64), 3)),
        "cmyk.jpg": png(Image.new("CMYK", (64, 64), (0, 50, 50, 0)), "JPEG"),
        "deep.png": png(Image.new("I;16", (64, 64), 40000)),
        "deep-big-endian.tif": png(Image.new("I;16B", (64, 64), 40000), "TIFF"),
        "rotated.jpg": rotated_jpeg(),
    }
    bad = {
        "empty.png": (b"", "empty_image"),
        "truncated.png": (png(Image.effect_noise((96, 96), 60).convert("RGB"))[:400], "corrupt_image"),
        "document.png": (b"%PDF-1.4 not an image at all", "not_an_image"),
        "bomb.png": (png(Image.new("L", (500, 500))), "too_many_pixels"),
        "tiny.png": (png(Image.new("RGB", (8, 8))), "too_small"),
        "nocaption.png": (png(Image.new("RGB", (64, 64), (1, 2, 3))), "empty_caption"),
        "blank.png": (png(Image.new("RGB", (64, 64), (4, 5, 6))), "empty_caption"),
        "essay.png": (png(Image.new("RGB", (64, 64), (7, 8, 9))), "long_caption"),
        "again.png": (good["rgb.png"], "duplicate_image_other_caption"),
        "drawing.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n", "not_an_image"),
    }
    captions = {name: GOOD_CAPTION + f" number {i}" for i, name in enumerate(good)}
    captions.update({"nocaption.png": None, "blank.png": "   \t ", "essay.png": " ".join(["word"] * 300),
                     "again.png": "a different caption"})
    for name, data in {**good, **{n: d for n, (d, _) in bad.items()}}.items():
        (folder / name).write_bytes(data)
    with open(folder / "metadata.jsonl", "w") as f:
        for name in [*good, *bad]:  # good first: the duplicate's original comes before it
            f.write(json.dumps({"file_name": name, "text": captions.get(name, GOOD_CAPTION)}) + "\n")
    # files outside the catalogue folder, which DVC does not hash with it: named by a climbing or an absolute
    # path, or through a link, they are refused, not read
    outside = folder.parent / "outside.png"
    outside.write_bytes(png(Image.new("RGB", (64, 64), (0, 99, 0))))
    (folder / "link.png").symlink_to(outside)
    escapes = ["../outside.png", str(outside), "link.png"]
    with open(folder / "metadata.jsonl", "a") as f:
        for name in ["gone.png", *escapes]:
            f.write(json.dumps({"file_name": name, "text": GOOD_CAPTION}) + "\n")
    legacy = folder / "legacy"
    legacy.mkdir()
    (legacy / "dress.png").write_bytes(png(Image.new("RGB", (64, 64), (100, 0, 100))))
    (legacy / "metadata.csv").write_bytes("file_name,text\ndress.png,Caf\xe9 cr\xe8me dress\n".encode("cp1252"))
    return {**{name: kind for name, (_, kind) in bad.items()}, "gone.png": "unreadable_entry",
            **{name: "unreadable_entry" for name in escapes}}


def prepare(tmp_path, write_params, tiny_raw, max_rejected: float) -> subprocess.CompletedProcess:
    data = {**tiny_raw["data"], "source": "imagefolder", "path": str(tmp_path / "shop"), "max_pixels": 100_000,
            "val_fraction": 0.2, "test_fraction": 0.2, "split_salt": "dirty", "max_rejected_fraction": max_rejected}
    params = write_params({**tiny_raw, "data": data})
    return subprocess.run([sys.executable, "-m", "fashioncap.prepare", "--params", str(params),
                           "--out", str(tmp_path / "prepared"), "--metrics", str(tmp_path / "prepare.json"),
                           "--corrections", str(tmp_path / "corrections")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


@pytest.fixture
def shop(tmp_path) -> dict[str, str]:
    (tmp_path / "shop").mkdir()
    return dirty_catalogue(tmp_path / "shop")


@pytest.mark.slow
def test_dirty_catalogue_prepares_with_a_rejection_report(tmp_path, write_params, tiny_raw, shop):
    proc = prepare(tmp_path, write_params, tiny_raw, max_rejected=0.7)
    assert proc.returncode == 0, proc.stderr
    report = [json.loads(line) for line in (tmp_path / "prepared" / "rejected.jsonl").read_text().splitlines()]
    assert {r["source"]: r["kind"] for r in report} == shop
    assert all(r["key"] and r["reason"] for r in report)
    metrics = json.loads((tmp_path / "prepare.json").read_text())
    assert metrics["items"] == 9 and metrics["rejected"] == len(shop)
    reasons = {r["source"]: r["reason"] for r in report}
    assert "outside the catalogue folder" in reasons["../outside.png"] and "absolute path" in reasons[
        str(tmp_path / "outside.png")] and "outside the catalogue folder" in reasons["link.png"]
    assert metrics["rejected_by_reason"]["empty_caption"] == 2
    kept = datasets.load_from_disk(str(tmp_path / "prepared"))
    images = [row["image"] for split in kept.values() for row in split]
    assert len(images) == 9 and {im.mode for im in images} == {"RGB"}
    captions = {row["caption"] for split in kept.values() for row in split}
    assert "Café crème dress" in captions  # a legacy-encoded metadata file is read, not rejected
    assert {im.size for im in images} == {(tiny_raw["model"]["image_size"],) * 2}
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_too_dirty_a_catalogue_fails_naming_the_worst_reasons(tmp_path, write_params, tiny_raw, shop):
    proc = prepare(tmp_path, write_params, tiny_raw, max_rejected=0.3)
    assert proc.returncode == 2
    assert "14 of 23 items rejected" in proc.stderr and "empty_caption (2)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_processes_give_the_same_rows_and_rejections_as_one_process(tmp_path, tiny_raw, shop):
    from fashioncap.config import parse_params
    from fashioncap.prepare import build_splits

    data = {**tiny_raw["data"], "source": "imagefolder", "path": str(tmp_path / "shop"), "max_pixels": 100_000}
    serial = build_splits(parse_params({**tiny_raw, "data": {**data, "num_workers": 0}}))
    parallel = build_splits(parse_params({**tiny_raw, "data": {**data, "num_workers": 2}}))
    assert parallel == serial
    rows, rejected = serial
    assert sum(map(len, rows.values())) >= 5 and {r["kind"] for r in rejected} >= {"duplicate_image_other_caption", "corrupt_image", "too_many_pixels"}
