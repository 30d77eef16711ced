"""End to end: the real `mlflow models serve` process serves the champion over HTTP on loopback."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from fashioncap import registry
from fashioncap.register import register
from tests.test_registry import new_run, png_b64, table

pytestmark = pytest.mark.slow
NAME = "fashion-captioner"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def server(registry_env, tiny_params, tmp_path):
    client, model_dir, data_dir = registry_env
    register(tiny_params, new_run(tiny_params), model_dir, data_dir, table(1.0))
    registry.promote(client, NAME)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fashioncap.cli", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not answer /ping in 120 s")
        yield port, tiny_params
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def truncated_png() -> str:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()[:300]).decode()


def test_serves_captions_and_answers_bad_input_with_4xx(server):
    port, params = server
    status, body = post(port, images_body([png_b64(), png_b64((0, 0, 250), (80, 30))]))
    assert status == 200 and len(body["predictions"]) == 2
    status, body = post(port, {"inputs": {"image": [png_b64()]}, "params": {"num_beams": 2}})
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
