"""Image operations: check a body is an image, and the adaptive crop/pad square preprocessor.

Everything here is a pure function from bytes to an :class:`ImageResult`, safe to run in worker
processes. Bytes are sniffed by Pillow, never trusted from a Content-Type; the pixel-count guard
reads the header only, so a decompression bomb is refused before a single pixel is decoded.

The square rule (DESIGN.md, "preprocess"): after EXIF orientation and conversion to RGB (alpha
composited onto the fill colour), ``r = min(w, h) / max(w, h)``; if ``r >= pad_threshold`` the
largest centred square is cropped, otherwise the image is padded to a square with the fill
colour, whole and centred; then it is resized to ``size`` x ``size``.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass, replace

from PIL import Image, ImageOps, UnidentifiedImageError

from vlmdata.errors import UserError
from vlmdata.pipeline.shards import FAILED_TO_DECODE, FILTERED, SUCCESS

# Pillow's own bomb check warns at its limit and raises at twice it; we enforce ours instead.
Image.MAX_IMAGE_PIXELS = None
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
                     "TIFF": "tiff", "MPO": "jpg"}  # fmt: skip
OUTPUT_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_DRAFT_SCALE = 8  # the largest JPEG DCT scaling (1/8)
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Pillow's decoders signal broken data with a zoo of exception types.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError)


@dataclass(frozen=True)
class SquareOptions:
    """How to turn any image into a ``size`` x ``size`` RGB square."""

    size: int = 448
    pad_threshold: float = 0.6
    fill: tuple[int, int, int] = (0, 0, 0)
    format: str = "jpg"  # jpg | png | webp
    quality: int = 95
    min_side: int = 0  # shorter sides below this are filtered out, not written

    def __post_init__(self) -> None:
        if self.size < 1:
            raise UserError(f"--size must be at least 1, got {self.size}")
        if not 0 < self.pad_threshold <= 1:
            raise UserError(f"--pad-threshold must be in (0, 1], got {self.pad_threshold}")
        if len(self.fill) != 3 or not all(0 <= c <= 255 for c in self.fill):
            raise UserError(f"--fill must be three values 0-255 like 0,0,0, got {self.fill}")
        if self.format not in OUTPUT_FORMATS:
            raise UserError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be 1-100, got {self.quality}")
        if self.min_side < 0:
            raise UserError("--min-side cannot be negative")


@dataclass(frozen=True)
class ImageResult:
    """What came of one image: stored bytes and their geometry, or why there are none."""

    status: str = SUCCESS  # success | failed_to_decode | filtered
    error_kind: str | None = None
    error: str | None = None
    format: str | None = None  # of the stored bytes
    original_width: int | None = None
    original_height: int | None = None
    width: int | None = None
    height: int | None = None
    ratio: float | None = None  # min(w, h) / max(w, h) of the original
    action: str | None = None  # crop | pad (None: stored as downloaded)
    data: bytes | None = None  # the new bytes; None means the input bytes are stored as is
    sha256: str | None = None  # of the stored bytes

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS

    @property
    def extension(self) -> str:
        assert self.format is not None
        return FORMAT_EXTENSIONS.get(self.format, self.format.lower())

    def record_fields(self) -> dict:
        """The status-row columns this result fills (every stage's parquet shares them)."""
        return {
            "status": self.status, "error_kind": self.error_kind, "error": self.error,
            "format": self.format, "original_width": self.original_width,
            "original_height": self.original_height, "width": self.width, "height": self.height,
            "ratio": self.ratio, "action": self.action, "sha256": self.sha256,
        }  # fmt: skip


def _failure(kind: str, message: str, **geometry: object) -> ImageResult:
    status = FILTERED if kind == "too_small" else FAILED_TO_DECODE
    return ImageResult(status=status, error_kind=kind, error=message[:300], **geometry)


def inspect_image(data: bytes, max_pixels: int) -> ImageResult:
    """Check that ``data`` is an image no larger than ``max_pixels``, to be stored as is.

    The header is always parsed and the bytes hashed. Pixels are decoded only when the file's
    structure looks cut short (no JPEG end marker, no PNG IEND, a RIFF shorter than it
    declares): verifying a whole structure costs ~0.1 ms, a decode ~2 ms, and downloads are cut
    far more often than corrupted inside an intact file. Stages that decode catch the rest.
    """
    try:
        with _open(data, max_pixels) as image:
            width, height = image.size
            if not _looks_complete(image.format, data):
                _draft_jpeg(image, (max(1, width // _DRAFT_SCALE), max(1, height // _DRAFT_SCALE)))
                image.load()
            return ImageResult(
                format=image.format, original_width=width, original_height=height,
                width=width, height=height, ratio=_ratio(width, height),
                sha256=hashlib.sha256(data).hexdigest(),
            )  # fmt: skip
    except _Refused as refused:
        return refused.result
    except _DECODE_ERRORS as e:
        return _failure("broken_image", f"{type(e).__name__}: {e}")


def square_image(data: bytes, options: SquareOptions, max_pixels: int) -> ImageResult:
    """Decode ``data``, apply the crop/pad rule and encode a ``size`` x ``size`` square."""
    result, square = make_square(data, options, max_pixels)
    if square is None:
        return result
    encoded = encode_image(square, options)
    return replace(
        result, format=OUTPUT_FORMATS[options.format], data=encoded,
        sha256=hashlib.sha256(encoded).hexdigest(),
    )  # fmt: skip


def make_square(
    data: bytes, options: SquareOptions, max_pixels: int
) -> tuple[ImageResult, Image.Image | None]:
    """The crop/pad rule on ``data``: the square as a Pillow RGB image (None on failure) and
    what happened (``format``, ``data`` and ``sha256`` are left for the caller's encoding)."""
    try:
        with _open(data, max_pixels) as image:
            oriented = _oriented_size(image)
            geometry = {"original_width": oriented[0], "original_height": oriented[1],
                        "ratio": _ratio(*oriented)}  # fmt: skip
            if min(oriented) < options.min_side:
                message = f"shorter side {min(oriented)} < --min-side {options.min_side}"
                return _failure("too_small", message, **geometry), None
            action = "crop" if geometry["ratio"] >= options.pad_threshold else "pad"
            _draft_jpeg(image, _draft_request(image.size, options.size, action))
            rgb = to_rgb(ImageOps.exif_transpose(image), options.fill)
            square = _crop_or_pad(rgb, action, options)
    except _Refused as refused:
        return refused.result, None
    except _DECODE_ERRORS as e:
        return _failure("broken_image", f"{type(e).__name__}: {e}"), None
    result = ImageResult(width=options.size, height=options.size, action=action, **geometry)
    return result, square


def to_rgb(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited onto ``fill``, 16-bit scaled down."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow would clip 16-bit values at 255 (a white image); scale them to 8 bits.
        top = 65535 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 255
        image = image.convert("I").point(lambda v: v * (255 / top)).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*fill, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_image(image: Image.Image, options: SquareOptions) -> bytes:
    out = io.BytesIO()
    fmt = OUTPUT_FORMATS[options.format]
    if fmt == "PNG":
        image.save(out, fmt, compress_level=3)  # lossless anyway; level 3 is ~3x faster than 6
    else:
        image.save(out, fmt, quality=options.quality)
    return out.getvalue()


def _crop_or_pad(image: Image.Image, action: str, options: SquareOptions) -> Image.Image:
    """One resampling pass: a crop is the ``box`` of the resize; a pad resizes, then pastes."""
    size = options.size
    width, height = image.size
    if action == "crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return image.resize(
            (size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side)
        )
    scale = size / max(width, height)
    inner = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new("RGB", (size, size), options.fill)
    resized = image if inner == image.size else image.resize(inner, Image.Resampling.LANCZOS)
    canvas.paste(resized, ((size - inner[0]) // 2, (size - inner[1]) // 2))
    return canvas


def _draft_request(stored: tuple[int, int], size: int, action: str) -> tuple[int, int]:
    """The smallest decode size that still leaves ``size`` pixels across the output square.

    The square's side is the shorter side (crop) or the longer side (pad), in the stored
    orientation as in the displayed one.
    """
    side = min(stored) if action == "crop" else max(stored)
    scale = min(1.0, size / side)
    return (max(1, math.ceil(stored[0] * scale)), max(1, math.ceil(stored[1] * scale)))


def _draft_jpeg(image: Image.Image, request: tuple[int, int]) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers ``request``."""
    if image.format in ("JPEG", "MPO"):
        image.draft("RGB", request)


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size as displayed: EXIF orientations 5-8 swap width and height."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _ratio(width: int, height: int) -> float:
    return min(width, height) / max(width, height)


class _Refused(Exception):
    def __init__(self, result: ImageResult) -> None:
        self.result = result


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open ``data`` (header only) or raise _Refused: empty, not an image, too many pixels."""
    if not data:
        raise _Refused(_failure("empty", "empty body"))
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _Refused(_failure("not_an_image", f"not an image: {_sniff(data)}")) from None
    except Image.DecompressionBombError as e:
        raise _Refused(_failure("decompression_bomb", str(e))) from None
    except _DECODE_ERRORS as e:
        raise _Refused(_failure("broken_image", f"{type(e).__name__}: {e}")) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        message = f"{width}x{height} exceeds --max-pixels {max_pixels}"
        geometry = {"original_width": width, "original_height": height}
        raise _Refused(_failure("decompression_bomb", message, **geometry))
    return image


def _looks_complete(fmt: str | None, data: bytes) -> bool:
    """True when the file ends the way a whole file of its format ends."""
    if fmt in ("JPEG", "MPO"):
        return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"
    if fmt == "PNG":
        return data[-12:] == _PNG_IEND
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    if fmt == "GIF":
        return data.rstrip(b"\x00")[-1:] == b";"
    return False


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "HTML page"
    return f"starts with {data[:16]!r}"


def parse_fill(text: str) -> tuple[int, int, int]:
    """``"R,G,B"`` -> a fill colour (UserError when malformed)."""
    try:
        red, green, blue = (int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--fill takes R,G,B like 0,0,0 or 255,255,255, got {text!r}") from None
    return (red, green, blue)
