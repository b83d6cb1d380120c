"""`vlmdata download` against what the web throws at it, each case a route on a loopback server.

One download run covers every case (a module fixture); each test then checks its own row.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from conftest import LoopbackServer, make_image, png_header_only
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.fetch import FetchPolicy

JPEG = make_image(320, 240)
PNG = make_image(64, 48, "PNG")
MAX_BYTES = 1_000_000
HUGE_STREAM = 64 * 1024 * 1024
TIMEOUT_S = 1.5


def hostile_routes(server: LoopbackServer) -> None:
    """Register one route per misbehaviour."""
    first_hit: dict[str, bool] = {}

    async def slow_drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "image/jpeg", "Content-Length": "100000"}
        )
        await response.prepare(request)
        for _ in range(40):  # 40 bytes over ~10 s, far past the deadline
            await response.write(b"x")
            await asyncio.sleep(0.25)
        return response

    async def hang_after_headers(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        await asyncio.sleep(10)
        return response

    async def truncated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "image/jpeg", "Content-Length": str(len(JPEG))}
        )
        await response.prepare(request)
        await response.write(JPEG[: len(JPEG) // 2])
        request.transport.close()  # the connection drops mid-body
        return response

    async def short_content_length(request: web.Request) -> web.Response:
        # Declares half the body: the client reads half a JPEG, which must not decode.
        response = web.StreamResponse(
            headers={"Content-Type": "image/jpeg", "Content-Length": str(len(JPEG) // 2)}
        )
        await response.prepare(request)
        await response.write(JPEG)
        return response

    async def redirect_to(location: str) -> web.Response:
        raise web.HTTPFound(location)

    async def loop_a(request: web.Request) -> web.Response:
        return await redirect_to("/loop/b")

    async def loop_b(request: web.Request) -> web.Response:
        return await redirect_to("/loop/a")

    async def chain(request: web.Request) -> web.Response:
        left = int(request.match_info["n"])
        if left == 0:
            return web.Response(body=JPEG, content_type="image/jpeg")
        return await redirect_to(f"/chain/{left - 1}")

    async def flaky(request: web.Request) -> web.Response:
        if not first_hit.get(request.path):
            first_hit[request.path] = True
            if request.path == "/flaky-429":
                return web.Response(status=429, headers={"Retry-After": "1"})
            return web.Response(status=503)
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def big_declared(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "image/jpeg", "Content-Length": str(HUGE_STREAM)}
        )
        await response.prepare(request)
        await _stream_zeros(server, request, response)
        return response

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await _stream_zeros(server, request, response)
        return response

    def fixed(body: bytes, content_type: str, **headers: str):
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=body, headers={"Content-Type": content_type, **headers})

        return handler

    routes = {
        "/slow-drip": slow_drip,
        "/hang": hang_after_headers,
        "/truncated": truncated,
        "/short-content-length": short_content_length,
        "/loop/a": loop_a,
        "/loop/b": loop_b,
        "/chain/{n}": chain,
        "/flaky-429": flaky,
        "/flaky-503": flaky,
        "/status/{code}": status,
        "/big-declared": big_declared,
        "/big-chunked": big_chunked,
        "/gzip": fixed(gzip.compress(JPEG), "image/jpeg", **{"Content-Encoding": "gzip"}),
        "/png-as-text": fixed(PNG, "text/plain"),
        "/html-as-jpeg": fixed(b"<!DOCTYPE html><html><body>404</body></html>", "image/jpeg"),
        "/empty": fixed(b"", "image/jpeg"),
        "/random-bytes": fixed(bytes(range(256)) * 8, "image/jpeg"),
        "/truncated-jpeg": fixed(JPEG[: len(JPEG) * 2 // 3], "image/jpeg"),
        "/bomb.png": fixed(png_header_only(100_000, 100_000), "image/png"),
        "/noai": fixed(JPEG, "image/jpeg", **{"X-Robots-Tag": "noai"}),
        "/noimageai-list": fixed(JPEG, "image/jpeg", **{"X-Robots-Tag": "noindex, noimageai"}),
        "/noai-for-otherbot": fixed(JPEG, "image/jpeg", **{"X-Robots-Tag": "otherbot: noai"}),
        "/noai-for-vlmdata": fixed(JPEG, "image/jpeg", **{"X-Robots-Tag": "vlmdata: noai"}),
        "/café/東京.jpg": fixed(JPEG, "image/jpeg"),
        "/dup.jpg": fixed(JPEG, "image/jpeg"),
    }
    for path, handler in routes.items():
        server.route(path, handler)


async def _stream_zeros(
    server: LoopbackServer, request: web.Request, response: web.StreamResponse
) -> None:
    chunk = b"\0" * 65536
    try:
        for _ in range(HUGE_STREAM // len(chunk)):
            await response.write(chunk)
            server.bytes_sent[request.path] += len(chunk)
    except (ConnectionError, asyncio.CancelledError):
        pass


# case name -> (path or literal URL, caption)
CASES = {
    "ok": ("/img/ok.jpg", "a plain photo"),
    "slow_drip": ("/slow-drip", "drip"),
    "hang": ("/hang", "hang"),
    "truncated": ("/truncated", "cut"),
    "short_content_length": ("/short-content-length", "lie"),
    "redirect_loop": ("/loop/a", "loop"),
    "redirect_chain_ok": ("/chain/3", "three hops"),
    "redirect_chain_long": ("/chain/15", "fifteen hops"),
    "retry_429": ("/flaky-429", "429 then ok"),
    "retry_503": ("/flaky-503", "503 then ok"),
    "not_found": ("/status/404", "404"),
    "server_error": ("/status/500", "500"),
    "big_declared": ("/big-declared", "declared too big"),
    "big_chunked": ("/big-chunked", "chunked too big"),
    "gzip": ("/gzip", "gzip"),
    "png_as_text": ("/png-as-text", "image as text/plain"),
    "html_as_jpeg": ("/html-as-jpeg", "html error page"),
    "empty": ("/empty", "empty"),
    "random_bytes": ("/random-bytes", "noise"),
    "truncated_jpeg": ("/truncated-jpeg", "half a jpeg"),
    "bomb": ("/bomb.png", "bomb"),
    "noai": ("/noai", "opted out"),
    "noimageai": ("/noimageai-list", "opted out in a list"),
    "noai_other_bot": ("/noai-for-otherbot", "someone else opted out"),
    "noai_for_us": ("/noai-for-vlmdata", "opted out for vlmdata"),
    "unicode": ("/café/東京.jpg", "café 東京 🚀 naïve ünïcode"),
    "dup_1": ("/dup.jpg", "first copy"),
    "dup_2": ("/dup.jpg", "second copy"),
    "ftp": ("ftp://127.0.0.1/x.jpg", "ftp"),
    "javascript": ("javascript:alert(1)", "js"),
    "garbage": ("not a url at all", "garbage"),
    "empty_url": ("", "empty url"),
    "null_url": (None, "null url"),
    "refused_port": ("http://127.0.0.1:9/x.jpg", "nothing listens"),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory):
    """Run one download over every case; yield rows by case name, the output dir and server."""
    tmp = tmp_path_factory.mktemp("zoo")
    server = LoopbackServer()
    hostile_routes(server)  # routes must exist before the server starts
    with server:
        server.add_file("ok.jpg", JPEG)
        urls = [
            server.url(path) if path is not None and path.startswith("/") else path
            for path, _ in CASES.values()
        ]
        table = pa.table(
            {
                "image_url": urls,
                "capsfusion": [caption for _, caption in CASES.values()],
                "case": list(CASES),
            }
        )
        pq.write_table(table, tmp / "urls.parquet")
        out = tmp / "out"
        summary = run_download(
            DownloadConfig(
                input=str(tmp / "urls.parquet"),
                output_dir=str(out),
                keep_cols=("case",),
                shard_size=20,
                concurrency=16,
                processes=1,
                quiet=True,
                fetch=FetchPolicy(
                    timeout=TIMEOUT_S,
                    retries=2,
                    max_bytes=MAX_BYTES,
                    allow_private_network=True,
                    backoff_s=0.05,
                ),
            )
        )
        rows = {}
        for path in sorted(out.glob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                rows[row["case"]] = row
        yield {"rows": rows, "out": out, "server": server, "summary": summary}


def row(zoo: dict, case: str) -> dict:
    return zoo["rows"][case]


def assert_failed(zoo: dict, case: str, status: str, kind: str) -> dict:
    r = row(zoo, case)
    assert (r["status"], r["error_kind"]) == (status, kind), r
    assert r["error"], r
    return r


def test_every_input_row_has_exactly_one_status_row(zoo):
    assert set(zoo["rows"]) == set(CASES)
    keys = [r["key"] for r in zoo["rows"].values()]
    assert len(keys) == len(set(keys)) == len(CASES)
    assert zoo["summary"].totals["rows"] == len(CASES)


@pytest.mark.parametrize(
    "case",
    ["ok", "redirect_chain_ok", "retry_429", "retry_503", "gzip", "png_as_text", "noai_other_bot",
     "unicode", "dup_1", "dup_2"],
)  # fmt: skip
def test_successes_keep_original_bytes_in_the_tar(zoo, case):
    r = row(zoo, case)
    assert r["status"] == "success", r
    members = tar_members(zoo["out"])
    ext = "png" if case == "png_as_text" else "jpg"
    original = PNG if case == "png_as_text" else JPEG
    assert members[f"{r['key']}.{ext}"] == original
    assert members[f"{r['key']}.txt"].decode() == CASES[case][1]
    meta = json.loads(members[f"{r['key']}.json"])
    assert meta["key"] == r["key"] and meta["status"] == "success"
    assert (r["width"], r["height"]) == Image.open(io.BytesIO(original)).size
    assert r["sha256"] and r["bytes"] == len(original)


def test_total_deadline_stops_slow_drip_and_hang_after_headers(zoo):
    for case in ("slow_drip", "hang"):
        r = assert_failed(zoo, case, "failed_to_download", "timeout")
        assert r["attempts"] == 3  # timeouts are retried
        assert r["elapsed_s"] < 3 * TIMEOUT_S + 3


def test_truncated_bodies_and_content_length_lies(zoo):
    assert_failed(zoo, "truncated", "failed_to_download", "truncated")
    assert_failed(zoo, "short_content_length", "failed_to_decode", "broken_image")
    assert_failed(zoo, "truncated_jpeg", "failed_to_decode", "broken_image")


def test_redirect_loops_and_long_chains_are_cut(zoo):
    assert_failed(zoo, "redirect_loop", "failed_to_download", "redirect_loop")
    assert_failed(zoo, "redirect_chain_long", "failed_to_download", "too_many_redirects")
    assert row(zoo, "redirect_chain_ok")["final_url"].endswith("/chain/0")


def test_429_and_503_recover_with_retries(zoo):
    for case in ("retry_429", "retry_503"):
        r = row(zoo, case)
        assert (r["status"], r["attempts"]) == ("success", 2), r
    assert row(zoo, "retry_429")["elapsed_s"] >= 1.0  # Retry-After: 1 was honoured


def test_http_errors_are_classified(zoo):
    assert assert_failed(zoo, "not_found", "failed_to_download", "http_4xx")["http_status"] == 404
    r = assert_failed(zoo, "server_error", "failed_to_download", "http_5xx")
    assert (r["http_status"], r["attempts"]) == (500, 3)


def test_bodies_over_max_bytes_stop_reading_early(zoo):
    assert_failed(zoo, "big_declared", "failed_to_download", "too_large")
    assert_failed(zoo, "big_chunked", "failed_to_download", "too_large")
    # The client hung up long before the server could push the whole 64 MiB.
    assert zoo["server"].bytes_sent["/big-chunked"] < HUGE_STREAM // 4


def test_bytes_are_sniffed_not_content_type(zoo):
    assert row(zoo, "png_as_text")["format"] == "PNG"
    assert row(zoo, "png_as_text")["content_type"].startswith("text/plain")
    r = assert_failed(zoo, "html_as_jpeg", "failed_to_decode", "not_an_image")
    assert "HTML" in r["error"]
    assert_failed(zoo, "random_bytes", "failed_to_decode", "not_an_image")
    assert_failed(zoo, "empty", "failed_to_decode", "empty")


def test_decompression_bomb_refused_from_header(zoo):
    assert_failed(zoo, "bomb", "failed_to_decode", "decompression_bomb")


def test_noai_opt_outs(zoo):
    assert_failed(zoo, "noai", "failed_to_download", "opted_out")
    assert_failed(zoo, "noimageai", "failed_to_download", "opted_out")
    assert_failed(zoo, "noai_for_us", "failed_to_download", "opted_out")


def test_invalid_empty_and_null_urls(zoo):
    for case in ("ftp", "javascript", "garbage", "empty_url", "null_url"):
        assert_failed(zoo, case, "failed_to_download", "invalid_url")


def test_connection_refused(zoo):
    assert_failed(zoo, "refused_port", "failed_to_download", "connection")


def test_duplicate_urls_fetched_once(zoo):
    assert zoo["server"].hits["/dup.jpg"] == 1
    assert row(zoo, "dup_1")["key"] != row(zoo, "dup_2")["key"]


def test_non_ascii_captions_and_urls_round_trip(zoo):
    r = row(zoo, "unicode")
    assert r["caption"] == CASES["unicode"][1]
    assert "東京" in r["url"]


def test_tars_are_valid_and_keys_unique(zoo):
    for tar_path in sorted(zoo["out"].glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
        assert len(names) == len(set(names))
    stats = json.loads((zoo["out"] / "stats.json").read_text())
    assert stats["complete"] and stats["rows"] == len(CASES)


def tar_members(out: Path) -> dict[str, bytes]:
    members = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                members[member.name] = tar.extractfile(member).read()
    return members
