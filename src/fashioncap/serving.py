"""The registered model, as MLflow models-from-code: captions base64-encoded images with a saved BLIP.

MLflow copies this file and the `fashioncap` package into the model, so the registry alone serves it:
`mlflow models serve -m models:/fashion-captioner@champion --env-manager local`.

Inside the scoring server the model batches: MLflow runs each request's `predict` in a thread of its own,
and concurrent requests' images are captioned together in one generate() call (`Batcher`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # set by `mlflow models serve` (--timeout) for its workers
BATCH_ENV = "FASHIONCAP_BATCH_IMAGES"  # set by `fashioncap serve --batch-size`: overrides registry.batch_images
WAIT_ENV = "FASHIONCAP_BATCH_WAIT_MS"  # set by `fashioncap serve --max-wait-ms`: overrides registry.batch_wait_ms
TIMEOUT_SHARE = 0.8  # of the request timeout a full request may take: decoding, queueing and the rest get 20%
log = logging.getLogger("fashioncap.serving")


def fitting_images(timeout_s: float, seconds_per_image: float, configured: int) -> int:
    """The most images per request (at most `configured`, at least 1) that one generate() call over them
    finishes within TIMEOUT_SHARE of the request timeout, at the measured worst-case pace per image."""
    return max(1, min(configured, int(TIMEOUT_SHARE * timeout_s / max(seconds_per_image, 1e-9))))


def batch_images_within(timeout_s: float, seconds_per_image: float, configured: int) -> int:
    """The most images per generate() call such that a request that waits for one full batch and then has
    its own captioned still finishes within TIMEOUT_SHARE of the request timeout."""
    return max(1, min(configured, fitting_images(timeout_s, seconds_per_image, 2 * configured) // 2))


@dataclass(eq=False)
class Job:
    """One request's images and generation settings, and where its captions go."""

    images: list
    generate: object  # GenerateParams
    done: Future = field(default_factory=Future)

    @property
    def key(self) -> str:
        return self.generate.model_dump_json()


def pack(jobs: list[Job], max_images: int) -> list[list[Job]]:
    """Jobs in arrival order, grouped by generation settings (one generate() call has one), packed into
    batches of at most max_images images; a job larger than that is a batch of its own."""
    batches: list[list[Job]] = []
    open_batch: dict[str, tuple[list[Job], int]] = {}
    for job in jobs:
        batch, count = open_batch.get(job.key, ([], 0))
        if batch and count + len(job.images) > max_images:
            batches.append(batch)
            batch, count = [], 0
        open_batch[job.key] = (batch + [job], count + len(job.images))
    batches.extend(batch for batch, _ in open_batch.values())
    arrival = {id(job): i for i, job in enumerate(jobs)}
    return sorted(batches, key=lambda batch: arrival[id(batch[0])])


class Batcher:
    """Captions concurrent requests together: the first request to arrive waits at most `max_wait_s` for
    others, up to `max_images` images in all; one thread runs the generate() calls, one at a time (two at
    once would only share the same cores), and each caller gets its own captions, or its batch's error."""

    def __init__(self, caption: Callable[[list, object], list[str]], max_images: int, max_wait_s: float):
        self.caption, self.max_images, self.max_wait_s = caption, max_images, max_wait_s
        self._queue: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._run, name="caption-batcher", daemon=True).start()

    def submit(self, images: list, generate) -> list[str]:
        """Captions these images with these settings, in a batch with whatever else arrives meanwhile."""
        job = Job(list(images), generate)
        self._queue.put(job)
        return job.done.result()

    def _collect(self) -> list[Job]:
        jobs = [self._queue.get()]
        count, deadline = len(jobs[0].images), time.monotonic() + self.max_wait_s
        while count < self.max_images:
            try:
                jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
            count += len(jobs[-1].images)
        return jobs

    def _run(self) -> None:
        while True:
            for batch in pack(self._collect(), self.max_images):
                try:
                    captions = self.caption([im for job in batch for im in job.images], batch[0].generate)
                except BaseException as error:  # every waiting request hears of it; the thread goes on
                    for job in batch:
                        job.done.set_exception(error)
                    continue
                for job in batch:
                    job.done.set_result(captions[: len(job.images)])
                    captions = captions[len(job.images):]


def bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class Captioner(PythonModel):
    """Loads the Hugging Face directory once; predicts one caption per image, in batches."""

    def load_context(self, context) -> None:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from fashioncap.config import GenerateParams
        from fashioncap.fingerprint import mixed_precision, pin

        with open(context.artifacts["serving_config"]) as f:
            self.config = json.load(f)
        if "numerics" in self.config:  # the kernels and threads evaluate used: the same captions (older models: none)
            pin(self.config["numerics"]["cpu_kernels"], self.config["numerics"]["threads"])
        self.generate = GenerateParams.model_validate(self.config["generate"])
        self.processor = BlipProcessor.from_pretrained(context.artifacts["blip"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = BlipForConditionalGeneration.from_pretrained(context.artifacts["blip"], use_safetensors=True)
        self.model.to(device).eval()
        self.precision = mixed_precision(self.config.get("mixed_precision", "no"))  # older models: fp32
        self.max_images = self.config["max_images"]
        self.batcher = None
        if os.environ.get(TIMEOUT_ENV):  # inside the scoring server: a request must fit its timeout
            self._start_serving(float(os.environ[TIMEOUT_ENV]))

    def _start_serving(self, timeout_s: float) -> None:
        """Times one caption at full length (the worst case: min_length = max_new_tokens) on this device,
        which also warms it up; fits the per-request image limit and the batch to the timeout. With batching,
        every generate() runs on the batcher's thread, the warm-up too: one thread pool of torch's on the
        cores, not one per request thread competing for them."""
        from PIL import Image

        configured = int(os.environ.get(BATCH_ENV) or self.config.get("batch_images", 1))  # older models: 1
        wait_ms = float(os.environ.get(WAIT_ENV) or self.config.get("batch_wait_ms", 0))
        caption = self._caption
        if configured > 1:
            self.batcher = Batcher(self._caption, 1, wait_ms / 1000)
            caption = self.batcher.submit
        worst = self.generate.model_copy(update={"min_length": self.generate.max_new_tokens})
        started = time.perf_counter()
        caption([Image.new("RGB", (self.config["image_size"],) * 2, "white")], worst)
        seconds = time.perf_counter() - started
        self.max_images = fitting_images(timeout_s, seconds, self.config["max_images"])
        batch = batch_images_within(timeout_s, seconds, configured)
        if self.batcher is not None:
            self.batcher.max_images = batch
        log.warning("one full-length caption takes %.2f s on %s (%s): serving at most %d images per request "
                    "(registry.max_images %d, request timeout %.0f s); %s", seconds, self.model.device,
                    "bf16 autocast" if self.precision == "bf16" else "fp32", self.max_images,
                    self.config["max_images"], timeout_s,
                    f"batching up to {batch} images of concurrent requests, waiting at most {wait_ms:g} ms"
                    if self.batcher is not None else "one request at a time")

    def _caption(self, images: list, generate) -> list[str]:
        from fashioncap.modeling import caption_all

        generate = generate.model_copy(update={"batch_size": max(generate.batch_size, len(images))})
        return caption_all(self.model, self.processor, images, generate, quiet=True, precision=self.precision)
    def _images(self, model_input):
        from fashioncap.imaging import ImageInputError, decode_base64_image, to_model_image

        if IMAGE_COLUMN not in getattr(model_input, "columns", []):
            raise bad_input(f"the request needs a column '{IMAGE_COLUMN}' of base64-encoded images")
        values = list(model_input[IMAGE_COLUMN])
        if not values:
            raise bad_input("the request holds no images")
        if len(values) > self.max_images:
            raise bad_input(f"{len(values)} images in one request; the limit is {self.max_images}"
                            + ("" if self.max_images == self.config["max_images"] else
                               f" on this device (within the {os.environ.get(TIMEOUT_ENV)} s request timeout)"))
        size = sum(len(v) for v in values if isinstance(v, (str, bytes)))
        if size > self.config["max_request_bytes"]:
            raise bad_input(f"{size} bytes of image data in one request; the limit is {self.config['max_request_bytes']}")
        images = []
        for row, value in enumerate(values):
            try:
                image = decode_base64_image(value, self.config["max_pixels"])
            except ImageInputError as error:
                raise bad_input(f"image {row}: {error}") from None
            images.append(to_model_image(image, self.config["image_size"]))
        return images

    def predict(self, context, model_input, params=None) -> list[str]:
        images = self._images(model_input)
        overrides = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            generate = self.generate.model_copy(update=overrides)
            generate = type(generate).model_validate(generate.model_dump())
        except ValueError as error:
            raise bad_input(f"invalid inference params: {error}") from None
        if self.batcher is not None:
            return self.batcher.submit(images, generate)
        return self._caption(images, generate)


mlflow.models.set_model(Captioner())
