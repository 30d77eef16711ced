"""End to end: `fashioncap caption-catalogue` captions a folder of catalogue photos on Spark in local mode
(`local[2]`) with the registered champion through mlflow.pyfunc.spark_udf."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys

import pytest

from fashioncap import promotion
from fashioncap.catalogue import OUTPUT_COLUMNS
from fashioncap.register import register
from tests.conftest import new_run, table

pyspark = pytest.importorskip("pyspark", reason="the [spark] extra is not installed")
pytestmark = pytest.mark.slow
NAME = "fashion-captioner"
GOOD = 30


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tiny_model, tiny_raw):
    """A registry whose champion (version 1) is the tiny model, and a catalogue folder of 30 product photos
    in two sub-folders, JPEG and PNG, with three bad files and one file that is not an image by its name."""
    from mlflow import MlflowClient
    from PIL import Image

    from fashioncap.config import parse_params
    from fashioncap.runtime import QUIET_ENV
    from fashioncap.synthetic import catalogue as products

    root = tmp_path_factory.mktemp("catalogue")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = parse_params(copy.deepcopy(tiny_raw))
    model_dir, data_dir = tiny_model
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": uri}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        register(params, new_run(params), model_dir, data_dir, table(1.0))
        promotion.promote(MlflowClient(uri), NAME)
    photos = root / "photos"
    for i, product in enumerate(products(3, GOOD, 80)):
        folder = photos / ("tops" if i % 2 else "shoes")
        folder.mkdir(parents=True, exist_ok=True)
        product.image.save(folder / f"item-{i:03d}.{'png' if i % 3 else 'jpg'}")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    bad = {"truncated.png": buf.getvalue()[:100], "text.jpg": b"not an image at all",
           "huge.png": _huge_png(params.registry.max_pixels)}
    for file, data in bad.items():
        (photos / file).write_bytes(data)
    (photos / "notes.txt").write_text("not a photo: left out by its name")
    return root, photos, env, set(bad)


def _huge_png(max_pixels: int) -> bytes:
    """A small file whose header claims more pixels than the model accepts (a decompression bomb)."""
    from PIL import Image

    side = int(max_pixels**0.5) + 16
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def caption_catalogue(root, env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashioncap.cli", "caption-catalogue", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_image_comes_back_exactly_once_with_a_caption_or_its_error(catalogue):
    import pyarrow.parquet as pq

    root, photos, env, bad = catalogue
    out = root / "captions.parquet"
    proc = caption_catalogue(root, env, str(photos), "--output", str(out), "--master", "local[2]",
                             "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{GOOD + len(bad)} images: {GOOD} captioned, {len(bad)} with an error" in proc.stdout

    written = pq.read_table(out)
    assert tuple(written.column_names) == OUTPUT_COLUMNS
    rows = written.to_pylist()
    paths = [r["path"].removeprefix("file:") for r in rows]
    expected = sorted(str(p) for p in photos.rglob("*") if p.is_file() and p.suffix != ".txt")
    assert sorted(paths) == expected  # every image once, nothing else
    by_name = {os.path.basename(p): r for p, r in zip(paths, rows)}
    for name in bad:
        assert by_name[name]["caption"] is None and by_name[name]["error"], by_name[name]
    assert "pixels" in by_name["huge.png"]["error"]
    good = [r for n, r in by_name.items() if n not in bad]
    assert all(r["caption"] and r["error"] is None for r in good)
    assert {(r["model_name"], r["model_version"]) for r in rows} == {(NAME, "1")}

    # the same captions as `fashioncap caption` gives for the same files, one process, no Spark
    proc = subprocess.run([sys.executable, "-m", "fashioncap.cli", "caption", str(photos / "tops"), "--json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in proc.stdout.splitlines():
        item = json.loads(line)
        assert by_name[os.path.basename(item["file"])]["caption"] == item["caption"], item


def test_a_parquet_table_of_images_and_clear_errors(catalogue):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, photos, env, _ = catalogue
    files = sorted(photos.glob("shoes/*"))[:5]
    source = root / "table.parquet"
    pq.write_table(pa.table({"path": [f.name for f in files], "image": [f.read_bytes() for f in files]}), source)
    out = root / "from-table"
    proc = caption_catalogue(root, env, str(source), "--output", str(out), "--master", "local[1]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in rows) == [f.name for f in files] and all(r["caption"] for r in rows)

    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), root / "no-path.parquet")
    proc = caption_catalogue(root, env, str(root / "no-path.parquet"), "--output", str(root / "x"))
    assert proc.returncode == 2 and "lacks the column(s) ['path']" in proc.stderr
    proc = caption_catalogue(root, env, str(photos), "--output", str(root / "y"), "--model",
                             f"models:/{NAME}@nobody")
    assert proc.returncode == 2 and "no version with alias 'nobody'" in proc.stderr
