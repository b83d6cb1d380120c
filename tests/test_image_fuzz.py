"""Mutated and pathological image bytes: every image function returns a status, none raises.

Web bytes are hostile or merely broken; a crash in a worker would stop a shard. The mutations
are seeded, so a failure reproduces exactly; its message names format, mutation and case.
"""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Callable

import pytest
from PIL import Image, ImageDraw
from PIL.TiffImagePlugin import IFDRational

from vlmdata.pipeline.imageops import (
    ImageResult,
    SquareOptions,
    inspect_image,
    make_square,
    square_image,
)

OPTIONS = SquareOptions(size=32)
# Small enough that a mutated header declaring a huge size is refused, not decoded.
MAX_PIXELS = 4_000_000
STATUSES = {"success", "failed_to_decode", "filtered"}
CASES_PER_MUTATION = 50


def picture(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    image = Image.new("RGB", size, (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle([8, 8, 40, 30], fill=(250, 200, 0))
    draw.ellipse([20, 10, 60, 44], fill=(10, 180, 40))
    return image.convert(mode)


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def jpeg_with_exif() -> bytes:
    """A phone-like JPEG: rotated by its EXIF, with rationals (signed too) and strings, all
    things Pillow parses, and writes back when it transposes."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate on display
    exif[0x011A] = exif[0x011B] = IFDRational(72, 1)  # X/Y resolution
    exif[0x010F], exif[0x0132] = "Camera", "2024:01:01 00:00:00"
    sub_ifd = exif.get_ifd(0x8769)
    sub_ifd[0x9204] = IFDRational(-1, 3)  # exposure bias, a signed rational
    sub_ifd[0x829A] = IFDRational(1, 100)  # exposure time
    return encoded(picture(), "JPEG", quality=80, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [picture().rotate(angle) for angle in (0, 90, 180)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


SEEDS = {
    "jpeg": jpeg_with_exif,
    "png": lambda: encoded(picture("RGBA"), "PNG"),
    "webp": lambda: encoded(picture(), "WEBP", quality=70),
    "gif": animated_gif,
}


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def insert_bytes(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]


def duplicate_chunk(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    chunk = data[start : start + rng.randint(1, 256)]
    at = rng.randrange(len(data))
    return data[:at] + chunk + data[at:]


def overwrite_header(data: bytes, rng: random.Random) -> bytes:
    """Random bytes over the first 64: sizes, chunk lengths and markers live there."""
    at = rng.randrange(min(64, len(data)))
    length = rng.randint(1, 8)
    return data[:at] + rng.randbytes(length) + data[at + length :]


def mutate_metadata(data: bytes, rng: random.Random) -> bytes:
    """A few random bytes inside the metadata: the JPEG's EXIF segment, else the first 256
    bytes. Pillow parses metadata in Python, far from its hardened C decoders."""
    start, end = 0, min(256, len(data))
    if (exif := data.find(b"Exif\0\0")) > 0:
        start, end = exif + 6, exif - 2 + int.from_bytes(data[exif - 2 : exif], "big")
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(start, end)
        out[at] = rng.randrange(256) if rng.random() < 0.5 else out[at] ^ 1 << rng.randrange(8)
    return bytes(out)


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip": flip_bits, "truncate": truncate, "insert": insert_bytes,
    "duplicate": duplicate_chunk, "header": overwrite_header, "metadata": mutate_metadata,
}  # fmt: skip


def check(result: ImageResult) -> None:
    assert result.status in STATUSES, result
    if result.status != "success":
        assert result.error_kind and result.error, result


def run_all(data: bytes) -> list[ImageResult]:
    """Every public image function on ``data``: none may raise."""
    results = [inspect_image(data, MAX_PIXELS), square_image(data, OPTIONS, MAX_PIXELS)]
    result, square = make_square(data, OPTIONS, MAX_PIXELS)
    assert (square is None) != result.ok
    if square is not None:
        assert square.size == (OPTIONS.size, OPTIONS.size) and square.mode == "RGB"
    results.append(result)
    for one in results:
        check(one)
    return results


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("fmt", SEEDS)
def test_mutated_images_never_raise(fmt, mutation):
    seed = SEEDS[fmt]()
    rng = random.Random(f"{fmt}-{mutation}")  # deterministic per case
    for case in range(CASES_PER_MUTATION):
        data = MUTATIONS[mutation](seed, rng)
        try:
            results = run_all(data)
        except BaseException as e:  # name the case that broke
            raise AssertionError(f"{fmt}/{mutation} case {case}: {type(e).__name__}: {e}") from e
        squared = results[1]
        if squared.ok:  # a stored square must itself be a clean image
            assert Image.open(io.BytesIO(squared.data)).size == (OPTIONS.size, OPTIONS.size)


def sixteen_bit_png() -> bytes:
    raw = b"".join(struct.pack("<H", (x * 997) % 65536) for _ in range(40) for x in range(50))
    return encoded(Image.frombytes("I;16", (50, 40), raw), "PNG")


def palette_png_with_transparency() -> bytes:
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    ImageDraw.Draw(image).rectangle([0, 0, 19, 39], fill=0)
    return encoded(image, "PNG", transparency=0)


PATHOLOGICAL = {
    "empty": (lambda: b"", "empty"),
    "jpeg-soi-only": (lambda: b"\xff\xd8", "not_an_image"),
    "jpeg-header-only": (lambda: jpeg_with_exif()[:300], None),
    "png-signature-only": (lambda: b"\x89PNG\r\n\x1a\n", None),
    "zeros": (lambda: bytes(4096), "not_an_image"),
    "1x1": (lambda: encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "success"),
    "1x65000": (lambda: encoded(Image.new("L", (1, 65000), 200), "PNG"), "success"),
    "65000x1-jpeg": (lambda: encoded(Image.new("RGB", (65000, 1), (0, 90, 0)), "JPEG"), "success"),
    "16-bit-png": (sixteen_bit_png, "success"),
    "cmyk-jpeg": (lambda: encoded(picture("CMYK"), "JPEG"), "success"),
    "palette-png-transparency": (palette_png_with_transparency, "success"),
    "animated-gif": (animated_gif, "success"),
    "la-png": (lambda: encoded(picture("LA"), "PNG"), "success"),
    "1-bit-tiff": (lambda: encoded(picture("1"), "TIFF"), "success"),
    "float-tiff": (lambda: encoded(picture("F"), "TIFF"), None),
    "html": (lambda: b"<!DOCTYPE html><html><body>404</body></html>", "not_an_image"),
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_inputs(name):
    make, expected = PATHOLOGICAL[name]
    results = run_all(make())
    if expected == "success":
        assert all(result.ok for result in results), results
    elif expected is not None:
        assert {result.error_kind for result in results} == {expected}, results
