"""The registered model, as MLflow models-from-code: captions base64-encoded images with a saved BLIP.

MLflow copies this file and the `fashioncap` package into the model, so the registry alone serves it:
`mlflow models serve -m models:/fashion-captioner@champion --env-manager local`.
"""

from __future__ import annotations

import json

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"


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

    def _images(self, model_input):
        from fashioncap.imaging import ImageInputError, decode_base64_image, to_model_image

        if IMAGE_COLUMN not in getattr(model_input, "columns", []):
            raise bad_input(f"the request needs a column '{IMAGE_COLUMN}' of base64-encoded images")
        values = list(model_input[IMAGE_COLUMN])
        if not values:
            raise bad_input("the request holds no images")
        if len(values) > self.config["max_images"]:
            raise bad_input(f"{len(values)} images in one request; the limit is {self.config['max_images']}")
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
