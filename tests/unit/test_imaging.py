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


def _tiff(image: Image.Image) -> bytes:
    return encoded(image, "TIFF")


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_mode_pillow_decodes_becomes_rgb_or_a_named_error(mode):
    """Fuzz of the modes: each one converts to an RGB image of the same size, or is an ImageInputError
    saying why (never Pillow's own ValueError, as 16-bit big-endian TIFFs once were)."""
    import numpy as np

    image = Image.new(mode, (6, 5))
    if mode.startswith("I") or mode == "F":
        dtype = {"I;16B": ">u2", "I;16": "<u2", "I;16L": "<u2", "I;16N": "=u2", "I": "<i4", "F": "<f4"}[mode]
        ramp = np.linspace(0, 65535 if mode != "F" else 1.0, 30).reshape(5, 6).astype(dtype)
        image = Image.frombytes(mode, (6, 5), ramp.tobytes())
    try:
        rgb = to_rgb(image)
    except ImageInputError as error:
        assert error.kind == "unsupported_mode" and mode in str(error)
        return
    assert rgb.mode == "RGB" and rgb.size == (6, 5)
    if mode.startswith("I") or mode == "F":  # deep greyscale keeps its range: black to white, not clipped
        assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((5, 4)) == (255, 255, 255)


def test_a_16_bit_big_endian_tiff_decodes_and_converts():
    import numpy as np

    ramp = (np.arange(64).reshape(8, 8) * 1024).astype(">u2")  # big-endian bytes
    image = decode_image(_tiff(Image.frombytes("I;16B", (8, 8), ramp.tobytes())))
    assert image.mode == "I;16B"
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((7, 7))[0] == round(63 * 1024 / 257)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nnewpath 0 0 moveto 10 10 lineto stroke\n"


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PPM", "TGA", "PCX", "SGI", "IM", "JPEG2000", "QOI"])
def test_formats_outside_the_catalogue_ones_are_refused_unread(fmt):
    """EPS would run Ghostscript; the rest widen what a request can make Pillow parse."""
    if fmt == "EPS":
        data = EPS
    else:
        buf = io.BytesIO()
        try:
            Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format=fmt)
        except (KeyError, OSError):
            pytest.skip(f"this Pillow cannot write {fmt}")
        data = buf.getvalue()
    with pytest.raises(ImageInputError, match="accepted formats: JPEG, PNG, WEBP, GIF, BMP, TIFF") as error:
        decode_image(data)
    assert error.value.kind == "not_an_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_catalogue_formats_decode(fmt):
    assert decode_image(encoded(Image.new("RGB", (20, 10), (10, 200, 30)), fmt)).size == (20, 10)


def test_base64_with_line_breaks_spaces_or_a_data_url_prefix_decodes():
    data = encoded(Image.effect_noise((120, 90), 60).convert("RGB"))
    mime = base64.encodebytes(data)  # 76-character lines
    assert b"\n" in mime
    for text in (mime, mime.decode(), mime.decode().replace("\n", "\r\n"), "  " + base64.b64encode(data).decode() + "\n",
                 "data:image/png;base64," + base64.b64encode(data).decode()):
        assert decode_base64_image(text).size == (120, 90)
    with pytest.raises(ImageInputError, match="invalid base64"):
        decode_base64_image(mime.decode().replace("A", "*", 1))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data: a decompression bomb's first bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_oversized_images_are_refused_from_their_header_in_many_threads_at_once():
    """The pixel limit is checked from the header, before decoding, in every thread of a pool (prepare's),
    with no per-call change of the process's warning filters (not thread-safe): Pillow's own bomb error
    (above 179M pixels) is the same named error."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    good = encoded(Image.new("RGB", (50, 40)))
    inputs = [good, _png_header(300, 300), _png_header(100_000, 100_000)] * 40
    filters = list(warnings.filters)

    def outcome(data: bytes) -> str:
        try:
            return f"ok {decode_image(data, max_pixels=10_000).size}"
        except ImageInputError as error:
            return error.kind

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(outcome, inputs))
    assert results == ["ok (50, 40)", "too_many_pixels", "too_many_pixels"] * 40
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert [f for f in warnings.filters if f not in filters] == []
