"""Image sources for the stages that read images: shard tars (vlmdata's own or img2dataset's
webdataset output) or a plain folder of images with optional same-name ``.txt`` captions.

A shard is read in two steps: :meth:`ImageShard.index` lists its samples (a tar's member
headers only, or a folder's files) and :meth:`ImageShard.read` reads the bytes of any run of
them, so several processes can share one shard and every byte is read once. A tar keeps its
keys (webdataset's rule: the member path without its extension) and, when its name is a number,
its shard number; a plain folder is cut into shards of ``shard_size`` files in sorted order,
keyed by position like a URL list's rows. A folder holds one or the other, never both.

Everything a :class:`Sample` carries as text is valid UTF-8, whatever bytes the file names,
member names or sidecar files hold: the stages write it to parquet, tar and HDF5.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from vlmdata.errors import UserError
from vlmdata.pipeline.imageops import IMAGE_EXTENSIONS
from vlmdata.pipeline.shards import shard_name
from vlmdata.pipeline.sources import LONE_SURROGATE, row_key

_SAMPLE_EXTENSIONS = IMAGE_EXTENSIONS | {"txt", "json"}  # the tar members a sample reads


@dataclass(frozen=True)
class Sample:
    """One image with what travels with it."""

    key: str
    image: bytes
    caption: str | None
    meta: dict  # the input's KEY.json (url and the like), {} when there is none
    source: str  # where the image came from: tar member or file path
    # A key already yielded from this shard: the first is kept, each repeat is renamed
    # ``KEY#2``, ``KEY#3``, ... (keys stay unique in an output) and recorded as a duplicate.
    duplicate: bool = False


@dataclass(frozen=True)
class Span:
    """A tar member's data: ``size`` bytes at ``offset``; or, for a sparse member (its stored
    bytes are not its content), the content itself, expanded when it was indexed."""

    offset: int
    size: int
    expanded: bytes | None = None


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's bytes are, as :meth:`ImageShard.index` found them."""

    key: str
    source: str  # tar member or file path
    image: Span | Path  # a tar member's data, or an image file (its caption is beside it)
    caption: Span | None = None  # the tar's KEY.txt
    meta: Span | None = None  # the tar's KEY.json
    duplicate: bool = False  # see Sample.duplicate


@dataclass(frozen=True)
class ImageShard:
    """One unit of work: a tar, or a run of files of a plain folder."""

    name: str
    tar: Path | None = None
    files: tuple[Path, ...] = ()
    start: int = 0  # row number of files[0] in the sorted folder listing

    def samples(self) -> Iterator[Sample]:
        """The shard's samples in order (tar entries without an image are skipped)."""
        return self.read(self.index())

    def index(self) -> list[SampleRef]:
        """Where each sample of the shard is, in order: one pass over a tar's member headers
        (its data is skipped, not read), or the folder's files."""
        if self.tar is not None:
            return _tar_index(self.tar)
        # A file name need not be UTF-8 (the source is made so); the file still reads.
        return [
            SampleRef(row_key(self.start + offset), _text(str(path)), path)
            for offset, path in enumerate(self.files)
        ]

    def read(self, refs: Sequence[SampleRef]) -> Iterator[Sample]:
        """The samples of ``refs`` (from :meth:`index`), read in order: a run of consecutive
        refs is one forward sweep over the tar."""
        try:
            if self.tar is None:
                for ref in refs:
                    yield Sample(ref.key, ref.image.read_bytes(), _caption_beside(ref.image), {},
                                 ref.source)  # fmt: skip
                return
            with open(self.tar, "rb", buffering=0) as tar:  # exact reads: no read-ahead
                for ref in refs:
                    yield _tar_sample(tar, ref, self.tar)
        except FileNotFoundError as e:  # deleted since the index: the input changed under us
            raise UserError(
                f"{e.filename} was deleted while this stage read it; rerun it once the input "
                "is left alone"
            ) from None


