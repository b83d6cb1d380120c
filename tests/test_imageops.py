"""The crop/pad square preprocessor: orientation, modes, formats, geometry, bad bytes."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image, ImageDraw

from conftest import make_image, png_header_only
from vlmdata.errors import UserError
from vlmdata.pipeline.imageops import SquareOptions, inspect_image, parse_fill, square_image

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
