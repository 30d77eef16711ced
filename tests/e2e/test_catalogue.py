"""End to end: `fashioncap caption-catalogue` captions a folder of catalogue photos on Spark, in local mode
(`local[2]`) and on a standalone cluster of two workers that loses one, with the registered champion
through mlflow.pyfunc.spark_udf."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fashioncap import promotion
from fashioncap.catalogue import OUTPUT_COLUMNS
from fashioncap.register import register
from tests.conftest import SHORT_LIVED_JVM, new_run, table

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


def spark_class(*args: str) -> list[str]:
    """A Spark daemon from the jars pyspark ships (its bin/spark-class; no Spark install needed)."""
    return [str(Path(pyspark.__file__).parent / "bin" / "spark-class"), *args]


def alive_workers(web: str) -> int:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{web}/json/", timeout=2) as response:
            return json.loads(response.read())["aliveworkers"]
    except (OSError, ValueError, KeyError):  # not up yet: no answer, or a starting UI's empty or partial page
        return -1


def test_a_standalone_cluster_losing_a_worker_mid_job_still_returns_every_photo_once(catalogue, tmp_path):
    """A Spark standalone master and two one-core workers on loopback; one worker (and its executor) is
    SIGKILLed once the job has committed a few tasks. Spark runs the lost tasks again on the other worker:
    the output still holds every photo exactly once, with the same captions as local mode."""
    import signal
    import time

    import pyarrow.parquet as pq

    from tests.services import Service, free_port

    root, photos, env, bad = catalogue
    port, web_port = free_port(), free_port()
    master, web = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{web_port}"
    spark_env = {**env, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
                 "SPARK_LOG_DIR": str(tmp_path), "SPARK_WORKER_DIR": str(tmp_path / "work")}
    with contextlib.ExitStack() as stack:
        stack.enter_context(Service(spark_class("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                                "--port", str(port), "--webui-port", str(web_port)),
                                    lambda: alive_workers(web) >= 0, tmp_path / "master.log", spark_env))
        workers = [stack.enter_context(Service(
            spark_class("org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1",
                        "--memory", "2g", "--webui-port", str(free_port()), "--work-dir", str(tmp_path / f"w{i}"),
                        master),
            lambda i=i: alive_workers(web) >= i + 1, tmp_path / f"worker{i}.log", spark_env, grace=5))
            for i in range(2)]
        out = tmp_path / "captions.parquet"
        # a task for every photo or two, so that each worker has several to lose
        job_env = {**spark_env, "PYSPARK_SUBMIT_ARGS": "--conf spark.sql.files.maxPartitionBytes=16384 "
                   "--conf spark.sql.files.openCostInBytes=8192 --conf spark.executor.extraJavaOptions="
                   f"'{SHORT_LIVED_JVM}' pyspark-shell"}
        job = subprocess.Popen([sys.executable, "-m", "fashioncap.cli", "caption-catalogue", str(photos), "--output",
                                str(out), "--master", master, "--batch-size", "4"], cwd=root, env=job_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(list((out / "_temporary" / "0").glob("task_*"))) < 3:  # tasks committed so far
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(workers[1].pid, signal.SIGKILL)  # the worker and the executor it started
        killed_while_running = job.poll() is None
        stdout, stderr = job.communicate(timeout=600)
    assert killed_while_running and job.returncode == 0, stderr[-3000:]
    assert "Lost executor" in stderr, stderr[-3000:]  # the driver saw the executor go
    assert f"{GOOD + len(bad)} images: {GOOD} captioned, {len(bad)} with an error" in stdout

    rows = pq.read_table(out).to_pylist()
    paths = sorted(r["path"].removeprefix("file:") for r in rows)
    assert paths == sorted(str(p) for p in photos.rglob("*") if p.is_file() and p.suffix != ".txt")
    local = {r["path"]: r["caption"] for r in pq.read_table(root / "captions.parquet").to_pylist()} \
        if (root / "captions.parquet").exists() else {}
    for r in rows:
        assert local.get(r["path"], r["caption"]) == r["caption"]
