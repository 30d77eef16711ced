"""The registered model's code: captions base64-encoded images with a saved BLIP, in batches.

MLflow copies the `fashioncap` package into each version, whose entry file (models-from-code) is
`served_model.py`, so the registry alone serves it:
`mlflow models serve -m models:/fashion-captioner@champion --env-manager local`. This module only defines;
importing it starts nothing.

Inside the scoring server the model batches: MLflow runs each request's `predict` in a thread of its own,
and concurrent requests' images are captioned together in one generate() call (`Batcher`).

Its settings are one `ServingSettings`, read once when the model loads: the version's registered
`serving_config.json` and what the process hosting it says (`HostSettings`: `fashioncap serve`'s flags, a
batch job's threads), which the host hands to the processes it starts in the one variable FASHIONCAP_SERVING.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"
SETTINGS_ENV = "FASHIONCAP_SERVING"  # HostSettings as JSON, for the processes a host starts
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # MLflow's own: `mlflow models serve --timeout`, for its workers
TIMEOUT_SHARE = 0.8  # of the request timeout a full request may take: decoding, queueing and the rest get 20%
log = logging.getLogger("fashioncap.serving")


@dataclass(frozen=True)
class HostSettings:
    """What the process that hosts the model says, besides the registered config. None: the registered value."""

    batch_images: int | None = None  # `fashioncap serve --batch-size`: over registry.batch_images
    batch_wait_ms: float | None = None  # `fashioncap serve --max-wait-ms`: over registry.batch_wait_ms
    threads: int | None = None  # torch threads of a process that captions (0: numerics.threads); set, it pins
    request_threads: int | None = None  # the scoring server's pool of request threads (`request_loop`)

    def env(self) -> dict[str, str]:
        """The one variable that hands these settings to the processes the host starts."""
        return {SETTINGS_ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HostSettings:
        text = (os.environ if environ is None else environ).get(SETTINGS_ENV)
        if not text:
            return cls()
        values = json.loads(text)
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{SETTINGS_ENV} has unknown settings {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class ServingSettings:
    """Everything the served model is configured by, read once when it loads."""

    config: dict  # the version's serving_config.json: generation, limits, numerics, batching
    request_timeout: float | None  # inside the scoring server: requests and their limits; None in a batch job
    batch_images: int
    batch_wait_ms: float
    pin: bool  # a process of its own: pin the kernels and threads evaluate used, so the same captions
    threads: int | None

    @classmethod
    def read(cls, config: dict, environ: Mapping[str, str] | None = None) -> ServingSettings:
        environ = os.environ if environ is None else environ
        host = HostSettings.from_env(environ)
        timeout = environ.get(TIMEOUT_ENV)
        numerics = config.get("numerics", {"cpu_kernels": "native", "threads": None})
        # pinned only in a process of its own (the scoring server, a Spark worker, `fashioncap caption`), never in
        # one that loads the model in passing (log_model checking its input example, a notebook)
        pin = bool(timeout) or host.threads is not None
        return cls(config, float(timeout) if timeout else None,
                   host.batch_images or int(config.get("batch_images", 1)),  # older models: 1
                   host.batch_wait_ms if host.batch_wait_ms is not None else float(config.get("batch_wait_ms", 0)),
                   pin, ((host.threads or 0) or numerics["threads"]) if pin else None)

    @property
    def numerics(self) -> dict:
        return self.config.get("numerics", {"cpu_kernels": "native", "threads": None})


def request_loop():
    """The scoring server's event loop (uvicorn's custom loop factory: `fashioncap serve` sets
    UVICORN_LOOP to it). MLflow runs each request's predict in asyncio's default thread pool, which has
    min(32, cores + 4) threads, 6 on 2 cores: at most 6 requests could wait for one batch. This loop's pool
    has HostSettings.request_threads threads."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.SelectorEventLoop()
    threads = HostSettings.from_env().request_threads or 32
    loop.set_default_executor(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="request"))
    return loop


