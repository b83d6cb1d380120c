"""Shard files: the on-disk contract every stage shares, written so that a kill loses nothing.

Per shard ``NNNNN`` an output directory holds ``NNNNN.tar`` (KEY.<ext>, KEY.txt, KEY.json),
``NNNNN.parquet`` (one row per input row, whatever happened to it) and ``NNNNN.stats.json``,
written last: with the data files beside it, it is what marks the shard done. Data files are
fsynced before the marker and the directory after the renames, so a power cut cannot leave a
marker that vouches for an empty file.

While a shard is in progress its samples are appended to ``NNNNN.tar.partial`` and its failures
to ``NNNNN.journal.jsonl`` as they finish. A sample's KEY.json (its full status row) is its last
tar member, so after a SIGKILL :class:`ShardWriter` keeps every sample whose KEY.json is whole,
truncates the torn tail, and the stage fetches only what is missing. Every append is whole
or absent (a short write on a full disk is cut back), and recovery drops anything torn.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import json
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from vlmdata.errors import UserError

SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_DECODE = "failed_to_decode"
FILTERED = "filtered"  # a valid image a rule left out (e.g. --min-side)
PLACEHOLDER = "placeholder"  # encode: an image like a reference placeholder, left out
DUPLICATE = "duplicate"  # a key seen before in the same input shard (the first is kept)
RATIO_BINS = 20  # histogram of min(w, h) / max(w, h) over [0, 1] in image stages' stats
SIMILARITY_BINS = 50  # histogram of the max cosine similarity to a placeholder, over [0, 1]

_BLOCK = 512


PLAN = "plan.json"


class Named(Protocol):
    """A shard of any stage's input: all the runner needs is its output name."""

    name: str


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
    """Write ``data`` to ``path`` through a temporary file, an fsync and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_named_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a file the user named: a new path or a regular file atomically; through
    a symlink, or to a device or FIFO (``/dev/stdout``), in place, as a shell's ``>`` does, so
    the link or node stays (a rename would replace it by a regular file)."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        with open(path, "wb") as f:
            f.write(data)
    else:
        atomic_write_bytes(path, data)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode() + b"\n")


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    """Write ``table`` under a temporary name, fsync it, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", use_dictionary=_string_columns(table.schema))
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _string_columns(schema: pa.Schema) -> list[str]:
    """The parquet column paths of ``schema``'s strings and lists of strings: dictionary pages
    pay off for strings that repeat (statuses, error kinds, categories), not for numbers and
    hashes, where building the dictionary only costs time."""
    paths = []
    for field in schema:
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            paths.append(field.name)
        elif pa.types.is_list(field.type) and pa.types.is_string(field.type.value_type):
            paths.append(f"{field.name}.list.element")
    return paths


def fsync_file(path: Path) -> None:
    """Flush a file written by a library that does not fsync (parquet, HDF5) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` survive a power cut (a rename lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state_json(path: Path, missing_ok: bool = False) -> dict | None:
    """A state file written by a stage (plan, stats): a JSON object, or one clear UserError."""
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UserError(f"{path} is missing; rerun the stage that writes it") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); {_fix(path)}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged (not a JSON object); {_fix(path)}")
    return value


def _fix(path: Path) -> str:
    """What to do about a damaged state file: totals are made again, a plan cannot be."""
    if path.name == PLAN:
        return (
            "the output cannot be resumed safely without it: restore it, or start over in an "
            "empty directory"
        )
    return "delete it and rerun the stage"


def stage_of(out: Path) -> str | None:
    """The stage whose output ``out`` holds, from its ``plan.json`` (None: no plan there)."""
    plan = read_state_json(out / PLAN, missing_ok=True)
    if plan is None:
        return None
    stage = plan.get("stage")
    return stage if isinstance(stage, str) else "unknown"


def duplicate_fields() -> dict:
    """The status columns of a repeated key's row (its key is ``KEY#2``, ...)."""
    message = "the key appears earlier in this input shard; the first sample is kept"
    return {"status": DUPLICATE, "error_kind": "duplicate_key", "error": message}


