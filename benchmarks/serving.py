"""Serving: requests/s, images/s and p50/p95 latency of the real `mlflow models serve` (through
`fashioncap serve`) on loopback, at concurrency 1 and 8, with 1-image and 8-image requests."""

from __future__ import annotations

import base64
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


def champion(root: Path) -> dict:
    """A registry in `root` whose champion is an offline-size BLIP (random weights: the same work per
    request as a trained one, since generation runs to max_new_tokens either way)."""
    import mlflow

    from fashioncap import promotion, tracking
    from fashioncap.register import register

    params = offline_params("data.synthetic.items=60", "data.synthetic.render_size=96", "data.num_workers=0")
    untrained_model(params, root)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ.update(env)  # the project's tracking code reads it
    try:
        run = tracking.start_run(params)
        mlflow.end_run()
        scores = {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "cider_d": 0.0, "rouge_l": 0.0}
        register(params, run.info.run_id, root / "best", root / "prepared",
                 {"test_items": 1, "novel_items": 1, "before": scores, "after": scores, "test_digest": "benchmark",
                  "exact_match_after": 0.0})
        promotion.promote(mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]), params.registry.name)
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return env


def _post(url: str, body: bytes) -> float:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200 and json.loads(response.read())["predictions"]
    return time.perf_counter() - started


def load(url: str, images: list[str], per_request: int, concurrency: int, requests: int) -> dict:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[im] for im in images[:per_request]]}})
    _post(url, body.encode())  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(lambda _: _post(url, body.encode()), range(requests)))
    wall = time.perf_counter() - started
    return {"requests_per_s": requests / wall, "images_per_s": requests * per_request / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[int(0.95 * (len(latencies) - 1))]}


def run(level: str) -> list[Result]:
    requests = {"full": 48, "quick": 12, "smoke": 2}[level]
    concurrency, sizes = ((1, 2), (1, 2)) if level == "smoke" else ((1, 8), (1, 8))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, **champion(root)}
        images = []
        for p in products(8, 96):
            buf = io.BytesIO()
            p.image.save(buf, format="PNG")
            images.append(base64.b64encode(buf.getvalue()).decode())
        port = free_port()
        serve = [sys.executable, "-m", "fashioncap.cli", "serve", "--port", str(port)]
        with background_server(serve, f"http://127.0.0.1:{port}/ping", root / "serve.log", root, env, timeout=180):
            url = f"http://127.0.0.1:{port}/invocations"
            figures = {(c, k): load(url, images, k, c, requests) for c in concurrency for k in sizes}
    results = []
    for (c, k), m in figures.items():
        single = figures[(c, 1)]["images_per_s"] if k > 1 else None
        results.append(Result("serving", f"concurrency {c}, {k} image(s)/request", "images/s", m["images_per_s"],
                              single, "1-image requests" if single else "",
                              note=f"{m['requests_per_s']:.1f} req/s, p50 {m['p50_s'] * 1000:.0f} ms, "
                                   f"p95 {m['p95_s'] * 1000:.0f} ms"))
    return results
