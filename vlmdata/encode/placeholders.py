"""Reference placeholder images: what hosts serve in place of a deleted or hot-linked picture.

Web-scale URL lists are full of "image not available" stand-ins; they are identical in pixels
but paired with unrelated captions, which teaches an adapter nothing but noise. The package
draws its own references in the styles common on the web (no third-party artwork), users add
theirs with ``--reference``, and encode drops images whose CLIP embedding is too close to one.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlmdata.errors import UserError

_SIZE = 448


def builtin_placeholders() -> dict[str, bytes]:
    """The built-in references, drawn deterministically (name -> 448x448 PNG bytes)."""
    images = {
        "grey-no-longer-available": _text_card((224, 224, 224), (90, 90, 90),
                                               "This photo is no longer available"),
        "white-image-not-found": _broken_icon_card((255, 255, 255), (190, 190, 190),
                                                   "Image not found"),
        "landscape-icon": _landscape_icon((238, 238, 238), (200, 200, 200)),
        "dark-unavailable": _text_card((34, 34, 34), (200, 200, 200), "Image unavailable"),
        "blank-grey": Image.new("RGB", (_SIZE, _SIZE), (204, 204, 204)),
    }  # fmt: skip
    encoded = {}
    for name, image in images.items():
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        encoded[name] = buffer.getvalue()
    return encoded


def load_references(paths: list[str]) -> dict[str, bytes]:
    """User reference images by file name (UserError for a missing or unreadable file)."""
    references = {}
    for path in paths:
        try:
            data = Path(path).read_bytes()
            Image.open(io.BytesIO(data)).load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(
                f"--reference {path} is not a readable image ({e}); fix the path"
            ) from None
        references[Path(path).name] = data
    return references


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _centred_text(draw: ImageDraw.ImageDraw, y: int, text: str, colour: tuple, size: int) -> None:
    font = _font(size)
    width = draw.textlength(text, font=font)
    draw.text(((_SIZE - width) / 2, y), text, fill=colour, font=font)


def _text_card(background: tuple, ink: tuple, text: str) -> Image.Image:
    image = Image.new("RGB", (_SIZE, _SIZE), background)
    draw = ImageDraw.Draw(image)
    draw.ellipse([184, 120, 264, 200], outline=ink, width=6)  # an "unavailable" glyph
    draw.line([198, 134, 250, 186], fill=ink, width=6)
    _centred_text(draw, 240, text, ink, 20)
    return image


def _broken_icon_card(background: tuple, ink: tuple, text: str) -> Image.Image:
    image = Image.new("RGB", (_SIZE, _SIZE), background)
    draw = ImageDraw.Draw(image)
    draw.rectangle([164, 120, 284, 220], outline=ink, width=5)  # a torn picture frame
    draw.line([164, 190, 204, 160, 234, 185, 284, 140], fill=ink, width=5)
    draw.polygon([(250, 120), (284, 120), (284, 154)], fill=background)
    _centred_text(draw, 250, text, ink, 24)
    return image


def _landscape_icon(background: tuple, ink: tuple) -> Image.Image:
    image = Image.new("RGB", (_SIZE, _SIZE), background)
    draw = ImageDraw.Draw(image)
    draw.ellipse([250, 130, 300, 180], fill=ink)  # the sun
    draw.polygon([(120, 330), (200, 200), (260, 280), (300, 240), (340, 330)], fill=ink)
    return image
