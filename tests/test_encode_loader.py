"""How encode feeds the model (issue 9): each input byte read once, uint8 pixels from the
workers, shared memory sized to /dev/shm, and the precision it resolved recorded."""

from __future__ import annotations

import builtins
import io
import json
import os
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_image
from vlmdata.cli import app
from vlmdata.encode import stage
from vlmdata.encode.stage import EncodeConfig, run_encode
from vlmdata.errors import UserError
from vlmdata.pipeline.image_sources import find_image_shards
from vlmdata.pipeline.imageops import SquareOptions, make_square

pytestmark = pytest.mark.filterwarnings("ignore:tiny-random-clip has random weights")
runner = CliRunner(env={"COLUMNS": "200"})
TINY = "tiny-random-clip"


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    """A webdataset tar of 14 samples (images of several shapes, a caption and metadata
    each), one image that does not decode and a repeated key. One member fills its 512-byte
    blocks exactly: no padding separates its last byte from the next header."""
    folder = tmp_path / "shards"
    folder.mkdir()
    members = []
    for i in range(14):
        width, height = (300 + 20 * i, 200) if i % 3 else (120, 600)  # some padded
        meta = json.dumps({"url": f"http://x/{i}"}).ljust(512 if i == 5 else 0)
        members += [(f"{i:04d}.jpg", make_image(width, height, seed=i)),
                    (f"{i:04d}.txt", f"caption {i}".encode()),
                    (f"{i:04d}.json", meta.encode())]  # fmt: skip
    members += [("0014.jpg", b"not an image"), ("0003.jpg", make_image(90, 90, seed=99))]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder


def encode(input_dir: Path, out: Path, **options) -> object:
    defaults = dict(model=TINY, device="cpu", workers=0, batch_size=4, quiet=True,
                    placeholder_filter=False)  # fmt: skip
    return run_encode(EncodeConfig(str(input_dir), str(out), **{**defaults, **options}))


def encoded(input_dir: Path, out: Path, **options) -> tuple:
    """``features`` of a new encode output."""
    encode(input_dir, out, **options)
    return features(out)


def features(out: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[tuple]]:
    """keys, tokens and embeds of the .h5, and the parquet's rows."""
    with h5py.File(out / "00000.h5", "r") as f:
        stored = list(f["keys"].asstr()[:]), f["tokens"][:], f["embeds"][:]
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    return (*stored, [(r["key"], r["status"], r["row"], r["caption"], r["url"]) for r in rows])


# --- every byte once -------------------------------------------------------------------------


def _log_read(log_dir: Path, offset: int, length: int) -> None:
    with open(log_dir / f"{os.getpid()}.log", "a") as log:
        log.write(f"{offset} {length}\n")


class _CountingFile:
    """A file whose reads are logged as ``offset length`` lines, one log per process."""

    def __init__(self, file: object, log_dir: Path) -> None:
        self._file, self._log_dir = file, log_dir

    def read(self, size: int = -1) -> bytes:
        offset = self._file.tell()
        data = self._file.read(size)
        _log_read(self._log_dir, offset, len(data))
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def test_each_byte_of_a_shard_is_read_once_with_two_workers(shard, tmp_path, monkeypatch):
    tar_path = shard / "00000.tar"
    with tarfile.open(tar_path) as tar:
        data = [(m.offset_data, m.size) for m in tar.getmembers()]
    log_dir = tmp_path / "reads"
    log_dir.mkdir()
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened = real_open(file, *args, **kwargs)
        if isinstance(file, str | os.PathLike) and Path(file) == tar_path:
            return _CountingFile(opened, log_dir)
        return opened

    class CountingLowLevelFile(tarfile._LowLevelFile):  # what tarfile streams ("r|") read with
        def read(self, size: int) -> bytes:
            offset = os.lseek(self.fd, 0, os.SEEK_CUR)
            data = super().read(size)
            _log_read(log_dir, offset, len(data))
            return data

    # Every way Python reads the tar by its path: open(), and tarfile's own openers. The
    # forked DataLoader workers inherit the patches.
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(tarfile, "bltn_open", counting_open)
    monkeypatch.setattr(tarfile, "_LowLevelFile", CountingLowLevelFile)
    encode(shard, tmp_path / "out", workers=2, batch_size=4)
    monkeypatch.undo()

    times_read = np.zeros(tar_path.stat().st_size, dtype=np.int64)
    data_readers = set()
    for log in log_dir.glob("*.log"):
        for line in log.read_text().splitlines():
            offset, length = map(int, line.split())
            times_read[offset : offset + length] += 1
            if any(offset < start + size and start < offset + length for start, size in data):
                data_readers.add(int(log.stem))
    for start, size in data:  # the members' data, all of it
        assert times_read[start : start + size].min() >= 1, "a member was not read"
    assert times_read.max() == 1, f"bytes read {times_read.max()} times"
    # The workers read the data, two of them; this process read the headers only.
    assert len(data_readers) == 2 and os.getpid() not in data_readers
    assert len(features(tmp_path / "out")[0]) == 14


