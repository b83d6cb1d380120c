"""Download benchmark: vlmdata vs the bare-aiohttp ceiling vs img2dataset, in one run.

    python benchmarks/download.py [--images 2000] [--processes N] [--img2dataset PATH]
                                  [--resize-only | --resume-only]

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

Then how ``--resize 448`` scales with ``--processes`` (``--resize-processes``, default 1 and
2; ``--resize-only`` runs it alone): images/s and CPU an image, for the whole run and in
steady state (while the server sends the 25th to the 90th percent of the images: start-up
and the tail left out), the latter by kind of process, read from /proc as the run goes (the
parent that reads the input and counts rows, the event-loop processes, the resize workers).
img2dataset ``--resize_mode center_crop --image_size 448`` runs at the same process counts
when it is found. From those per-image costs, a model of 16 and 64 cores: the CPU bound with
one process per core against a network bound at 1 and 10 Gbit/s for the corpus's mean image
size.

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
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
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


def start_corpus_server(
    corpus: list[Path], served: Synchronized | None = None
) -> tuple[multiprocessing.Process, list[str]]:
    """Serve ``corpus`` from its own process on 127.0.0.1; return the process and the URLs.
    ``served`` (a shared integer from the spawn context) counts the images sent."""
    ctx = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue = ctx.Queue()
    server = ctx.Process(target=serve, args=(str(corpus[0].parent), ports, served), daemon=True)
    server.start()
    port = ports.get(timeout=60)
    return server, [f"http://127.0.0.1:{port}/i/{p.name}" for p in corpus]


def serve(
    directory: str, port_queue: multiprocessing.Queue, served: Synchronized | None = None
) -> None:
    """The corpus server (its own process): every file held in memory, served as image/jpeg."""
    from aiohttp import web

    files = {p.name: p.read_bytes() for p in Path(directory).glob("*.jpg")}

    async def handler(request: web.Request) -> web.Response:
        data = files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        if served is not None:
            served.value += 1  # this process alone writes it
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


def img2dataset_command(
    exe: str, url_list: Path, out: Path, args: argparse.Namespace,
    processes: int | None = None, resize: int | None = None,
) -> list[str]:  # fmt: skip
    """img2dataset with settings matching vlmdata's: original bytes (or, with ``resize``,
    centre-cropped squares re-encoded as JPEG), webdataset, same workers."""
    options = {
        "url_list": url_list, "input_format": "parquet", "url_col": "image_url",
        "caption_col": "capsfusion", "output_format": "webdataset", "output_folder": out,
        "processes_count": processes or args.processes, "thread_count": args.concurrency,
        "resize_mode": "no", "disable_all_reencoding": True,
        "number_sample_per_shard": args.shard_size, "retries": 0, "timeout": 20,
        "enable_wandb": False, "distributor": "multiprocessing",
    }  # fmt: skip
    if resize:
        options.update(resize_mode="center_crop", disable_all_reencoding=False, image_size=resize)
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


# -- --resize across processes ----------------------------------------------------------------

_RESIZE = 448
_TICK = os.sysconf("SC_CLK_TCK")
_POLL_S = 0.1
_ROLES = ("parent", "event loops", "resize workers")
_CORES = (16, 64)
_NETWORK_GBIT = (1, 10)
_WEB_REQUEST_S = 0.5  # an assumed time per request on the web (DNS, connect, TLS, body)


def process_tree(root: int) -> dict[int, tuple[int, float, bytes]]:
    """``root`` and its descendants: pid -> (depth below root, CPU seconds so far, cmdline)."""
    found, todo = {}, [(root, 0)]
    while todo:
        pid, depth = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue  # gone meanwhile
        found[pid] = (depth, (int(fields[11]) + int(fields[12])) / _TICK, cmdline)
        todo += [(int(child), depth + 1) for child in children]
    return found


@dataclass
class Run:
    """One measured run: wall time and CPU in all, and in steady state by role."""

    images: int
    elapsed_s: float  # interpreter start to exit
    cpu_s: float  # every process of the run, start-up included (exact: reaped children)
    steady_rate: float  # images/s while 25 % to 90 % of the images were sent
    steady_cpu: dict[str, float]  # CPU seconds an image by role over the same stretch


def measure(
    command: list[str], processes: int, served: Synchronized, images: int, env: dict | None = None
) -> Run:
    """Run ``command`` while reading its processes' CPU from /proc and the server's count.

    A vlmdata download with one process is the event loop, its spawned children the resize
    workers; with more, the first process is the parent, its children the loops and theirs the
    workers; multiprocessing's resource tracker counts as the parent. Steady state is the
    stretch from the first look after 25 % of the images were sent to the last before 90 %:
    start-up (interpreter, imports, pools) and the tail are left out."""
    loops = 0 if processes == 1 else 1

    def role(depth: int, cmdline: bytes) -> str:
        if depth == loops and b"resource_tracker" not in cmdline:
            return "event loops"
        if depth == loops + 1 and b"spawn_main" in cmdline:
            return "resize workers"
        return "parent"

    seen: dict[int, tuple[str, float]] = {}  # pid -> role, CPU seconds so far
    samples = []  # (time, images sent, CPU seconds by role)
    served.value = 0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    while process.poll() is None:
        count = served.value
        for pid, (depth, seconds, cmdline) in process_tree(process.pid).items():
            # An exited child waiting to be reaped shows its CPU, but no command line.
            seen[pid] = (seen[pid][0] if pid in seen else role(depth, cmdline), seconds)
        by_role = dict.fromkeys(_ROLES, 0.0)
        for name, seconds in seen.values():
            by_role[name] += seconds
        samples.append((time.perf_counter(), count, by_role))
        time.sleep(_POLL_S)
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{process.stderr.read().decode()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
    first = next(s for s in samples if s[1] >= 0.25 * images)
    last = [s for s in samples if s[1] <= 0.9 * images][-1]
    sent = last[1] - first[1]
    steady = {name: (last[2][name] - first[2][name]) / sent for name in _ROLES}
    return Run(images, elapsed, cpu, sent / (last[0] - first[0]), steady)


def parent_cost_per_row(tmp: Path, rows: tuple[int, int] = (20_000, 200_000)) -> float:
    """CPU seconds the parent of ``--processes 2`` spends on a row (reading the input, passing
    shards on, counting outcomes), over URLs the SSRF guard refuses without a packet sent, so
    that rows go by fast enough to show it; the difference of two list lengths."""
    cpu = []
    for count in rows:
        listing = tmp / f"refused-{count}.txt"
        listing.write_text("".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(count)))
        out = tmp / f"refused-{count}"
        parent = 0.0
        command = vlmdata_command(listing, out, "--processes", "2")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None:  # the parent alone: its CPU until it exits
            parent = process_tree(process.pid).get(process.pid, (0, parent))[1]
            time.sleep(_POLL_S)
        cpu.append(parent)
        shutil.rmtree(out)
    return (cpu[1] - cpu[0]) / (rows[1] - rows[0])


def measure_resize_scaling(tmp: Path, args: argparse.Namespace, process_counts: list[int]) -> None:
    """``download --resize 448`` at each process count (and img2dataset's equivalent), then a
    model of the rate on 16 and 64 cores against the network."""
    corpus = build_corpus(Path(args.corpus), args.images)
    n = len(corpus)
    mean_bytes = sum(p.stat().st_size for p in corpus) / n
    served = multiprocessing.get_context("spawn").Value("q", 0, lock=False)
    server, urls = start_corpus_server(corpus, served)
    url_list = tmp / "resize-urls.parquet"
    captions = [f"caption {i}" for i in range(n)]
    pq.write_table(pa.table({"image_url": urls, "capsfusion": captions}), url_list)
    asyncio.run(ceiling(urls[:50], args.concurrency))  # warm the server
    # Small enough shards that every process has work through the steady stretch.
    shard_size = max(1, min(args.shard_size, n // (4 * max(process_counts))))
    print(f"\n--resize {_RESIZE}: {n} JPEGs, mean {mean_bytes / 1e3:.0f} kB, concurrency "
          f"{args.concurrency}, shard size {shard_size}, {os.cpu_count()} cores here "
          "(the server shares them)")  # fmt: skip
    runs: dict[str, Run] = {}
    for processes in process_counts:
        out = tmp / f"resize-{processes}"
        flags = ["--allow-private-network", "--resize", str(_RESIZE), "--processes",
                 str(processes), "--concurrency", str(args.concurrency), "--shard-size",
                 str(shard_size)]  # fmt: skip
        runs[f"vlmdata --processes {processes}"] = measure(
            vlmdata_command(url_list, out, *flags), processes, served, n
        )
        stats = json.loads((out / "stats.json").read_text())
        assert stats["status"].get("success") == n, stats
        shutil.rmtree(out)
    if args.img2dataset:
        same = argparse.Namespace(**{**vars(args), "shard_size": shard_size})
        quiet = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
        for processes in process_counts:
            out = tmp / f"img2dataset-resize-{processes}"
            command = img2dataset_command(args.img2dataset, url_list, out, same, processes,
                                          resize=_RESIZE)  # fmt: skip
            run = measure(command, processes, served, n, quiet)
            run.steady_cpu = {"all processes": sum(run.steady_cpu.values())}
            runs[f"img2dataset processes_count {processes}"] = run
            assert count_tar_images(out) == n
            shutil.rmtree(out)
    server.terminate()

    print(f"\n{'':<32}{'images/s':>17}{'CPU ms an image':>18}")
    print(f"{'run':<32}{'in all':>8}{'steady':>9}{'in all':>9}{'steady':>9}   steady, by process")
    for name, run in runs.items():
        steady = sum(run.steady_cpu.values())
        roles = ", ".join(f"{role} {1000 * s:.2f}" for role, s in run.steady_cpu.items() if s)
        print(f"{name:<32}{run.images / run.elapsed_s:>8.0f}{run.steady_rate:>9.0f}"
              f"{1000 * run.cpu_s / run.images:>9.2f}{1000 * steady:>9.2f}   {roles}")  # fmt: skip
    if not args.img2dataset:
        print("img2dataset: not found (pass --img2dataset PATH to compare)")
    widest = runs[f"vlmdata --processes {max(process_counts)}"]
    model_cores(widest.steady_cpu, parent_cost_per_row(tmp), mean_bytes)


def model_cores(cpu: dict, parent_per_row: float, mean_bytes: float) -> None:
    """The expected rate on bigger machines from the per-image costs of one run: one process
    per core (each with one resize worker), all CPU spread over the cores, except the parent's
    per-row work, which one process does for all; against the network at a few line rates."""
    per_image = sum(cpu.values())
    parent_cap = 1 / parent_per_row
    print(f"\nModel: --processes = cores, {1000 * per_image:.1f} CPU ms an image; the parent, "
          f"one process for all, {1e6 * parent_per_row:.1f} us a row (at most "
          f"{parent_cap:,.0f} rows/s); network: {mean_bytes / 1e3:.0f} kB an image")  # fmt: skip
    header = f"{'cores':>6}{'CPU bound':>11}"
    for gbit in _NETWORK_GBIT:
        header += f"{f'{gbit} Gbit/s':>11}{'expected':>10}  {'bound by':<9}"
    print(header)
    fastest = 0.0
    for cores in _CORES:
        cpu_bound = min(cores / per_image, parent_cap)
        line = f"{cores:>6}{cpu_bound:>11,.0f}"
        for gbit in _NETWORK_GBIT:
            network = gbit * 1e9 / 8 / mean_bytes
            side = "network" if network <= cpu_bound else "CPU"
            line += f"{network:>11,.0f}{min(network, cpu_bound):>10,.0f}  {side:<9}"
            fastest = max(fastest, min(network, cpu_bound))
        print(line)
    print(
        f"In flight it takes (Little's law, at {_WEB_REQUEST_S:g} s a web request): "
        f"{fastest:,.0f} images/s need --concurrency >= {fastest * _WEB_REQUEST_S:,.0f}."
    )
    share = cpu["event loops"] / per_image
    print(f"One event loop spends {1000 * cpu['event loops']:.2f} ms an image ({share:.0%} of "
          f"the CPU): one process keeps ~{1 / share:.0f} cores busy at most, so --processes "
          f"should be at least cores / {max(1, int(1 / share))} (the default: cores / 4)."
          )  # fmt: skip


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
    """Make ``out`` look like a run killed while its last shard was being downloaded (the same
    shard every time: the last the run planned, whether or not a repeat already removed it)."""
    root = json.loads((out / "stats.json").read_text())
    for path in out.glob(f"{root['shard_names'][-1]}.*"):
        path.unlink()
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
    parser.add_argument("--resize-processes", default="1,2", help="'' skips the --resize runs")
    parser.add_argument("--resize-only", action="store_true", help="only the --resize runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if not (args.resume_only or args.resize_only):
            measure_throughput(tmp, args)
            if args.rss_rows:
                measure_rss(tmp, [int(n) for n in args.rss_rows.split(",")])
        if args.resize_processes and not args.resume_only:
            counts = [int(n) for n in args.resize_processes.split(",")]
            measure_resize_scaling(tmp, args, counts)
        if not (args.no_resume or args.resize_only):
            measure_resume(tmp, [int(n) for n in args.resume_rows.split(",")], args.resume_repeats)


if __name__ == "__main__":
    main()
