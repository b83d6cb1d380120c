"""The crop/pad square preprocessor: orientation, modes, formats, geometry, bad bytes."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image, ImageDraw

from conftest import make_image, png_header_only
from vlmdata.errors import UserError
from vlmdata.pipeline.imageops import (
    SquareOptions,
    inspect_image,
    make_square,
    parse_fill,
    square_image,
)

SIZE = 64
OPTIONS = SquareOptions(size=SIZE)
MAX_PIXELS = 100_000_000
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def square(data: bytes, **options) -> Image.Image:
    result = square_image(data, SquareOptions(**{"size": SIZE, **options}), MAX_PIXELS)
    assert result.ok, result
    image = Image.open(io.BytesIO(result.data))
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    return image


def close(pixel, expected, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


# exif_transpose applies these for orientations 2..8; storing with the inverse and tagging the
# orientation must give back the displayed image.
INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_270}  # fmt: skip


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(orientation):
    displayed = Image.new("RGB", (300, 240), BLUE)  # landscape, ratio 0.8: cropped
    ImageDraw.Draw(displayed).rectangle([0, 0, 149, 119], fill=RED)  # red top-left quadrant
    stored = displayed if orientation == 1 else displayed.transpose(INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    result = square_image(data, OPTIONS, MAX_PIXELS)
    assert (result.original_width, result.original_height) == (300, 240)
    out = Image.open(io.BytesIO(result.data))
    assert close(out.getpixel((5, 5)), RED) and close(out.getpixel((SIZE - 5, SIZE - 5)), BLUE)


def test_portrait_phone_photo_stays_portrait():
    displayed = Image.new("RGB", (120, 400), GREEN)  # tall: ratio 0.3, padded
    exif = Image.Exif()
    exif[0x0112] = 6  # how phones store portrait shots: landscape pixels, rotate on display
    data = encode(displayed.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes())
    out = square(data)
    assert close(out.getpixel((SIZE // 2, 2)), GREEN)  # content spans the full height
    assert out.getpixel((1, SIZE // 2)) == (0, 0, 0)  # and is padded left and right


def test_pad_geometry_fill_border_and_centred_content():
    fill = (10, 20, 200)
    # PNG output: lossless, so edges are exact
    out = square(encode(Image.new("RGB", (300, 100), GREEN)), fill=fill, format="png")  # pad
    rows = [out.getpixel((SIZE // 2, y)) for y in range(SIZE)]
    content = [y for y, p in enumerate(rows) if close(p, GREEN)]
    top, bottom = content[0], SIZE - 1 - content[-1]
    assert abs(top - bottom) <= 1  # centred
    assert len(content) == pytest.approx(SIZE / 3, abs=1)  # whole: aspect kept
    for x in range(SIZE):  # the border is exactly the fill colour
        assert out.getpixel((x, 0)) == fill and out.getpixel((x, SIZE - 1)) == fill


def test_crop_keeps_the_centre():
    source = Image.linear_gradient("L").resize((400, 300)).convert("RGB")
    ImageDraw.Draw(source).rectangle([190, 140, 210, 160], fill=RED)
    out = square(encode(source))
    assert close(out.getpixel((SIZE // 2, SIZE // 2)), RED)
    result = square_image(encode(source), OPTIONS, MAX_PIXELS)
    assert (result.action, result.ratio) == ("crop", 0.75)


def test_ratio_exactly_at_threshold_is_cropped():
    result = square_image(encode(Image.new("RGB", (500, 300), GREEN)), OPTIONS, MAX_PIXELS)
    assert (result.ratio, result.action) == (0.6, "crop")


def test_panorama_1_to_50_is_padded_not_cropped():
    lossless = SquareOptions(size=SIZE, format="png")
    result = square_image(encode(Image.new("RGB", (1000, 20), GREEN)), lossless, MAX_PIXELS)
    assert (result.action, result.ratio) == ("pad", 0.02)
    out = Image.open(io.BytesIO(result.data))
    band = [y for y in range(SIZE) if close(out.getpixel((SIZE // 2, y)), GREEN)]
    # the whole width kept: a one-pixel band, centred (31 rows above, 32 below)
    assert len(band) == 1 and abs(band[0] - (SIZE - 1) / 2) <= 0.5
    assert close(out.getpixel((0, band[0])), GREEN) and close(
        out.getpixel((SIZE - 1, band[0])), GREEN
    )
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_one_pixel_image():
    out = square(encode(Image.new("RGB", (1, 1), RED)))
    assert close(out.getpixel((0, 0)), RED) and close(out.getpixel((SIZE - 1, SIZE - 1)), RED)


def half_transparent(mode: str) -> Image.Image:
    image = Image.new("RGBA", (100, 100), (0, 255, 0, 255))
    ImageDraw.Draw(image).rectangle([0, 0, 49, 99], fill=(0, 0, 0, 0))
    return image.convert(mode) if mode != "RGBA" else image


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_the_fill(mode):
    out = square(encode(half_transparent(mode)), fill=RED)
    assert close(out.getpixel((5, SIZE // 2)), RED)
    assert out.getpixel((SIZE - 5, SIZE // 2)) != RED


def test_palette_with_transparency_index():
    image = Image.new("P", (100, 100), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    ImageDraw.Draw(image).rectangle([0, 0, 49, 99], fill=0)
    data = encode(image, "PNG", transparency=0)
    out = square(data, fill=RED)
    assert close(out.getpixel((5, SIZE // 2)), RED)
    assert close(out.getpixel((SIZE - 5, SIZE // 2)), GREEN)


def test_16_bit_png_is_scaled_not_clipped():
    width = 256
    raw = b"".join(struct.pack("<H", x * 256) for _ in range(width) for x in range(width))
    image = Image.frombytes("I;16", (width, width), raw)
    out = square(encode(image)).convert("L")
    left, middle, right = (out.getpixel((x, SIZE // 2)) for x in (1, SIZE // 2, SIZE - 2))
    assert left < 30 and 90 < middle < 170 and right > 220


@pytest.mark.parametrize(
    ("image", "fmt", "save", "expected"),
    [
        (Image.new("L", (80, 60), 128), "PNG", {}, (128, 128, 128)),
        (Image.new("1", (80, 60), 1), "PNG", {}, (255, 255, 255)),
        (Image.new("CMYK", (80, 60), (0, 255, 255, 0)), "JPEG", {}, RED),
        (Image.new("RGB", (80, 60), GREEN), "JPEG", {"progressive": True}, GREEN),
        (Image.new("RGB", (80, 60), BLUE), "WEBP", {"quality": 90}, BLUE),
        (Image.new("RGB", (80, 60), RED), "BMP", {}, RED),
        (Image.new("RGB", (80, 60), GREEN), "TIFF", {}, GREEN),
    ],
    ids=["L", "1-bit", "CMYK-jpeg", "progressive-jpeg", "webp", "bmp", "tiff"],
)
def test_modes_and_formats(image, fmt, save, expected):
    out = square(encode(image, fmt, **save))
    assert close(out.getpixel((SIZE // 2, SIZE // 2)), expected)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animations_use_the_first_frame(fmt):
    frames = [Image.new("RGB", (80, 60), color) for color in (RED, BLUE, GREEN)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert close(square(data).getpixel((SIZE // 2, SIZE // 2)), RED)


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_output_formats(fmt):
    result = square_image(make_image(200, 150), SquareOptions(size=SIZE, format=fmt), MAX_PIXELS)
    assert result.extension == fmt
    expected = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    assert Image.open(io.BytesIO(result.data)).format == expected


def test_large_jpeg_uses_draft_decoding_and_still_looks_right():
    source = Image.new("RGB", (4000, 3000), BLUE)
    ImageDraw.Draw(source).rectangle([1900, 1400, 2100, 1600], fill=RED)
    out = square(encode(source, "JPEG"))
    assert close(out.getpixel((SIZE // 2, SIZE // 2)), RED)


def test_broken_inputs_are_failures_not_exceptions():
    jpeg = make_image(200, 150)
    cases = {
        "broken_image": jpeg[: len(jpeg) // 2],
        "not_an_image": bytes(range(256)) * 4,
        "empty": b"",
    }
    for kind, data in cases.items():
        for result in (square_image(data, OPTIONS, MAX_PIXELS), inspect_image(data, MAX_PIXELS)):
            assert (result.status, result.error_kind) == ("failed_to_decode", kind)
            assert result.data is None and result.error


def test_pixel_bomb_refused_from_the_header():
    bomb = png_header_only(100_000, 100_000)  # 10^10 pixels: decoding would need ~30 GB
    result = square_image(bomb, OPTIONS, MAX_PIXELS)
    assert (result.error_kind, result.original_width) == ("decompression_bomb", 100_000)


def test_min_side_filters():
    result = square_image(make_image(200, 30), SquareOptions(size=SIZE, min_side=32), MAX_PIXELS)
    assert (result.status, result.error_kind, result.data) == ("filtered", "too_small", None)


def test_inspect_keeps_original_bytes_and_geometry():
    result = inspect_image(make_image(300, 100), MAX_PIXELS)
    assert result.ok and result.data is None
    assert (result.width, result.height, result.ratio, result.action) == (300, 100, 1 / 3, None)


@pytest.mark.parametrize(
    "options",
    [{"size": 0}, {"pad_threshold": 0}, {"pad_threshold": 1.5}, {"format": "gif"}, {"quality": 0},
     {"fill": (0, 0, 300)}, {"min_side": -1}],
)  # fmt: skip
def test_bad_options_are_user_errors(options):
    with pytest.raises(UserError):
        SquareOptions(**options)


def test_parse_fill():
    assert parse_fill("255,255,255") == (255, 255, 255)
    with pytest.raises(UserError, match="R,G,B"):
        parse_fill("white")


# --- one allow-list of formats ---------------------------------------------------------------


def test_one_list_of_formats_for_every_stage():
    from vlmdata.pipeline import image_sources, imageops

    assert image_sources.IMAGE_EXTENSIONS is imageops.IMAGE_EXTENSIONS
    assert {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"} <= imageops.IMAGE_EXTENSIONS
    assert set(imageops.FORMAT_EXTENSIONS) == set(imageops.FORMATS)


def test_mpo_is_a_jpeg():
    frames = [Image.new("RGB", (80, 60), color) for color in (RED, BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    result = inspect_image(data, MAX_PIXELS)
    assert (result.status, result.format, result.extension) == ("success", "MPO", "jpg")
    assert close(square(data).getpixel((SIZE // 2, SIZE // 2)), RED)


def foreign(fmt: str) -> bytes:
    """A small image in ``fmt``, a format Pillow reads but vlmdata does not accept."""
    image = Image.new("RGB", (40, 30), GREEN)
    if fmt in ("XBM", "MSP"):
        image = image.convert("1")
    try:
        return encode(image, fmt)
    except (KeyError, OSError) as e:  # this Pillow was built without that codec
        pytest.skip(f"cannot write {fmt}: {e}")


# Signed formats: identified from their bytes, reported as unsupported_format.
SIGNED = ["ICO", "TGA", "QOI", "DDS", "JPEG2000", "AVIF", "PPM", "EPS", "PDF", "ICNS"]
# Formats with no reliable signature: unsupported_format or not_an_image, never success.
UNSIGNED = ["PCX", "SGI", "IM", "SPIDER", "MSP", "XBM"]


@pytest.mark.parametrize("fmt", SIGNED + UNSIGNED)
def test_formats_outside_the_list_are_refused(fmt):
    data = foreign(fmt)
    options = SquareOptions(size=SIZE)
    results = [inspect_image(data, MAX_PIXELS), square_image(data, options, MAX_PIXELS),
               make_square(data, options, MAX_PIXELS)[0]]  # fmt: skip
    kinds = {"unsupported_format"} if fmt in SIGNED else {"unsupported_format", "not_an_image"}
    for result in results:
        assert result.status == "failed_to_decode" and result.error_kind in kinds, (fmt, result)
        assert result.error


def test_unsupported_format_names_the_format():
    result = inspect_image(foreign("ICO"), MAX_PIXELS)
    assert "ICO" in result.error and "JPEG" in result.error


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
       b"0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")  # fmt: skip
DOS_EPS = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIII", 30, len(EPS), 0, 0, 0, 0) + b"\xff\xff" + EPS


@pytest.mark.parametrize("data", [EPS, DOS_EPS], ids=["eps", "dos-eps"])
def test_eps_never_reaches_pillows_eps_plugin(monkeypatch, data):
    from PIL import EpsImagePlugin

    calls = []

    def spy(self):  # what Image.open would run on an EPS, and Ghostscript after it
        calls.append(self)
        raise SyntaxError("spy")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    options = SquareOptions(size=SIZE)
    for result in (inspect_image(data, MAX_PIXELS), square_image(data, options, MAX_PIXELS),
                   make_square(data, options, MAX_PIXELS)[0]):  # fmt: skip
        assert (result.status, result.error_kind) == ("failed_to_decode", "unsupported_format")
    assert calls == []


# --- decoder exceptions are data -------------------------------------------------------------


def jpeg_with_exif_segment(payload: bytes, size: tuple[int, int] = (40, 30)) -> bytes:
    """A JPEG whose APP1 segment is ``payload`` as is (no validation)."""
    data = encode(Image.new("RGB", size, RED), "JPEG")
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def malformed_exif(orientation: int) -> bytes:
    """EXIF with an orientation and an XResolution stored as the signed rational -1/0, which
    Pillow reads back as nan and cannot write again (struct.error in exif_transpose)."""
    entries = [(0x0112, 3, 1, struct.pack("<HH", orientation, 0)),
               (0x011A, 10, 1, struct.pack("<I", 8 + 2 + 2 * 12 + 4))]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHI", *entry[:3]) + entry[3] for entry in entries)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + struct.pack("<ii", -1, 0)


def test_malformed_exif_neither_raises_nor_loses_the_orientation():
    data = jpeg_with_exif_segment(malformed_exif(6))  # stored 40x30, displayed 30x40
    options = SquareOptions(size=SIZE)
    result, image = make_square(data, options, MAX_PIXELS)
    assert result.ok and image.size == (SIZE, SIZE)
    assert (result.original_width, result.original_height) == (30, 40)
    assert square_image(data, options, MAX_PIXELS).ok
    assert inspect_image(data, MAX_PIXELS).ok


@pytest.mark.parametrize(
    "error",
    [struct.error("bad"), KeyError("x"), ZeroDivisionError(), RuntimeError("x"), MemoryError()],
)
def test_any_decoder_exception_is_a_broken_image(monkeypatch, error):
    from PIL import ImageFile

    def load(self):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    jpeg = make_image(200, 150)
    for data, result in [
        (jpeg, square_image(jpeg, OPTIONS, MAX_PIXELS)),
        (jpeg, make_square(jpeg, OPTIONS, MAX_PIXELS)[0]),
        (jpeg[:-100], inspect_image(jpeg[:-100], MAX_PIXELS)),  # cut: inspect decodes it
    ]:
        assert (result.status, result.error_kind) == ("failed_to_decode", "broken_image"), data
        assert type(error).__name__ in result.error


def test_interrupts_are_not_swallowed(monkeypatch):
    from PIL import ImageFile

    def load(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(KeyboardInterrupt):
        square_image(make_image(200, 150), OPTIONS, MAX_PIXELS)


# --- no process-wide Pillow state ------------------------------------------------------------

_GLOBALS_SCRIPT = """
import sys, warnings
sys.path.insert(0, "tests")
from PIL import Image
from conftest import make_image, png_header_only
import vlmdata.pipeline.shards  # imageops' own imports (pyarrow, numpy) add warning filters
before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
from vlmdata.pipeline import imageops
options = imageops.SquareOptions(size=32)
for data in (make_image(300, 200), make_image(50, 40, "PNG"), png_header_only(12000, 10000)):
    imageops.inspect_image(data, 100_000_000)
    imageops.square_image(data, options, 100_000_000)
after = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
print("unchanged" if before == after else f"changed: {before} -> {after}")
"""


def test_pillow_globals_are_left_alone():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _GLOBALS_SCRIPT], cwd=root, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "unchanged", done.stdout + done.stderr


def test_the_pixel_limit_is_max_pixels_not_pillows():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 120 MP: above --max-pixels 100 MP, refused from the header
        refused = inspect_image(png_header_only(12_000, 10_000), 100_000_000)
        # 200 MP: above twice Pillow's own default limit, yet allowed by --max-pixels 300 MP
        allowed = inspect_image(png_header_only(20_000, 10_000), 300_000_000)
    assert (refused.error_kind, refused.original_width) == ("decompression_bomb", 12_000)
    assert "--max-pixels" in refused.error
    assert allowed.ok and (allowed.width, allowed.height) == (20_000, 10_000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
