"""Image inputs of preprocess and encode: shard tars (webdataset layout) or a folder of images.

Every test builds real files in ``tmp_path``: tars with :mod:`tarfile`, images with Pillow.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import make_image
from vlmdata.errors import UserError
from vlmdata.pipeline.image_sources import Sample, find_image_shards, fingerprint

JPEG = make_image(40, 30)


def write_tar(path: Path, members: list[tuple[str, bytes]], **open_options: object) -> Path:
    """A tar holding ``members`` (name, data) as regular files, in that order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", **open_options) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def samples_of(tar: Path) -> list[Sample]:
    (shard,) = find_image_shards(tar.parent, shard_size=10)
    return list(shard.samples())


def one_sample_tar(path: Path) -> Path:
    return write_tar(path, [("000000000.jpg", JPEG)])


# --- shard names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a non-numeric name must not take a numeric tar's number (was: extra -> 00002)
        (["00000.tar", "00002.tar", "extra.tar"], ["00000", "00002", "00003"]),
        # 7, 007 and 00007 are all number 7: the one spelled 00007 keeps it, the others (and the
        # non-numeric ones) follow the largest number, in sorted order
        (
            ["00000.tar", "00002.tar", "00007.tar", "007.tar", "7.tar", "b.tar", "a.tar"],
            ["00000", "00002", "00007", "00008", "00009", "00010", "00011"],
        ),
        # without a canonical spelling the first in sorted order keeps the number
        (["7.tar", "007.tar"], ["00007", "00008"]),
        # a numeric stem of any width maps to shard_name(int(stem))
        (["000007.tar", "12.tar"], ["00007", "00012"]),
    ],
)
def test_shard_names_are_unique_per_input_tar(tmp_path, files, expected):
    for name in files:
        one_sample_tar(tmp_path / name)
    shards = find_image_shards(tmp_path, shard_size=10)
    by_file = {shard.tar.name: shard.name for shard in shards}
    assert sorted(by_file.values()) == sorted(expected)
    assert [by_file[name] for name in sorted(files)] == expected
    assert len({shard.name for shard in shards}) == len(files)


def test_fingerprint_records_which_tar_makes_which_shard(tmp_path):
    for name in ("00000.tar", "00002.tar", "extra.tar"):
        one_sample_tar(tmp_path / name)
    size = (tmp_path / "extra.tar").stat().st_size
    tars = fingerprint(find_image_shards(tmp_path, shard_size=10))["tars"]
    assert ["extra.tar", "00003", size] in tars
    assert [row[:2] for row in tars] == [
        ["00000.tar", "00000"], ["00002.tar", "00002"], ["extra.tar", "00003"]
    ]  # fmt: skip


def test_a_tar_among_loose_images_is_refused(tmp_path):
    one_sample_tar(tmp_path / "x.tar")
    (tmp_path / "photos").mkdir()
    for i in range(2):
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(JPEG)
    message = r"holds 1 \.tar file \(x\.tar\) and 2 loose images; pass a folder of shards"
    with pytest.raises(UserError, match=message):
        find_image_shards(tmp_path, shard_size=10)


def test_many_tars_among_loose_images_are_named_briefly(tmp_path):
    for i in range(5):
        one_sample_tar(tmp_path / f"{i}.tar")
    (tmp_path / "a.png").write_bytes(make_image(8, 8, "PNG"))
    with pytest.raises(UserError, match=r"5 \.tar files \(0\.tar, 1\.tar, 2\.tar, \.\.\.\) and 1"):
        find_image_shards(tmp_path, shard_size=10)


# --- webdataset keys -------------------------------------------------------------------------


def test_keys_keep_their_folder(tmp_path):
    tar = write_tar(
        tmp_path / "in" / "00000.tar",
        [("partA/0001.jpg", JPEG), ("partA/0001.txt", b"a"),
         ("partB/0001.jpg", JPEG), ("partB/0001.txt", b"b"),
         ("dir.v1/0002.JPG", JPEG), ("dir.v1/0002.seg.png", b"a mask, not the image")],
    )  # fmt: skip
    samples = samples_of(tar)
    assert [(s.key, s.caption) for s in samples] == [
        ("partA/0001", "a"), ("partB/0001", "b"), ("dir.v1/0002", None)
    ]  # fmt: skip
    assert samples[2].source == "00000.tar:dir.v1/0002.jpg"
    assert not any(s.duplicate for s in samples)


