"""Image sources for the stages that read images: shard tars (vlmdata's own or img2dataset's
webdataset output) or a plain folder of images with optional same-name ``.txt`` captions.

Tars are streamed member by member, so a shard never has to fit in memory. A tar keeps its
name and its keys; a plain folder is cut into shards of ``shard_size`` files in sorted order,
keyed by position like a URL list's rows.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vlmdata.errors import UserError
from vlmdata.pipeline.shards import shard_name
from vlmdata.pipeline.sources import row_key

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})


@dataclass(frozen=True)
class Sample:
    """One image with what travels with it."""

    key: str
    image: bytes
    caption: str | None
    meta: dict  # the input's KEY.json (url and the like), {} when there is none
    source: str  # where the image came from: tar member or file path


@dataclass(frozen=True)
class ImageShard:
    """One unit of work: a tar, or a run of files of a plain folder."""

    name: str
    tar: Path | None = None
    files: tuple[Path, ...] = ()
    start: int = 0  # row number of files[0] in the sorted folder listing

    def samples(self) -> Iterator[Sample]:
        """The shard's samples in order (tar entries without an image are skipped)."""
        if self.tar is not None:
            yield from _tar_samples(self.tar)
            return
        for offset, path in enumerate(self.files):
            caption_file = path.with_suffix(".txt")
            caption = (
                caption_file.read_text(encoding="utf-8", errors="replace").strip()
                if caption_file.exists()
                else None
            )
            yield Sample(row_key(self.start + offset), path.read_bytes(), caption, {}, str(path))


def find_image_shards(input_dir: Path, shard_size: int) -> list[ImageShard]:
    """The shards of ``input_dir``: its ``*.tar`` files, else its images (recursively)."""
    if not input_dir.is_dir():
        raise UserError(f"input {input_dir} is not a directory of shards or images")
    tars = sorted(input_dir.glob("*.tar"))
    if tars:
        return [
            ImageShard(shard_name(int(p.stem) if p.stem.isdigit() else i), tar=p)
            for i, p in enumerate(tars)
        ]
    images = sorted(
        p for p in input_dir.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )  # fmt: skip
    if not images:
        raise UserError(
            f"{input_dir} holds no .tar shards and no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); point it at a stage's output or a folder"
        )
    return [
        ImageShard(shard_name(i // shard_size), files=tuple(images[i : i + shard_size]), start=i)
        for i in range(0, len(images), shard_size)
    ]


def fingerprint(shards: list[ImageShard]) -> dict:
    """What identifies an image input: shard names and sizes, or the folder listing."""
    if shards and shards[0].tar is not None:
        return {"tars": [[s.tar.name, s.tar.stat().st_size] for s in shards]}
    listing = hashlib.sha256()
    count = 0
    for shard in shards:
        for path in shard.files:
            listing.update(f"{path}\0{path.stat().st_size}\n".encode())
            count += 1
    return {"images": count, "listing_sha256": listing.hexdigest()}


def expected_samples(shards: list[ImageShard]) -> int | None:
    """How many samples the shards hold, when their producers' stats say so cheaply."""
    total = 0
    for shard in shards:
        if shard.tar is None:
            total += len(shard.files)
            continue
        vlmdata_stats = shard.tar.with_name(f"{shard.tar.stem}.stats.json")
        img2dataset_stats = shard.tar.with_name(f"{shard.tar.stem}_stats.json")
        if vlmdata_stats.exists():
            total += json.loads(vlmdata_stats.read_text())["status"].get("success", 0)
        elif img2dataset_stats.exists():
            total += json.loads(img2dataset_stats.read_text())["successes"]
        else:
            return None
    return total


def _tar_samples(path: Path) -> Iterator[Sample]:
    """Group a webdataset tar's consecutive members by key (the name up to its first dot)."""
    group: dict[str, bytes] = {}
    key = None
    try:
        with tarfile.open(path, "r|") as tar:  # streaming: one member in memory at a time
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                member_key, _, extension = base.partition(".")
                if member_key != key:
                    if key is not None:
                        yield from _sample(key, group, path)
                    key, group = member_key, {}
                group[extension.lower()] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise UserError(f"{path} is not a valid tar ({e}); rerun the stage that wrote it") from None
    if key is not None:
        yield from _sample(key, group, path)


def _sample(key: str, group: dict[str, bytes], path: Path) -> Iterator[Sample]:
    extension = next((ext for ext in group if ext in IMAGE_EXTENSIONS), None)
    if extension is None:
        return
    caption = group["txt"].decode("utf-8", "replace") if "txt" in group else None
    try:
        meta = json.loads(group["json"]) if "json" in group else {}
    except ValueError:
        meta = {}
    yield Sample(key, group[extension], caption, meta, f"{path.name}:{key}.{extension}")
