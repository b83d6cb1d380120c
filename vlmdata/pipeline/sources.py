"""URL sources: find the input files, check their columns and stream their rows as shards.

Inputs are read batch by batch (parquet record batches, csv/jsonl/txt line by line, gzip'd or
not), so memory stays flat however long the URL list is: a CapsFusion parquet file is 7.7 GB and
loading it whole is how img2dataset runs out of memory. Rows are numbered across all input
files in order; row *n* gets the key ``f"{n:09d}"`` and lands in shard ``n // shard_size``.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlmdata.errors import UserError
from vlmdata.pipeline.shards import RECORD_SCHEMA, shard_name

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
_SUFFIX_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".txt": "txt",
}
TXT_COLUMN = "url"  # the single column of a plain URL list
KEY_DIGITS = 9  # 113M CapsFusion rows fit; a longer list just gets longer keys
_BATCH_ROWS = 8192
_FINGERPRINT_BYTES = 1 << 20


def row_key(row_number: int) -> str:
    """The stable key of input row ``row_number`` (shared by every stage's outputs)."""
    return f"{row_number:0{KEY_DIGITS}d}"


def detect_format(path: Path) -> str | None:
    """The input format implied by a file name (``urls.csv.gz`` -> ``csv``), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def list_input_files(spec: str, input_format: str | None = None) -> list[Path]:
    """The files named by ``spec``: one file, every input file of a directory, or a glob."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir()
            if p.is_file() and (detect_format(p) is not None) and not p.name.startswith(".")
        )  # fmt: skip
        if input_format:
            files = [p for p in files if detect_format(p) == input_format]
        if not files:
            raise UserError(
                f"no input files in directory {spec} (expected {', '.join(FORMATS)}, "
                "optionally .gz); point INPUT at a file, a directory or a glob of such files"
            )
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not files:
            raise UserError(f"the glob {spec!r} matches no files; check the pattern and quote it")
        return files
    raise UserError(f"input {spec} does not exist; pass a file, a directory or a glob")


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, start + len(table))`` of the input: shard ``index`` of the output."""

    index: int
    start: int
    table: pa.Table  # columns: url, caption, then the kept input columns

    @property
    def name(self) -> str:
        return shard_name(self.index)

    def rows(self) -> list[dict]:
        """The shard's rows as dicts, each with its stable ``key``."""
        rows = self.table.to_pylist()
        for offset, row in enumerate(rows):
            row["key"] = row_key(self.start + offset)
        return rows


