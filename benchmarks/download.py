"""Download benchmark: vlmdata vs the bare-aiohttp ceiling vs img2dataset, in one run.

    python benchmarks/download.py [--images 2000] [--processes N] [--img2dataset PATH]

Generates a corpus of JPEGs (200-1600 px, 10 % extreme aspect ratios), serves it from a
separate process on 127.0.0.1 and measures, on the same corpus and process count:

1. the ceiling: a bare aiohttp loop fetching every URL and discarding the bytes;
2. ``vlmdata download`` (original bytes kept, every image decode-checked);
3. img2dataset ``--resize_mode no --disable_all_reencoding True --output_format webdataset``,
   when an ``img2dataset`` executable is on PATH or given (install it in its own venv: it pins
   old pandas and opencv).

Then peak RSS of ``vlmdata download`` over URL lists of growing length (default up to
1,000,000 rows) whose URLs the SSRF guard refuses without a packet sent: the whole row path
(read, shard, record, write) runs at full speed, so memory growth with input size would show.

Then what a rerun costs as the input grows (``--resume-rows``, default 50,000 and 5,000,000;
``--no-resume`` skips it, ``--resume-only`` runs it alone): a CapsFusion-like parquet (an image
URL and a ~260-character caption a row, ~275 bytes a row on disk, 250k-row groups) is
downloaded to a finished output (default --shard-size), its URLs failing without a packet sent
(an unsupported scheme) except the last shard's, which point at a loopback server. Measured
on that output: (a) the wall time of a rerun, which has nothing to do; (b) after deleting the
last shard's files (a run killed before it finished), the time from process start to the
first request the loopback server receives. Neither should grow with the input.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def make_jpeg(seed: int) -> bytes:
    """One photo-like JPEG: smooth noise at a random size, 10 % of them extreme panoramas."""
    from PIL import Image

    rng = random.Random(seed)
    if rng.random() < 0.1:
        long_side, short_side = rng.randint(1200, 1600), rng.randint(200, 300)
        width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    else:
        width, height = rng.randint(200, 1600), rng.randint(200, 1600)
    small = (max(1, width // 8), max(1, height // 8))
    channels = [
        Image.effect_noise(small, 60 + 20 * c).point(lambda v, c=c: (v + 40 * c) % 256)
        for c in range(3)
    ]
    image = Image.merge("RGB", channels).resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def build_corpus(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{i:06d}.jpg" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        print(f"generating {len(missing)} JPEGs in {directory} ...", flush=True)
        with multiprocessing.Pool() as pool:
            for i, data in zip(missing, pool.imap(make_jpeg, missing, chunksize=16), strict=True):
                paths[i].write_bytes(data)
    return paths


def start_corpus_server(corpus: list[Path]) -> tuple[multiprocessing.Process, list[str]]:
    """Serve ``corpus`` from its own process on 127.0.0.1; return the process and the URLs."""
    ctx = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue = ctx.Queue()
    server = ctx.Process(target=serve, args=(str(corpus[0].parent), ports), daemon=True)
    server.start()
    port = ports.get(timeout=60)
    return server, [f"http://127.0.0.1:{port}/i/{p.name}" for p in corpus]


def serve(directory: str, port_queue: multiprocessing.Queue) -> None:
    """The corpus server (its own process): every file held in memory, served as image/jpeg."""
    from aiohttp import web

    files = {p.name: p.read_bytes() for p in Path(directory).glob("*.jpg")}

    async def handler(request: web.Request) -> web.Response:
        data = files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/i/{name}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port_queue.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


async def ceiling(urls: list[str], concurrency: int, sink: Path | None = None) -> int:
    """The bare aiohttp loop: fetch every URL and discard it (or append it to ``sink``)."""
    import aiohttp

    semaphore = asyncio.Semaphore(concurrency)
    fetched = 0
    with open(sink or os.devnull, "wb") as out:

        async def fetch(session: aiohttp.ClientSession, url: str) -> None:
            nonlocal fetched
            async with semaphore, session.get(url) as response:
                body = await response.read()
            if sink:
                out.write(body)
            fetched += 1

        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(fetch(session, url) for url in urls))
    return fetched


def timed(command: list[str], env: dict | None = None) -> tuple[float, str]:
    """Wall seconds of ``command`` (interpreter start to exit) and its stdout."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed, done.stdout


def count_tar_images(out: Path) -> int:
    count = 0
    for path in out.rglob("*.tar"):
        with tarfile.open(path) as tar:
            count += sum(1 for name in tar.getnames() if name.endswith(".jpg"))
    return count


def peak_rss_mb(command: list[str]) -> float:
    """Peak RSS (MB) of the largest process ``command`` starts, measured from a fresh parent."""
    probe = (
        "import resource, subprocess, sys;"
        "r = subprocess.run(sys.argv[1:], capture_output=True);"
        "assert r.returncode == 0, r.stderr.decode()[-2000:];"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip()) / 1024


def vlmdata_command(url_list: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "vlmdata", "download", str(url_list), str(out), "--quiet", *flags]


