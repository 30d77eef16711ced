"""Property-based fuzzing of the image-decoding path: arbitrary input only ever raises ImageInputError."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fashioncap.imaging import ImageInputError, decode_base64_image, decode_image, to_model_image


def _seed_files() -> list[bytes]:
    image = Image.effect_noise((24, 16), 40).convert("RGB")
    files = []
    for fmt, mode in (("PNG", "RGBA"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "CMYK"),
                      ("WEBP", "RGB"), ("PNG", "I;16")):
        buf = io.BytesIO()
        image.convert(mode).save(buf, format=fmt)
        files.append(buf.getvalue())
    return files


SEEDS = _seed_files()


def decode_fully(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=1_000_000)
        assert to_model_image(image, 16).mode == "RGB"
    except ImageInputError as error:
        assert str(error) and error.kind


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data):
    decode_fully(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(0, 10_000))
def test_mutated_and_truncated_real_images(seed, flips, cut):
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    decode_fully(bytes(data[: max(1, len(data) - cut % len(data))]))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), st.integers(), st.none()))
def test_arbitrary_base64_payloads(value):
    try:
        decode_base64_image(value, max_pixels=1_000_000)
    except ImageInputError as error:
        assert error.kind
