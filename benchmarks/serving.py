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

from .common import Result, offline_params, products

# BLIP-base with the default profile's numerics (this CPU's kernels); greedy 16-token captions keep a request
# to seconds on a CPU (random weights write every token)
BASE_OVERRIDES = ("model.image_size=384", "numerics.cpu_kernels=native", "numerics.threads=null",
                  "model.max_caption_tokens=16", "generate.max_new_tokens=16", "generate.min_length=0")


def champion(root: Path, size: str, precisions: tuple[str, ...] = ("auto",)) -> tuple[dict, Path, object]:
    """A registry in `root` with one version per entry of `precisions` (version 1, 2, ...): a
    `train.mixed_precision` value, optionally with more overrides after a space ("auto model.attention=eager"),
    of an offline-size BLIP or a BLIP-base-shaped one (random weights: the same work per request as trained
    ones, since generation runs to max_new_tokens either way), the last one champion; returns the
    environment that points at it, the model folder and the last version's params."""
    import mlflow

    from fashioncap import promotion, standins, tracking
    from fashioncap.register import register

    small = ("data.synthetic.items=60", "data.synthetic.render_size=96", "data.num_workers=0")
    model_dir, data_dir = untrained_model(offline_params(*small), root)
    if size == "base":
        model_dir = root / "blip-base"
        model_dir.mkdir()
        standins.write_model(model_dir, shrunk=False, seed=0)
    import torch

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    # registering validates the input example by loading the model, which pins the registered numerics in this
    # process (ONEDNN_MAX_CPU_ISA=AVX2 would turn bf16 off for every later benchmark): put everything back after
    before, threads = dict(os.environ), torch.get_num_threads()
    os.environ.update(env)  # the project's tracking code reads it
    try:
        for version in precisions:
            precision, *more = version.split()
            params = offline_params(*small, *(BASE_OVERRIDES if size == "base" else ()),
                                    f"train.mixed_precision={precision}", *more)
            run = tracking.start_run(params)
            mlflow.end_run()
            scores = {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "cider_d": 0.0, "rouge_l": 0.0}
            register(params, run.info.run_id, model_dir, data_dir,
                     {"test_items": 1, "novel_items": 1, "before": scores, "after": scores,
                      "test_digest": "benchmark", "exact_match_after": 0.0})
        promotion.promote(mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]), params.registry.name, force=True)
    finally:
        os.environ.clear()
        os.environ.update(before)
        torch.set_num_threads(threads)
    return env, model_dir, params


def _post(url: str, body: bytes) -> float:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=900) as response:
        assert response.status == 200 and json.loads(response.read())["predictions"]
    return time.perf_counter() - started


def _body(images: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[im] for im in images]}}).encode()


def load(url: str, images: list[str], concurrency: int, requests: int) -> dict:
    """1-image requests, `concurrency` at a time, each image of the set in turn."""
    bodies = [_body([im]) for im in images]
    for body in bodies[:concurrency]:
        _post(url, body)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(lambda i: _post(url, bodies[i % len(bodies)]), range(requests)))
    wall = time.perf_counter() - started
    return {"images_per_s": requests / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))]}


@contextlib.contextmanager
def server(root: Path, env: dict, *options: str):
    """`fashioncap serve` with these options (`--batch-size 1`: one request at a time, as before batching)."""
    port = free_port()
    serve = [sys.executable, "-m", "fashioncap.cli", "serve", "--port", str(port), *options]
    log = root / f"serve-{port}.log"
    with background_server(serve, f"http://127.0.0.1:{port}/ping", log, root, env, timeout=300):
        yield f"http://127.0.0.1:{port}/invocations"


# name: registered version (1 = train.mixed_precision no, 2 = auto, 3 = auto with transformers' eager attention,
# BLIP-base only) and `fashioncap serve` options
SERVERS = {"today": ("1", "--batch-size", "1"), "one at a time": ("2", "--batch-size", "1"), "batching": ("2",),
           "batching, eager attention": ("3",)}
VERSIONS = {"offline": ("no", "auto"), "base": ("no", "auto", "auto model.attention=eager")}