def fitting_images(timeout_s: float, seconds_per_image: float, configured: int) -> int:
    """The most images per request (at most `configured`, at least 1) that one generate() call over them
    finishes within TIMEOUT_SHARE of the request timeout, at the measured worst-case pace per image."""
    return max(1, min(configured, int(TIMEOUT_SHARE * timeout_s / max(seconds_per_image, 1e-9))))


def batch_images_within(timeout_s: float, seconds_per_image: float, configured: int) -> int:
    """The most images per generate() call such that a request that waits for one full batch and then has
    its own captioned still finishes within TIMEOUT_SHARE of the request timeout."""
    return max(1, min(configured, fitting_images(timeout_s, seconds_per_image, 2 * configured) // 2))


class QueueFull(RuntimeError):
    """The batcher holds as many waiting images as it may: answered 503 at once, not after a timeout."""


class DeadlineExceeded(TimeoutError):
    """A request's deadline passed before its captions were computed: they never are."""


@dataclass(eq=False)
class Job:
    """One request's images and generation settings, and where its captions go."""

    images: list
    generate: object  # GenerateParams
    deadline: float = float("inf")  # time.monotonic() after which nobody waits for the captions
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
    once would only share the same cores), and each caller gets its own captions, or its batch's error.

    Bounded: at most `max_waiting` images wait behind the batch being computed (more would miss their
    deadline anyway: a request beyond that is refused at once with QueueFull), and a request whose deadline
    passed, or whose caller stopped waiting, is dropped before its batch is computed."""

    def __init__(self, caption: Callable[[list, object], list[str]], max_images: int, max_wait_s: float,
                 max_waiting: int | None = None):
        self.caption, self.max_images, self.max_wait_s = caption, max_images, max_wait_s
        self.max_waiting = max_waiting
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting, self._lock = 0, threading.Lock()
        self.dropped = 0  # requests dropped unanswered: deadline passed or caller gone
        threading.Thread(target=self._run, name="caption-batcher", daemon=True).start()

    def submit(self, images: list, generate, deadline: float = float("inf")) -> list[str]:
        """Captions these images with these settings, in a batch with whatever else arrives meanwhile;
        QueueFull at once when the queue is full, DeadlineExceeded when `deadline` passes first."""
        job = Job(list(images), generate, deadline)
        with self._lock:
            limit = self.max_waiting
            if limit is not None and self._waiting > 0 and self._waiting + len(job.images) > limit:
                raise QueueFull(f"{self._waiting} images are waiting to be captioned, the most this server queues "
                                f"is {limit}: retry later")
            self._waiting += len(job.images)
        self._queue.put(job)
        try:
            return job.done.result(timeout=None if deadline == float("inf") else max(0.0, deadline - time.monotonic()))
        except (FutureTimeout, CancelledError):
            job.done.cancel()  # not computed if its batch has not started; if it has, the result is dropped
            raise DeadlineExceeded("the request's deadline passed before its captions were computed") from None

    def _take(self, timeout: float | None = None) -> Job:
        """The next job off the queue (queue.Empty after `timeout`); its images no longer count as waiting."""
        job = self._queue.get(timeout=timeout)
        with self._lock:
            self._waiting -= len(job.images)
        return job

    def _collect(self) -> list[Job]:
        jobs = [self._take()]
        count, deadline = len(jobs[0].images), time.monotonic() + self.max_wait_s
        while count < self.max_images:
            try:
                jobs.append(self._take(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
            count += len(jobs[-1].images)
        return jobs

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs still awaited; the others are dropped uncomputed."""
        live, now = [], time.monotonic()
        for job in jobs:
            if now > job.deadline:
                job.done.cancel()
            if job.done.set_running_or_notify_cancel():
                live.append(job)
            else:
                self.dropped += 1
        return live

    def _run(self) -> None:
        while True:
            for batch in pack(self._live(self._collect()), self.max_images):
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
        from transformers import BlipProcessor

        from fashioncap.config import GenerateParams
        from fashioncap.fingerprint import mixed_precision, pin
        from fashioncap.modeling import load_model

        with open(context.artifacts["serving_config"]) as f:
            self.config = json.load(f)
        self.settings = ServingSettings.read(self.config)
        if self.settings.pin:
            pin(self.settings.numerics["cpu_kernels"], self.settings.threads)
        self.generate = GenerateParams.model_validate(self.config["generate"])
        self.processor = BlipProcessor.from_pretrained(context.artifacts["blip"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # older models were evaluated with transformers' eager attention: they keep it
        self.model = load_model(context.artifacts["blip"], self.config.get("attention", "eager"))
        self.model.to(device).eval()
        self.precision = mixed_precision(self.config.get("mixed_precision", "no"))  # older models: fp32
        self.max_images = self.config["max_images"]
        self.batcher = None
        self.max_queued, self.timeout_s = None, None  # set by _start_serving: requests are bounded there
        self._in_flight, self._in_flight_lock = 0, threading.Lock()
        self.serving = self.settings.request_timeout is not None  # the scoring server: requests and limits
        if self.serving:
            self._start_serving(self.settings.request_timeout)

    def _start_serving(self, timeout_s: float) -> None:
        """Times one caption at full length (the worst case: min_length = max_new_tokens) on this device, after
        an untimed one that warms it up (a cold call also pays for creating every kernel's primitives: on an
        AMX CPU it took twice as long, which cut the image limit in half); fits the per-request image limit and
        the batch to the timeout. With batching,
        every generate() runs on the batcher's thread, the warm-up too: one thread pool of torch's on the
        cores, not one per request thread competing for them."""
        from PIL import Image

        configured, wait_ms = self.settings.batch_images, self.settings.batch_wait_ms
        caption = self._caption
        if configured > 1:
            self.batcher = Batcher(self._caption, 1, wait_ms / 1000)
            caption = self.batcher.submit
        worst = self.generate.model_copy(update={"min_length": self.generate.max_new_tokens})
        blank = [Image.new("RGB", (self.config["image_size"],) * 2, "white")]
        caption(blank, worst)  # warm-up
        started = time.perf_counter()
        caption(blank, worst)
        seconds = time.perf_counter() - started
        self.max_images = fitting_images(timeout_s, seconds, self.config["max_images"])
        batch = batch_images_within(timeout_s, seconds, configured)
        # the images that may wait or be in progress at once: what the device captions within the timeout at
        # the measured one-image pace (batches go faster), never less than a request or a batch
        self.max_queued = max(self.max_images, batch, fitting_images(timeout_s, seconds, 1 << 30))
        self.timeout_s = timeout_s
        if self.batcher is not None:
            self.batcher.max_images, self.batcher.max_waiting = batch, self.max_queued
        log.warning("one full-length caption takes %.2f s on %s (%s): serving at most %d images per request "
                    "(registry.max_images %d, request timeout %.0f s), %d waiting or in progress at once; %s",
                    seconds, self.model.device, "bf16 autocast" if self.precision == "bf16" else "fp32",
                    self.max_images, self.config["max_images"], timeout_s, self.max_queued,
                    f"batching up to {batch} images of concurrent requests, waiting at most {wait_ms:g} ms"
                    if self.batcher is not None else "one request at a time")

    def _caption(self, images: list, generate) -> list[str]:
        from fashioncap.modeling import caption_all

        generate = generate.model_copy(update={"batch_size": max(generate.batch_size, len(images))})
        return caption_all(self.model, self.processor, images, generate, quiet=True, precision=self.precision)
    def _values(self, model_input) -> list:
        """The request's base64 images; inside the scoring server, within its per-request limits."""
        if IMAGE_COLUMN not in getattr(model_input, "columns", []):
            raise bad_input(f"the request needs a column '{IMAGE_COLUMN}' of base64-encoded images")
        values = list(model_input[IMAGE_COLUMN])
        if not self.serving:  # a batch job (Spark, a script): its batches are not requests
            return values
        if not values:
            raise bad_input("the request holds no images")
        if len(values) > self.max_images:
            raise bad_input(f"{len(values)} images in one request; the limit is {self.max_images}"
                            + ("" if self.max_images == self.config["max_images"] else
                               f" on this device (within the {self.timeout_s:g} s request timeout)"))
        size = sum(len(v) for v in values if isinstance(v, (str, bytes)))
        if size > self.config["max_request_bytes"]:
            raise bad_input(f"{size} bytes of image data in one request; the limit is {self.config['max_request_bytes']}")
        return values

    def _decoded(self, values: list) -> list:
        """Each value as the model's image, or the ImageInputError that says why it is not one."""
        from fashioncap.imaging import ImageInputError, decode_base64_image, to_model_image

        images = []
        for value in values:
            try:
                images.append(to_model_image(decode_base64_image(value, self.config["max_pixels"]),
                                             self.config["image_size"]))
            except ImageInputError as error:
                images.append(error)
        return images

    def _settings(self, params: dict | None) -> tuple[object, str]:
        """The generation settings with the request's overrides, and its error mode."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        errors = params.pop("errors", "raise")
        if errors not in ("raise", "row"):
            raise bad_input(f"invalid inference params: errors must be 'raise' or 'row', not {errors!r}")
        try:
            generate = self.generate.model_copy(update=params)
            generate = type(generate).model_validate(generate.model_dump())
        except ValueError as error:
            raise bad_input(f"invalid inference params: {error}") from None
        # a request may ask for less work than the registered settings, never more: the image limit and the
        # batches were fitted to the timeout with them (400 beams would hold the batcher for hours)
        for name in ("num_beams", "max_new_tokens"):
            if getattr(generate, name) > getattr(self.generate, name):
                raise bad_input(f"invalid inference params: {name} {getattr(generate, name)} is above the registered "
                                f"{getattr(self.generate, name)}, the most a request may ask for")
        return generate, errors

    def _captions(self, images: list, generate, deadline: float) -> list[str]:
        """The captions of a request's good images within the server's bounds: a full queue is a 503 at once,
        a request whose deadline passed a 504 and never computed."""
        from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, TEMPORARILY_UNAVAILABLE

        try:
            if self.batcher is not None:
                return self.batcher.submit(images, generate, deadline)
            if self.max_queued is None:  # a batch job, not a server
                return self._caption(images, generate)
            with self._in_flight_lock:
                if self._in_flight > 0 and self._in_flight + len(images) > self.max_queued:
                    raise QueueFull(f"{self._in_flight} images are being captioned, the most this server takes at "
                                    f"once is {self.max_queued}: retry later")
                self._in_flight += len(images)
            try:
                if time.monotonic() > deadline:
                    raise DeadlineExceeded("the request's deadline passed before its captions were computed")
                return self._caption(images, generate)
            finally:
                with self._in_flight_lock:
                    self._in_flight -= len(images)
        except QueueFull as error:
            raise MlflowException(str(error), error_code=TEMPORARILY_UNAVAILABLE) from None
        except DeadlineExceeded as error:
            raise MlflowException(str(error), error_code=DEADLINE_EXCEEDED) from None

    def predict(self, context, model_input, params=None):
        """One caption per image. errors='raise' (the default): a bad image fails the request with a
        message naming it (HTTP 400). errors='row': a DataFrame of caption and error per image, where a bad
        image is a row with an error and no caption ("" for none), as a batch job over a catalogue needs."""
        import pandas as pd

        deadline = time.monotonic() + self.timeout_s if self.timeout_s else float("inf")
        generate, errors = self._settings(params)
        images = self._decoded(self._values(model_input))
        bad = {row: str(image) for row, image in enumerate(images) if isinstance(image, Exception)}
        if errors == "raise" and bad:
            row = min(bad)
            raise bad_input(f"image {row}: {bad[row]}")
        good = [image for image in images if not isinstance(image, Exception)]
        captions = iter(self._captions(good, generate, deadline) if good else [])
        if errors == "raise":
            return list(captions)
        # "" for none: mlflow.pyfunc.spark_udf casts a struct's string fields with astype(str), None -> "None"
        return pd.DataFrame({"caption": ["" if row in bad else next(captions) for row in range(len(images))],
                             "error": [bad.get(row, "") for row in range(len(images))]})

