"""Shard files: the on-disk contract every stage shares, written so that a kill loses nothing.

Per shard ``NNNNN`` an output directory holds ``NNNNN.tar`` (KEY.<ext>, KEY.txt, KEY.json),
``NNNNN.parquet`` (one row per input row, whatever happened to it) and ``NNNNN.stats.json``,
written last: its presence is what marks the shard done.

While a shard is in progress its samples are appended to ``NNNNN.tar.partial`` and its failures
to ``NNNNN.journal.jsonl`` as they finish. A sample's KEY.json (its full status row) is its last
tar member, so after a SIGKILL :class:`ShardWriter` keeps every sample whose KEY.json is whole,
truncates the torn tail, and the stage fetches only what is missing.
"""

from __future__ import annotations

import fcntl
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from vlmdata.errors import UserError

SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_DECODE = "failed_to_decode"
FILTERED = "filtered"  # a valid image a rule left out (e.g. --min-side)
RATIO_BINS = 20  # histogram of min(w, h) / max(w, h) over [0, 1] in image stages' stats
SIMILARITY_BINS = 50  # histogram of the max cosine similarity to a placeholder, over [0, 1]

_BLOCK = 512


class _Named(Protocol):
    name: str


class SkipCounter(Protocol):
    def skip(self, rows: int) -> None: ...


S = TypeVar("S", bound=_Named)

# Columns of every shard parquet, before the kept input columns.
RECORD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("http_status", pa.int32()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("format", pa.string()),
        ("content_type", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("ratio", pa.float32()),
        ("action", pa.string()),
        ("final_url", pa.string()),
        ("attempts", pa.int32()),
        ("elapsed_s", pa.float32()),
    ]
)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode() + b"\n")


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shard_name(index: int) -> str:
    """The file stem of shard ``index``: ``00042``."""
    return f"{index:05d}"