def shard_name(index: int) -> str:
    """The file stem of shard ``index``: ``00042``."""
    return f"{index:05d}"


class ShardFiles:
    """The paths of shard ``name`` in ``out_dir``.

    ``retry_*`` are where ``--retry-failed`` rebuilds a finished shard beside the old one, so
    readers keep the old shard until the new one is swapped in whole.
    """

    def __init__(self, out_dir: Path, name: str) -> None:
        self.name = name
        self.tar = out_dir / f"{name}.tar"
        self.parquet = out_dir / f"{name}.parquet"
        self.stats = out_dir / f"{name}.stats.json"
        self.partial_tar = out_dir / f"{name}.tar.partial"
        self.journal = out_dir / f"{name}.journal.jsonl"
        self.retry_tar = out_dir / f"{name}.retry.tar.partial"
        self.retry_journal = out_dir / f"{name}.retry.journal.jsonl"

    def data(self, suffix: str) -> Path:
        return self.tar.with_name(f"{self.name}{suffix}")


IMAGE_SHARD_FILES = (".tar", ".parquet")  # the data files of an image stage's shard
# What a done shard of each stage holds beside its stats marker.
STAGE_DATA_FILES = {"download": IMAGE_SHARD_FILES, "preprocess": IMAGE_SHARD_FILES,
                    "encode": (".h5", ".parquet"), "labels": (".parquet",)}  # fmt: skip


def complete_shard_stats(files: ShardFiles, data_files: tuple[str, ...]) -> dict | None:
    """The shard's stats when it is complete: its marker is a whole stats file, its data files
    exist and no retry is pending. None otherwise."""
    if files.retry_journal.exists() or not all(files.data(s).exists() for s in data_files):
        return None
    try:
        stats = read_state_json(files.stats, missing_ok=True)
    except UserError:
        return None  # a damaged marker marks nothing: the shard is redone
    if stats is None or not isinstance(stats.get("rows"), int):
        return None
    # A data file emptied, cut or replaced since the marker was written vouches for nothing.
    sizes = stats.get("sizes")
    if isinstance(sizes, dict) and sizes != data_sizes(files, tuple(sizes)):
        return None
    return stats


def data_sizes(files: ShardFiles, data_files: tuple[str, ...]) -> dict[str, int]:
    """The sizes of a shard's data files, as its stats marker records them."""
    return {suffix: files.data(suffix).stat().st_size for suffix in data_files}


