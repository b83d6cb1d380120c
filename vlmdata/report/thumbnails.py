"""Thumbnails for the one-file report, embedded as ``data:`` URIs.

They are made exactly as the labels report makes its own (:mod:`vlmdata.labels.thumbnails`:
each tar needed is indexed once, only the wanted samples read), in a temporary folder that is
read back into the page and deleted.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vlmdata.errors import UserError
from vlmdata.labels.thumbnails import ImageShards, open_image_shards, write_thumbnails
from vlmdata.pipeline.image_sources import ImageShard
from vlmdata.report.page import data_uri


@dataclass(frozen=True)
class Picture:
    """A wanted sample as the page shows it: its thumbnail, or why there is none."""

    uri: str | None
    problem: str | None = None


def pictures(
    images: ImageShards, wanted: Iterable[tuple[str, str]], quiet: bool
) -> dict[tuple[str, str], Picture]:
    """The thumbnail of each wanted (shard, key) of ``images``."""
    wanted = list(wanted)
    if not wanted:
        return {}
    with tempfile.TemporaryDirectory(prefix="vlmdata-report-") as folder:
        made = write_thumbnails(images, wanted, Path(folder), quiet)
        return {
            key: Picture(data_uri("image/jpeg", (Path(folder) / t.file).read_bytes()))
            if t.file is not None else Picture(None, t.problem)
            for key, t in made.items()
        }  # fmt: skip


def shard_pictures(
    path: Path, wanted: Iterable[tuple[str, str]], quiet: bool
) -> dict[tuple[str, str], Picture]:
    """Thumbnails from the image shards at ``path`` (a download or preprocess output); when
    they cannot be opened, every one says why."""
    wanted = list(wanted)
    try:
        images = open_image_shards(path)
    except UserError:  # gone or emptied since: the page goes on without them
        return {key: Picture(None, "its image shards cannot be read") for key in wanted}
    return pictures(images, wanted, quiet)


def file_pictures(files: dict[tuple[str, str], str], quiet: bool) -> dict[tuple[str, str], Picture]:
    """Thumbnails of samples encoded from a plain image folder, by the file each came from
    (an absolute path; a key of a folder is the file's position in its listing)."""
    # One single-file shard per sample, named by its key: the key the file gets is then its
    # own, and write_thumbnails reads exactly the files asked for.
    shards, by_key = {}, {}
    for (shard, key), source in files.items():
        if key.isdigit() and Path(source).is_absolute() and Path(source).is_file():
            shards[key] = ImageShard(key, files=(Path(source),), start=int(key))
            by_key[key] = (shard, key)
    made = pictures(ImageShards(Path("/"), shards), [(k, k) for k in shards], quiet)
    found = {by_key[k]: picture for (k, _), picture in made.items()}
    return {w: found.get(w, Picture(None, "its image file is gone")) for w in files}
