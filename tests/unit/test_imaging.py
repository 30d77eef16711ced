"""Decoding of untrusted image bytes: every bad input is an ImageInputError naming the problem."""

import base64
import io

import pytest
from PIL import Image

from fashioncap.imaging import ImageInputError, decode_base64_image, decode_image, to_rgb


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("data,message", [
    (b"", "empty image data"),
    (b"plain text, not an image", "not a readable image"),
    (encoded(Image.effect_noise((64, 64), 40).convert("RGB"))[:200], "corrupt or truncated"),
    (encoded(Image.new("L", (300, 300))), "exceeds the limit of 10000 pixels"),
])
def test_bad_bytes_are_named(data, message):
    with pytest.raises(ImageInputError, match=message):
        decode_image(data, max_pixels=10_000)


def test_base64_errors():
    with pytest.raises(ImageInputError, match="invalid base64"):
        decode_base64_image("***")
    with pytest.raises(ImageInputError, match="expected a base64 string"):
        decode_base64_image(12)
    image = decode_base64_image(base64.b64encode(encoded(Image.new("RGB", (5, 4)))).decode())
    assert image.size == (5, 4)


def test_transparent_pixels_become_white_and_16_bit_keeps_its_range():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (4, 4), 32768)
    assert to_rgb(deep).getpixel((0, 0)) == (128, 128, 128)
