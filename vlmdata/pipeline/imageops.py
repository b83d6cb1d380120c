"""Image operations: check a body is an image, and the adaptive crop/pad square preprocessor.

Everything here is a pure function from bytes to an :class:`ImageResult`, safe to run in worker
processes and threads: it sets no process-wide state (Pillow's ``MAX_IMAGE_PIXELS``, warning
filters). Bytes are sniffed, never trusted from a Content-Type, and only the readers of
:data:`FORMATS` ever see them: Pillow's other plugins are never tried (EPS would run
Ghostscript on web bytes). The pixel-count guard reads the header only, so a decompression bomb
is refused before a single pixel is decoded. Whatever a decoder raises is a ``broken_image``.

The square rule (DESIGN.md, "preprocess"): after EXIF orientation and conversion to RGB (alpha
composited onto the fill colour), ``r = min(w, h) / max(w, h)``; if ``r >= pad_threshold`` the
largest centred square is cropped, otherwise the image is padded to a square with the fill
colour, whole and centred; then it is resized to ``size`` x ``size``.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

# The readers of the accepted formats: importing them registers them with Pillow.
from PIL import (  # noqa: F401
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from vlmdata.errors import UserError
from vlmdata.pipeline.shards import FAILED_TO_DECODE, FILTERED, SUCCESS

# The one list of image formats every stage accepts (download, preprocess, encode, and the
# folder scan of image_sources), each with its file extensions: the first is the one written.
FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": ("jpg", "jpeg"), "MPO": ("jpg",), "PNG": ("png",), "WEBP": ("webp",),
    "GIF": ("gif",), "BMP": ("bmp",), "TIFF": ("tiff", "tif"),
}  # fmt: skip
FORMAT_EXTENSIONS = {fmt: extensions[0] for fmt, extensions in FORMATS.items()}
IMAGE_EXTENSIONS = frozenset(ext for extensions in FORMATS.values() for ext in extensions)
# Pillow's readers tried, in order (JPEG's reader returns an MPO for multi-picture files).
_READERS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# What a Pillow reader raises for "not my format" (what Image.open moves on after).
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, struct.error)

# Signatures of image formats Pillow (or the web) knows but vlmdata does not accept: they make
# an unsupported_format rather than a not_an_image. Matched on the bytes alone, so no parser of
# theirs ever runs; TGA has no signature but an optional footer, see _foreign_format.
_FOREIGN_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"icns", "ICNS"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
)
_NETPBM = {b"1": "PBM", b"2": "PGM", b"3": "PPM", b"4": "PBM", b"5": "PGM", b"6": "PPM",
           b"7": "PAM", b"f": "PFM", b"F": "PFM"}  # fmt: skip
_ISO_MEDIA_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC",
                     b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"mif1": "HEIF",
                     b"msf1": "HEIF"}  # fmt: skip

OUTPUT_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_DRAFT_SCALE = 8  # the largest JPEG DCT scaling (1/8)
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_ORIENTATION = 0x0112  # EXIF tag
# How to turn each EXIF orientation upright (as ImageOps.exif_transpose does).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}  # fmt: skip


MAX_SQUARE = 8192  # a square side; beyond it one image alone takes gigabytes to resize


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
        if not 1 <= self.size <= MAX_SQUARE:
            raise UserError(
                f"the square side (--size, or --resize N) must be 1 to {MAX_SQUARE}, "
                f"got {self.size}"
            )
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


_INT32_MAX = 2**31 - 1  # the parquet's size columns are int32


def _failure(kind: str, message: str, **geometry: int | float) -> ImageResult:
    status = FILTERED if kind == "too_small" else FAILED_TO_DECODE
    # A hostile header can declare any size (a BMP's negative width reads as 4294917296): the
    # message keeps it, the columns only what they can hold.
    sizes = {k: v for k, v in geometry.items() if not isinstance(v, int) or 0 <= v <= _INT32_MAX}
    return ImageResult(status=status, error_kind=kind, error=message[:300], **sizes)


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
    except Exception as e:  # bad data, whatever the decoder raised (MemoryError included)
        return _decode_failure(e)


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
            orientation = _orientation(image)
            oriented = _oriented_size(image.size, orientation)
            geometry = {"original_width": oriented[0], "original_height": oriented[1],
                        "ratio": _ratio(*oriented)}  # fmt: skip
            if min(oriented) < options.min_side:
                message = f"shorter side {min(oriented)} < --min-side {options.min_side}"
                return _failure("too_small", message, **geometry), None
            action = "crop" if geometry["ratio"] >= options.pad_threshold else "pad"
            _draft_jpeg(image, _draft_request(image.size, options.size, action))
            rgb = to_rgb(_upright(image, orientation), options.fill)
            square = _crop_or_pad(rgb, action, options)
    except _Refused as refused:
        return refused.result, None
    except Exception as e:  # bad data, whatever the decoder raised (MemoryError included)
        return _decode_failure(e), None
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


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1 (as stored) when there is none or it cannot be read.

    EXIF is metadata written by every kind of software: a block Pillow cannot parse is no
    reason to lose pixels that decode fine.
    """
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: treated as absent
        return 1
    return orientation if isinstance(orientation, int) and orientation in _UPRIGHT else 1


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """The size as displayed: EXIF orientations 5-8 swap width and height."""
    width, height = size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """The pixels as displayed.

    Not ``ImageOps.exif_transpose``: besides the pixels it rewrites the EXIF block, which raises
    (struct.error, ...) on values Pillow read but cannot write back; the squares keep no EXIF.
    """
    method = _UPRIGHT.get(orientation)
    return image if method is None else image.transpose(method)


