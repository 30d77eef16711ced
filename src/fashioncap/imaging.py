"""Robust image decoding shared by data preparation, serving, the caption command and the catalogue job."""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# Larger images are refused before their pixels are decoded (decompression bombs): the callers pass the one
# limit of their params (data.max_pixels, registry.max_pixels); this is the default of both.
DEFAULT_MAX_PIXELS = 40_000_000
# The formats a catalogue photo comes in (JPEG includes the MPO files many cameras and phones write). Everything
# else Pillow could open (EPS through Ghostscript, PSD, ICO, FITS, JPEG 2000, AVIF, ...) is refused unread.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # their file names
Image.init()  # registers every plugin: `Image.open(formats=...)` looks the accepted ones up by name
# Pillow warns (and at twice the limit raises) on its own limit of 89M pixels; the size check below refuses
# images before that, with the caller's limit, so the warning only repeats it. Ignored once, here: a
# `warnings.catch_warnings` around each decode is not thread-safe, and prepare decodes in a thread pool.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_WHITESPACE = re.compile(rb"\s+")
_DATA_URL = re.compile(rb"^data:image/[\w.+-]+;base64,", re.I)


class ImageInputError(ValueError):
    """An input that cannot be used as an image; the message names the problem, `kind` classifies it."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes image bytes fully, refusing empty, truncated, non-image, other-format and oversized inputs."""
    if not data:
        raise ImageInputError("empty image data", "empty_image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageInputError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels",
                                  "too_many_pixels")
        image.load()
    except ImageInputError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"image exceeds the limit of {max_pixels} pixels ({error})", "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"not a readable image (the accepted formats: {', '.join(FORMATS)})",
                              "not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, ZeroDivisionError,
            struct.error) as error:  # Pillow's ways of saying "truncated/corrupt"
        raise ImageInputError(f"corrupt or truncated image ({str(error)[:120]})", "corrupt_image") from None
    return image


def decode_base64_image(text: object, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes a base64 string (or bytes) into an image. Line breaks and spaces (MIME's 76-character lines,
    `base64.encodebytes`) and a `data:image/...;base64,` prefix are accepted."""
    if isinstance(text, str):
        text = text.encode("ascii", errors="replace")
    if not isinstance(text, (bytes, bytearray)):
        raise ImageInputError(f"expected a base64 string, got {type(text).__name__}", "not_base64")
    text = _DATA_URL.sub(b"", _WHITESPACE.sub(b"", bytes(text)))
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("invalid base64", "not_base64") from None
    return decode_image(data, max_pixels)


# modes Pillow converts to RGB as they are; the rest are scaled to 8 bits first (16-bit and 32-bit greyscale,
# float), and anything else is refused by name
_DIRECT = {"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"}
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA", "P")


def _deep_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float greyscale as 8-bit: scaled from its range (16-bit: 0-65535; floats of 0-1 from
    there; other 32-bit values and floats: 0-255 as they are, else the image's own range), not clipped to white."""
    import numpy as np

    pixels = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = pixels.astype(np.float64) / 257.0
    else:
        pixels = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = pixels.max() if pixels.size else 0.0
        if image.mode == "F" and top <= 1.0 and pixels.min() >= 0:  # float pixels of 0-1
            scaled = pixels * 255.0
        elif top <= 255 and pixels.min() >= 0:
            scaled = pixels
        else:
            low = min(pixels.min(), 0.0)
            scaled = (pixels - low) * (255.0 / (top - low)) if top > low else np.zeros_like(pixels)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Turns a photo upright (EXIF orientation) and converts any mode Pillow decodes (RGBA, L, P, CMYK,
    I;16, I;16B, I, F, ...) to RGB; transparent pixels become white. A mode it cannot convert, or a photo whose
    pixels cannot be read, is an ImageInputError naming it."""
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode == "RGB":
            return image
        if image.mode not in _DIRECT:
            if not (image.mode.startswith("I") or image.mode == "F"):
                raise ImageInputError(f"image mode {image.mode} cannot be converted to RGB", "unsupported_mode")
            image = _deep_to_l(image)
        if image.mode in _ALPHA:
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")
    except ImageInputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, ZeroDivisionError) as error:
        raise ImageInputError(f"image of mode {image.mode} cannot be converted to RGB ({str(error)[:120]})",
                              "unsupported_mode") from None


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
