"""The demo's built-in data: the generated corpus, its loopback server, and a real download of it
with the demo's settings."""

from __future__ import annotations

import io
import json
import re
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from vlmdata.cli import app
from vlmdata.demo.corpus import (
    COLOURS,
    FAILURE_KINDS,
    KINDS,
    SHAPES,
    CorpusEntry,
    build_corpus,
    draw_shape,
    write_url_list,
)
from vlmdata.demo.server import DemoServer
from vlmdata.errors import UserError

SMALL = 12  # images in the corpus the server and download tests use
# What `vlmdata download` records for each kind: (status, error_kind).
EXPECTED = {
    "image": ("success", None),
    "slow": ("success", None),
    "placeholder": ("success", None),
    "dead": ("failed_to_download", "http_4xx"),
    "gone": ("failed_to_download", "http_4xx"),
    "server-error": ("failed_to_download", "http_5xx"),
    "stall": ("failed_to_download", "timeout"),
    "truncated": ("failed_to_decode", "broken_image"),
    "not-an-image": ("failed_to_decode", "not_an_image"),
    "empty": ("failed_to_decode", "empty"),
    "noai": ("failed_to_download", "opted_out"),
}
PICTURES = ("image", "slow", "placeholder")
HTTP_ERRORS = {"dead": 404, "gone": 410, "server-error": 500}
FORMATS = {
    "image/jpeg": ("JPEG", "jpg"),
    "image/png": ("PNG", "png"),
    "image/webp": ("WEBP", "webp"),
}


@pytest.fixture(scope="module")
def corpus() -> list[CorpusEntry]:
    """The demo's default corpus."""
    return build_corpus()


@pytest.fixture(scope="module")
def small() -> list[CorpusEntry]:
    return build_corpus(SMALL, seed=1)


def decode(entry: CorpusEntry) -> Image.Image:
    image = Image.open(io.BytesIO(entry.body))
    image.load()
    return image


# --- the corpus -------------------------------------------------------------------------------


def test_same_seed_same_bytes(small: list[CorpusEntry]) -> None:
    assert build_corpus(SMALL, seed=1) == small
    other = build_corpus(SMALL, seed=2)
    assert [e.body for e in other] != [e.body for e in small]


def test_every_kind_with_the_requested_number_of_images(corpus: list[CorpusEntry]) -> None:
    kinds = Counter(entry.kind for entry in corpus)
    assert set(kinds) == set(KINDS) == set(EXPECTED)
    assert kinds["image"] + kinds["slow"] == 300
    assert kinds["placeholder"] >= 3
    failures = sum(kinds[kind] for kind in FAILURE_KINDS)
    assert 0.05 <= failures / len(corpus) <= 0.08
    names = [entry.name for entry in corpus]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9-]+\.(jpg|png|webp)", name) for name in names)
    assert all(entry.caption.strip() for entry in corpus)
    assert len({entry.caption for entry in corpus if entry.kind == "image"}) > 150  # varied


def test_a_small_corpus_still_has_every_kind(small: list[CorpusEntry]) -> None:
    kinds = Counter(entry.kind for entry in small)
    assert set(kinds) == set(KINDS)
    assert kinds["image"] + kinds["slow"] == SMALL
    with pytest.raises(UserError, match="at least"):
        build_corpus(3)


def test_pictures_decode_in_the_promised_sizes_and_formats(corpus: list[CorpusEntry]) -> None:
    pictures = [entry for entry in corpus if entry.kind in PICTURES]
    formats: Counter[str] = Counter()
    sizes = []
    alpha = 0
    for entry in pictures:
        image = decode(entry)
        fmt, extension = FORMATS[entry.content_type]
        assert image.format == fmt and entry.name.endswith(f".{extension}")
        formats[fmt] += 1
        alpha += image.mode == "RGBA"
        sizes.append(image.size)
    assert formats["JPEG"] > len(pictures) / 2 and formats["PNG"] > 5 and formats["WEBP"] > 5
    assert alpha >= 3
    ratios = [min(w, h) / max(w, h) for w, h in sizes]
    assert sum(r >= 0.6 for r in ratios) > 0.7 * len(sizes)  # most are cropped, not padded
    assert sum(w / h >= 2 for w, h in sizes) >= 3 and sum(h / w >= 2 for w, h in sizes) >= 3
    assert sum(max(size) > 448 for size in sizes) >= 5
    assert sum(max(size) < 100 for size in sizes) >= 5


def test_broken_bodies_are_broken_as_promised(corpus: list[CorpusEntry]) -> None:
    for entry in corpus:
        if entry.kind == "truncated":
            assert entry.body.startswith(b"\xff\xd8") and not entry.body.endswith(b"\xff\xd9")
            with pytest.raises(OSError):
                decode(entry)
        elif entry.kind == "not-an-image":
            assert entry.body.startswith(b"<!DOCTYPE html>")
            assert entry.content_type == "image/jpeg"
        elif entry.kind == "empty" or entry.kind in HTTP_ERRORS:
            assert entry.body == b""
        elif entry.kind in ("stall", "noai"):
            decode(entry)


def colour_share(image: Image.Image, rgb: tuple[int, int, int]) -> float:
    """The share of pixels within JPEG noise of ``rgb`` (transparent ones count as none)."""
    pixels = np.asarray(image.convert("RGBA"), dtype=np.int32)
    near = np.abs(pixels[..., :3] - np.array(rgb)).sum(axis=-1) < 60
    return float((near & (pixels[..., 3] > 0)).mean())