# --- what the workers hand back --------------------------------------------------------------


def test_workers_hand_back_uint8_squares_in_shard_order(shard):
    (image_shard,) = find_image_shards(shard, shard_size=100)
    options = SquareOptions(size=32)
    loader = stage.image_loader(image_shard, options, 10**8, stage.LoaderShape(2, 3, 2))
    chunks = list(loader)
    assert [len(c.items) for c in chunks] == [3, 3, 3, 3, 3, 1]
    items = [item for chunk in chunks for item in chunk.items]
    assert [item["key"] for item in items] == [f"{i:04d}" for i in range(15)] + ["0003#2"]
    assert [item["status"] for item in items[-2:]] == ["failed_to_decode", "duplicate"]
    samples = {s.key: s for s in image_shard.samples()}
    for chunk in chunks:
        decoded = [item for item in chunk.items if item["decoded"]]
        if not decoded:  # the last chunk: only the repeated key
            assert chunk.images is None
            continue
        assert chunk.images.dtype == torch.uint8 and chunk.images.shape[1:] == (3, 32, 32)
        assert len(chunk.images) == len(decoded)
        for item, image in zip(decoded, chunk.images, strict=True):
            _, square = make_square(samples[item["key"]].image, options, 10**8)
            assert torch.equal(image, stage.pixels(square))
            assert item["caption"] == f"caption {int(item['key'])}"


# --- the same features, however the decoding is spread --------------------------------------


def test_the_same_features_whatever_the_workers_and_batch_size(shard, tmp_path, monkeypatch):
    reference = encoded(shard, tmp_path / "w0", workers=0)
    for workers in (1, 2):
        got = encoded(shard, tmp_path / f"w{workers}", workers=workers)
        assert got[0] == reference[0] and got[3] == reference[3]
        np.testing.assert_array_equal(got[1], reference[1])
        np.testing.assert_array_equal(got[2], reference[2])
    # /dev/shm room for two images per worker: chunks of two, regrouped into batches of four.
    room = 2 * 2 * 3 * 96**2 * 2  # workers x images x pixels, over the share chunks may take
    monkeypatch.setattr(stage, "_shm_free_bytes", lambda: room)
    assert stage.loader_shape(2, 4, 96) == stage.LoaderShape(2, 2, 1)
    got = encoded(shard, tmp_path / "small-shm", workers=2)
    assert got[0] == reference[0] and got[3] == reference[3]
    np.testing.assert_array_equal(got[1], reference[1])
    monkeypatch.undo()
    # Other batch sizes: the same rows in the same order; the forward of a batch of another
    # size may round its last bits differently.
    for batch_size in (3, 5, 64):
        got = encoded(shard, tmp_path / f"b{batch_size}", workers=2, batch_size=batch_size)
        assert got[0] == reference[0] and got[3] == reference[3]
        np.testing.assert_allclose(got[1], reference[1], atol=2e-3)
        np.testing.assert_allclose(got[2], reference[2], atol=2e-3)


# --- shared memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [64, 256, 4096])
def test_shared_memory_in_flight_does_not_grow_with_the_batch(monkeypatch, batch_size):
    image = 3 * 336**2  # bytes of one uint8 square at 336 px
    monkeypatch.setattr(stage, "_shm_free_bytes", lambda: 64 << 20)  # Docker's default
    shape = stage.loader_shape(4, batch_size, 336)
    assert shape.workers == 4
    assert shape.workers * shape.prefetch * shape.chunk * image <= 32 << 20
    monkeypatch.setattr(stage, "_shm_free_bytes", lambda: 64 << 30)
    shape = stage.loader_shape(4, batch_size, 336)
    assert shape.workers * shape.prefetch * shape.chunk <= 4 * 8 * 16  # 173 MB at most