class UrlSource:
    """A URL list on disk: one or more files of one format, read lazily.

    Construction checks that the files exist and hold the requested columns, and raises
    UserError (listing the columns that do exist) otherwise.
    """

    def __init__(
        self,
        spec: str,
        url_col: str = "image_url",
        caption_col: str | None = "capsfusion",
        keep_cols: tuple[str, ...] = (),
        input_format: str | None = None,
        limit: int | None = None,
    ) -> None:
        if input_format is not None and input_format not in FORMATS:
            raise UserError(
                f"unknown --input-format {input_format!r}; use one of {', '.join(FORMATS)}"
            )
        self.files = list_input_files(spec, input_format)
        self.formats = [input_format or detect_format(p) for p in self.files]
        for path, fmt in zip(self.files, self.formats, strict=True):
            if fmt is None:
                raise UserError(
                    f"cannot tell the format of {path} from its name; pass --input-format "
                    f"({', '.join(FORMATS)})"
                )
        if limit is not None and limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        self.limit = limit
        self.keep_cols = tuple(keep_cols)
        for col in self.keep_cols:
            if col in RECORD_SCHEMA.names:
                raise UserError(
                    f"--keep-col {col!r} clashes with a column vlmdata writes; keep another column"
                )
        self.is_text_list = all(fmt == "txt" for fmt in self.formats)
        if any(fmt == "txt" for fmt in self.formats) and not self.is_text_list:
            raise UserError("cannot mix plain-text URL lists with tabular inputs; pass one kind")
        # A plain URL list has one column and no captions, whatever the column flags say.
        self.url_col = TXT_COLUMN if self.is_text_list else url_col
        self.caption_col = None if self.is_text_list else (caption_col or None)
        if self.is_text_list and self.keep_cols:
            raise UserError("a plain-text URL list has no columns to keep; drop --keep-col")
        self.keep_schema = self._check_columns()

    # -- validation -------------------------------------------------------------------------

    def _check_columns(self) -> pa.Schema:
        """Check every file has the needed columns; return the schema of the kept ones."""
        keep_types: dict[str, pa.DataType] = {}
        for path, fmt in zip(self.files, self.formats, strict=True):
            if fmt == "txt":
                continue
            schema = _file_schema(path, fmt)
            for col, flag in [(self.url_col, "--url-col"), (self.caption_col, "--caption-col")]:
                if col and col not in schema.names:
                    hint = " or --caption-col '' for none" if flag == "--caption-col" else ""
                    raise UserError(
                        f"{path.name} has no column {col!r} (columns: "
                        f"{', '.join(schema.names) or 'none'}); pass {flag} NAME{hint}"
                    )
            for col in self.keep_cols:
                if col not in schema.names:
                    raise UserError(
                        f"{path.name} has no column {col!r} to keep (columns: "
                        f"{', '.join(schema.names)}); fix --keep-col"
                    )
                keep_types.setdefault(col, schema.field(col).type)
        return pa.schema([(col, keep_types.get(col, pa.string())) for col in self.keep_cols])

    # -- description ------------------------------------------------------------------------

    def total_rows(self) -> int | None:
        """The number of rows that will be read, when it is known without reading them."""
        if all(fmt == "parquet" for fmt in self.formats):
            total = sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)
            return min(total, self.limit) if self.limit else total
        return self.limit

    def fingerprint(self) -> dict:
        """What identifies this input: file names, sizes and a hash of their first MiB."""
        files = []
        for path, fmt in zip(self.files, self.formats, strict=True):
            with open(path, "rb") as f:
                head = hashlib.sha256(f.read(_FINGERPRINT_BYTES)).hexdigest()
            files.append(
                {"name": path.name, "format": fmt, "size": path.stat().st_size, "head_sha256": head}
            )
        return {
            "files": files,
            "url_col": self.url_col,
            "caption_col": self.caption_col,
            "keep_cols": list(self.keep_cols),
            "limit": self.limit,
        }

    # -- reading ----------------------------------------------------------------------------

    def shards(
        self, shard_size: int, wanted: Callable[[int], bool] = lambda i: True
    ) -> Iterator[Shard]:
        """Stream the input as shards of ``shard_size`` rows (the last one may be shorter).

        Shards for which ``wanted(index)`` is False are still counted (keys never move) but
        are yielded with an empty table, so skipping finished work costs no row conversion.
        """
        schema = self.output_schema()
        pending: list[pa.Table] = []
        pending_rows = 0
        start = 0
        for table in self._batches(schema):
            pending.append(table)
            pending_rows += table.num_rows
            while pending_rows >= shard_size:
                merged = pa.concat_tables(pending)
                index = start // shard_size
                head = merged.slice(0, shard_size) if wanted(index) else merged.slice(0, 0)
                yield Shard(index, start, head.combine_chunks())
                start += shard_size
                rest = merged.slice(shard_size)
                pending, pending_rows = [rest], rest.num_rows
        if pending_rows:
            index = start // shard_size
            merged = pa.concat_tables(pending)
            yield Shard(index, start, merged if wanted(index) else merged.slice(0, 0))

    def output_schema(self) -> pa.Schema:
        """The schema of the tables :meth:`shards` yields."""
        return pa.schema([("url", pa.string()), ("caption", pa.string()), *self.keep_schema])

    def _batches(self, schema: pa.Schema) -> Iterator[pa.Table]:
        remaining = self.limit
        for path, fmt in zip(self.files, self.formats, strict=True):
            for table in self._file_batches(path, fmt, schema):
                if remaining is not None:
                    if table.num_rows >= remaining:
                        yield table.slice(0, remaining)
                        return
                    remaining -= table.num_rows
                yield table

    def _file_batches(self, path: Path, fmt: str, schema: pa.Schema) -> Iterator[pa.Table]:
        if fmt == "parquet":
            columns = [self.url_col] + ([self.caption_col] if self.caption_col else [])
            columns += [c for c in self.keep_cols if c not in columns]
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                yield _normalise(pa.Table.from_batches([batch]), self, schema)
            return
        records = _text_records(path, fmt)
        while True:
            batch = _take(records, _BATCH_ROWS)
            if not batch:
                return
            columns = {
                "url": [_as_text(r.get(self.url_col)) for r in batch],
                "caption": [_as_text(r.get(self.caption_col)) if self.caption_col else None
                            for r in batch],
            }  # fmt: skip
            for col in self.keep_cols:
                columns[col] = [_as_text(r.get(col)) for r in batch]
            yield pa.table(columns, schema=schema)


def _normalise(table: pa.Table, source: UrlSource, schema: pa.Schema) -> pa.Table:
    """Rename a parquet batch to (url, caption, kept columns) with the output types."""
    n = table.num_rows
    url = table.column(source.url_col)
    caption = table.column(source.caption_col) if source.caption_col else pa.nulls(n, pa.string())
    arrays = [_to_string(url), _to_string(caption)]
    arrays += [table.column(col).cast(schema.field(col).type) for col in source.keep_cols]
    return pa.Table.from_arrays(arrays, schema=schema)


def _to_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_string(column.type):
        return column
    if pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
        return column.cast(pa.string())
    # Numbers or bytes in a URL column are bad rows, not a bad file: turn them into text.
    return pa.chunked_array([pa.array([_as_text(v) for v in column.to_pylist()], pa.string())])


def _as_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value)


def _take(records: Iterator[dict], n: int) -> list[dict]:
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == n:
            break
    return batch


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def _text_records(path: Path, fmt: str) -> Iterator[dict]:
    """Records of a csv/tsv/jsonl/txt file (gzip'd or not), one dict per row."""
    with _open_text(path) as f:
        if fmt in ("csv", "tsv"):
            csv.field_size_limit(sys.maxsize)  # captions can be long
            yield from csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
        elif fmt == "jsonl":
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    yield _json_record(line, path, line_number)
        else:
            for line in f:
                if line.strip():  # blank lines in a URL list are layout, not rows
                    yield {TXT_COLUMN: line.strip()}


def _json_record(line: str, path: Path, line_number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path.name} line {line_number} is not valid JSON ({e.msg}); fix or drop it"
        ) from None
    if not isinstance(record, dict):
        raise UserError(
            f"{path.name} line {line_number} is not a JSON object; jsonl needs one object per line"
        )
    return record


def _file_schema(path: Path, fmt: str) -> pa.Schema:
    """Column names (and, for parquet, types) of one input file, read from its head only."""
    if fmt == "parquet":
        try:
            return pq.ParquetFile(path).schema_arrow
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(
                f"{path} is not a readable parquet file ({e}); check the file"
            ) from None
    try:
        first = next(_text_records(path, fmt), None)
    except (OSError, EOFError, csv.Error) as e:
        raise UserError(
            f"cannot read {path} as {fmt} ({e}); check the file or --input-format"
        ) from None
    names = list(first) if first else []
    return pa.schema([(str(name), pa.string()) for name in names])
