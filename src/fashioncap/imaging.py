"""Robust image decoding shared by data preparation, serving and the caption command."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# Larger images are refused before their pixels are decoded (decompression bombs).
DEFAULT_MAX_PIXELS = 40_000_000


class ImageInputError(ValueError):
    """An input that cannot be used as an image; the message names the problem, `kind` classifies it."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes image bytes fully, refusing empty, truncated, non-image and oversized inputs."""
    if not data:
        raise ImageInputError("empty image data", "empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageInputError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels",
                                      "too_many_pixels")
            image.load()
    except ImageInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageInputError(f"not a readable image ({type(error).__name__})", "not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # PIL's ways of saying "truncated/corrupt"
        raise ImageInputError(f"corrupt or truncated image ({str(error)[:120]})", "corrupt_image") from None
    return image


def decode_base64_image(text: object, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes a base64 string (or bytes) into an image."""
    if isinstance(text, str):
        text = text.encode("ascii", errors="replace")
    if not isinstance(text, (bytes, bytearray)):
        raise ImageInputError(f"expected a base64 string, got {type(text).__name__}", "not_base64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("invalid base64", "not_base64") from None
    return decode_image(data, max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """Turns a photo upright (EXIF orientation) and converts any mode (RGBA, L, P, CMYK, I;16...) to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """Encodes an image for storage in the prepared dataset (png or jpeg)."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def to_model_image(image: Image.Image | bytes, size: int) -> Image.Image:
    """Decodes if needed, turns upright, converts to RGB and resizes to the model's square input."""
    if isinstance(image, (bytes, bytearray)):
        image = decode_image(bytes(image))
    return to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