def find_image_shards(input_dir: Path, shard_size: int) -> list[ImageShard]:
    """The shards of ``input_dir``: its ``*.tar`` files, or its images (recursively).

    A folder with both is refused: reading either alone would silently drop the other.
    """
    if not input_dir.is_dir():
        raise UserError(f"input {input_dir} is not a directory of shards or images")
    tars = sorted(p for p in input_dir.glob("*.tar") if p.is_file())
    files = [p for p in input_dir.rglob("*") if p.is_file()]
    images = sorted(p for p in files if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    nested_tars = sorted(p for p in files if p.suffix.lower() == ".tar" and p.parent != input_dir)
    if images and (tars or nested_tars):  # a tar in a subfolder would be skipped as well
        raise UserError(_mixed_input_message(input_dir, tars or nested_tars, len(images)))
    if tars:
        return [
            ImageShard(name, tar=p) for p, name in zip(tars, _tar_shard_names(tars), strict=True)
        ]
    if not images:
        raise UserError(
            f"{input_dir} holds no .tar shards and no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); point it at a stage's output or a folder"
        )
    return [
        ImageShard(shard_name(i // shard_size), files=tuple(images[i : i + shard_size]), start=i)
        for i in range(0, len(images), shard_size)
    ]


def _tar_shard_names(tars: list[Path]) -> list[str]:
    """The output shard name of each of ``tars`` (sorted by name): distinct files, distinct names.

    A tar named by a number keeps it (``7.tar`` and ``000007.tar`` are shard ``00007``); when
    several spell one number, the one spelled like a shard name keeps it (else the first in
    sorted order). The others, and every tar not named by a number, follow the largest number,
    in sorted order: two input files never write one output shard.
    """
    numbers = {p: int(p.stem) for p in tars if p.stem.isascii() and p.stem.isdigit()}
    owner: dict[int, Path] = {}
    for path in sorted(numbers, key=lambda p: (p.stem != shard_name(numbers[p]), p.name)):
        owner.setdefault(numbers[path], path)
    following = max(numbers.values(), default=-1) + 1
    names = []
    for path in tars:
        if path in numbers and owner[numbers[path]] == path:
            names.append(shard_name(numbers[path]))
        else:
            names.append(shard_name(following))
            following += 1
    return names


def _mixed_input_message(input_dir: Path, tars: list[Path], images: int) -> str:
    shown = ", ".join(_text(p.name) for p in tars[:3]) + (", ..." if len(tars) > 3 else "")
    tar_files = f"{len(tars)} .tar file{'s' if len(tars) != 1 else ''} ({shown})"
    loose = f"{images} loose image{'s' if images != 1 else ''}"
    return (
        f"{_text(str(input_dir))} holds {tar_files} and {loose}; pass a folder of shards or "
        "a folder of images, not both"
    )


def fingerprint(shards: list[ImageShard]) -> dict:
    """What identifies an image input: each tar's file name, the output shard it makes and its
    size; or the folder listing."""
    if shards and shards[0].tar is not None:
        return {"tars": [[_text(s.tar.name), s.name, s.tar.stat().st_size] for s in shards]}
    listing = hashlib.sha256()
    count = 0
    for shard in shards:
        for path in shard.files:
            listing.update(os.fsencode(path) + f"\0{path.stat().st_size}\n".encode())
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
        try:  # only a progress bar's total: a damaged stats file just leaves it unknown
            if vlmdata_stats.exists():
                total += int(json.loads(vlmdata_stats.read_bytes())["status"].get("success", 0))
            elif img2dataset_stats.exists():
                total += int(json.loads(img2dataset_stats.read_bytes())["successes"])
            else:
                return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    return total


@dataclass
class _Group:
    """The members of one sample being gathered: consecutive members with one key."""

    key: str
    data: dict[str, Span] = field(default_factory=dict)  # extension -> data, wanted ones
    extensions: set[str] = field(default_factory=set)  # every one seen: a repeat is a new sample


def _tar_index(path: Path) -> list[SampleRef]:
    """A webdataset tar's samples: consecutive members grouped by key, repeats flagged.

    Only the headers are read: the index seeks over each member's data. A tar cut inside a
    member is refused here, before any sample is read.
    """
    refs: list[SampleRef] = []
    keys: set[str] = set()  # keys of this shard so far, for the repeats
    group: _Group | None = None
    try:
        with open(path, "rb", buffering=0) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            while True:
                # At the next header already: else tarfile reads the byte before it to check
                # the data is there, a byte a worker reads again. The size check below does.
                raw.seek(tar.offset)
                member = tar.next()
                if member is None:
                    break
                split = _member_key(member)
                if split is None:
                    continue
                key, extension = split
                if group is None or key != group.key or extension in group.extensions:
                    if group is not None:
                        refs += _sample_ref(group, path, keys)
                    group = _Group(key)
                group.extensions.add(extension)
                if extension in _SAMPLE_EXTENSIONS:
                    group.data[extension] = _span(tar, member)
            if os.fstat(raw.fileno()).st_size < tar.offset:  # cut in the last member's data
                raise tarfile.ReadError("unexpected end of data")
    except tarfile.TarError as e:
        raise _not_a_valid_tar(path, e) from None
    if group is not None:
        refs += _sample_ref(group, path, keys)
    return refs


def _span(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Span:
    """Where ``member``'s content is; a sparse member (``tar --sparse``, rare) is expanded
    now, by tarfile: its holes are not in the file."""
    if not member.issparse():
        return Span(member.offset_data, member.size)
    return Span(member.offset_data, member.size, tar.extractfile(member).read())


def _not_a_valid_tar(path: Path, why: object) -> UserError:
    return UserError(f"{path} is not a valid tar ({why}); rerun the stage that wrote it")


def _tar_sample(tar: BinaryIO, ref: SampleRef, path: Path) -> Sample:
    """The sample ``ref`` locates in the open ``tar``, its members read in file order."""
    spans = {"image": ref.image, "caption": ref.caption, "meta": ref.meta}
    data: dict[str, bytes] = {}
    for name in sorted((n for n in spans if spans[n] is not None), key=lambda n: spans[n].offset):
        if spans[name].expanded is not None:
            data[name] = spans[name].expanded
            continue
        tar.seek(spans[name].offset)
        data[name] = tar.read(spans[name].size)
        if len(data[name]) != spans[name].size:  # cut since it was indexed
            raise _not_a_valid_tar(path, "unexpected end of data")
    caption = data["caption"].decode("utf-8", "replace") if "caption" in data else None
    return Sample(
        ref.key, data["image"], caption, _meta(data.get("meta")), ref.source, ref.duplicate
    )


def _member_key(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """A regular member's (key, lower-case extension), or None for a member that is no part
    of a sample.

    webdataset's rule: the key is the member path without its extension, its folders kept
    (``partA/0001`` and ``partB/0001`` are two samples), the extension runs from the first dot
    of the last path component. Links, folders and devices are skipped, never followed. Empty,
    ``.`` and ``..`` components are dropped: a stage writes ``KEY.jpg`` into its own tar, and a
    key must never climb out of a folder there. Names without a dot or without anything before
    it (``README``, ``._0001.jpg`` from macOS) are skipped, as webdataset does.
    """
    if not member.isfile():
        return None
    parts = [part for part in member.name.split("/") if part not in ("", ".", "..")]
    if not parts:
        return None
    stem, dot, extension = parts[-1].partition(".")
    if not stem or not dot:
        return None
    return _text("/".join([*parts[:-1], stem])), extension.lower()


def _sample_ref(group: _Group, path: Path, keys: set[str]) -> list[SampleRef]:
    """The sample of ``group``, if it has an image."""
    extension = next((ext for ext in group.data if ext in IMAGE_EXTENSIONS), None)
    if extension is None:
        return []
    key, repeat = group.key, 1
    while key in keys:  # a repeat: the first next free KEY#n (a real "a#2" may exist)
        repeat += 1
        key = f"{group.key}#{repeat}"
    keys.add(key)
    source = _text(f"{path.name}:{group.key}.{extension}")
    return [SampleRef(key, source, group.data[extension], group.data.get("txt"),
                      group.data.get("json"), duplicate=repeat > 1)]  # fmt: skip


def _meta(raw: bytes | None) -> dict:
    """A KEY.json member as a dict of valid text; {} when absent, not JSON or not an object."""
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8-sig", "replace"))
        return _valid(meta) if isinstance(meta, dict) else {}
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python recurses
        return {}


def _valid(value: object) -> object:
    """``value`` (parsed JSON) with lone surrogates (``"\\udce9"`` escapes) out of every string."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(k): _valid(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid(v) for v in value]
    return value


def _caption_beside(image: Path) -> str | None:
    """The same-name ``.txt`` of an image in a folder, decoded whatever its bytes."""
    caption_file = image.with_suffix(".txt")
    if not caption_file.exists():
        return None
    return caption_file.read_text(encoding="utf-8", errors="replace").strip()


def _text(text: str) -> str:
    """``text`` made valid UTF-8.

    Python decodes file and tar member names that are not UTF-8 with ``surrogateescape``; such
    a byte becomes ``\\xNN`` (the name stays readable and distinct), any other lone surrogate
    U+FFFD.
    """
    return LONE_SURROGATE.sub(_escape_surrogate, text)


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "\ufffd"