@contextmanager
def exclusive_output(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir`` for one run: two runs writing the same shards would corrupt them."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory; pass a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "a")  # "a": the lock never rewrites the file
    except OSError as e:
        raise UserError(
            f"cannot write to output {out_dir} ({e.strerror or e}); pass a writable directory"
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS if we die
        except BlockingIOError:
            raise UserError(
                f"another vlmdata run is writing {out_dir}; wait for it or use another directory"
            ) from None
        yield


def check_plan(out_dir: Path, plan: dict, shown_as: str | None = None) -> None:
    """Record ``plan`` in ``out_dir/plan.json``, or refuse if a different plan is there
    (naming the output ``shown_as``: the URL of an object-store output staged in out_dir)."""
    path = out_dir / PLAN
    where = shown_as or str(out_dir)
    plan = json.loads(json.dumps(plan))  # compare as stored: tuples become lists
    previous = read_state_json(path, missing_ok=True)
    if previous is None:
        atomic_write_json(path, plan)
        return
    if previous.get("input") != plan.get("input"):
        raise UserError(
            f"{where} was made from a different input: "
            f"{_input_change(previous.get('input'), plan.get('input'))}; "
            "pass the same input, or use another directory for this one"
        )
    # In the plan's own order, which puts the options a user sets before what follows them.
    for option in [*plan, *(k for k in previous if k not in plan)]:
        before, now = previous.get(option), plan.get(option)
        if before == now:
            continue
        if isinstance(before, dict) and isinstance(now, dict):  # name the sub-option
            option = next(f"{option}.{k}" for k in sorted(set(before) | set(now))
                          if before.get(k) != now.get(k))  # fmt: skip
            before, now = before.get(option.split(".")[1]), now.get(option.split(".")[1])
        raise UserError(
            f"{where} was made with {_as_flag(option, before)}, this run has "
            f"{_as_flag(option, now)}; pass the same options again, or use another directory"
        )


def _input_change(before: object, now: object) -> str:
    """What differs between two input fingerprints, in a user's words: the file that changed
    and how, or the input option (``--limit 100``)."""
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return short_text(before)
    old_files, new_files = before.get("files"), now.get("files")
    if isinstance(old_files, list) and isinstance(new_files, list) and old_files != new_files:
        old_names = [f.get("name") for f in old_files if isinstance(f, dict)]
        new_names = [f.get("name") for f in new_files if isinstance(f, dict)]
        if old_names != new_names:
            return f"the files {short_text(', '.join(map(str, old_names)))}"
        old, new = next((a, b) for a, b in zip(old_files, new_files, strict=True) if a != b)
        if set(old) != set(new):  # written by a vlmdata that fingerprinted otherwise
            return "it was made by an older vlmdata, which identified inputs otherwise"
        if {k: v for k, v in old.items() if k != "mtime_ns"} == {
            k: v for k, v in new.items() if k != "mtime_ns"
        }:  # same size and hashes, another time: a copy, or an edit in place
            ns = int(old.get("mtime_ns", 0))
            return (f"{old['name']} was modified since (if only its time changed, as in a copy "
                    f"without -p, restore it: touch -d @{ns // 10**9}.{ns % 10**9:09d} "
                    f"{old['name']})")  # fmt: skip
        return f"{old['name']} has changed since (its size or content)"
    key = next(k for k in [*now, *before] if before.get(k) != now.get(k))
    if key in ("upstream", "plan_sha256"):  # a stage output as the input
        return "its plan.json changed: it was made again since, with other options or input"
    return f"made with {_as_flag(key, before.get(key))}"


# Plan entries whose command-line flag is not their own name.
_FLAGS = {"resize.size": "--resize", "layer_requested": "--layer",
          "placeholder_references": "--reference", "vlmdata_version": "vlmdata version",
          "weights_sha256": "--pretrained weights with sha256",
          "taxonomy_name": "a --taxonomy named"}  # fmt: skip


def _as_flag(option: str, value: object) -> str:
    """A plan entry in the words of the command line: ``--pad-threshold 0.6``, ``no --resize``."""
    flag = _FLAGS.get(option, "--" + option.rsplit(".", 1)[-1].replace("_", "-"))
    if isinstance(value, dict) and "size" in value:  # a whole option group: --resize 448
        value = value["size"]
    if value is None or value is False:
        return f"no {flag}"
    if value is True:
        return flag
    if isinstance(value, list):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {short_text(value)}"


def short_text(value: object) -> str:
    """A value for a one-line message: JSON unless a string, cut to 60 characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


class ShardWriter:
    """Collects the results of one shard and writes its files.

    Opening it recovers what an interrupted run left (``records`` holds those rows by key);
    :meth:`add` appends one finished row; :meth:`finish` writes parquet and stats. A shard
    with a pending ``--retry-failed`` keeps its finished tar as it is (readers go on using it)
    and appends only the new successes to ``NNNNN.retry.tar.partial``; at the end they are
    joined into a new tar that is swapped in whole, and a shard whose retries all failed again
    keeps its tar untouched: a retry pass over a dataset costs what it recovers.
    """

    def __init__(self, files: ShardFiles) -> None:
        self.files = files
        self.records: dict[str, dict] = {}
        self.retrying = files.retry_journal.exists()
        if self.retrying:
            self.partial, self.journal = files.retry_tar, files.retry_journal
            finished, self._finished_end = _scan_tar(files.tar)  # read, never written
            self.records.update(finished)
            if self._recover_tar().keys() & finished.keys():
                # Killed after the swap: the new samples are in the tar already.
                os.truncate(self.partial, 0)
        else:
            self.partial, self.journal = files.partial_tar, files.journal
            if files.tar.exists() and not self.partial.exists():
                os.replace(files.tar, self.partial)  # killed between finish steps: reopen it
            self._recover_tar()
        self._recover_journal()
        # Unbuffered: each row is whole write(2)s, on disk (page cache) before the next row,
        # and a short write (a full disk) is cut back by _append_whole, not left in a buffer.
        self._tar = open(self.partial, "ab", buffering=0)
        self._journal = open(self.journal, "ab", buffering=0)
        self._lock = threading.Lock()  # rows finish on several threads

    def add(self, record: dict, image: bytes | None = None, extension: str | None = None) -> None:
        """Record one finished row; a success also stores its image, caption and metadata."""
        key = record["key"]
        meta = json.dumps(record, ensure_ascii=False, default=_json_text).encode()
        if image is None:
            with self._lock:
                _append_whole(self._journal, meta + b"\n")
                self.records[key] = record
            return
        caption = (record.get("caption") or "").encode()
        # Image first, KEY.json last: a sample counts only once its metadata is whole.
        sample = b"".join([
            _tar_header(f"{key}.{extension}", len(image)), image, _padding(len(image)),
            _tar_header(f"{key}.txt", len(caption)), caption, _padding(len(caption)),
            _tar_header(f"{key}.json", len(meta)), meta, _padding(len(meta)),
        ])  # fmt: skip
        with self._lock:
            _append_whole(self._tar, sample)
            self.records[key] = record

    def finish(
        self, keys: Iterable[str], schema: pa.Schema, duration_s: float,
        inputs: list[dict] | None = None, input_marker: str | None = None,
    ) -> dict:  # fmt: skip
        """Write the final tar, parquet (rows in ``keys`` order) and stats; return the stats.

        ``inputs`` (aligned with ``keys``) are the input rows: their values win over the
        recorded ones, so kept columns keep their own types (KEY.json holds text forms).
        ``input_marker`` records which state of the input shard this one was made from.
        """
        if not self.retrying:
            _append_whole(self._tar, b"\0" * (2 * _BLOCK))  # end-of-archive marker
        os.fsync(self._tar.fileno())
        self._tar.close()
        self._journal.close()
        keys = list(keys)
        rows = [self.records[key] for key in keys]
        if inputs is not None:
            rows = [{**row, **given} for row, given in zip(rows, inputs, strict=True)]
        table = pa.Table.from_pylist(rows, schema=schema)
        # The tar first: at every moment the parquet's successes are in the tar beside it.
        if not self.retrying:
            os.replace(self.partial, self.files.tar)
        elif self.partial.stat().st_size:  # new successes: old samples, new ones, end marker
            _join_tar_atomic(self.files.tar, self._finished_end, self.partial)
        write_parquet_atomic(self.files.parquet, table)
        sizes = data_sizes(self.files, IMAGE_SHARD_FILES)
        stats = shard_stats(self.files.name, rows, duration_s, input_marker, sizes)
        atomic_write_json(self.files.stats, stats)
        if self.retrying:
            self.partial.unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)  # for a retry: the end of the swap
        fsync_dir(self.files.stats.parent)
        return stats

    def close(self) -> None:
        """Release the files without finishing (the shard stays resumable)."""
        self._tar.close()
        self._journal.close()

    def _recover_tar(self) -> dict[str, dict]:
        """Keep every whole sample of the partial tar (KEY.json last) and cut the torn tail;
        return the recovered rows."""
        if not self.partial.exists():
            return {}
        records, valid_end = _scan_tar(self.partial)
        self.records.update(records)
        os.truncate(self.partial, valid_end)
        return records

    def _recover_journal(self) -> None:
        """Keep every whole line that parses; drop a torn tail or a torn line in the middle."""
        if not self.journal.exists():
            return
        kept = []
        for line in self.journal.read_bytes().split(b"\n")[:-1]:  # the last piece is torn
            record = _parse_record(line)
            if record is not None:
                self.records[record["key"]] = record
                kept.append(line + b"\n")
        # Rewrite without the torn pieces so appends start on a line boundary.
        atomic_write_bytes(self.journal, b"".join(kept))


def _scan_tar(path: Path) -> tuple[dict[str, dict], int]:
    """The status rows of the whole samples of a tar written by :class:`ShardWriter` (KEY.json
    is each sample's last member), by key, and the offset where the last whole one ends."""
    records: dict[str, dict] = {}
    valid_end = 0
    if not path.exists():
        return records, valid_end
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                while (member := tar.next()) is not None:
                    data_end = member.offset_data + member.size
                    if data_end > size:
                        break  # cut inside the data
                    if member.name.endswith(".json"):
                        record = _parse_record(tar.extractfile(member).read())
                        if record is None:
                            break
                        records[record["key"]] = record
                        valid_end = data_end + (-member.size % _BLOCK)
        except (tarfile.TarError, EOFError, OSError):
            pass  # a torn header (or the end marker): everything before it is kept
    return records, valid_end


def _join_tar_atomic(tar: Path, end: int, more: Path) -> None:
    """Replace ``tar`` with its first ``end`` bytes, then ``more``, then an end marker."""
    tmp = tar.with_name(f".{tar.name}.tmp")
    with open(tmp, "wb") as out:
        with open(tar, "rb") as old:
            remaining = end
            while remaining and (chunk := old.read(min(remaining, 1 << 24))):
                out.write(chunk)
                remaining -= len(chunk)
        with open(more, "rb") as new:
            shutil.copyfileobj(new, out, 1 << 24)
        out.write(b"\0" * (2 * _BLOCK))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, tar)
    fsync_dir(tar.parent)


def _parse_record(data: bytes) -> dict | None:
    """A status row as written by :meth:`ShardWriter.add`, or None if it is damaged."""
    try:
        record = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        return None
    return record if isinstance(record, dict) and isinstance(record.get("key"), str) else None


def _append_whole(f: BinaryIO, data: bytes) -> None:
    """Append ``data`` completely or not at all: a short write (a full disk) is cut back."""
    start = f.tell()
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view) :]
        f.flush()
    except BaseException:
        f.truncate(start)
        raise