def img2dataset_command(exe: str, url_list: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """img2dataset with settings matching vlmdata's: original bytes, webdataset, same workers."""
    options = {
        "url_list": url_list, "input_format": "parquet", "url_col": "image_url",
        "caption_col": "capsfusion", "output_format": "webdataset", "output_folder": out,
        "processes_count": args.processes, "thread_count": args.concurrency,
        "resize_mode": "no", "disable_all_reencoding": True,
        "number_sample_per_shard": args.shard_size, "retries": 0, "timeout": 20,
        "enable_wandb": False, "distributor": "multiprocessing",
    }  # fmt: skip
    return [exe, *(part for k, v in options.items() for part in (f"--{k}", str(v)))]


def measure_rss(tmp: Path, row_counts: list[int]) -> None:
    print(f"\n{'URL list rows':>14}{'peak RSS MB':>14}{'seconds':>10}")
    for rows in row_counts:
        listing = tmp / f"rss-{rows}.txt"
        # Loopback URLs without --allow-private-network: refused before any connection.
        listing.write_text("".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(rows)))
        out = tmp / f"rss-{rows}"
        started = time.perf_counter()
        rss = peak_rss_mb(vlmdata_command(listing, out))
        print(f"{rows:>14}{rss:>14.0f}{time.perf_counter() - started:>10.1f}", flush=True)
        shutil.rmtree(out)


# -- what a rerun costs as the input grows ----------------------------------------------------

_GROUP_ROWS = 250_000  # CapsFusion's row groups
_SHARD_ROWS = 10_000  # the default --shard-size: a rerun's cost is per shard, so keep it
# Captions of random made-up words: English compresses better, but a CapsFusion file carries
# three caption columns; this makes one column weigh what its rows weigh, ~275 bytes a row.
_CAPTION_WORDS = 40
_VOCABULARY_SIZE = 20_000


