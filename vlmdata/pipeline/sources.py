"""URL sources: find the input files, check their columns and stream their rows as shards.

Inputs are read batch by batch (parquet record batches, csv/jsonl/txt line by line, gzip'd or
not), so memory stays flat however long the URL list is: a CapsFusion parquet file is 7.7 GB and
loading it whole is how img2dataset runs out of memory. Rows are numbered across all input
files in order; row *n* gets the key ``f"{n:09d}"`` and lands in shard ``n // shard_size``.

A resume costs what is left to do, not what is done: a parquet file's row counts come from its
metadata, so row groups that hold no row of an unfinished shard are skipped unread, and the
input is identified by sizes, modification times, its first MiB and the parquet footers,
never by hashing it all.

URL lists are scraped, so their files are hostile but real. A file the user must fix (a csv
quote never closed, a cut gzip, UTF-16) stops the read with one UserError line naming the file
and line; odd *values* (invalid UTF-8, half an emoji) are repaired to U+FFFD and read on.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import gzip
import hashlib
import io
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from vlmdata.errors import UserError, one_line
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
_PARQUET_TAIL = 8  # a parquet file ends with its footer's length (4 bytes LE) and b"PAR1"
_SNIFF_BYTES = 4096  # enough of a file's head to tell its encoding
_GZIP_MAGIC = b"\x1f\x8b"
# Guards that keep memory flat on a file that is not what it claims: no caption is 1 MiB or
# 100 lines long, but a csv quote left open makes one field of the rest of the file, and a file
# without line breaks is one line.
_MAX_FIELD_CHARS = 1 << 20
_MAX_RECORD_LINES = 100
_MAX_LINE_CHARS = 16 << 20
_WIDE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"),
)  # fmt: skip
# A lone JSON "\ud83d" (half an emoji, cut by a scraper) makes a str arrow and parquet refuse.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_T = TypeVar("_T")


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
    if not spec.strip():
        raise UserError("INPUT is empty; pass a file, a directory or a glob")
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


@dataclass(frozen=True)
class _Rows:
    """``count`` consecutive input rows: read into ``table``, or passed over unread (None)."""

    count: int
    table: pa.Table | None

    def head(self, count: int) -> _Rows:
        return _Rows(count, None if self.table is None else self.table.slice(0, count))


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
        if not self.is_text_list and not url_col.strip():
            raise UserError("--url-col is empty; pass the name of the column holding the URLs")
        self.url_col = TXT_COLUMN if self.is_text_list else url_col
        self.caption_col = None if self.is_text_list else (caption_col or None)
        if self.is_text_list and self.keep_cols:
            raise UserError("a plain-text URL list has no columns to keep; drop --keep-col")
        self.keep_schema = self._check_columns()

    # -- validation -------------------------------------------------------------------------

    def _check_columns(self) -> pa.Schema:
        """Check every file has the needed columns; return the schema of the kept ones.

        A kept column typed differently across files gets a type all of them cast to
        (int32 and int64 -> int64, int64 and string -> string), else a UserError here.
        """
        kept: dict[str, tuple[pa.DataType, Path]] = {}  # column -> (type so far, a file with it)
        for path, fmt in zip(self.files, self.formats, strict=True):
            if fmt == "txt":
                continue
            schema = _file_schema(path, fmt)
            if schema is None:
                continue  # no header and no record: an empty input, nothing to check
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
                kept[col] = _merge_kept_type(col, kept.get(col), (schema.field(col).type, path))
        return pa.schema([(c, kept[c][0] if c in kept else pa.string()) for c in self.keep_cols])

    # -- description ------------------------------------------------------------------------

    def total_rows(self) -> int | None:
        """The number of rows that will be read, when it is known without reading them (a
        parquet input's metadata; a text input's --limit is only an upper bound: None)."""
        if all(fmt == "parquet" for fmt in self.formats):
            total = sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)
            return min(total, self.limit) if self.limit else total
        return None

    def fingerprint(self) -> dict:
        """What identifies this input, read without reading the rows: per file its name,
        size, modification time and a hash of its first MiB, and for parquet a hash of its
        footer (the row groups' sizes, offsets and statistics). The modification time is what
        tells a file edited in place past its first MiB apart: its footer can stay the same."""
        files = []
        for path, fmt in zip(self.files, self.formats, strict=True):
            with open(path, "rb") as f:
                head = hashlib.sha256(f.read(_FINGERPRINT_BYTES)).hexdigest()
                status = os.fstat(f.fileno())
            entry = {"name": path.name, "format": fmt, "size": status.st_size,
                     "mtime_ns": status.st_mtime_ns, "head_sha256": head}  # fmt: skip
            if fmt == "parquet":
                entry["footer_sha256"] = _parquet_footer_sha256(path)
            files.append(entry)
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
        are yielded with an empty table. Their rows are not converted, and a parquet row group
        that holds rows of unwanted shards only is not even read (its row count comes from the
        file's metadata); a group that straddles a wanted shard is read once and sliced.
        """
        schema = self.output_schema()
        wanted = functools.cache(wanted)  # asked per row group and per shard: once each

        def needed(start: int, stop: int) -> bool:
            """Whether rows ``[start, stop)`` of the input hold a row of a wanted shard."""
            stop = stop if self.limit is None else min(stop, self.limit)
            last = math.ceil(stop / shard_size)
            return any(wanted(i) for i in range(start // shard_size, last))

        index, filled, parts = 0, 0, []  # the shard being cut, its rows so far, their tables
        for rows in self._rows(schema, needed):
            offset = 0
            while offset < rows.count:
                take = min(rows.count - offset, shard_size - filled)
                if wanted(index):
                    parts.append(rows.table.slice(offset, take))
                offset += take
                filled += take
                if filled == shard_size:
                    yield _cut(index, shard_size, parts, schema)
                    index, filled, parts = index + 1, 0, []
        if filled:
            yield _cut(index, shard_size, parts, schema)

    def output_schema(self) -> pa.Schema:
        """The schema of the tables :meth:`shards` yields."""
        return pa.schema([("url", pa.string()), ("caption", pa.string()), *self.keep_schema])

    def _rows(self, schema: pa.Schema, needed: Callable[[int, int], bool]) -> Iterator[_Rows]:
        """Every input row in order, up to --limit; parquet row groups holding no ``needed``
        row are passed over unread."""
        start = 0
        for path, fmt in zip(self.files, self.formats, strict=True):
            if fmt == "parquet":
                runs = self._parquet_rows(path, schema, start, needed)
            else:
                runs = (_Rows(t.num_rows, t) for t in self._text_batches(path, fmt, schema))
            for rows in runs:
                if self.limit is not None and start + rows.count >= self.limit:
                    yield rows.head(self.limit - start)
                    return
                yield rows
                start += rows.count

    def _parquet_rows(
        self, path: Path, schema: pa.Schema, start: int, needed: Callable[[int, int], bool]
    ) -> Iterator[_Rows]:
        """The rows of a parquet file whose first row is input row ``start``."""
        columns = [self.url_col] + ([self.caption_col] if self.caption_col else [])
        columns += [c for c in self.keep_cols if c not in columns]
        for count, batch in _parquet_batches(path, columns, start, needed):
            if batch is None:
                yield _Rows(count, None)
            else:
                yield _Rows(count, _normalise(pa.Table.from_batches([batch]), self, schema, path))

    def _text_batches(self, path: Path, fmt: str, schema: pa.Schema) -> Iterator[pa.Table]:
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


def _cut(index: int, shard_size: int, parts: list[pa.Table], schema: pa.Schema) -> Shard:
    """Shard ``index`` from the tables of its rows; an unwanted shard has none: empty."""
    table = pa.concat_tables(parts).combine_chunks() if parts else schema.empty_table()
    return Shard(index, index * shard_size, table)


# -- parquet ----------------------------------------------------------------------------------


def _parquet_batches(
    path: Path, columns: list[str], start: int, needed: Callable[[int, int], bool]
) -> Iterator[tuple[int, pa.RecordBatch | None]]:
    """``(rows, batch)`` pairs of ``columns`` in order, the file's first row being input row
    ``start``. A row group whose input rows ``[a, b)`` are not ``needed(a, b)`` comes as one
    ``(rows, None)``, unread. A damaged file is a UserError naming the row reached."""
    rows = 0
    try:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            if not needed(start + rows, start + rows + count):
                yield count, None
                rows += count
                continue
            for batch in parquet.iter_batches(_BATCH_ROWS, row_groups=[group], columns=columns):
                yield batch.num_rows, batch
                rows += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise UserError(
            f"cannot read {path.name} after row {rows} ({one_line(e)}); the file is damaged: "
            "re-download or re-write it"
        ) from None


def _parquet_footer_sha256(path: Path) -> str:
    """A hash of a parquet file's footer: its schema and every row group's sizes, offsets and
    statistics (what a rewrite of the same size and head most often changes)."""
    with open(path, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(max(0, size - _PARQUET_TAIL))
        tail = f.read()
        length = int.from_bytes(tail[:4], "little") + _PARQUET_TAIL
        f.seek(max(0, size - length))
        return hashlib.sha256(f.read()).hexdigest()


def _normalise(table: pa.Table, source: UrlSource, schema: pa.Schema, path: Path) -> pa.Table:
    """Rename a parquet batch to (url, caption, kept columns) with the output types."""
    n = table.num_rows
    url = table.column(source.url_col)
    caption = table.column(source.caption_col) if source.caption_col else pa.nulls(n, pa.string())
    arrays = [_to_string(url), _to_string(caption)]
    arrays += [_cast_kept(table.column(col), schema.field(col).type, col, path)
               for col in source.keep_cols]  # fmt: skip
    return pa.Table.from_arrays(arrays, schema=schema)


def _to_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_string(column.type):
        return _valid_utf8(column)
    if pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
        return _valid_utf8(column).cast(pa.string())
    # Numbers or bytes in a URL column are bad rows, not a bad file: turn them into text.
    return pa.chunked_array([pa.array([_as_text(v) for v in column.to_pylist()], pa.string())])


def _cast_kept(column: pa.ChunkedArray, to: pa.DataType, col: str, path: Path) -> pa.ChunkedArray:
    """A kept column in the type it has across all input files."""
    try:
        return _valid_utf8(column).cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        # The common type was chosen upfront; only a value it cannot hold lands here
        # (an int64 above 2**53 where another file has float64).
        raise UserError(
            f"{path.name}: column {col!r} does not fit {to}, its type across the input files "
            f"({one_line(e)}); keep another column or give it one type in every file"
        ) from None


def _valid_utf8(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """``column`` with invalid UTF-8 replaced by U+FFFD, as the text formats read it.

    Parquet writers do not all check string columns, and arrow only notices when a value is
    converted (as a row, or when the shard's parquet is written): repair it here, once.
    """
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column
    try:
        column.validate(full=True)  # fast (SIMD); the Python repair below runs on bad batches
        return column
    except pa.ArrowInvalid:
        raw = column.cast(pa.large_binary()).to_pylist()  # no UTF-8 check on the way to bytes
        fixed = [None if v is None else v.decode("utf-8", "replace") for v in raw]
        return pa.chunked_array([pa.array(fixed, column.type)])


def _merge_kept_type(
    col: str, seen: tuple[pa.DataType, Path] | None, new: tuple[pa.DataType, Path]
) -> tuple[pa.DataType, Path]:
    """The type of kept column ``col`` so far, merged with its type ``new`` in another file."""
    if seen is None:
        return new
    common = _common_type(seen[0], new[0])
    if common is None:
        raise UserError(
            f"--keep-col {col!r} is {seen[0]} in {seen[1].name} but {new[0]} in {new[1].name}, "
            "and no type holds both; keep another column or give it one type in every file"
        )
    return common, seen[1]


def _common_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """A type both ``a`` and ``b`` cast to (int32, int64 -> int64), or None if there is none."""
    try:
        schemas = [pa.schema([("c", a)]), pa.schema([("c", b)])]
        return pa.unify_schemas(schemas, promote_options="permissive").field("c").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    # Numbers, times or booleans in one file and text in another (a csv): keep the text forms.
    return pa.string() if _has_text_form(a) and _has_text_form(b) else None


def _has_text_form(kind: pa.DataType) -> bool:
    """Whether values of ``kind`` read the same as text (numbers, times, text; not bytes)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (
        pa.types.is_primitive(kind) or pa.types.is_decimal(kind)
        or pa.types.is_string(kind) or pa.types.is_large_string(kind)
    )  # fmt: skip


# -- text formats -----------------------------------------------------------------------------


def _as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    # isascii() is O(1) in CPython: the regex only scans the rare non-ASCII value.
    return text if text.isascii() else LONE_SURROGATE.sub("\ufffd", text)


def _take(records: Iterator[dict], n: int) -> list[dict]:
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == n:
            break
    return batch


def _first(items: Generator[_T, None, None]) -> _T | None:
    """The first item of ``items`` (None if none), closing it (and so its file) at once."""
    with contextlib.closing(items):
        return next(items, None)


def _open_bytes(path: Path) -> io.BufferedIOBase:
    """The bytes of ``path``, gunzipped when they are gzip (told by the bytes, not the name)."""
    f = open(path, "rb")
    if f.peek(2)[:2] != _GZIP_MAGIC:
        return f
    f.close()
    return gzip.open(path, "rb")


def _open_text(path: Path) -> io.TextIOWrapper:
    """``path`` as UTF-8 text: a BOM dropped, undecodable bytes read as U+FFFD."""
    with _open_bytes(path) as f:
        _refuse_wide_encoding(path, f.read(_SNIFF_BYTES))
    # newline="": the csv module sees "\r\n" inside quoted fields as they are.
    return io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", errors="replace", newline="")


def _refuse_wide_encoding(path: Path, head: bytes) -> None:
    """A UserError for UTF-16/32 text, which read as UTF-8 is NUL-ridden nonsense."""
    for bom, encoding in _WIDE_BOMS:
        if head.startswith(bom):
            raise UserError(
                f"{path.name} is {encoding}; convert it to UTF-8 "
                f"(e.g. iconv -f {encoding} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix})"
            )
    if head and head.count(0) * 4 >= len(head):  # ASCII as UTF-16 is half NUL bytes
        raise UserError(
            f"{path.name} looks like UTF-16 (a quarter of its first bytes are NUL) or is not "
            "text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8) or check --input-format"
        )


class _Lines:
    """The lines of a text file, counted (for messages), each at most _MAX_LINE_CHARS long.

    ``exhausted`` turns True when the end is reached: a csv row that comes back after that
    was still inside quotes at the end of the file.
    """

    def __init__(self, f: io.TextIOBase, path: Path) -> None:
        self.f = f
        self.path = path
        self.count = 0
        self.exhausted = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.f.readline(_MAX_LINE_CHARS + 1)
        if not line:
            self.exhausted = True
            raise StopIteration
        self.count += 1
        if len(line) > _MAX_LINE_CHARS:
            raise UserError(
                f"{self.path.name} line {self.count} is longer than {_MAX_LINE_CHARS >> 20} MiB: "
                "not a URL list (a binary file? no line breaks?); check the file or --input-format"
            )
        return line


def _read_text(
    path: Path, read: Callable[[_Lines, Path], Iterator[_T]]
) -> Generator[_T, None, None]:
    """What ``read`` makes of the lines of ``path``; a damaged file is a UserError."""
    lines: _Lines | None = None
    try:
        with _open_text(path) as f:
            lines = _Lines(f, path)
            yield from read(lines, path)
    except (OSError, EOFError, zlib.error) as e:  # gzip: BadGzipFile is an OSError
        where = f" after line {lines.count}" if lines and lines.count else ""
        raise UserError(
            f"cannot read {path.name}{where} ({one_line(e)}); the file is damaged or cut short: "
            "re-download or re-compress it"
        ) from None


def _text_records(path: Path, fmt: str) -> Generator[dict, None, None]:
    """Records of a csv/tsv/jsonl/txt file (gzip'd or not), one dict per row."""
    if fmt in ("csv", "tsv"):
        return _read_text(path, partial(_csv_records, fmt=fmt))
    return _read_text(path, _jsonl_records if fmt == "jsonl" else _txt_records)


def _txt_records(lines: _Lines, path: Path) -> Iterator[dict]:
    for line in lines:
        if line.strip():  # blank lines in a URL list are layout, not rows
            yield {TXT_COLUMN: line.strip()}


def _jsonl_records(lines: _Lines, path: Path) -> Iterator[dict]:
    for line in lines:
        if line.strip():
            yield _json_record(line, path, lines.count)


def _csv_records(lines: _Lines, path: Path, fmt: str) -> Iterator[dict]:
    rows = _csv_rows(lines, path, fmt)
    header = next(rows, None)
    if header is None:
        return
    for row in rows:
        yield dict(zip(header, row, strict=False))  # a short row lacks its last columns


def _csv_rows(lines: _Lines, path: Path, fmt: str) -> Iterator[list[str]]:
    """The non-blank rows of a csv (RFC 4180 quotes) or tsv (no quoting: quotes are data).

    A csv quote that is never closed would silently make one field of the rest of the file
    (2,000 rows read as 11): it is a UserError naming the line where the field started.
    """
    if fmt == "tsv":  # CC3M and most URL dumps: a tab-separated line is a row, quotes and all
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(lines)
    while True:
        start = lines.count + 1
        try:
            row = _next_row(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(_csv_problem(path, fmt, start, str(e))) from None
        if lines.exhausted:
            problem = "a quoted field opened here is never closed"
            raise UserError(_csv_problem(path, fmt, start, problem))
        if lines.count - start >= _MAX_RECORD_LINES:
            raise UserError(_csv_problem(
                path, fmt, start,
                f"a quoted field runs over {_MAX_RECORD_LINES} lines (to line {lines.count})",
            ))  # fmt: skip
        if row:  # a blank line is no row
            yield row


def _next_row(reader: Iterator[list[str]]) -> list[str]:
    """The next row under our field limit. The csv module's limit is process-wide: it is set
    for this read only and put back, so other csv users in the process are not affected."""
    previous = csv.field_size_limit(_MAX_FIELD_CHARS)
    try:
        return next(reader)
    finally:
        csv.field_size_limit(previous)


def _csv_problem(path: Path, fmt: str, line: int, problem: str) -> str:
    """The one-line message for a csv/tsv row that cannot be read as one."""
    if "field limit" in problem:  # csv.Error: field larger than field limit
        problem = f"a field is longer than {_MAX_FIELD_CHARS >> 20} MiB"
    if fmt == "tsv":
        return f"{path.name} line {line}: {problem}; check the file or --input-format"
    if "never closed" not in problem:
        problem += ", so a quote is probably left open"
    return (
        f'{path.name} line {line}: {problem}; close the quote (write "" for a quote inside a '
        "field) or, if the file is tab-separated without quoting, use --input-format tsv"
    )


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


def _file_schema(path: Path, fmt: str) -> pa.Schema | None:
    """Column names (and, for parquet, types) of one input file, read from its head only.

    None for a text file with neither header nor record: an empty input, not a mistake.
    """
    if fmt == "parquet":
        try:
            return pq.ParquetFile(path).schema_arrow
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(
                f"{path} is not a readable parquet file ({e}); check the file"
            ) from None
    if fmt in ("csv", "tsv"):  # the header line: a header-only file still names its columns
        names = _first(_read_text(path, partial(_csv_rows, fmt=fmt)))
    else:
        first = _first(_text_records(path, fmt))
        names = None if first is None else list(first)
    if names is None:
        return None
    return pa.schema([(str(name), pa.string()) for name in dict.fromkeys(names)])