def test_repeated_keys_are_renamed_and_flagged_first_kept(tmp_path):
    tar = write_tar(
        tmp_path / "in" / "00000.tar",
        [("0001.jpg", b"first"), ("0001.txt", b"one"),
         ("0002.jpg", b"two"),
         ("0001.jpg", b"again"),  # the key again, not next to its first group
         ("0003.jpg", b"c1"), ("0003.txt", b"c1"), ("0003.jpg", b"c2"), ("0003.txt", b"c2"),
         ("0004.txt", b"a caption without an image is no sample"),
         ("0005.jpg", b"five"),
         ("0004.jpg", b"so this is the first 0004")],
    )  # fmt: skip
    got = [(s.key, s.image, s.caption, s.duplicate) for s in samples_of(tar)]
    assert got == [
        ("0001", b"first", "one", False),
        ("0002", b"two", None, False),
        ("0001#2", b"again", None, True),
        ("0003", b"c1", "c1", False),
        ("0003#2", b"c2", "c2", True),
        ("0005", b"five", None, False),
        ("0004", b"so this is the first 0004", None, False),
    ]


def test_member_names_over_100_bytes(tmp_path):
    folder = "long-folder-name/" * 8  # 136 bytes
    name = f"{folder}0001.jpg"
    assert len(name.encode()) > 100
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        tar = write_tar(
            tmp_path / f"{fmt}" / "00000.tar",
            [(name, JPEG), (f"{folder}0001.txt", b"long")],
            format=fmt,
        )
        (sample,) = samples_of(tar)
        assert (sample.key, sample.image, sample.caption) == (f"{folder}0001", JPEG, "long")


def test_links_devices_and_odd_names_neither_escape_nor_crash(tmp_path):
    tar_path = tmp_path / "in" / "00000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        for name, kind, target in [
            ("d", tarfile.DIRTYPE, ""),
            ("0001.jpg", tarfile.SYMTYPE, "/etc/passwd"),
            ("0002.jpg", tarfile.LNKTYPE, "0003.jpg"),
            ("0004.jpg", tarfile.FIFOTYPE, ""),
            ("0008.jpg", tarfile.CHRTYPE, ""),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
        for name in ("0003.jpg", "../../0005.jpg", "/abs/0006.jpg", "a/./../0007.jpg",
                     ".jpg", "._0009.jpg", "sub/.jpg", "README", "./0010.jpg"):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(JPEG)
            tar.addfile(info, io.BytesIO(JPEG))
    keys = [s.key for s in samples_of(tar_path)]
    # no key may climb out of a folder or be empty when a stage writes KEY.jpg
    assert keys == ["0003", "0005", "abs/0006", "a/0007", "0010"]


@pytest.mark.parametrize("cut", ["first data", "last data", "last padding"])
def test_a_damaged_tar_is_one_user_error(tmp_path, cut):
    tar = write_tar(tmp_path / "in" / "00000.tar", [("0001.jpg", JPEG), ("0002.jpg", JPEG)])
    with tarfile.open(tar) as t:
        last = t.getmembers()[-1]
    assert last.size % 512, "the last member needs padding to cut into"
    end = {"first data": 700, "last data": last.offset_data + last.size - 1,
           "last padding": last.offset_data + last.size + 1}[cut]  # fmt: skip
    tar.write_bytes(tar.read_bytes()[:end])
    (shard,) = find_image_shards(tar.parent, shard_size=10)
    with pytest.raises(UserError, match="not a valid tar"):
        shard.index()  # before any sample is read


def test_runs_read_apart_are_the_samples_of_one_pass(tmp_path):
    members = []
    for i in range(7):
        members += [(f"{i % 5:04d}.jpg", make_image(30 + i, 20, seed=i)),  # 0000, 0001 repeat
                    (f"{i % 5:04d}.txt", f"c{i}".encode()),
                    (f"{i % 5:04d}.json", b'{"url": "u%d"}' % i)]  # fmt: skip
    (shard,) = find_image_shards(write_tar(tmp_path / "in" / "0.tar", members).parent, 10)
    whole = list(shard.samples())
    assert [(s.key, s.duplicate) for s in whole][-2:] == [("0000#2", True), ("0001#2", True)]
    refs = shard.index()
    apart = [s for i in (6, 4, 0, 2) for s in shard.read(refs[i : i + 2])]  # any order, any run
    assert sorted(apart, key=lambda s: s.key) == sorted(whole, key=lambda s: s.key)


