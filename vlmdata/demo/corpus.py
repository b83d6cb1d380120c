"""The demo's built-in data: a small generated web corpus of captioned pictures, "image not
available" stand-ins and the failures a real URL list is full of.

Everything is drawn with Pillow from one ``random.Random(seed)``: a seed gives the same bytes
on every run. The pictures come in three families whose captions say what is drawn, so a tiny
model learns colour and shape words from them in a few hundred steps:

- ``shape``: one coloured shape on a plain, tinted or transparent background
  ("a large red circle on a white background");
- ``texture``: stripes, checkers, dots, noise or a gradient in two named colours
  ("blue and white vertical stripes");
- ``scene``: sky, ground or sea, with a sun or moon, trees, a house, a boat, mountains
  ("a red house on green grass under a blue sky with a yellow sun").

Sizes and formats vary as on the web: mostly near-square (preprocess crops them), some wide or
tall (it pads them), a few larger than 448 px and a few tiny; mostly JPEG, some PNG (a few with
alpha) and WebP.

Entry kinds, and what :class:`vlmdata.demo.server.DemoServer` does with each:

============  ==============================================  =================================
kind          served                                          download records
============  ==============================================  =================================
image         the picture                                     success
slow          the picture, after about a second               success
placeholder   a grey "image not available" card (its          success (encode's placeholder
              caption still names the picture that is gone)   filter is what drops it)
dead          404                                             failed_to_download, http_4xx
gone          410                                             failed_to_download, http_4xx
server-error  500, every time                                 failed_to_download, http_5xx
stall         the picture after far longer than any sane      failed_to_download, timeout
              ``--timeout`` (bounded; dropped with the
              client)
truncated     the first half of a JPEG, as a whole response   failed_to_decode, broken_image
not-an-image  an HTML page labelled image/jpeg                failed_to_decode, not_an_image
empty         an empty body labelled image/jpeg               failed_to_decode, empty
noai          the picture with ``X-Robots-Tag: noai``         failed_to_download, opted_out
============  ==============================================  =================================
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from vlmdata.errors import UserError
from vlmdata.pipeline.shards import write_parquet_atomic

PICTURE_KINDS = ("image", "slow")  # served whole: ``images`` of build_corpus counts these
FAILURE_KINDS = (
    "dead", "gone", "server-error", "stall", "truncated", "not-an-image", "empty", "noai",
)  # fmt: skip
KINDS = (*PICTURE_KINDS, "placeholder", *FAILURE_KINDS)
FAMILIES = ("shape", "texture", "scene")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
MIN_IMAGES = 10

Size = tuple[int, int]  # width, height

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (230, 210, 30), "orange": (245, 140, 20), "purple": (130, 50, 180),
    "pink": (240, 120, 170), "black": (20, 20, 20), "white": (250, 250, 250),
}  # fmt: skip
_TINTS = {"light grey": (215, 215, 215), "pale blue": (205, 225, 250),
          "pale yellow": (250, 240, 195), "pale green": (210, 240, 210)}  # fmt: skip

# Shares of the pictures. Each label gets at least one picture when the corpus is big enough.
_FAMILY_SHARES = {"shape": 0.45, "scene": 0.30, "texture": 0.25}
# near-square (cropped), larger than 448 px, tiny, and wide or tall enough to be padded
_SIZE_SHARES = {"square": 0.70, "large": 0.08, "small": 0.08, "wide": 0.08, "tall": 0.06}
_FORMAT_SHARES = {"jpeg": 0.72, "png": 0.10, "webp": 0.12, "png-alpha": 0.06}
_FORMATS = {"jpeg": ("jpg", "image/jpeg"), "png": ("png", "image/png"),
            "png-alpha": ("png", "image/png"), "webp": ("webp", "image/webp")}  # fmt: skip

_NOT_AN_IMAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Access denied</title></head>\n"
    b"<body><h1>Access denied</h1><p>Hotlinking is not allowed.</p></body></html>\n"
)


@dataclass(frozen=True)
class CorpusEntry:
    """One URL of the demo corpus: what the server answers for it and the caption it comes with."""

    name: str  # unique and URL-safe, e.g. "0042-shape.jpg": the URL's path
    kind: str  # one of KINDS (see the module docstring)
    caption: str  # describes the picture; failures and placeholders keep a plausible one
    body: bytes = field(repr=False)  # what the server answers (b"" where nothing)
    content_type: str


@dataclass(frozen=True)
class _Picture:
    family: str
    caption: str
    body: bytes
    extension: str
    content_type: str


def build_corpus(images: int = 300, seed: int = 0) -> list[CorpusEntry]:
    """The demo corpus: ``images`` pictures that download fine (a few of them slow), a few
    placeholders and about 7 % failures of every kind, shuffled, all drawn from ``seed``."""
    if images < MIN_IMAGES:
        raise UserError(
            f"the demo corpus needs at least {MIN_IMAGES} images, got {images}: ask for more"
        )
    rng = random.Random(seed)
    per_failure = max(1, round(images / 100))
    pictures = [
        _picture(rng, family, size, fmt)
        for family, size, fmt in zip(
            _spread(rng, images, _FAMILY_SHARES),
            _spread(rng, images, _SIZE_SHARES),
            _spread(rng, images, _FORMAT_SHARES),
            strict=True,
        )
    ]
    # A few of the pictures answer slowly (the order of pictures is random already).
    entries = [("slow" if i < per_failure else "image", p) for i, p in enumerate(pictures)]
    for kind in FAILURE_KINDS:
        for _ in range(per_failure):
            # What the URL would have shown: its caption stays, plausible as on the web.
            entries.append((kind, _picture(rng, rng.choice(FAMILIES), "square", "jpeg")))
    for _ in range(max(3, round(images / 40))):
        gone = _picture(rng, rng.choice(FAMILIES), "square", "jpeg")
        entries.append(("placeholder", _placeholder(rng, gone.caption)))
    rng.shuffle(entries)
    return [_entry(i, kind, picture) for i, (kind, picture) in enumerate(entries)]


def write_url_list(entries: list[CorpusEntry], base_url: str, path: Path) -> Path:
    """Write the URL list of ``entries`` served at ``base_url`` as a parquet with CapsFusion's
    column names (``image_url``, ``capsfusion``), so download's defaults apply."""
    base = base_url.rstrip("/")
    table = pa.table(
        {
            "image_url": [f"{base}/{entry.name}" for entry in entries],
            "capsfusion": [entry.caption for entry in entries],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(path, table)
    return path


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[int, int, int, int],
    fill: tuple[int, ...],
) -> None:
    """Draw one of SHAPES filling the square ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    elif shape == "diamond":
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "star":
        cx, cy, outer = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        points = []
        for i in range(10):  # five points, pointing up, and the five corners between them
            radius = outer if i % 2 == 0 else outer * 0.4
            angle = math.pi * i / 5 - math.pi / 2
            points.append(
                (round(cx + radius * math.cos(angle)), round(cy + radius * math.sin(angle)))
            )
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _spread(rng: random.Random, n: int, shares: dict[str, float]) -> list[str]:
    """``n`` labels in the proportions of ``shares``, shuffled. Every label but the first gets
    at least one; the first takes what is left (a corpus too small for all loses some)."""
    first, *others = shares
    labels = [label for label in others for _ in range(max(1, round(n * shares[label])))]
    labels += [first] * max(0, n - len(labels))
    rng.shuffle(labels)
    return labels[:n]


def _entry(index: int, kind: str, picture: _Picture) -> CorpusEntry:
    if kind in ("image", "slow", "stall", "noai", "placeholder"):
        label = picture.family if kind == "image" else kind
        return CorpusEntry(f"{index:04d}-{label}.{picture.extension}", kind, picture.caption,
                           picture.body, picture.content_type)  # fmt: skip
    if kind == "truncated":
        body, content_type = picture.body[: len(picture.body) // 2], picture.content_type
    elif kind == "not-an-image":
        body, content_type = _NOT_AN_IMAGE, "image/jpeg"
    elif kind == "empty":
        body, content_type = b"", "image/jpeg"
    else:  # an HTTP error status: the server answers its own short text
        body, content_type = b"", "text/plain"
    return CorpusEntry(f"{index:04d}-{kind}.jpg", kind, picture.caption, body, content_type)


# --- pictures ---------------------------------------------------------------------------------


def _picture(rng: random.Random, family: str, size_class: str, fmt: str) -> _Picture:
    size = _size(rng, size_class)
    if family == "shape":
        image, caption = _shape_picture(rng, size, alpha=fmt == "png-alpha")
    elif family == "texture":
        image, caption = _texture_picture(rng, size)
    else:
        image, caption = _scene_picture(rng, size)
    extension, content_type = _FORMATS[fmt]
    return _Picture(family, caption, _encode(image, fmt), extension, content_type)


def _size(rng: random.Random, size_class: str) -> Size:
    """A (width, height) of ``size_class``; near-square ones have ratio >= 0.75, wide and tall
    ones 0.33-0.5 (2:1 to 3:1), far below preprocess's pad threshold of 0.6."""
    long_side, ratio = {
        "square": (rng.randint(192, 448), rng.uniform(0.75, 1.0)),
        "large": (rng.randint(500, 800), rng.uniform(0.75, 1.0)),
        "small": (rng.randint(40, 96), rng.uniform(0.8, 1.0)),
        "wide": (rng.randint(320, 600), rng.uniform(0.33, 0.5)),
        "tall": (rng.randint(320, 600), rng.uniform(0.33, 0.5)),
    }[size_class]
    short_side = max(16, round(long_side * ratio))
    if size_class == "tall" or (size_class != "wide" and rng.random() < 0.3):
        return short_side, long_side
    return long_side, short_side


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "jpeg":
        image.save(out, "JPEG", quality=88)
    elif fmt == "webp":
        image.save(out, "WEBP", quality=85)
    else:
        image.save(out, "PNG")
    return out.getvalue()


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _shape_picture(rng: random.Random, size: Size, alpha: bool) -> tuple[Image.Image, str]:
    """One shape, anywhere in the picture, a third to most of its shorter side wide."""
    shape = rng.choice(SHAPES)
    # Preprocess composites transparency onto black: a black shape there would vanish.
    colour = rng.choice([c for c in COLOURS if c != "white" and not (alpha and c == "black")])
    if alpha:
        image, background = Image.new("RGBA", size, (0, 0, 0, 0)), "transparent"
        fill: tuple[int, ...] = (*COLOURS[colour], 255)
    else:
        background = "white" if rng.random() < 0.5 else rng.choice(list(_TINTS))
        image = Image.new("RGB", size, _TINTS.get(background, (255, 255, 255)))
        fill = COLOURS[colour]
    fraction = rng.uniform(0.3, 0.85)
    side = max(4, round(min(size) * fraction))
    x, y = rng.randint(0, size[0] - side), rng.randint(0, size[1] - side)
    draw_shape(ImageDraw.Draw(image), shape, (x, y, x + side, y + side), fill)
    scale = "small " if fraction < 0.4 else "large " if fraction > 0.7 else ""
    return image, f"{_article(f'{scale}{colour} {shape}')} on {_article(background)} background"


def _texture_picture(rng: random.Random, size: Size) -> tuple[Image.Image, str]:
    """A two-colour pattern over the whole picture."""
    first, second = rng.sample(list(COLOURS), 2)
    a, b = COLOURS[first], COLOURS[second]
    width, height = size
    image = Image.new("RGB", size, b)
    draw = ImageDraw.Draw(image)
    period = max(8, round(min(size) * rng.uniform(0.08, 0.18)))
    pattern = rng.choice(("stripes", "checkers", "dots", "noise", "gradient"))
    if pattern == "stripes":
        direction = rng.choice(("vertical", "horizontal", "diagonal"))
        for k in range(-height, width + height, period):
            band = period // 2
            if direction == "vertical":
                draw.rectangle([k, 0, k + band - 1, height], fill=a)
            elif direction == "horizontal":
                draw.rectangle([0, k, width, k + band - 1], fill=a)
            else:
                draw.polygon([(k, 0), (k + band, 0), (k + band + height, height),
                              (k + height, height)], fill=a)  # fmt: skip
        return image, f"{first} and {second} {direction} stripes"
    if pattern == "checkers":
        for row in range(0, height, period):
            for col in range(0, width, period):
                if (row // period + col // period) % 2 == 0:
                    draw.rectangle([col, row, col + period - 1, row + period - 1], fill=a)
        return image, f"{_article(first)} and {second} checkerboard"
    if pattern == "dots":
        radius = max(1, period // 4)
        for row in range(period // 2, height, period):
            for col in range(period // 2, width, period):
                draw.ellipse([col - radius, row - radius, col + radius, row + radius], fill=a)
        return image, f"{first} dots on {_article(second)} background"
    if pattern == "noise":
        # Coarse cells: learnable colours, and a JPEG a few kilobytes large.
        cells = (max(1, width // 6), max(1, height // 6))
        noise = Image.new("RGB", cells)
        noise.putdata([a if rng.random() < 0.5 else b for _ in range(cells[0] * cells[1])])
        return noise.resize(size, Image.Resampling.NEAREST), f"{first} and {second} noise"
    vertical = rng.random() < 0.5
    mask = Image.linear_gradient("L")  # 0 at the top, 255 at the bottom
    if not vertical:
        mask = mask.transpose(Image.Transpose.ROTATE_90)  # 0 at the left
    mask = mask.resize(size)
    gradient = Image.composite(Image.new("RGB", size, b), Image.new("RGB", size, a), mask)
    direction = "vertical" if vertical else "horizontal"
    return gradient, f"{_article(direction)} gradient from {first} to {second}"


_SKIES = {"day": ((110, 175, 240), "a blue sky"),
          "sunset": ((250, 150, 80), "an orange sunset sky"),
          "night": ((20, 30, 75), "a dark night sky")}  # fmt: skip
# ground: colour, "a house ___", what it is alone
_GROUNDS = {"grass": ((70, 160, 60), "on green grass", "green grass"),
            "snow": ((240, 242, 248), "in the snow", "a snowy field"),
            "sand": ((225, 200, 130), "on yellow sand", "yellow sand"),
            "sea": ((30, 90, 180), "on the blue sea", "the blue sea")}  # fmt: skip
_HOUSES = {"red": (200, 40, 40), "white": (245, 245, 240), "yellow": (235, 200, 60)}
_NUMBERS = {1: "a tree", 2: "two trees", 3: "three trees"}


def _scene_picture(rng: random.Random, size: Size) -> tuple[Image.Image, str]:
    """A landscape: sky above a horizon, ground or sea below, a few things in it."""
    width, height = size
    unit = min(size)
    sky, ground = rng.choice(list(_SKIES)), rng.choice(list(_GROUNDS))
    image = Image.new("RGB", size, _SKIES[sky][0])
    draw = ImageDraw.Draw(image)
    horizon = round(height * rng.uniform(0.55, 0.7))
    mountains = rng.random() < 0.35
    if mountains:
        for _ in range(rng.randint(1, 3)):
            half, rise = round(unit * rng.uniform(0.2, 0.4)), round(unit * rng.uniform(0.2, 0.4))
            top = rng.randint(0, width)
            draw.polygon([(top - half, horizon), (top + half, horizon), (top, horizon - rise)],
                         fill=(115, 115, 125))  # fmt: skip
    draw.rectangle([0, horizon, width, height], fill=_GROUNDS[ground][0])
    light = rng.random() < 0.7
    if light:
        radius = max(2, round(unit * rng.uniform(0.06, 0.1)))
        x, y = rng.randint(radius, width - radius), rng.randint(radius, max(radius, horizon // 3))
        colour = (240, 240, 225) if sky == "night" else (255, 215, 40)
        draw_shape(draw, "circle", (x - radius, y - radius, x + radius, y + radius), colour)
    things = []
    if ground == "sea":
        if rng.random() < 0.6:
            _boat(draw, rng, size, horizon)
            things.append("a boat")
    else:
        house = rng.choice(list(_HOUSES)) if rng.random() < 0.55 else None
        trees = rng.choice((0, 0, 1, 2, 3))
        for _ in range(trees):
            _tree(draw, rng, size, horizon)
        if house:
            _house(draw, rng, size, horizon, _HOUSES[house])
            things.append(f"a {house} house")
        if trees:
            things.append(_NUMBERS[trees])
    _, on_ground, alone = _GROUNDS[ground]
    caption = f"{' and '.join(things)} {on_ground}" if things else alone
    if mountains:
        caption += " in front of grey mountains"
    caption += f" under {_SKIES[sky][1]}"
    if light:
        caption += " with a white moon" if sky == "night" else " with a yellow sun"
    return image, caption


def _standing(rng: random.Random, size: Size, horizon: int, scale: float) -> tuple[int, int, int]:
    """Where a thing ``scale`` x the shorter side tall stands: (x, baseline, height)."""
    tall = max(6, round(min(size) * scale))
    base = rng.randint(horizon + tall // 8, max(horizon + tall // 8, size[1] - 2))
    return rng.randint(0, max(0, size[0] - tall)), base, tall


def _tree(draw: ImageDraw.ImageDraw, rng: random.Random, size: Size, horizon: int) -> None:
    x, base, tall = _standing(rng, size, horizon, rng.uniform(0.25, 0.4))
    trunk = max(2, tall // 8)
    centre = x + tall // 3
    draw.rectangle(
        [centre - trunk // 2, base - tall // 2, centre + trunk // 2, base], fill=(110, 70, 35)
    )
    crown = tall * 2 // 3
    draw_shape(draw, "circle", (centre - crown // 2, base - tall, centre + crown // 2,
                                base - tall + crown), (25, 110, 40))  # fmt: skip


def _house(
    draw: ImageDraw.ImageDraw,
    rng: random.Random,
    size: Size,
    horizon: int,
    wall: tuple[int, int, int],
) -> None:
    x, base, tall = _standing(rng, size, horizon, rng.uniform(0.3, 0.45))
    body = tall * 3 // 5
    draw.rectangle([x, base - body, x + tall, base], fill=wall)
    draw_shape(draw, "triangle", (x - tall // 10, base - tall, x + tall + tall // 10, base - body),
               (120, 55, 30))  # fmt: skip
    door = max(2, tall // 5)
    left = x + tall // 2 - door // 2
    draw.rectangle([left, base - body * 2 // 3, left + door, base], fill=(80, 45, 25))


def _boat(draw: ImageDraw.ImageDraw, rng: random.Random, size: Size, horizon: int) -> None:
    x, base, tall = _standing(rng, size, horizon, rng.uniform(0.25, 0.4))
    hull = tall // 4
    draw.polygon([(x, base - hull), (x + tall, base - hull), (x + tall * 4 // 5, base),
                  (x + tall // 5, base)], fill=(110, 60, 30))  # fmt: skip
    mast = x + tall // 2
    draw.polygon([(mast, base - tall), (mast, base - hull), (mast - tall * 2 // 5, base - hull)],
                 fill=(250, 250, 250))  # fmt: skip


def _placeholder(rng: random.Random, caption: str) -> _Picture:
    """A CDN's stand-in for a picture that is gone: a grey card with a crossed-out picture icon
    and a line of text. Variants differ in size and a shade, so they cluster as real ones do."""
    width, height = rng.choice(((300, 300), (400, 300), (320, 240), (500, 375), (250, 250)))
    shade = rng.choice((200, 204, 210))
    ink = (shade - 85,) * 3
    image = Image.new("RGB", (width, height), (shade,) * 3)
    draw = ImageDraw.Draw(image)
    unit = min(width, height)
    icon = unit * 3 // 10
    left, top = (width - icon) // 2, height // 2 - icon * 3 // 4
    line = max(2, unit // 60)
    draw.rectangle([left, top, left + icon, top + icon * 4 // 5], outline=ink, width=line)
    draw.polygon([(left + line, top + icon * 4 // 5 - line), (left + icon // 3, top + icon // 3),
                  (left + icon * 2 // 3, top + icon * 3 // 5),
                  (left + icon - line, top + icon * 4 // 5 - line)], fill=ink)  # fmt: skip
    sun = icon // 8
    draw.ellipse([left + icon * 2 // 3, top + icon // 6, left + icon * 2 // 3 + sun,
                  top + icon // 6 + sun], fill=ink)  # fmt: skip
    draw.line([left - icon // 6, top + icon, left + icon + icon // 6, top - icon // 6], fill=ink,
              width=line * 2)  # fmt: skip
    text = rng.choice(("Image not available", "Image not available", "Image unavailable"))
    font = ImageFont.load_default(size=max(10, unit // 16))
    text_width = draw.textlength(text, font=font)
    draw.text(((width - text_width) / 2, top + icon + unit // 12), text, fill=ink, font=font)
    fmt = "png" if rng.random() < 0.25 else "jpeg"
    extension, content_type = _FORMATS[fmt]
    return _Picture("placeholder", caption, _encode(image, fmt), extension, content_type)
