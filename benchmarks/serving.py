"""Serving: images/s and p50/p95 latency of the real `mlflow models serve` (through `fashioncap serve`) on
loopback with 1-image requests at concurrency 1, 8 and 16: the batching server (the registered
`registry.batch_images` / `batch_wait_ms`) against today's server, the same command with `--batch-size 1`
(one request at a time). Offline-size model, and BLIP-base size in the full run."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import background_server, free_port, untrained_model  # the test suite's helpers

from .common import Result, median_seconds, offline_params, products

# BLIP-base with the default profile's numerics (this CPU's kernels); greedy 16-token captions keep a request
# to seconds on a CPU (random weights write every token)
BASE_OVERRIDES = ("model.image_size=384", "numerics.cpu_kernels=native", "numerics.threads=null",
                  "model.max_caption_tokens=16", "generate.max_new_tokens=16", "generate.min_length=0")


def champion(root: Path, size: str) -> tuple[dict, Path, object]:
    """A registry in `root` whose champion is an offline-size BLIP or a BLIP-base-shaped one (random weights:
    the same work per request as trained ones, since generation runs to max_new_tokens either way); returns
    the environment that points at it, the model folder and the params it was registered with."""
    import mlflow

    from fashioncap import promotion, standins, tracking
    from fashioncap.register import register

    small = ("data.synthetic.items=60", "data.synthetic.render_size=96", "data.num_workers=0")
    params = offline_params(*small, *(BASE_OVERRIDES if size == "base" else ()))
    model_dir, data_dir = untrained_model(offline_params(*small), root)
    if size == "base":
        model_dir = root / "blip-base"
        model_dir.mkdir()
        standins.write_model(model_dir, shrunk=False, seed=0)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ.update(env)  # the project's tracking code reads it
    try:
        run = tracking.start_run(params)
        mlflow.end_run()
        scores = {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "cider_d": 0.0, "rouge_l": 0.0}
        register(params, run.info.run_id, model_dir, data_dir,
                 {"test_items": 1, "novel_items": 1, "before": scores, "after": scores, "test_digest": "benchmark",
                  "exact_match_after": 0.0})
        promotion.promote(mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]), params.registry.name)
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return env, model_dir, params


def batch_generate_s(model_dir: Path, params, images: list) -> float:
    """Seconds of one generate() over a full batch, with the served model's precision and threads (this
    process keeps its own kernels: they were chosen at its first operation)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    import torch

    from fashioncap.fingerprint import mixed_precision
    from fashioncap.imaging import to_model_image
    from fashioncap.modeling import caption_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(params.numerics.threads or threads)  # the server's; its kernel pin is not repeated here
    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    batch = [to_model_image(im, params.model.image_size) for im in images][: params.registry.batch_images]
    batch = (batch * params.registry.batch_images)[: params.registry.batch_images]
    precision = mixed_precision(params.train.mixed_precision)
    try:
        return median_seconds(lambda: caption_batch(model, processor, batch, params.generate, precision), 3)
    finally:
        torch.set_num_threads(threads)


def _post(url: str, body: bytes) -> float:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.status == 200 and json.loads(response.read())["predictions"]
    return time.perf_counter() - started


def load(url: str, images: list[str], concurrency: int, requests: int) -> dict:
    """1-image requests, `concurrency` at a time, each image of the set in turn."""
    bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[im]]}}).encode() for im in images]
    for body in bodies[:concurrency]:
        _post(url, body)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(lambda i: _post(url, bodies[i % len(bodies)]), range(requests)))
    wall = time.perf_counter() - started
    return {"images_per_s": requests / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))]}


@contextlib.contextmanager
def server(root: Path, env: dict, batch_size: int | None):
    """`fashioncap serve` of the champion; `batch_size` 1 is today's one-request-at-a-time server."""
    port = free_port()
    serve = [sys.executable, "-m", "fashioncap.cli", "serve", "--port", str(port)]
    if batch_size is not None:
        serve += ["--batch-size", str(batch_size)]
    log = root / f"serve-{batch_size}.log"
    with background_server(serve, f"http://127.0.0.1:{port}/ping", log, root, env, timeout=300):
        yield f"http://127.0.0.1:{port}/invocations"


def measure(size: str, concurrencies: tuple[int, ...], requests: dict[int, int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env, model_dir, params = champion(root, size)
        env = {**os.environ, **env}
        side = params.model.image_size
        photos = [p.image for p in products(16, max(side, 96))]
        encoded = []
        for image in photos:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode())
        figures = {}
        for name, batch_size in (("today", 1), ("batching", None)):
            with server(root, env, batch_size) as url:
                for c in concurrencies:
                    figures[(name, c)] = load(url, encoded, c, requests[c])
        figures["batch_generate_s"] = batch_generate_s(model_dir, params, photos)
        figures["params"] = params
    return figures


def _note(m: dict) -> str:
    return f"p50 {m['p50_s'] * 1000:.0f} ms, p95 {m['p95_s'] * 1000:.0f} ms"


def rows(size: str, figures: dict, concurrencies: tuple[int, ...], target: float) -> list[Result]:
    params = figures["params"]
    name = "BLIP-base (224M)" if size == "base" else "offline BLIP"
    results = []
    for c in concurrencies:
        ours, today = figures[("batching", c)], figures[("today", c)]
        results.append(Result("serving", f"{name}, concurrency {c}, 1-image requests", "images/s",
                              ours["images_per_s"], today["images_per_s"], "one request at a time",
                              target=target if c == max(concurrencies) else None,
                              note=f"batching {_note(ours)}; one at a time {_note(today)}"))
    wait_s = params.registry.batch_wait_ms / 1000
    bound = figures[("today", 1)]["p95_s"] + wait_s + figures["batch_generate_s"]
    top = max(concurrencies)
    results.append(Result("serving", f"{name}, p95 latency at concurrency {top}", "s",
                          figures[("batching", top)]["p95_s"], bound, "bound", target=1.0, higher_is_better=False,
                          note=f"bound = one-at-a-time p95 at concurrency 1 + {wait_s * 1000:g} ms wait + one "
                               f"generate of {params.registry.batch_images} images "
                               f"({figures['batch_generate_s']:.2f} s)"))
    return results


def run(level: str) -> list[Result]:
    if level == "smoke":
        concurrencies, requests = (1, 4), {1: 2, 4: 4}
    else:
        concurrencies = (1, 8, 16)
        requests = {1: 16, 8: 48, 16: 96} if level == "full" else {1: 8, 8: 16, 16: 32}
    results = rows("offline", measure("offline", concurrencies, requests), concurrencies, 4.0)
    if level == "full":
        base = (1, 16)
        results += rows("base", measure("base", base, {1: 4, 16: 32}), base, 1.3)
    return results
