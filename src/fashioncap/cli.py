"""The `fashioncap` command: promote, roll back, serve and caption with the model registry."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from . import promotion, tracking
from .imaging import IMAGE_SUFFIXES
from .runtime import FashioncapError, configure_environment, progress, project_root, tune_collector

log = logging.getLogger(__name__)
DEFAULT_NAME = "fashion-captioner"


def registry_params():
    """The `registry` section of the project's params.yaml, or None outside a valid project."""
    from .config import ConfigError, load_params

    try:
        return load_params(project_root() / "params.yaml").registry
    except ConfigError:
        return None


def model_name(given: str | None) -> str:
    """--name if given, else registry.name from the project's params.yaml, else the default name."""
    registry = None if given else registry_params()
    return given or (registry.name if registry else DEFAULT_NAME)


def _client():
    from mlflow import MlflowClient

    return MlflowClient(tracking.tracking_uri())


def cmd_promote(args) -> int:
    for line in promotion.promote(_client(), model_name(args.name), args.version, args.force).lines():
        print(line)
    return 0


def cmd_rollback(args) -> int:
    for line in promotion.rollback(_client(), model_name(args.name)):
        print(line)
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce

    logging.getLogger("fashioncap").setLevel(logging.INFO)  # the re-run takes minutes: say what happens
    text, same = reproduce(args.ref, project_root(), _client(), keep=args.keep)
    print(text)
    return 0 if same else 1


def cmd_rehearse(args) -> int:
    from .rehearsal import rehearse, table

    logging.getLogger("fashioncap").setLevel(logging.INFO)  # minutes of work: say which stage runs
    root = project_root()
    from .rehearsal import check_hf_home, default_hf_home

    hf_home = Path(args.hf_home).resolve() if args.hf_home else default_hf_home(args.size)
    if args.build_only:
        from .rehearsal import SIZES
        from .standins import build

        check_hf_home(hf_home, args.size)
        shape = SIZES[args.size]
        print(json.dumps(build(hf_home, shape["shrunk"], shape["items"], shape["shards"], shape["image_size"]), indent=2))
        print(f"run the default profile on them with: HF_HOME={hf_home} HF_HUB_OFFLINE=1 dvc exp run -S profile=default "
              "-S train.allow_cpu=true ...", file=sys.stderr)
        return 0
    result = rehearse(root, args.size, hf_home, args.serve, args.port, args.set or [], use_dvc=not args.without_dvc,
                      keep=args.keep)
    out = root / "reports" / f"rehearsal-{args.size}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"all figures: {out}" + (f"; the rehearsal's work tree (outputs, mlflow.db): {result['worktree']}"
                                   if result["worktree"] else ""))
    return 0 if result.get("serving", {}).get("status", 200) == 200 else 1


def _check_alias(uri: str) -> None:
    """Fails clearly when a models:/name@alias URI names an alias that is not set."""
    if uri.startswith("models:/") and "@" in uri:
        name, alias = uri.removeprefix("models:/").split("@", 1)
        if promotion.alias_version(_client(), name, alias) is None:
            raise promotion.RegistryError(f"model '{name}' has no version with alias '{alias}'"
                                         + (": promote one with `fashioncap promote`" if alias == "champion" else ""))


def request_timeout(given: int | None) -> int:
    """--timeout if given, else registry.request_timeout of the project's params.yaml, else MLflow's 60 s."""
    registry = None if given else registry_params()
    return given or (registry.request_timeout if registry else 60)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds >= 0, not {text}")
    return value


def served_config(uri: str) -> dict:
    """The serving_config.json a registered model carries (limits, generation, batching), without
    downloading the model; {} when it has none."""
    import tempfile

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = get_artifact_repository(uri).download_artifacts("artifacts/serving_config.json", tmp)
        except Exception as error:  # noqa: BLE001 - any store's "not found"
            log.debug("no serving config in %s: %s", uri, error)
            return {}
        return json.loads(Path(path).read_text())


