"""The registered model, as MLflow models-from-code: captions base64-encoded images with a saved BLIP.

MLflow copies this file and the `fashioncap` package into the model, so the registry alone serves it:
`mlflow models serve -m models:/fashion-captioner@champion --env-manager local`.
"""

from __future__ import annotations

import json
import logging
import os
import time

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # set by `mlflow models serve` (--timeout) for its workers
TIMEOUT_SHARE = 0.8  # of the request timeout a full request may take: decoding, queueing and the rest get 20%
log = logging.getLogger("fashioncap.serving")


def fitting_images(timeout_s: float, seconds_per_image: float, configured: int) -> int:
    """The most images per request (at most `configured`, at least 1) that one generate() call over them
    finishes within TIMEOUT_SHARE of the request timeout, at the measured worst-case pace per image."""
    return max(1, min(configured, int(TIMEOUT_SHARE * timeout_s / max(seconds_per_image, 1e-9))))


def bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class Captioner(PythonModel):
    """Loads the Hugging Face directory once; predicts one caption per image, in batches."""

    def load_context(self, context) -> None:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from fashioncap.config import GenerateParams

        with open(context.artifacts["serving_config"]) as f:
            self.config = json.load(f)
        self.generate = GenerateParams.model_validate(self.config["generate"])
        self.processor = BlipProcessor.from_pretrained(context.artifacts["blip"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = BlipForConditionalGeneration.from_pretrained(context.artifacts["blip"], use_safetensors=True)
        self.model.to(device).eval()
        self.max_images = self.config["max_images"]
        if os.environ.get(TIMEOUT_ENV):  # inside the scoring server: a request must fit its timeout
            self.max_images = self._images_within(float(os.environ[TIMEOUT_ENV]))

    def _images_within(self, timeout_s: float) -> int:
        """Times one caption at full length (the worst case: min_length = max_new_tokens) on this device,
        which also warms it up, and returns how many images a request may hold."""
        from PIL import Image

        from fashioncap.modeling import caption_batch

        worst = self.generate.model_copy(update={"min_length": self.generate.max_new_tokens})
        started = time.perf_counter()
        caption_batch(self.model, self.processor, [Image.new("RGB", (self.config["image_size"],) * 2, "white")], worst)
        seconds = time.perf_counter() - started
        limit = fitting_images(timeout_s, seconds, self.config["max_images"])
        log.warning("one full-length caption takes %.2f s on %s: serving at most %d images per request "
                    "(registry.max_images %d, request timeout %.0f s)", seconds, self.model.device, limit,
                    self.config["max_images"], timeout_s)
        return limit
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
        from fashioncap.modeling import caption_all

        images = self._images(model_input)
        overrides = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            generate = self.generate.model_copy(update=overrides)
            generate = type(generate).model_validate(generate.model_dump())
        except ValueError as error:
            raise bad_input(f"invalid inference params: {error}") from None
        return caption_all(self.model, self.processor, images, generate, desc="caption")


mlflow.models.set_model(Captioner())
