"""End to end: the real `mlflow models serve` process serves the champion over HTTP on loopback."""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from fashioncap import promotion
from fashioncap.register import register
from tests.conftest import background_server, free_port
from tests.conftest import new_run, png_b64, table

pytestmark = pytest.mark.slow
NAME = "fashion-captioner"


def post(port: int, body: object, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def images_body(values: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, tiny_raw):
    """The tiny model registered, promoted and served by `fashioncap serve`, once for the module (the
    tests only send requests)."""
    from mlflow import MlflowClient

    from fashioncap.config import parse_params
    from fashioncap.runtime import QUIET_ENV

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = parse_params(copy.deepcopy(tiny_raw))
    model_dir, data_dir = tiny_model
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**QUIET_ENV, "MLFLOW_TRACKING_URI": uri}.items():
            mp.setenv(key, value)
        mp.chdir(root)
        register(params, new_run(params), model_dir, data_dir, table(1.0))
        promotion.promote(MlflowClient(uri), NAME)
        port = free_port()
        with background_server([sys.executable, "-m", "fashioncap.cli", "serve", "--port", str(port)],
                               f"http://127.0.0.1:{port}/ping", root / "serve.log", root, dict(os.environ)) as pid:
            yield port, params, pid, root / "serve.log"  # `fashioncap serve` execs mlflow: the same PID


def noise_b64() -> str:
    buf = io.BytesIO()
    Image.effect_noise((90, 90), 80).convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def truncated_png() -> str:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()[:300]).decode()


def test_serves_captions_and_answers_bad_input_with_4xx(server):
    port, params, _, log = server
    assert "batching up to 16 images of concurrent requests, waiting at most 10 ms" in log.read_text()
    status, body = post(port, images_body([png_b64(), png_b64((0, 0, 250), (80, 30))]))
    assert status == 200 and len(body["predictions"]) == 2
    status, body = post(port, {"inputs": {"image": [png_b64()]}, "params": {"max_new_tokens": 5}})
    assert status == 200 and len(body["predictions"]) == 1

    limit = params.registry.max_pixels
    side = int(limit**0.5) + 10
    cases = {
        "invalid base64": images_body(["not/base64!!"]),
        "not a readable image": images_body([base64.b64encode(b"hello, not an image").decode()]),
        "corrupt or truncated": images_body([truncated_png()]),
        f"exceeds the limit of {limit} pixels": images_body([png_b64(size=(side, side))]),
        "holds no images": images_body([]),
        f"the limit is {params.registry.max_images}": images_body([png_b64()] * (params.registry.max_images + 1)),
        f"the limit is {params.registry.max_request_bytes}": images_body([noise_b64(), noise_b64(), noise_b64()]),
        # a request may ask for less generation work than registered, never more
        f"num_beams 400 is above the registered {params.generate.num_beams}":
            {**images_body([png_b64()]), "params": {"num_beams": 400}},
        f"max_new_tokens {params.generate.max_new_tokens + 1} is above the registered "
        f"{params.generate.max_new_tokens}":
            {**images_body([png_b64()]), "params": {"max_new_tokens": params.generate.max_new_tokens + 1}},
        "accepted formats: JPEG, PNG": images_body([base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: "
                                                                     b"0 0 9 9\n").decode()]),
    }
    for expected, payload in cases.items():
        status, body = post(port, payload)
        assert status == 400, (expected, status, body)
        assert expected in body["message"], (expected, body)
        assert "Traceback" not in json.dumps(body)
    status, _ = post(port, None, raw=b"{not json")
    assert 400 <= status < 500
    status, _ = post(port, {"something": "else"})
    assert 400 <= status < 500