def cmd_serve(args) -> int:
    from .serving import HostSettings

    _check_alias(args.model)
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    # the served model measures its pace at start-up and lowers its image limit and batch to fit this timeout
    command = [mlflow_bin, "models", "serve", "-m", args.model, "--env-manager", "local", "-h", args.host,
               "-p", str(args.port), "--timeout", str(request_timeout(args.timeout)), "--workers", str(args.workers)]
    print(" ".join(command), file=sys.stderr)
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    # MLflow starts the server as `uvicorn` from PATH: the one installed beside this Python, venv not activated
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    config = served_config(args.model)
    batch = args.batch_size or config.get("batch_images", 1)
    if "batch_images" not in config:
        print("this model version was registered before request batching: it serves one request at a time",
              file=sys.stderr)
    elif batch > 1:
        # the model reads these in each server process; a full batch of requests waits while the next is read
        os.environ.update({**HostSettings(batch_images=batch, batch_wait_ms=args.max_wait_ms,
                                          request_threads=2 * batch + 4).env(),
                           "UVICORN_LOOP": "fashioncap.serving:request_loop"})
    else:
        os.environ.update(HostSettings(batch_images=1).env())
    os.execv(mlflow_bin, command)  # MLflow's own scoring server, not a re-implementation
    return 0


