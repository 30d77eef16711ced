"""What every entry point shares: quiet offline-safe environment, logging, clean errors, progress bars."""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Telemetry and update checks would make network calls that stall an offline run; the rest keeps runs
# deterministic and quiet.
class FashioncapError(RuntimeError):
    """An error whose message tells the user what to do; entry points print it without a traceback."""


QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # deterministic cuBLAS, needed by torch.use_deterministic_algorithms on a GPU
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}


def configure_environment() -> None:
    """Switches off telemetry for this process and its children, unless the user set the variables."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


# Python's cyclic collector runs a full pass over every live object each time their number has grown by a
# quarter, and several more passes while the interpreter shuts down. torch, transformers and MLflow load
# millions of objects that live as long as the process, so in a stage those passes alone took ~2 s of its
# start and end (the heavy imports: 7.1 s, 4.4 s with the settings below; 2-core AMD EPYC). A larger first
# generation makes the passes rare while imports run, and the objects alive at exit are frozen (gc.freeze)
# so the shutdown passes skip them: their memory goes back with the process. Cycles the stage makes while it
# works are still collected.
COLLECTOR_THRESHOLDS = (10_000, 10, 10)


def tune_collector() -> None:
    """Sets this process's collector for a short-lived entry point (see COLLECTOR_THRESHOLDS)."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
    atexit.register(gc.freeze)


def project_root() -> Path:
    """The repository root: DVC's DVC_ROOT (the parent repo, also for queued experiments), else the
    nearest folder above the working directory that holds dvc.yaml, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


# dense bf16 tensor-core peaks, TFLOP/s, for model FLOPs utilisation; PEAK_TFLOPS overrides for other cards
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def gpu_peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak (PEAK_TFLOPS in the environment wins), or None when unknown."""
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"])
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


def stage_args(doc: str | None, argv: list[str] | None, *paths: str) -> argparse.Namespace:
    """Parses a stage's command line: --params, and one required --<name> option per path (values are
    Paths). Paths have no defaults: dvc.yaml names each once and passes it, so the two cannot disagree.
    --init (the init stage's record of model.init) is the one that may be left out: a stage run by hand
    then resolves model.init itself."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--init", type=Path, default=None)
    for name in paths:
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True)
    return parser.parse_args(argv)


def progress(iterable: Iterable[T] | None = None, quiet: bool = False, **kwargs) -> Iterable[T]:
    """A progress bar with ETA on a terminal; silent otherwise (and when quiet). Without an iterable it is
    a bar to `update()` by hand, as the training loop does."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def run_stage(main: Callable[[], None]) -> None:
    """Runs an entry point: environment and logging first, and known errors as one paragraph, exit 2."""
    from .config import ConfigError

    tune_collector()
    configure_environment()
    logging.basicConfig(level=os.environ.get("FASHIONCAP_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store.db.utils", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        main()
    except (ConfigError, FashioncapError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        if not unreachable(error):
            raise
        print(f"error: the MLflow tracking server at {os.environ.get('MLFLOW_TRACKING_URI')} did not answer, also "
              f"after MLflow's retries ({str(error)[:300]}). The stage stopped; run it again once the server is "
              "back (training resumes from its last checkpoint, into the same run).", file=sys.stderr)
        sys.exit(2)


def unreachable(error: BaseException) -> bool:
    """Whether an error (or its cause) is a tracking server that refused or dropped the connection (not one
    that answered with an error)."""
    marks = ("Connection refused", "Failed to establish a new connection", "RemoteDisconnected",
             "Connection aborted", "Connection reset by peer")
    while error is not None:
        if type(error).__name__ in ("ConnectionError", "NewConnectionError") or any(m in str(error) for m in marks):
            return True
        error = error.__cause__ or error.__context__
    return False