def test_captions_name_colours_that_are_drawn(corpus: list[CorpusEntry]) -> None:
    """Shapes and textures show every colour their caption names: what a model learns from."""
    checked = 0
    for entry in corpus:
        family = entry.name.split("-")[1].split(".")[0]
        if entry.kind != "image" or family not in ("shape", "texture"):
            continue
        image = decode(entry)
        words = [w for w in re.findall(r"[a-z]+", entry.caption) if w in COLOURS]
        # A shape's colour, or both of a pattern's (a shape's "pale" background is no colour).
        for word in words[: 1 if family == "shape" else 2]:
            assert colour_share(image, COLOURS[word]) > 0.005, (entry.name, entry.caption, word)
        checked += 1
    assert checked > 150


@pytest.mark.parametrize("shape", SHAPES)
def test_draw_shape_fills_its_box(shape: str) -> None:
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    draw_shape(ImageDraw.Draw(image), shape, (10, 10, 30, 30), (0, 0, 0))
    assert image.getpixel((20, 22)) == (0, 0, 0)
    assert all(
        image.getpixel((x, y)) == (255, 255, 255)
        for x in range(40)
        for y in range(40)
        if not (10 <= x <= 30 and 10 <= y <= 30)
    )
    with pytest.raises(ValueError, match="unknown shape"):
        draw_shape(ImageDraw.Draw(image), "blob", (0, 0, 9, 9), (0, 0, 0))


def test_write_url_list(small: list[CorpusEntry], tmp_path: Path) -> None:
    path = write_url_list(small, "http://127.0.0.1:1234/", tmp_path / "in" / "urls.parquet")
    table = pq.read_table(path)
    assert table.column_names == ["image_url", "capsfusion"]
    assert table.column("image_url").to_pylist() == [
        f"http://127.0.0.1:1234/{entry.name}" for entry in small
    ]
    assert table.column("capsfusion").to_pylist() == [entry.caption for entry in small]
    assert sorted(p.name for p in path.parent.iterdir()) == ["urls.parquet"]  # no temp file


# --- the server -------------------------------------------------------------------------------


def get(url: str, timeout: float = 5) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def test_server_answers_each_kind_as_promised(small: list[CorpusEntry]) -> None:
    before = set(threading.enumerate())
    with DemoServer(small, slow_s=0.2) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        for entry in small:
            url = f"{server.base_url}/{entry.name}"
            if entry.kind == "stall":
                with pytest.raises(TimeoutError):  # 20 s of silence; we leave after 0.5
                    get(url, timeout=0.5)
                continue
            status, headers, body = get(url)
            if entry.kind in HTTP_ERRORS:
                expected = HTTP_ERRORS[entry.kind]
                assert status == expected and get(url)[0] == expected  # every time
                continue
            assert (status, body) == (200, entry.body)
            assert headers["Content-Type"] == entry.content_type
            assert ("X-Robots-Tag" in headers) == (entry.kind == "noai")
            if entry.kind == "noai":
                assert headers["X-Robots-Tag"] == "noai"
        assert get(f"{server.base_url}/nothing-here.jpg")[0] == 404
    assert set(threading.enumerate()) <= before  # the server's thread is gone
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.base_url


def test_a_stall_is_bounded(small: list[CorpusEntry]) -> None:
    stall = next(entry for entry in small if entry.kind == "stall")
    with DemoServer(small, stall_s=0.2) as server:
        status, _, body = get(f"{server.base_url}/{stall.name}")
    assert (status, body) == (200, stall.body)


def test_a_rerun_serves_on_the_same_port(small: list[CorpusEntry]) -> None:
    with DemoServer(small) as first:
        port = first.port
        with pytest.raises(UserError, match=f"127.0.0.1:{port} .*free that port"):
            DemoServer(small, port=port).__enter__()  # busy: one clear line
    picture = next(entry for entry in small if entry.kind == "image")
    with DemoServer(small, port=port) as again:
        assert again.base_url == f"http://127.0.0.1:{port}"
        assert get(f"{again.base_url}/{picture.name}")[::2] == (200, picture.body)


# --- end to end -------------------------------------------------------------------------------


def test_download_records_every_row_with_the_expected_outcome(
    small: list[CorpusEntry], tmp_path: Path
) -> None:
    kind_of = {entry.name: entry.kind for entry in small}
    out = tmp_path / "images"
    with DemoServer(small) as server:
        urls = write_url_list(small, server.base_url, tmp_path / "urls.parquet")
        result = CliRunner().invoke(app, [
            "download", str(urls), str(out), "--allow-private-network", "--timeout", "3",
            "--retries", "1", "--resize", "448", "--quiet",
        ])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [
        row for path in sorted(out.glob("*.parquet")) for row in pq.read_table(path).to_pylist()
    ]
    assert len(rows) == len(small)
    expected_stats: Counter[str] = Counter()
    expected_errors: Counter[str] = Counter()
    actions = set()
    for row in rows:
        kind = kind_of[row["url"].rsplit("/", 1)[1]]
        status, error_kind = EXPECTED[kind]
        assert (row["status"], row["error_kind"]) == (status, error_kind), (kind, row["error"])
        expected_stats[status] += 1
        if error_kind:
            expected_errors[error_kind] += 1
        if status == "success":
            assert (row["width"], row["height"]) == (448, 448)
            assert row["action"] == ("crop" if row["ratio"] >= 0.6 else "pad")
            actions.add(row["action"])
        if kind in HTTP_ERRORS:
            assert row["http_status"] == HTTP_ERRORS[kind]
        if kind in ("server-error", "stall"):
            assert row["attempts"] == 2  # --retries 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == len(small)
    assert stats["status"] == dict(expected_stats)
    assert stats["error_kind"] == dict(expected_errors)
    assert actions == {"crop", "pad"}  # near-square pictures are cropped, wide and tall padded