def _json_text(value: object) -> str:
    """Text forms for KEY.json of kept columns JSON has no type for (timestamps, bytes)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def reopen_for_retry(files: ShardFiles, retry: set[str]) -> int:
    """Start rebuilding a finished shard whose rows with an ``error_kind`` in ``retry`` are
    left to do. Returns how many rows will be retried (0: shard untouched).

    The retry journal (the failures kept as they are) is the one file this writes; its
    presence marks the retry pending. The finished shard is not touched until the rebuilt one
    replaces it (:class:`ShardWriter`), so readers and a kill never see it disappear.
    """
    try:
        rows = pq.read_table(files.parquet).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(
            f"{files.parquet} is damaged ({e}); delete the shard's files ({files.name}.*) and "
            "rerun to redo it"
        ) from None
    again = {
        r["key"] for r in rows if r["status"] == FAILED_TO_DOWNLOAD and r["error_kind"] in retry
    }
    if not again:
        return 0
    kept = [r for r in rows if r["status"] != SUCCESS and r["key"] not in again]
    atomic_write_bytes(
        files.retry_journal,
        b"".join(json.dumps(r, ensure_ascii=False, default=_json_text).encode() + b"\n"
                 for r in kept),
    )  # fmt: skip
    return len(again)


def shard_stats(
    name: str, rows: list[dict], duration_s: float, input_marker: str | None = None,
    sizes: dict[str, int] | None = None,
) -> dict:  # fmt: skip
    """Counts by status and error kind for one shard (what ``NNNNN.stats.json`` holds), and
    the state of the input shard it was made from, when that is a vlmdata shard."""
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
    if input_marker is not None:
        stats["input"] = input_marker
    if sizes is not None:
        stats["sizes"] = sizes
    stats["duration_s"] = round(duration_s, 3)
    # To the microsecond: a shard rewritten later (a retry) always gets a different marker.
    stats["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    return stats


def _bin(value: float, bins: int) -> int:
    """The bin of ``value`` among ``bins`` equal bins over [0, 1] (outside values clamp)."""
    return min(max(int(value * bins), 0), bins - 1)


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(time.time())
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)  # PAX: names over 100 bytes, UTF-8


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)