def image_files(paths: list[str]) -> list[Path]:
    """The files named, and the images inside the folders named, in a stable order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)
    return found


def _readable(files: list[Path], max_pixels: int) -> tuple[list[tuple[Path, str]], dict[Path, str]]:
    """Reads and checks each file; returns (file, base64) for the good ones and an error per bad one."""
    from .imaging import ImageInputError, decode_image

    good, errors = [], {}
    for f in files:
        try:
            data = f.read_bytes()
            decode_image(data, max_pixels)
            good.append((f, base64.b64encode(data).decode()))
        except (OSError, ImageInputError) as error:
            errors[f] = str(error)
    return good, errors


def requests_within(images: list[tuple[Path, str]], max_images: int, max_bytes: int) -> list[list[tuple[Path, str]]]:
    """Splits (file, base64) pairs into requests of at most `max_images` images and `max_bytes` of image
    data, in order; an image larger than `max_bytes` on its own goes alone (the model refuses it by name)."""
    batches: list[list[tuple[Path, str]]] = []
    size = 0
    for item in images:
        if not batches or len(batches[-1]) >= max_images or size + len(item[1]) > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += len(item[1])
    return batches


def served_limits(model, batch_size: int) -> tuple[int, int, int]:
    """The images per request, bytes per request and pixels per image that the loaded model accepts."""
    from .imaging import DEFAULT_MAX_PIXELS

    inner = model.unwrap_python_model()
    config = getattr(inner, "config", {})
    return (min(batch_size, getattr(inner, "max_images", batch_size)),
            config.get("max_request_bytes", 1 << 62), config.get("max_pixels", DEFAULT_MAX_PIXELS))


def cmd_caption_catalogue(args) -> int:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise FashioncapError("caption-catalogue runs on Apache Spark: pip install -e '.[spark]' (and Java 17+)") from None
    from .catalogue import run

    _check_alias(args.model)
    summary = run(Path(args.source), Path(args.output), args.model, args.master, args.batch_size, args.threads)
    print(f"{summary['rows']} images: {summary['captioned']} captioned, {summary['errors']} with an error "
          f"(column 'error'), by {summary['model']} in {summary['seconds']} s ({summary['images_per_s']} images/s) "
          f"-> {args.output}")
    return 0


def cmd_caption(args) -> int:
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    files = image_files(args.paths)
    if not files:
        raise promotion.RegistryError("no image files found in the paths given")
    from .serving import SETTINGS_ENV, HostSettings

    _check_alias(args.model)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    if SETTINGS_ENV not in os.environ:  # a process of its own: the model pins the training's numerics
        os.environ.update(HostSettings(threads=0).env())
    model = mlflow.pyfunc.load_model(args.model)
    max_images, max_bytes, max_pixels = served_limits(model, args.batch_size)
    good, errors = _readable(files, max_pixels)
    captions: dict[Path, str] = {}
    for batch in progress(requests_within(good, max_images, max_bytes), desc="caption", unit="request"):
        try:
            out = model.predict(pd.DataFrame({"image": [b for _, b in batch]}))
        except MlflowException as error:  # the model refused the request: say so for each of its files
            errors.update((f, error.message) for f, _ in batch)
            continue
        captions.update(zip((f for f, _ in batch), out))
    for f in files:
        if f in errors:
            print(f"error: {f}: {errors[f]}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"file": str(f), "caption": captions[f]}))
        else:
            print(f"{f}\t{captions[f]}")
    return 1 if not captions else 0


def cmd_score(args) -> int:
    from .scoring import default_vocabulary, score_files, table

    vocabulary = None if args.no_attributes else Path(args.attributes) if args.attributes else default_vocabulary()
    scores = score_files(Path(args.references), Path(args.predictions), meteor=not args.no_meteor,
                         attributes=vocabulary)
    print(json.dumps(scores) if args.json else table(scores))
    return 0


def cmd_review(args) -> int:
    from .review import PAGE, WORKLIST, review

    _check_alias(args.model)
    root = project_root()
    out, data = root / args.out, root / args.data
    rows = review(args.model, data, args.count, out, args.splits)
    print(f"{len(rows)} captions of {args.model} to review, least sure first: {out / WORKLIST} (correct a line's "
          f"caption, then `fashioncap feedback {out / WORKLIST}`); the page: {out / PAGE}")
    return 0


def cmd_feedback(args) -> int:
    import subprocess

    import datasets
    import yaml

    from . import feedback
    from .config import load_params

    root = project_root()
    params = load_params(root / "params.yaml")
    prepared = root / args.data
    if not (prepared / "dataset_dict.json").is_file():
        raise FashioncapError(f"{prepared} holds no prepared catalogue to check keys against: run the pipeline "
                              "(`dvc repro`) first")
    keys = {key for split in datasets.load_from_disk(str(prepared)).values() for key in split["key"]}
    source = Path(args.file)
    try:
        lines = source.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise feedback.FeedbackError(f"cannot read {source}: {error}") from None
    corrections = feedback.check(lines, source.resolve().parent, keys, params.data)
    folder = root / yaml.safe_load((root / "dvc.yaml").read_text())["vars"][0]["paths"]["corrections"]
    counts = feedback.apply(corrections, folder)
    tracked = folder / feedback.REVIEWED
    proc = subprocess.run([str(Path(sys.executable).with_name("dvc")), "add", str(tracked.relative_to(root))],
                          cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise FashioncapError(f"the corrections are in {tracked}, but `dvc add` failed: {proc.stderr.strip()[-500:]}")
    print(f"applied {counts['captions']} caption corrections and {counts['photos']} new photos "
          f"({counts['stored']} corrections in {tracked.relative_to(root)}, tracked by DVC). Commit them "
          f"(`git add {folder.relative_to(root)} && git commit`), then train on them with replay: "
          "dvc exp run -S 'model.init=models:/fashion-captioner@champion'")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fashioncap", description=__doc__)
    p.add_argument("--name", help="registered model name (default: registry.name of params.yaml)")
    sub = p.add_subparsers(dest="command", required=True)
    promote = sub.add_parser("promote", help="make a version the champion if it beats the current one")
    promote.add_argument("version", nargs="?", help="version number (default: the candidate)")
    promote.add_argument("--force", action="store_true", help="promote even if it does not beat the champion")
    promote.set_defaults(func=cmd_promote)
    sub.add_parser("rollback", help="make the previous champion serve again").set_defaults(func=cmd_rollback)
    serve = sub.add_parser("serve", help="serve a registry model with `mlflow models serve`")
    serve.add_argument("--model", help="model URI (default: models:/<name>@champion)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5001)
    serve.add_argument("--timeout", type=int, help="seconds a request may take (default: registry.request_timeout "
                       "of params.yaml); the model fits its per-request image limit to it")
    serve.add_argument("--batch-size", type=positive_int, help="most images of concurrent requests captioned in "
                       "one generate() call (default: the model's registry.batch_images); 1 serves one request "
                       "at a time")
    serve.add_argument("--max-wait-ms", type=non_negative_float, help="how long a request waits for others to "
                       "join its batch (default: the model's registry.batch_wait_ms)")
    serve.add_argument("--workers", type=positive_int, default=1, help="server processes, each with its own copy "
                       "of the model and its own batches (default 1: on a CPU one process uses every core)")
    serve.set_defaults(func=cmd_serve)
    reproduce = sub.add_parser("reproduce", help="re-run what produced a run, model version, experiment or commit")
    reproduce.add_argument("ref", help="MLflow run id, models:/name@alias or models:/name/N, DVC experiment, git rev")
    reproduce.add_argument("--keep", action="store_true", help="keep the worktree of the re-run")
    reproduce.set_defaults(func=cmd_reproduce)
    rehearse = sub.add_parser("rehearse", help="run the real job on local stand-ins of its Hub model and dataset")
    rehearse.add_argument("--size", choices=["full", "shrunk"], default="full",
                          help="BLIP-base size with 400 catalogue photos, or a shrunk copy for a quick check")
    rehearse.add_argument("--hf-home", help="where the stand-ins' Hugging Face cache goes "
                          "(default: ~/.cache/fashioncap/hf-standins-<size>; never your own cache)")
    rehearse.add_argument("--build-only", action="store_true", help="build the stand-ins, run nothing")
    rehearse.add_argument("--serve", action="store_true", help="then promote, serve and send one maximum-size request")
    rehearse.add_argument("--port", type=int, default=5011)
    rehearse.add_argument("--without-dvc", action="store_true",
                          help="run the stages' commands from dvc.yaml as plain processes (a machine without DVC)")
    rehearse.add_argument("--set", action="append", metavar="KEY=VALUE", help="another `dvc exp run -S` override")
    rehearse.add_argument("--keep", action="store_true",
                          help="keep the temporary work tree it ran in (its outputs, DVC experiment and MLflow store)")
    rehearse.set_defaults(func=cmd_rehearse)
    caption = sub.add_parser("caption", help="caption image files or folders with a registry model")
    caption.add_argument("paths", nargs="+")
    caption.add_argument("--model", help="model URI (default: models:/<name>@champion)")
    caption.add_argument("--json", action="store_true", help="one JSON object per line")
    caption.add_argument("--batch-size", type=int, default=16)
    caption.set_defaults(func=cmd_caption)
    catalogue = sub.add_parser("caption-catalogue", help="caption a whole catalogue on Apache Spark with a registry "
                               "model (mlflow.pyfunc.spark_udf); needs the [spark] extra")
    catalogue.add_argument("source", help="a folder of images (searched recursively) or a parquet table with "
                           "'path' and 'image' (encoded bytes) columns")
    catalogue.add_argument("--output", required=True, help="parquet folder to write: path, caption, error, "
                           "model_name, model_version; one row per image (replaced if it exists)")
    catalogue.add_argument("--model", help="model URI (default: models:/<name>@champion); the job pins the version "
                           "the alias names when it starts")
    catalogue.add_argument("--master", default="local[2]", help="Spark master URL: local[N] on this machine, "
                           "spark://host:7077, yarn, k8s://... on a cluster (default local[2])")
    catalogue.add_argument("--batch-size", type=positive_int, default=16, help="images per predict() call (Arrow batch)")
    catalogue.add_argument("--threads", type=positive_int, default=1, help="torch threads per Spark task (default 1: "
                           "one task per core)")
    catalogue.set_defaults(func=cmd_caption_catalogue)
    review = sub.add_parser("review", help="a worklist of the captions a version is least sure of, for reviewers")
    review.add_argument("--model", help="model URI (default: models:/<name>@champion)")
    review.add_argument("--data", default="data/prepared", help="the prepared catalogue, relative to the project "
                        "(default data/prepared)")
    review.add_argument("--splits", nargs="+", default=["train", "validation", "test"],
                        help="its splits to caption (default: train validation test)")
    review.add_argument("--count", type=positive_int, default=50, help="captions on the worklist (default 50)")
    review.add_argument("--out", default="reviews", help="folder for worklist.jsonl, worklist.html and the photos, "
                        "relative to the project (default reviews)")
    review.set_defaults(func=cmd_review)
    fb = sub.add_parser("feedback", help="apply reviewers' corrections (JSONL) to the catalogue, for the next training")
    fb.add_argument("file", help='JSON lines: {"key": ..., "caption": ...} for a catalogue product, or '
                    '{"image": PATH, "caption": ...} for a new photo (PATH relative to the file)')
    fb.add_argument("--data", default="data/prepared", help="the prepared catalogue whose keys corrections name, "
                    "relative to the project (default data/prepared)")
    fb.set_defaults(func=cmd_feedback)
    score = sub.add_parser("score", help="score captions against references with the pipeline's metrics (COCO "
                           "tokenisation, BLEU-1..4, CIDEr-D, ROUGE-L, METEOR)")
    score.add_argument("--references", required=True, help='JSON lines: {"id": ..., "references": ["...", ...]}')
    score.add_argument("--predictions", required=True, help='JSON lines: {"id": ..., "caption": "..."}')
    score.add_argument("--json", action="store_true", help="one JSON object with every metric")
    score.add_argument("--no-meteor", action="store_true", help="leave METEOR out (it needs Java)")
    score.add_argument("--attributes", help="attribute vocabulary (default: conf/attributes.yaml of the project)")
    score.add_argument("--no-attributes", action="store_true", help="leave the attribute scores out")
    score.set_defaults(func=cmd_score)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "model", "unset") is None:
        args.model = f"models:/{model_name(args.name)}@champion"
    tune_collector()
    configure_environment()
    logging.basicConfig(level=os.environ.get("FASHIONCAP_LOG", "WARNING"), format="%(levelname)s %(message)s")
    try:
        sys.exit(args.func(args))
    except FashioncapError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
