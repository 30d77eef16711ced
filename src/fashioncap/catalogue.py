"""`fashioncap caption-catalogue`: a whole catalogue captioned on Apache Spark by the registered model.

The images (a folder, read with Spark's binaryFile source, or a parquet table with `path` and `image`
columns) go through `mlflow.pyfunc.spark_udf` over one model version in Arrow batches; the model's
errors='row' mode makes a bad image a row with an error, never a failed job. The output is parquet with one
row per input image: path, caption, error, model name and version. `--master local[2]` runs on this
machine's cores; a cluster's master URL (spark://host:7077, yarn, k8s://...) runs the same job there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .runtime import FashioncapError

OUTPUT_COLUMNS = ("path", "caption", "error", "model_name", "model_version")  # one row per input image


class CatalogueError(FashioncapError):
    """The catalogue or the model cannot be used; the message says what to do."""


def pinned_version(client, uri: str) -> tuple[str, str]:
    """(name, version) of a models:/name@alias or models:/name/N URI: the job uses that one version from
    its first image to its last, even if the alias moves meanwhile."""
    from . import promotion

    if not uri.startswith("models:/"):
        raise CatalogueError(f"--model must be a registry URI (models:/name@alias or models:/name/N), not {uri}")
    name, _, ref = uri.removeprefix("models:/").partition("@")
    if ref:
        version = promotion.alias_version(client, name, ref)
        if version is None:
            raise CatalogueError(f"model '{name}' has no version with alias '{ref}'")
        return name, str(version.version)
    name, _, number = name.partition("/")
    if not number.isdigit():
        raise CatalogueError(f"--model {uri}: expected models:/name@alias or models:/name/N")
    return name, number


def session(master: str, app: str = "fashioncap-caption-catalogue"):
    """A Spark session on `master`, with Arrow batches for the pandas UDF."""
    from pyspark.sql import SparkSession

    from .serving import SETTINGS_ENV

    builder = (SparkSession.builder.master(master).appName(app)
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.ui.enabled", "false"))
    # a cluster's executors start from their worker's environment, not the driver's: they get these as well
    for name in ("MLFLOW_TRACKING_URI", SETTINGS_ENV):
        if os.environ.get(name):
            builder = builder.config(f"spark.executorEnv.{name}", os.environ[name])
    return builder.getOrCreate()


def read_images(spark, source: Path, suffixes: set[str]):
    """(path, content) rows: every image file under a folder, or a parquet table's path and image columns."""
    from pyspark.sql import functions as F

    if source.is_dir():
        pattern = "(?i)\\.(" + "|".join(sorted(s.lstrip(".") for s in suffixes)) + ")$"
        frame = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(source))
                 .where(F.col("path").rlike(pattern)))
        return frame.select("path", "content")
    frame = spark.read.parquet(str(source))
    return frame.select(F.col("path").cast("string"), F.col("image").alias("content"))


def check_source(source: Path) -> None:
    """A folder, or a parquet table with the columns a catalogue needs: checked before Spark starts (a JVM
    and its workers take seconds to start, and a wrong path should not wait for them)."""
    if not source.exists():
        raise CatalogueError(f"{source} does not exist")
    if source.is_dir():
        return
    with open(source, "rb") as handle:
        if source.suffix != ".parquet" and handle.read(4) != b"PAR1":
            raise CatalogueError(f"{source} is neither a folder of images nor a parquet table")
    import pyarrow.parquet as pq

    missing = {"path", "image"} - set(pq.read_schema(source).names)
    if missing:
        raise CatalogueError(f"{source} lacks the column(s) {sorted(missing)}: a catalogue table has a 'path' "
                             "(or id) column and an 'image' column of encoded image bytes")


def caption_catalogue(spark, source: Path, output: Path, model_uri: str, tracking_uri: str, batch_images: int) -> dict:
    """Captions every image of `source` with one model version; writes `output` (parquet) and returns counts."""
    import mlflow
    from pyspark.sql import functions as F

    from .imaging import IMAGE_SUFFIXES

    name, version = pinned_version(mlflow.MlflowClient(tracking_uri), model_uri)
    images = read_images(spark, source, IMAGE_SUFFIXES)
    # one Arrow batch is one predict() call: the model captions it in generate() batches of its own
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_images))
    caption = mlflow.pyfunc.spark_udf(spark, f"models:/{name}/{version}", result_type="caption string, error string",
                                      env_manager="local", params={"errors": "row"})
    # Spark's base64() may wrap lines MIME-style (a setting that changed between versions): the model wants none
    result = (images.withColumn("image", F.regexp_replace(F.base64("content"), r"\s", ""))
              .withColumn("out", caption("image"))
              .select("path", F.nullif("out.caption", F.lit("")).alias("caption"),
                      F.nullif("out.error", F.lit("")).alias("error"), F.lit(name).alias("model_name"),
                      F.lit(version).alias("model_version")))
    started = time.perf_counter()
    result.write.mode("overwrite").parquet(str(output))
    seconds = time.perf_counter() - started
    written = spark.read.parquet(str(output))
    counts = written.agg(F.count("*").alias("rows"), F.count("caption").alias("captioned"),
                         F.count("error").alias("errors")).first().asDict()
    return {**counts, "model": f"models:/{name}/{version}", "seconds": round(seconds, 1),
            "images_per_s": round(counts["rows"] / seconds, 2) if seconds else None}


def run(source: Path, output: Path, model_uri: str, master: str, batch_images: int, threads: int) -> dict:
    """The job as the command runs it: environment, session, captions, session stopped."""
    from . import tracking
    from .serving import HostSettings

    check_source(source)
    tracking_uri = tracking.tracking_uri()
    # the Python workers Spark starts inherit these: the registry, and one torch thread pool per task
    os.environ.update({"MLFLOW_TRACKING_URI": tracking_uri, **HostSettings(threads=threads).env()})
    if master.startswith("local"):  # the workers run this Python (a cluster's nodes have their own, PYSPARK_PYTHON)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = session(master)
    try:
        return caption_catalogue(spark, source, output, model_uri, tracking_uri, batch_images)
    finally:
        spark.stop()
