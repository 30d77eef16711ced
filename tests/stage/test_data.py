"""Splitting, image conversion, caption cleaning and the data sources."""

import io
import json
import subprocess
import sys
import time

import pytest
from PIL import Image

from fashioncap.config import parse_params
from fashioncap.data import DataSourceError, clean_caption, read_source, split_of
from fashioncap.imaging import to_model_image
from tests.conftest import compose


def test_split_depends_only_on_the_key():
    keys = [f"item-{i}" for i in range(3000)]
    first = {k: split_of(k, "salt", 0.1, 0.1) for k in keys}
    more = [f"new-{i}" for i in range(500)] + keys[::-1]  # rows added and reordered
    again = {k: split_of(k, "salt", 0.1, 0.1) for k in more}
    assert all(first[k] == again[k] for k in keys)
    counts = {s: list(first.values()).count(s) for s in ("train", "validation", "test")}
    assert 240 <= counts["test"] <= 360 and 240 <= counts["validation"] <= 360
    salted = {k: split_of(k, "other salt", 0.1, 0.1) for k in keys}
    moved = sum(first[k] != salted[k] for k in keys)
    assert 850 < moved < 1200  # another salt draws another split: 1 - (0.8² + 0.1² + 0.1²) = 34% of items move


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16", "LA"])
def test_images_of_any_mode_become_rgb_at_model_size(mode):
    image = Image.new(mode, (40, 20))
    out = to_model_image(image, 24)
    assert out.mode == "RGB" and out.size == (24, 24)


def test_exif_rotated_photo_is_turned_upright():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    upright = to_model_image(buf.getvalue(), 40)
    top, bottom = upright.getpixel((20, 5)), upright.getpixel((20, 35))
    assert top[2] > 150 and bottom[0] > 150  # blue now on top, red below


def test_clean_caption_rejects_non_text():
    assert clean_caption("  A Red  WATCH. ") == "A Red WATCH."
    assert clean_caption(None) == "" and clean_caption(3) == "" and clean_caption("   ") == ""
    assert clean_caption("caf\xe9".encode("latin-1")) == "caf"  # undecodable bytes dropped, no crash


def test_imagefolder_source_reads_user_catalogue(tmp_path, tiny_raw):
    for i in range(3):
        Image.new("RGB", (30, 30), (i * 80, 0, 0)).save(tmp_path / f"p{i}.png")
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"p{i}.png", "description": f"Item {i}", "kind": "bag"}) + "\n" for i in range(3)))
    raw = dict(tiny_raw, data={**tiny_raw["data"], "source": "imagefolder", "path": str(tmp_path),
                               "text_column": "description", "category_column": "kind"})
    items = list(read_source(parse_params(raw).data, seed=0))
    assert sorted(i.caption for i in items) == ["Item 0", "Item 1", "Item 2"]
    assert {i.category for i in items} == {"bag"} and len({i.key for i in items}) == 3


def test_missing_text_column_names_the_columns_it_found(tmp_path, tiny_raw):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,hello\n")
    raw = dict(tiny_raw, data={**tiny_raw["data"], "source": "imagefolder", "path": str(tmp_path)})
    with pytest.raises(DataSourceError, match=r"no column\(s\) \['text'\].*caption"):
        list(read_source(parse_params(raw).data, seed=0))


@pytest.mark.slow
def test_default_profile_without_hub_access_stops_fast_naming_the_offline_command(tmp_path, write_params, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: no Hub here, whatever the network
    params = write_params(compose([]))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fashioncap.prepare", "--params", str(params),
                           "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
                           "--corrections", str(tmp_path / "corrections")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "dvc exp run -S profile=offline" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


def test_the_new_part_is_prepared_with_the_base_parts_test_split_beside_it(tiny_raw):
    """What a model adapted from the base part forgot is scored on exactly what that model was tested on."""
    from fashioncap.prepare import build_splits

    base_rows, _ = build_splits(parse_params(tiny_raw))
    new_raw = {**tiny_raw, "data": {**tiny_raw["data"], "synthetic": {**tiny_raw["data"]["synthetic"], "part": "new"}}}
    new_rows, rejected = build_splits(parse_params(new_raw))
    assert set(base_rows) == {"train", "validation", "test"} and not rejected
    assert [r["key"] for r in new_rows["base_test"]] == [r["key"] for r in base_rows["test"]]
    assert [r["caption"] for r in new_rows["base_test"]] == [r["caption"] for r in base_rows["test"]]
    assert new_rows["base_test"][0]["image"]["bytes"] == base_rows["test"][0]["image"]["bytes"]
    new_keys = {r["key"] for split in ("train", "validation", "test") for r in new_rows[split]}
    assert len(new_keys) == 150 and all(k.startswith("synthetic-new-") for k in new_keys)