def test_a_tiny_dev_shm_decodes_in_this_process_with_one_warning(shard, tmp_path, monkeypatch):
    reference = encoded(shard, tmp_path / "w0", workers=0)
    monkeypatch.setattr(stage, "_shm_free_bytes", lambda: 40 << 10)
    result = runner.invoke(app, ["encode", str(shard), str(tmp_path / "o"), "--model", TINY,
                                 "--device", "cpu", "--workers", "2", "--batch-size", "4",
                                 "--no-placeholder-filter", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "/dev/shm" in line]
    assert warnings == [
        "warning: /dev/shm has only 40 KB free, too little to pass images between processes: "
        "decoding in the main process instead (slower); raise the container's --shm-size "
        "(e.g. docker run --shm-size=2g) to decode on --workers processes"
    ]
    got = features(tmp_path / "o")
    assert got[0] == reference[0] and got[3] == reference[3]
    np.testing.assert_array_equal(got[1], reference[1])


def _out_of_shared_memory(self: torch.Tensor) -> torch.Tensor:
    """What moving a chunk to a full /dev/shm raises (torch's own words; it reserves the pages
    with posix_fallocate, so a full /dev/shm fails here rather than with a SIGBUS later)."""
    raise RuntimeError("unable to write to file </torch_4242_1_0>: No space left on device (28)")


def test_workers_out_of_shared_memory_is_one_line_naming_shm_size(shard, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "share_memory_", _out_of_shared_memory)
    out = tmp_path / "o"
    args = ["encode", str(shard), str(out), "--model", TINY, "--device", "cpu", "--workers", "2",
            "--batch-size", "4", "--no-placeholder-filter", "--quiet"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("error: the decoding workers ran out of shared memory while ")
    assert "raise the container's --shm-size (e.g. docker run --shm-size=2g)" in errors[0]
    assert errors[0].endswith("rerun the same command to resume")
    monkeypatch.undo()
    assert runner.invoke(app, args).exit_code == 0  # the rerun completes
    assert len(features(out)[0]) == 14


# --- a tar cut after it was indexed ----------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_tar_cut_after_indexing_is_one_line(shard, tmp_path, monkeypatch, workers):
    tar_path = shard / "00000.tar"
    real_index = stage.ImageShard.index

    def index_then_cut(self):
        refs = real_index(self)
        os.truncate(tar_path, refs[9].image.offset + 10)  # inside sample 9's image
        return refs

    monkeypatch.setattr(stage.ImageShard, "index", index_then_cut)
    result = runner.invoke(app, ["encode", str(shard), str(tmp_path / "o"), "--model", TINY,
                                 "--device", "cpu", "--workers", str(workers), "--batch-size",
                                 "4", "--no-placeholder-filter", "--quiet"])  # fmt: skip
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert errors == [
        f"error: {tar_path} is not a valid tar (unexpected end of data); rerun the stage that "
        "wrote it"
    ]
    assert not (tmp_path / "o" / "00000.h5").exists()


# --- precision -------------------------------------------------------------------------------


def test_precision_auto_is_the_default_and_recorded_as_what_it_resolved_to(shard, tmp_path):
    out = tmp_path / "o"
    args = ["encode", str(shard), str(out), "--model", TINY, "--device", "cpu", "--workers", "0",
            "--quiet"]  # fmt: skip
    result = runner.invoke(app, [*args, "--precision", "auto"])
    assert result.exit_code == 0, result.output
    with h5py.File(out / "00000.h5", "r") as f:
        assert f.attrs["precision"] == "fp32"
    assert json.loads((out / "plan.json").read_text())["precision"] == "fp32"
    assert json.loads((out / "manifest.json").read_text())["attrs"]["precision"] == "fp32"
    # The default, and fp32 by name: the same output, nothing to do.
    for precision in ([], ["--precision", "fp32"]):
        again = runner.invoke(app, [*args, *precision])
        assert again.exit_code == 0 and "nothing to do" in again.stdout.lower(), again.output
    help_line = next(line for line in runner.invoke(app, ["encode", "--help"]).stdout.splitlines()
                     if "--precision" in line)  # fmt: skip
    assert "auto (GPU: bf16 where native, else fp16; CPU: fp32)" in help_line
    assert "[default: auto]" in help_line


def test_fp16_on_cpu_is_refused_in_one_line(shard, tmp_path):
    result = runner.invoke(app, ["encode", str(shard), str(tmp_path / "o"), "--model", TINY,
                                 "--device", "cpu", "--precision", "fp16"])  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr == "error: fp16 is not supported on CPU; use --precision bf16 or fp32\n"


def test_a_resume_where_auto_means_another_precision_is_refused(shard, tmp_path):
    # Made in bf16 (as auto does on a recent GPU), resumed where auto means fp32 (a CPU).
    out = tmp_path / "o"
    encode(shard, out, precision="bf16")
    with h5py.File(out / "00000.h5", "r") as f:
        assert f.attrs["precision"] == "bf16"
    (out / "00000.stats.json").unlink()  # unfinished: a resume has work to do
    with pytest.raises(UserError) as refused:
        encode(shard, out, precision="auto")
    assert str(refused.value) == (
        f"{out} was made with --precision bf16, and --precision auto means fp32 on this machine "
        "(cpu); pass --precision bf16 to go on with it, or use another directory"
    )
    encode(shard, out, precision="bf16")  # the flag it names resumes it
    assert len(features(out)[0]) == 14