def test_serve_without_a_champion_says_so(registry_env, cli_env):
    proc = subprocess.run([sys.executable, "-m", "fashioncap.cli", "serve"], env=cli_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no version with alias 'champion'" in proc.stderr and "fashioncap promote" in proc.stderr


def _tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_load_of_mixed_valid_and_invalid_requests(server):
    """500 requests at concurrency 16, 40% of them bad or abusive (garbage, truncated, empty, wrong shape,
    400 beams, 512 new tokens, an image above the pixel limit, too many images) while 4 slow clients trickle
    theirs, the good ones of 1-3 images with three caption lengths (three kinds of batch): no 5xx, every bad
    one a 4xx, every good one exactly its own captions (what it gets alone), memory stays flat."""
    import random
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    port, params, server_pid, _ = server
    rng = random.Random(0)
    lengths = [params.generate.max_new_tokens - k for k in (0, 3, 6)]  # captions of an untrained model differ in length
    valid = [{**images_body([png_b64((rng.randrange(256), 0, 0)) for _ in range(1 + i % 3)]),
              "params": {"max_new_tokens": lengths[i % 3]}} for i in range(9)]
    alone = [post(port, body) for body in valid]  # one request at a time: nothing to batch it with
    assert all(status == 200 for status, _ in alone)
    side = int(params.registry.max_pixels ** 0.5) + 10
    invalid = [images_body(["@@@"]), images_body([base64.b64encode(b"GIF89a broken").decode()]),
               images_body([truncated_png()]), images_body([]), {"wrong": []},
               # abuse: unbounded generation work, a huge image, more images than allowed
               {**images_body([png_b64()]), "params": {"num_beams": 400}},
               {**images_body([png_b64()]), "params": {"max_new_tokens": 512}},
               images_body([png_b64(size=(side, side))]),
               images_body([png_b64()] * (params.registry.max_images + 1))]
    plan = [("ok", i) if rng.random() < 0.6 else ("bad", rng.randrange(len(invalid))) for i in range(500)]

    def call(item):
        kind, index = item
        started = time.perf_counter()
        status, answer = post(port, valid[index % len(valid)] if kind == "ok" else invalid[index])
        return kind, index, status, answer, time.perf_counter() - started

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(call, plan[:50]))  # warm-up: allocator and caches settle
        rss_before = _tree_rss(server_pid)
        with slow_clients(port, 4):  # connections that trickle their request a few bytes a second meanwhile
            results = list(pool.map(call, plan))
    rss_growth = _tree_rss(server_pid) - rss_before
    latencies = sorted(r[-1] for r in results)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies))]
    print(f"\n500 requests, concurrency 16: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
          f"RSS growth {rss_growth / 2**20:.1f} MiB")
    assert len(results) == len(plan) and not [r for r in results if r[2] >= 500]
    assert all(400 <= status < 500 for kind, _, status, _, _ in results if kind == "bad")
    for kind, index, status, answer, _ in results:
        if kind == "ok":
            assert status == 200 and answer == alone[index % len(valid)][1], (index, answer)
    assert len({json.dumps(body) for _, body in alone}) == 3  # the check above tells the three lengths apart
    assert rss_growth < 150 * 2**20, f"server memory grew by {rss_growth / 2**20:.0f} MiB"


@contextlib.contextmanager
def slow_clients(port: int, count: int):
    """`count` clients that send a request's headers and then its body a few bytes at a time, until the end."""
    import socket
    import threading

    body = json.dumps(images_body([png_b64()])).encode()
    head = (f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    stop = threading.Event()

    def trickle():
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(head)
            for start in range(0, len(body), 8):
                if stop.wait(0.2):
                    return
                conn.sendall(body[start:start + 8])

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def test_request_image_limit_fits_the_timeout_on_the_serving_device():
    from fashioncap.serving import fitting_images

    assert fitting_images(timeout_s=300, seconds_per_image=45.0, configured=16) == 5  # BLIP-base on a CPU
    assert fitting_images(timeout_s=300, seconds_per_image=0.2, configured=16) == 16  # a GPU: the param rules
    assert fitting_images(timeout_s=60, seconds_per_image=90.0, configured=16) == 1  # never below one image