def measure(size: str, concurrencies: tuple[int, ...], requests: dict[int, int], wait_ms: float) -> dict:
    """images/s and latencies of each server at each concurrency, and the latency of one full batch."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env, _, params = champion(root, size, VERSIONS[size])
        params = offline_params("data.synthetic.items=60", "data.synthetic.render_size=96", "data.num_workers=0",
                                *(BASE_OVERRIDES if size == "base" else ()))  # version 2's, not the eager one's
        env = {**os.environ, **env}
        encoded = []
        for product in products(16, max(params.model.image_size, 96)):
            buf = io.BytesIO()
            product.image.save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode())
        # on the offline profile both versions compute in fp32 (its kernels are pinned): one server for both
        names = [n for n in SERVERS if size == "base" or n not in ("one at a time", "batching, eager attention")]
        figures: dict = {"params": params, "wait_ms": wait_ms}
        for name in names:
            version, *options = SERVERS[name]
            if name.startswith("batching"):
                options = ["--max-wait-ms", f"{wait_ms:g}"]
            with server(root, env, "--model", f"models:/{params.registry.name}/{version}", *options) as url:
                for c in concurrencies:
                    figures[(name, c)] = load(url, encoded, c, requests[c])
                if name == "batching":  # one request of a full batch: one generate() of batch_images images
                    full = _body(encoded[: params.registry.batch_images])
                    figures["batch_s"] = statistics.median(_post(url, full) for _ in range(3))
    return figures


def _note(m: dict) -> str:
    return f"p50 {m['p50_s'] * 1000:.0f} ms, p95 {m['p95_s'] * 1000:.0f} ms"


def rows(size: str, figures: dict, concurrencies: tuple[int, ...], target: float) -> list[Result]:
    params = figures["params"]
    name = "BLIP-base (224M)" if size == "base" else "offline BLIP"
    today = "fp32, one request at a time" if size == "base" else "one request at a time"
    results = []
    for c in concurrencies:
        ours, before = figures[("batching", c)], figures[("today", c)]
        note = f"batching {_note(ours)}; {today} {_note(before)}"
        if ("one at a time", c) in figures:
            alone = figures[("one at a time", c)]
            note += f"; bf16 one at a time {alone['images_per_s']:.3g} images/s, {_note(alone)}"
        results.append(Result("serving", f"{name}, concurrency {c}, 1-image requests", "images/s",
                              ours["images_per_s"], before["images_per_s"], today,
                              target=target if c == max(concurrencies) else None, note=note))
        if ("batching, eager attention", c) in figures:  # the same batching server before SDPA
            eager = figures[("batching, eager attention", c)]
            results.append(Result("serving", f"{name}, concurrency {c}, 1-image requests, SDPA", "images/s",
                                  ours["images_per_s"], eager["images_per_s"], "eager attention, batching",
                                  target=1.5 if c == max(concurrencies) else None,
                                  note=f"SDPA {_note(ours)}; eager {_note(eager)}"))
    wait_s = figures["wait_ms"] / 1000
    bound = figures[("today", 1)]["p95_s"] + wait_s + figures["batch_s"]
    top = max(concurrencies)
    results.append(Result("serving", f"{name}, p95 latency at concurrency {top}", "s",
                          figures[("batching", top)]["p95_s"], bound, "bound", target=1.0, higher_is_better=False,
                          note=f"bound = {today} p95 at concurrency 1 + {wait_s * 1000:g} ms wait + one request of "
                               f"{params.registry.batch_images} images to the batching server "
                               f"({figures['batch_s']:.2f} s)"))
    return results


def run(level: str) -> list[Result]:
    if level == "smoke":
        concurrencies, requests = (1, 4), {1: 2, 4: 4}
    else:
        concurrencies = (1, 8, 16)
        requests = {1: 16, 8: 48, 16: 96} if level == "full" else {1: 8, 8: 16, 16: 32}
    results = rows("offline", measure("offline", concurrencies, requests, 10), concurrencies, 4.0)
    if level == "full":
        # a BLIP-base generate() takes seconds on a CPU: a window of a few hundred ms lets the 16 requests a
        # batch answers come back into the next one, where 10 ms would split them into a batch of 1 and one of 15
        base = (1, 16)
        results += rows("base", measure("base", base, {1: 4, 16: 48}, 250), base, 1.3)
    return results
