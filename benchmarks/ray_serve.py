"""The candidate we did not take, measured: Ray Serve with `@serve.batch` over the same registered champion,
beside `fashioncap serve` (batching inside the model, behind MLflow's scoring server), same load, same run.

Not part of `python -m benchmarks` and not a dependency: `pip install "ray[serve]"` in a copy of the
environment, then `python -m benchmarks.ray_serve [--size offline|base]`. The Ray deployment loads the
pyfunc model and batches 1-image calls into predict() calls of up to 16 images, waiting at most 10 ms:
the same settings as the registered `registry.batch_images` / `batch_wait_ms`.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import tempfile
import time
from pathlib import Path

from .common import products
from .serving import champion, load, server

PLANS = {"offline": {1: 16, 8: 48, 16: 96}, "base": {1: 4, 16: 32}}


def ray_deployment(tracking_uri: str, port: int) -> str:
    """Starts Ray (2 CPUs, no dashboard) and a Serve application on loopback; returns its URL."""
    import ray
    from ray import serve
    from starlette.requests import Request

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
    class Captioner:
        def __init__(self, uri: str):
            import mlflow

            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
            self.model = mlflow.pyfunc.load_model(uri)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def caption(self, images: list[str]) -> list[str]:
            import pandas as pd

            return list(self.model.predict(pd.DataFrame({"image": images})))

        async def __call__(self, request: Request):
            body = await request.json()
            return {"predictions": [await self.caption(row[0]) for row in body["dataframe_split"]["data"]]}

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Captioner.bind("models:/fashion-captioner@champion"), route_prefix="/invocations")
    return f"http://127.0.0.1:{port}/invocations"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(PLANS), default="offline")
    args = parser.parse_args()
    plan = PLANS[args.size]
    from tests.conftest import free_port

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env, _, params = champion(root, args.size)
        os.environ.update(env)
        encoded = []
        for product in products(16, max(96, params.model.image_size)):
            buf = io.BytesIO()
            product.image.save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode())
        with server(root, {**os.environ}) as url:
            for c, n in plan.items():
                print(f"fashioncap serve, concurrency {c}: {load(url, encoded, c, n)}", flush=True)
        started = time.perf_counter()
        url = ray_deployment(env["MLFLOW_TRACKING_URI"], free_port())
        print(f"Ray Serve up in {time.perf_counter() - started:.1f} s", flush=True)
        for c, n in plan.items():
            print(f"Ray Serve, concurrency {c}: {load(url, encoded, c, n)}", flush=True)
        from ray import serve
        import ray

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
