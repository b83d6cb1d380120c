"""Thumbnails for the labels report, pulled by key from image shards without unpacking them.

The keys wanted are grouped by shard; each tar needed is indexed once (its member headers
only) and only the wanted samples are read, by byte range. A key that cannot be shown (its tar
missing or unreadable, the key not in it, the image undecodable) is recorded with the reason,
never fatal: the page says what is missing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vlmdata.errors import UserError
from vlmdata.pipeline.image_sources import ImageShard, find_image_shards
from vlmdata.pipeline.imageops import SquareOptions, encode_image, make_square
from vlmdata.pipeline.shards import PLAN, stage_of

THUMBNAIL_SIZE = 160  # pixels, square: what a grid tile shows
MAX_PIXELS = 100_000_000  # as the stages: a larger image is not decoded
_IMAGE_STAGES = ("download", "preprocess")
_FIX = "pass the download or preprocess output the features were made from"
# Squared as preprocess does, padded with the tile's background colour.
_OPTIONS = SquareOptions(size=THUMBNAIL_SIZE, fill=(246, 248, 250), format="jpg", quality=82)
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,80}")


@dataclass(frozen=True)
class ImageShards:
    """The image shards the report takes thumbnails from, by shard name."""

    path: Path
    shards: dict[str, ImageShard]


def open_image_shards(path: Path) -> ImageShards:
    """The ``.tar`` shards of ``path`` (a download or preprocess output, or another tool's
    webdataset shards); anything else is a UserError."""
    if not path.is_dir():
        raise UserError(f"--images {path} is not a directory; {_FIX}")
    if (path / PLAN).is_file() and (stage := stage_of(path)) not in _IMAGE_STAGES:
        raise UserError(f"--images {path} holds a {stage} output, not image shards; {_FIX}")
    if not any(tar.is_file() for tar in path.glob("*.tar")):
        raise UserError(f"--images {path} holds no .tar image shards; {_FIX}")
    shards = find_image_shards(path, 1)  # names them as the stages did; refuses loose images
    return ImageShards(path, {shard.name: shard for shard in shards})


@dataclass(frozen=True)
class Thumbnail:
    """One wanted sample: its thumbnail file (relative to the report) or why there is none."""

    file: str | None
    caption: str | None = None  # the tar's KEY.txt, for samples the parquet has no caption of
    problem: str | None = None


def write_thumbnails(
    images: ImageShards, wanted: Iterable[tuple[str, str]], report_dir: Path, quiet: bool
) -> dict[tuple[str, str], Thumbnail]:
    """A thumbnail under ``report_dir/thumbs`` for each wanted (shard, key)."""
    by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, set()).add(key)
    (report_dir / "thumbs").mkdir(parents=True, exist_ok=True)
    made: dict[tuple[str, str], Thumbnail] = {}
    bar = tqdm(sorted(by_shard.items()), desc="thumbnails", unit="shard", disable=quiet,
               leave=False)  # fmt: skip
    for name, keys in bar:
        made.update(_shard_thumbnails(images.shards.get(name), name, keys, report_dir))
    return made


def _shard_thumbnails(
    shard: ImageShard | None, name: str, keys: set[str], report_dir: Path
) -> dict[tuple[str, str], Thumbnail]:
    """The thumbnails of ``keys`` from one shard: its tar indexed once, only they read."""
    made: dict[tuple[str, str], Thumbnail] = {}
    if shard is None:
        missing = f"no {name}.tar in --images"
    else:
        try:
            for sample in shard.read([ref for ref in shard.index() if ref.key in keys]):
                result, square = make_square(sample.image, _OPTIONS, MAX_PIXELS)
                if square is None:
                    made[name, sample.key] = Thumbnail(None, sample.caption, result.error_kind)
                    continue
                file = f"thumbs/{thumbnail_name(name, sample.key)}"
                (report_dir / file).write_bytes(encode_image(square, _OPTIONS))
                made[name, sample.key] = Thumbnail(file, sample.caption)
            missing = f"not in {name}.tar"
        except UserError:  # cut or damaged: its samples are missing, the report goes on
            missing = f"{name}.tar is unreadable"
    for key in keys:
        made.setdefault((name, key), Thumbnail(None, problem=missing))
    return made


def thumbnail_name(shard: str, key: str) -> str:
    """The file name of a sample's thumbnail: ``SHARD_KEY.jpg``; a key that is not plain
    letters, digits, ``-`` and ``_`` (a webdataset key may hold ``/`` or ``#``) is replaced
    by a digest, so every name is a safe, distinct file name."""
    stem = key if _SAFE_KEY.fullmatch(key) else hashlib.sha256(key.encode()).hexdigest()[:24]
    return f"{shard}_{stem}.jpg"