def test_a_tar_cut_after_indexing_is_one_user_error(tmp_path):
    tar = write_tar(tmp_path / "in" / "00000.tar", [("0001.jpg", JPEG), ("0002.jpg", JPEG)])
    (shard,) = find_image_shards(tar.parent, shard_size=10)
    refs = shard.index()
    os.truncate(tar, refs[1].image.offset + 5)
    assert [s.key for s in shard.read(refs[:1])] == ["0001"]  # what is there still reads
    with pytest.raises(UserError, match=r"00000\.tar is not a valid tar \(unexpected end of"):
        list(shard.read(refs[1:]))


# --- text that can be written anywhere -------------------------------------------------------


def assert_utf8(sample: Sample) -> None:
    for text in (sample.key, sample.source, sample.caption or "", json.dumps(sample.meta)):
        text.encode("utf-8")  # raises on a lone surrogate
    pa.array([sample.key, sample.source, sample.caption])  # what the stages' parquet does


def test_non_utf8_file_name_in_an_image_folder(tmp_path):
    folder = os.fsencode(tmp_path / "photos")
    os.mkdir(folder)
    with open(os.path.join(folder, b"caf\xe9.jpg"), "wb") as f:
        f.write(JPEG)
    with open(os.path.join(folder, b"caf\xe9.txt"), "wb") as f:
        f.write("caf\xe9 au lait".encode("latin-1"))
    shards = find_image_shards(tmp_path / "photos", shard_size=10)
    assert fingerprint(shards)["images"] == 1
    (sample,) = shards[0].samples()
    assert_utf8(sample)
    assert sample.image == JPEG  # the file itself is still read
    assert sample.source.endswith("caf\\xe9.jpg") and sample.caption == "caf\ufffd au lait"


def test_non_utf8_member_and_tar_names(tmp_path):
    folder = os.fsencode(tmp_path / "in")
    os.mkdir(folder)
    tar_path = Path(os.fsdecode(os.path.join(folder, b"\xff.tar")))
    meta = b'{"url": "http://x/\\udce9", "key": "\\ud800"}'  # lone surrogates, JSON-escaped
    write_tar(
        tar_path,
        [("caf\udce9.jpg", JPEG), ("caf\udce9.json", meta), ("caf\udce9.txt", b"\xff\xfe")],
        format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape",
    )  # fmt: skip
    shards = find_image_shards(tar_path.parent, shard_size=10)
    json.dumps(fingerprint(shards), ensure_ascii=False).encode("utf-8")
    (sample,) = shards[0].samples()
    assert_utf8(sample)
    assert (sample.key, sample.image) == ("caf\\xe9", JPEG)
    assert sample.meta == {"url": "http://x/\\xe9", "key": "\ufffd"}
    assert sample.source == "\\xff.tar:caf\\xe9.jpg"


@pytest.mark.parametrize("meta", [b"[1, 2]", b'"a string"', b"not json", b"[" * 100_000])
def test_a_json_member_that_is_not_an_object_gives_empty_meta(tmp_path, meta):
    tar = write_tar(tmp_path / "in" / "00000.tar", [("0001.jpg", JPEG), ("0001.json", meta)])
    (sample,) = samples_of(tar)
    assert sample.meta == {}


def test_a_renamed_repeat_never_takes_a_real_key(tmp_path):
    tar = write_tar(
        tmp_path / "in" / "00000.tar",
        [("a.jpg", b"1"), ("a#2.jpg", b"2"), ("a.jpg", b"3"), ("a.jpg", b"4")],
    )
    got = [(s.key, s.image, s.duplicate) for s in samples_of(tar)]
    assert got == [("a", b"1", False), ("a#2", b"2", False), ("a#3", b"3", True),
                   ("a#4", b"4", True)]  # fmt: skip


def test_a_tar_in_a_subfolder_of_an_image_folder_is_refused_too(tmp_path):
    (tmp_path / "1.jpg").write_bytes(JPEG)
    (tmp_path / "sub").mkdir()
    one_sample_tar(tmp_path / "sub" / "extra.tar")
    with pytest.raises(UserError, match=r"holds 1 \.tar file \(extra\.tar\) and 1 loose image"):
        find_image_shards(tmp_path, shard_size=10)
