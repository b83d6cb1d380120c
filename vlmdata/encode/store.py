"""HDF5 feature shards (DESIGN.md, "HDF5 feature shard"): written incrementally, atomically.

``NNNNN.h5`` holds ``tokens [N, T, C]`` and ``embeds [N, E]`` as float16 plus ``keys`` and
``captions`` (UTF-8), and root attributes describing how the features were made. Tokens are
chunked one row per chunk, because the trainer reads rows in random order. Rows are appended
batch by batch from a writer thread (memory is bounded by batches, not shards, and the model
never waits on the disk); the file lives under a temporary name until :meth:`close`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from pathlib import Path

import h5py
import numpy as np

from vlmdata.pipeline.shards import fsync_dir, fsync_file

_STRING = h5py.string_dtype(encoding="utf-8")
_EMBED_CHUNK_ROWS = 256
_QUEUED_BATCHES = 4


class FeatureShardWriter:
    """Appends batches of features to ``path`` (a temporary file until closed)."""

    def __init__(self, path: Path, tokens: int, width: int, embed_dim: int, attrs: dict) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.rows = 0  # rows handed over so far: the next row's index
        # No chunk cache: every row is written through at once (its chunk is whole), and a
        # full disk then fails that write cleanly. With a cache, HDF5 crashes the process when
        # it cannot flush on close.
        self._file = h5py.File(self.tmp, "w", rdcc_nbytes=0)
        self._file.attrs.update({k: v for k, v in attrs.items() if v is not None})
        f2 = np.float16
        self._tokens = self._file.create_dataset(
            "tokens",
            (0, tokens, width),
            f2,
            maxshape=(None, tokens, width),
            chunks=(1, tokens, width),
        )
        self._embeds = self._file.create_dataset(
            "embeds",
            (0, embed_dim),
            f2,
            maxshape=(None, embed_dim),
            chunks=(_EMBED_CHUNK_ROWS, embed_dim),
        )
        self._keys = self._file.create_dataset(
            "keys", (0,), _STRING, maxshape=(None,), chunks=(4096,)
        )
        self._captions = self._file.create_dataset(
            "captions", (0,), _STRING, maxshape=(None,), chunks=(1024,)
        )
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUED_BATCHES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def append(
        self, keys: list[str], captions: list[str], tokens: np.ndarray, embeds: np.ndarray
    ) -> int:
        """Queue one batch; return the row index of its first row."""
        if self._error is not None:
            raise self._error
        first = self.rows
        self.rows += len(keys)
        self._queue.put((keys, captions, tokens, embeds))
        return first

    def close(self) -> int:
        """Flush, close and move the file into place; return its row count."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        try:
            self._file.close()  # flushes the metadata: the last write to the disk
        except RuntimeError as e:
            raise _system_error(e, self.tmp) from e
        fsync_file(self.tmp)  # on disk before the shard's stats can vouch for it
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.rows

    def abort(self) -> None:
        """Stop and delete the temporary file (an interrupted shard is redone whole)."""
        self._queue.put(None)
        self._thread.join()
        # After a failed write (a full disk) HDF5 cannot flush the file on close; it is
        # deleted anyway, and the write error is what the caller reports.
        with contextlib.suppress(Exception):
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def _drain(self) -> None:
        written = 0
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue
            keys, captions, tokens, embeds = batch
            end = written + len(keys)
            try:
                for dataset in (self._tokens, self._embeds, self._keys, self._captions):
                    dataset.resize(end, axis=0)
                self._tokens[written:end] = tokens
                self._embeds[written:end] = embeds
                self._keys[written:end] = keys
                self._captions[written:end] = captions
            except BaseException as e:  # surfaced to the caller on the next append or close
                self._error = e
            written = end


def _system_error(error: RuntimeError, path: Path) -> Exception:
    """HDF5 reports a failed system call as text ("errno = 28"): give it back its OSError, so
    a full disk reads as one, not as an internal error."""
    found = re.search(r"errno = (\d+)", str(error))
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))