def _ratio(width: int, height: int) -> float:
    return min(width, height) / max(width, height)


class _Refused(Exception):
    def __init__(self, result: ImageResult) -> None:
        self.result = result


def _decode_failure(error: Exception) -> ImageResult:
    """The result for an exception raised while reading or decoding an image.

    Pillow's readers keep a pixel guard of their own, at a fixed process-wide limit, inside
    some formats (WebP and MPO headers, GIF frames, TIFF tiles): it shows as a
    DecompressionBombError, refused like ours.
    """
    if isinstance(error, Image.DecompressionBombError):
        return _failure("decompression_bomb", str(error))
    return _failure("broken_image", f"{type(error).__name__}: {error}")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open ``data`` (header only) or raise _Refused: empty, not an image, not an accepted
    format, too many pixels. Other exceptions are the reader's: the caller's broken_image."""
    if not data:
        raise _Refused(_failure("empty", "empty body"))
    image = _read_header(data)
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        message = f"{width}x{height} exceeds --max-pixels {max_pixels}"
        geometry = {"original_width": width, "original_height": height}
        raise _Refused(_failure("decompression_bomb", message, **geometry))
    return image


def _read_header(data: bytes) -> Image.Image:
    """``data`` opened by the first reader of an accepted format that takes it.

    The readers are called directly rather than through ``Image.open``: ``Image.open`` would try
    every plugin Pillow has once the accepted ones decline (EPS hands its input to Ghostscript),
    and applies its own pixel guard with the process-wide ``Image.MAX_IMAGE_PIXELS``, which
    refuses images that ``max_pixels`` allows (setting it would change every thread's Pillow).
    A reader is tried only when its signature check (``accept``) takes the first 16 bytes, as
    ``Image.open`` does.
    """
    prefix, declined = data[:16], []
    for fmt in _READERS:
        if fmt not in Image.OPEN:  # e.g. Pillow built without WebP
            continue
        factory, accept = Image.OPEN[fmt]
        accepted = accept is None or accept(prefix)
        if not accepted or isinstance(accepted, str):  # a str: the codec is not available
            continue
        try:
            return factory(io.BytesIO(data), None)
        except _NOT_THIS_FORMAT as e:  # signature matched, header did not
            declined.append(f"{fmt} header: {type(e).__name__}: {e}")
    raise _Refused(_unidentified(data, declined))


def _unidentified(data: bytes, declined: list[str]) -> ImageResult:
    """Why no accepted reader took ``data``: another image format, or no image at all."""
    foreign = _foreign_format(data)
    if foreign is not None:
        accepted = ", ".join(f for f in FORMATS if f != "MPO")
        message = f"{foreign} images are not accepted (accepted: {accepted})"
        return _failure("unsupported_format", message)
    readers = f" ({'; '.join(declined)})" if declined else ""
    return _failure("not_an_image", f"not an image: {_sniff(data)}{readers}")


def _foreign_format(data: bytes) -> str | None:
    """The name of the image format ``data`` is in, among the refused ones, from its bytes."""
    for signature, name in _FOREIGN_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:1] == b"P" and data[1:2] in _NETPBM and data[2:3].isspace():  # P6\n...
        return _NETPBM[data[1:2]]
    if data[4:8] == b"ftyp" and data[8:12] in _ISO_MEDIA_BRANDS:  # ISO media: AVIF, HEIC
        return _ISO_MEDIA_BRANDS[data[8:12]]
    if data.endswith(b"TRUEVISION-XFILE.\x00"):
        return "TGA"
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in head:
        return "SVG"
    return None


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


def ignore_decoder_warnings() -> None:
    """Pillow warns about the bad files it reads (truncated EXIF, odd tags): that is data, and
    every image gets its status row; one line per file would flood stderr. Process-wide: call
    it in a worker process of our own, or through :func:`decoder_warnings_ignored`."""
    warnings.filterwarnings("ignore", module=r"PIL\.")


@contextmanager
def decoder_warnings_ignored() -> Iterator[None]:
    """:func:`ignore_decoder_warnings` for the duration of a block (filters restored after)."""
    with warnings.catch_warnings():
        ignore_decoder_warnings()
        yield