def write_capsfusion_like(path: Path, rows: int, loopback: str) -> None:
    """A parquet shaped like a CapsFusion file: ``image_url`` and ``capsfusion`` columns,
    250k-row groups, ~275 bytes a row on disk. The last shard's URLs go to ``loopback``; the others
    have an unsupported scheme, so they fail without a packet sent (and build fast)."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = pa.array(["".join(rng.choice(letters, rng.integers(2, 10)))
                      for _ in range(_VOCABULARY_SIZE)])  # fmt: skip
    last_shard = (rows - 1) // _SHARD_ROWS * _SHARD_ROWS
    schema = pa.schema([("image_url", pa.string()), ("capsfusion", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, _GROUP_ROWS):
            n = min(_GROUP_ROWS, rows - start)
            ids = pc.cast(pa.array(np.arange(start, start + n) * 7919 % 10**12), pa.string())
            hosts = pc.cast(pa.array(rng.integers(0, 500, n)), pa.string())
            urls = pc.binary_join_element_wise(
                "hxxps://cdn", hosts, ".images.example.com/photos/2019/", ids, ".jpg", ""
            ).to_pylist()
            for row in range(max(start, last_shard), start + n):
                urls[row - start] = f"{loopback}/r/{row}.jpg"
            picked = [pc.take(words, rng.integers(0, len(words), n)) for _ in range(_CAPTION_WORDS)]
            captions = pc.binary_join_element_wise(*picked, " ")
            writer.write_table(pa.table([pa.array(urls), captions], schema=schema))


class FirstRequestServer:
    """A loopback HTTP server on a thread of its own: answers 404, notes its first request."""

    def __init__(self) -> None:
        self.first_request: float | None = None  # time.monotonic() of the first request
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        if not ready.wait(60):
            raise SystemExit("the loopback server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web

        async def handler(request: web.Request) -> web.Response:
            if self.first_request is None:
                self.first_request = time.monotonic()
            return web.Response(status=404)

        app = web.Application()
        app.router.add_get("/{path:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
        self.port = runner.addresses[0][1]


def seconds_to_first_request(command: list[str], server: FirstRequestServer) -> float:
    """Seconds from starting ``command`` to the first request ``server`` gets; then kill it."""
    server.first_request = None
    started = time.monotonic()
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        while server.first_request is None:
            if process.poll() is not None:
                raise SystemExit(f"the resume sent no request:\n{process.stderr.read()[-2000:]}")
            time.sleep(0.001)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return server.first_request - started


def forget_last_shard(out: Path) -> None:
    """Make ``out`` look like a run killed while its last shard was being downloaded."""
    last = max(p.name.split(".")[0] for p in out.glob("*.stats.json") if p.name[0].isdigit())
    for path in out.glob(f"{last}.*"):
        path.unlink()
    root = json.loads((out / "stats.json").read_text())
    (out / "stats.json").write_text(json.dumps({**root, "complete": False}))


def measure_resume(tmp: Path, row_counts: list[int], repeats: int) -> None:
    """Build a finished output per row count, then time a rerun and a last-shard resume."""
    server = FirstRequestServer()
    processes = str(os.cpu_count() or 1)  # only the build is parallel: it is the long part
    results = {}
    for rows in row_counts:
        url_list = tmp / f"capsfusion-{rows}.parquet"
        started = time.perf_counter()
        write_capsfusion_like(url_list, rows, server.url)
        written = time.perf_counter() - started
        out = tmp / f"resume-{rows}"
        command = vlmdata_command(url_list, out, "--allow-private-network")
        built, _ = timed([*command, "--processes", processes])
        size_mb = url_list.stat().st_size / 1e6
        print(f"{rows} rows: parquet {size_mb:.0f} MB written in {written:.1f} s, downloaded "
              f"to a finished output in {built:.1f} s", flush=True)  # fmt: skip
        rerun = min(timed(command)[0] for _ in range(repeats))
        first = []
        for _ in range(repeats):
            forget_last_shard(out)
            first.append(seconds_to_first_request(command, server))
        results[rows] = (rerun, min(first))
        shutil.rmtree(out)
        url_list.unlink()
    print(f"\n{'input rows':>12}{'rerun s':>10}{'resume: first request s':>26}")
    for rows, (rerun, first) in results.items():
        print(f"{rows:>12}{rerun:>10.2f}{first:>26.2f}")
    small, large = min(results), max(results)
    if small != large:
        ratios = [results[large][i] / results[small][i] for i in range(2)]
        print(f"{large} / {small} rows: rerun {ratios[0]:.2f}x, first request {ratios[1]:.2f}x")


def measure_throughput(tmp: Path, args: argparse.Namespace) -> None:
    """Images/s of the ceiling, of vlmdata download and of img2dataset on one corpus."""
    corpus = build_corpus(Path(args.corpus), args.images)
    total_mb = sum(p.stat().st_size for p in corpus) / 1e6
    print(
        f"corpus: {len(corpus)} JPEGs, {total_mb:.0f} MB; processes={args.processes} "
        f"concurrency={args.concurrency} shard size={args.shard_size}"
    )
    server, urls = start_corpus_server(corpus)
    rates: dict[str, float] = {}
    url_list = tmp / "urls.parquet"
    captions = [f"caption {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"image_url": urls, "capsfusion": captions}), url_list)

    asyncio.run(ceiling(urls[:50], args.concurrency))  # warm the server
    started = time.perf_counter()
    fetched = asyncio.run(ceiling(urls, args.concurrency))
    rates["ceiling: fetch, discard"] = fetched / (time.perf_counter() - started)
    started = time.perf_counter()
    fetched = asyncio.run(ceiling(urls, args.concurrency, sink=tmp / "sink.bin"))
    rates["floor: fetch, write"] = fetched / (time.perf_counter() - started)
    (tmp / "sink.bin").unlink()

    out = tmp / "vlmdata"
    flags = ["--allow-private-network", "--processes", str(args.processes), "--concurrency",
             str(args.concurrency), "--shard-size", str(args.shard_size)]  # fmt: skip
    elapsed, stdout = timed(vlmdata_command(url_list, out, *flags))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"].get("success") == len(urls), stats
    rates["vlmdata download"] = len(urls) / elapsed
    # Its own summary's rate: the same run without interpreter start-up and imports.
    rates["  (steady, own summary)"] = float(stdout.rsplit("(", 1)[1].split(" images/s")[0])
    shutil.rmtree(out)

    if args.img2dataset:
        out = tmp / "img2dataset"
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
        elapsed, _ = timed(img2dataset_command(args.img2dataset, url_list, out, args), env)
        saved = count_tar_images(out)
        assert saved == len(urls), f"img2dataset saved {saved} of {len(urls)}"
        rates["img2dataset"] = len(urls) / elapsed
        shutil.rmtree(out)
    server.terminate()

    print(f"\n{'run':<28}{'images/s':>10}")
    for name, rate in rates.items():
        print(f"{name:<28}{rate:>10.1f}")
    ours = rates["vlmdata download"]
    print(f"\nvlmdata / ceiling      = {ours / rates['ceiling: fetch, discard']:.2f}")
    print(f"vlmdata / fetch+write  = {ours / rates['floor: fetch, write']:.2f}")
    if "img2dataset" in rates:
        print(f"vlmdata / img2dataset  = {ours / rates['img2dataset']:.2f}")
    else:
        print("img2dataset: not found (pass --img2dataset PATH to compare)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="executable")
    parser.add_argument("--corpus", default=os.path.join(tempfile.gettempdir(), "vlmdata-corpus"))
    parser.add_argument("--rss-rows", default="20000,200000,1000000", help="'' skips RSS runs")
    parser.add_argument("--resume-rows", default="50000,5000000", help="input sizes to rerun")
    parser.add_argument("--no-resume", action="store_true", help="skip the rerun measurements")
    parser.add_argument("--resume-only", action="store_true", help="only the rerun measurements")
    parser.add_argument("--resume-repeats", type=int, default=3, help="best of this many")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if not args.resume_only:
            measure_throughput(tmp, args)
            if args.rss_rows:
                measure_rss(tmp, [int(n) for n in args.rss_rows.split(",")])
        if not args.no_resume:
            measure_resume(tmp, [int(n) for n in args.resume_rows.split(",")], args.resume_repeats)


if __name__ == "__main__":
    main()