class ShardFiles:
    """The paths of shard ``name`` in ``out_dir``."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.name = name
        self.tar = out_dir / f"{name}.tar"
        self.parquet = out_dir / f"{name}.parquet"
        self.stats = out_dir / f"{name}.stats.json"
        self.partial_tar = out_dir / f"{name}.tar.partial"
        self.journal = out_dir / f"{name}.journal.jsonl"

    @property
    def done(self) -> bool:
        return self.stats.exists()


@contextmanager
def exclusive_output(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir`` for one run: two runs writing the same shards would corrupt them."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory; pass a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a") as lock:  # "a": the lock never rewrites the file
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS if we die
        except BlockingIOError:
            raise UserError(
                f"another vlmdata run is writing {out_dir}; wait for it or use another directory"
            ) from None
        yield


def unfinished(shards: Iterable[S], out_dir: Path, progress: SkipCounter) -> Iterator[S]:
    """The shards not yet finished in ``out_dir``; finished ones are counted as skipped."""
    for shard in shards:
        files = ShardFiles(out_dir, shard.name)
        if files.done:
            progress.skip(read_json(files.stats)["rows"])
        else:
            yield shard


def check_plan(out_dir: Path, plan: dict) -> None:
    """Record ``plan`` in ``out_dir/plan.json``, or refuse if a different plan is there."""
    path = out_dir / "plan.json"
    plan = json.loads(json.dumps(plan))  # compare as stored: tuples become lists
    if path.exists():
        previous, current = _flatten(read_json(path)), _flatten(plan)
        for field in sorted(set(previous) | set(current)):
            if previous.get(field) != current.get(field):
                raise UserError(
                    f"{out_dir} holds a run with a different {field} "
                    f"({_short(previous.get(field))} there, {_short(current.get(field))} now); "
                    "rerun with the same input and options, or use a new output directory"
                )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plan)


def _flatten(plan: dict, prefix: str = "") -> dict:
    """``{"square": {"size": 448}}`` -> ``{"square.size": 448}``: errors name the leaf."""
    flat = {}
    for key, value in plan.items():
        if isinstance(value, dict) and key != "input":  # the input is compared as a whole
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


class ShardWriter:
    """Collects the results of one shard and writes its files.

    Opening it recovers what an interrupted run left (``records`` holds those rows by key);
    :meth:`add` appends one finished row; :meth:`finish` writes parquet and stats.
    """

    def __init__(self, files: ShardFiles) -> None:
        self.files = files
        self.records: dict[str, dict] = {}
        if files.tar.exists() and not files.partial_tar.exists():
            os.replace(files.tar, files.partial_tar)  # killed between finish steps: reopen it
        self._recover_tar()
        self._recover_journal()
        self._tar = open(files.partial_tar, "ab")
        # Unbuffered: each failure is one write(2), on disk (page cache) before the next row.
        self._journal = open(files.journal, "ab", buffering=0)
        self._lock = threading.Lock()  # rows finish on several threads

    def add(self, record: dict, image: bytes | None = None, extension: str | None = None) -> None:
        """Record one finished row; a success also stores its image, caption and metadata."""
        key = record["key"]
        meta = json.dumps(record, ensure_ascii=False)
        if image is not None:
            caption = (record.get("caption") or "").encode()
            # Image first, KEY.json last: a sample counts only once its metadata is whole.
            headers = [
                _tar_header(f"{key}.{extension}", len(image)),
                _tar_header(f"{key}.txt", len(caption)),
                _tar_header(f"{key}.json", len(meta.encode())),
            ]
            with self._lock:
                self._tar.write(headers[0])
                self._tar.write(image)
                self._tar.write(
                    _padding(len(image)) + headers[1] + caption + _padding(len(caption))
                )
                self._tar.write(headers[2] + meta.encode() + _padding(len(meta.encode())))
                self._tar.flush()
                self.records[key] = record
        else:
            with self._lock:
                self._journal.write((meta + "\n").encode())
                self.records[key] = record

    def finish(self, keys: Iterable[str], schema: pa.Schema, duration_s: float) -> dict:
        """Write the final tar, parquet (rows in ``keys`` order) and stats; return the stats."""
        self._tar.write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
        self._tar.flush()
        os.fsync(self._tar.fileno())
        self._tar.close()
        self._journal.close()
        rows = [self.records[key] for key in keys]
        os.replace(self.files.partial_tar, self.files.tar)
        write_parquet_atomic(self.files.parquet, pa.Table.from_pylist(rows, schema=schema))
        stats = shard_stats(self.files.name, rows, duration_s)
        atomic_write_json(self.files.stats, stats)
        self.files.journal.unlink(missing_ok=True)
        return stats

    def close(self) -> None:
        """Release the files without finishing (the shard stays resumable)."""
        self._tar.close()
        self._journal.close()

    def _recover_tar(self) -> None:
        path = self.files.partial_tar
        if not path.exists():
            return
        size = path.stat().st_size
        valid_end = 0
        with open(path, "r+b") as f:
            offset = 0
            while offset + _BLOCK <= size:
                f.seek(offset)
                header = f.read(_BLOCK)
                try:
                    info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
                except tarfile.TarError:
                    break  # zero block (end marker) or a torn header
                data_end = offset + _BLOCK + info.size
                if data_end > size:
                    break
                if info.name.endswith(".json"):
                    try:
                        record = json.loads(f.read(info.size))
                    except ValueError:
                        break
                    self.records[record["key"]] = record
                    valid_end = data_end + (-info.size % _BLOCK)
                offset = data_end + (-info.size % _BLOCK)
            f.truncate(valid_end)

    def _recover_journal(self) -> None:
        if not self.files.journal.exists():
            return
        with open(self.files.journal, encoding="utf-8") as f:
            lines = f.read().split("\n")
        complete = lines[:-1]  # the last piece is empty, or a line torn by the kill
        for line in complete:
            record = json.loads(line)
            self.records[record["key"]] = record
        # Rewrite without the torn tail so appends start on a line boundary.
        atomic_write_bytes(self.files.journal, "".join(line + "\n" for line in complete).encode())


def reopen_for_retry(files: ShardFiles, retry: set[str]) -> int:
    """Turn a finished shard back into an in-progress one whose rows with an ``error_kind``
    in ``retry`` are left to do. Returns how many rows will be retried (0: shard untouched).

    Crash-safe at every step: the journal of kept failures is in place before the stats
    file goes, and a shard without stats is resumed from its tar and journal.
    """
    table = pq.read_table(files.parquet)
    rows = table.to_pylist()
    again = [r for r in rows if r["status"] == FAILED_TO_DOWNLOAD and r["error_kind"] in retry]
    if not again:
        return 0
    again_keys = {r["key"] for r in again}
    kept = [r for r in rows if r["status"] != SUCCESS and r["key"] not in again_keys]
    atomic_write_bytes(
        files.journal, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode()
    )
    files.stats.unlink()
    return len(again)


def shard_stats(name: str, rows: list[dict], duration_s: float) -> dict:
    """Counts by status and error kind for one shard (what ``NNNNN.stats.json`` holds)."""
    status: dict[str, int] = {}
    errors: dict[str, int] = {}
    for row in rows:
        status[row["status"]] = status.get(row["status"], 0) + 1
        if row["error_kind"]:
            errors[row["error_kind"]] = errors.get(row["error_kind"], 0) + 1
    stats = {"shard": name, "rows": len(rows), "status": status, "error_kind": errors}
    if rows and "bytes" in rows[0]:  # image stages
        actions: dict[str, int] = {}
        ratios = [0] * RATIO_BINS
        for row in rows:
            if row["status"] == SUCCESS and row.get("ratio") is not None:
                ratios[_bin(row["ratio"], RATIO_BINS)] += 1
            if row.get("action"):
                actions[row["action"]] = actions.get(row["action"], 0) + 1
        stats["bytes"] = sum(row["bytes"] or 0 for row in rows if row["status"] == SUCCESS)
        stats["action"] = actions
        stats["ratio_histogram"] = ratios
    if rows and "placeholder_similarity" in rows[0]:  # encode: where the placeholders sit
        similarity = [0] * SIMILARITY_BINS
        for row in rows:
            if row["placeholder_similarity"] is not None:
                similarity[_bin(row["placeholder_similarity"], SIMILARITY_BINS)] += 1
        stats["placeholder_similarity_histogram"] = similarity
    stats["duration_s"] = round(duration_s, 3)
    stats["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return stats


def _bin(value: float, bins: int) -> int:
    """The bin of ``value`` among ``bins`` equal bins over [0, 1] (outside values clamp)."""
    return min(max(int(value * bins), 0), bins - 1)


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(time.time())
    info.mode = 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)
