"""Shared test fixtures: generated images and a real aiohttp server on 127.0.0.1.

The server runs in a background thread with its own event loop, so stages under test (which
start their own loops) and subprocesses can talk to it. Every handler that stalls is bounded in
time; the server only ever listens on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Read when ray is imported, here and in every process of the test cluster: every Ray listener
# binds to 127.0.0.1 instead of the machine's external address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def make_image(width: int, height: int, fmt: str = "JPEG", seed: int = 0, **save: object) -> bytes:
    """A deterministic test picture: a gradient with a few shapes, encoded as ``fmt``."""
    mode = "RGBA" if fmt == "PNG" and save.pop("alpha", False) else "RGB"
    image = Image.linear_gradient("L").resize((width, height)).convert(mode)
    draw = ImageDraw.Draw(image)
    for i in range(4):
        x0 = (seed * 37 + i * 53) % max(1, width)
        y0 = (seed * 11 + i * 71) % max(1, height)
        draw.rectangle(
            [x0, y0, x0 + width // 4, y0 + height // 4], fill=(i * 60, 255 - i * 50, seed % 255)
        )
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoopbackServer:
    """An aiohttp server on 127.0.0.1 in a thread; counts the requests each path receives."""

    def __init__(self) -> None:
        self.app = web.Application(middlewares=[self._count])
        self.hits: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.files: dict[str, tuple[bytes, str]] = {}
        self.delay_s = 0.0  # added to every /img/ response
        self.fail_with: dict[str, int] = {}  # /img/ name -> HTTP status to answer instead
        self._lock = threading.Lock()
        self.app.router.add_get("/img/{name}", self._serve_file)

    def route(self, path: str, handler: Handler) -> None:
        self.app.router.add_get(path, handler)

    def add_file(self, name: str, data: bytes, content_type: str = "image/jpeg") -> str:
        """Serve ``data`` at ``/img/<name>``; return its full URL."""
        self.files[name] = (data, content_type)
        return self.url(f"/img/{name}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def total_hits(self, prefix: str = "/") -> int:
        with self._lock:
            return sum(n for path, n in self.hits.items() if path.startswith(prefix))

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        with self._lock:
            self.hits[request.path] += 1
        return await handler(request)

    async def _serve_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if name in self.fail_with:
            return web.Response(status=self.fail_with[name])
        data, content_type = self.files[name]
        return web.Response(body=data, content_type=content_type)

    def __enter__(self) -> LoopbackServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def start() -> None:
            self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=1)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert ready.wait(10), "test server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def quiet_random_weights() -> Iterator[None]:
    """The tiny random models' "random weights" warning, silenced for one test (use with
    ``pytestmark = pytest.mark.usefixtures("quiet_random_weights")``)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")
        yield


def one_error_line(result: object) -> str:
    """The output of a refused CLI command: exit 2 and exactly one line, ``error: ...``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as s:
        yield s


def die_on_poison(data: bytes) -> int:
    """An image function for worker-pool tests: ``b"poison"`` kills its worker process, every
    other input takes long enough to be in flight when that happens."""
    import time

    if data == b"poison":
        time.sleep(0.2)
        os._exit(1)
    time.sleep(0.5)
    return len(data)


# --- a learnable corpus for training tests: coloured shapes named by their captions ----------

SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
                 "yellow": (230, 210, 30)}  # fmt: skip
SHAPES = ("circle", "square", "triangle")


def write_shape_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` images ``NNNN.jpg`` of one coloured shape each, with ``NNNN.txt`` captions
    ("a red circle") that name both."""
    import random

    from vlmdata.demo.corpus import draw_shape

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour, shape = rng.choice(list(SHAPE_COLOURS)), rng.choice(SHAPES)
        image = Image.new("RGB", (96, 96), (255, 255, 255))
        x, w = rng.randint(8, 30), rng.randint(40, 60)
        draw_shape(ImageDraw.Draw(image), shape, (x, x, x + w, x + w), SHAPE_COLOURS[colour])
        image.save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(f"a {colour} {shape}")


def encode_folder(images: Path, out: Path, shard_size: int = 100, **options: object) -> Path:
    """The tiny-random-clip features of an image folder (in process, no workers)."""
    import warnings

    from vlmdata.encode.stage import EncodeConfig, run_encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        run_encode(EncodeConfig(input_dir=str(images), output_dir=str(out),
                                model="tiny-random-clip", workers=0, placeholder_filter=False,
                                shard_size=shard_size, quiet=True, **options))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def shape_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encode output of 240 coloured shapes in 3 shards (read-only: copy to change it)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shape_images(root / "images", 240)
    return encode_folder(root / "images", root / "features")


TRAINED_RUN_VAL_FRACTION = 0.1


@pytest.fixture(scope="session")
def trained_run(shape_features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few steps of a projector on the shapes (what it learns does not matter): a run
    directory for caption and eval (read-only: copy to change it)."""
    import warnings

    from vlmdata.train.trainer import TrainConfig, run_train

    out = tmp_path_factory.mktemp("trained") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        run_train(TrainConfig(features=(str(shape_features),), llm="tiny-random-llama",
                              out=str(out), max_steps=6, batch_size=8, workers=0,
                              val_fraction=TRAINED_RUN_VAL_FRACTION, quiet=True))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def ray_cluster(s3_server: str) -> Iterator[None]:
    """A Ray cluster for one test module: 2 CPUs, a small object store, no dashboard, every
    listener on 127.0.0.1. vlmdata's ``--distributor ray`` joins it (Ray is initialised).
    Started after the S3 server: its workers inherit the endpoint and credentials. Shut down
    with the module, so the rest of the run is not a Ray driver (Ray's threads and the object
    store's shared memory stay out of every other test's process)."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level=logging.ERROR)  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a thread of this process), with credentials and the
    endpoint in the environment that s3fs and subprocesses read; yields the endpoint."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in _S3_ENVIRONMENT}
    os.environ.update({**_S3_ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": ""}  # fmt: skip


@pytest.fixture
def bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A new empty bucket on the loopback S3 server: ``s3://NAME``."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    name = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    fs.mkdir(name)
    return f"s3://{name}"


# What two runs of the same input may differ in: timings.
_TIMINGS = {"elapsed_s", "attempts"}


def shard_records(out: Path) -> dict[str, dict]:
    """Every row of an output's shard parquets by key (each key once), without timings."""
    import pyarrow.parquet as pq

    rows = {}
    for parquet in sorted(out.glob("*.parquet")):
        for row in pq.read_table(parquet).to_pylist():
            assert row["key"] not in rows
            rows[row["key"]] = {k: v for k, v in row.items() if k not in _TIMINGS}
    return rows


def tar_members(out: Path) -> dict[str, bytes]:
    """Every member of an output's shard tars but the KEY.json rows (they hold timings)."""
    import tarfile

    members = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".json"):
                    members[member.name] = tar.extractfile(member).read()
    return members
