"""Reading what the stages wrote, for the report: which output a directory holds, its finished
shards, the options it was made with, and polars queries over its shard parquets.

The parquets are scanned lazily and every query the report runs is an aggregate, a top-N or a
small sample, collected by the streaming engine: memory follows the answers, not the rows.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from vlmdata.configfile import RECORD
from vlmdata.errors import UserError, one_line
from vlmdata.pipeline.runner import ROOT_STATS
from vlmdata.pipeline.shards import PLAN, STAGE_DATA_FILES, read_state_json, stage_of
from vlmdata.pipeline.stats import merge_stats
from vlmdata.pipeline.upstream import finished_shards, read_upstream
from vlmdata.train import RUN_CONFIG

STAGES = ("download", "preprocess", "encode", "labels")  # in pipeline order
TRAIN = "train"
SHARD = "shard"  # the column :func:`scan` adds: the shard a row comes from
_FILE = "file"


def command_of(stage: str) -> str:
    """The command that makes a stage's output, as a user types it."""
    return "vlmdata labels classify" if stage == "labels" else f"vlmdata {stage}"


def kind_of(path: Path) -> str | None:
    """What ``path`` holds: a stage's name, ``train`` for a training run, ``unknown`` for a
    plan of another stage, None for anything else."""
    if (path / PLAN).is_file():
        stage = stage_of(path)
        return stage if stage in STAGES else "unknown"
    if (path / RUN_CONFIG).is_file():
        return TRAIN
    return None


@dataclass(frozen=True)
class StageOutput:
    """A stage output directory as far as it goes."""

    path: Path
    stage: str
    plan: dict
    done: dict[str, dict]  # the stats marker of each finished shard, by name in order
    complete: bool  # the run finished and every shard it names is whole
    unfinished: tuple[str, ...]  # shards begun (or damaged) and not finished: left out

    @property
    def parquets(self) -> list[Path]:
        return [self.path / f"{name}.parquet" for name in self.done]

    def totals(self) -> dict:
        """The finished shards' stats added up (counts by status, error kind, ...): those the
        run wrote when complete (adding thousands of shards' label counts takes a while)."""
        if self.complete:
            return read_state_json(self.path / ROOT_STATS)
        return merge_stats(list(self.done.values()))


def open_stage(path: Path, stage: str) -> StageOutput:
    """The stage output at ``path`` (its plan names ``stage``)."""
    done, complete = finished_shards(path, STAGE_DATA_FILES[stage])
    begun = {p.name.split(".")[0] for p in path.glob("[0-9]*.*")
             if p.name.endswith((".stats.json", ".partial", ".journal.jsonl"))}  # fmt: skip
    return StageOutput(
        path=path,
        stage=stage,
        plan=read_state_json(path / PLAN),
        done=done,
        complete=complete,
        unfinished=tuple(sorted(begun - done.keys())),
    )


def recorded_options(path: Path) -> tuple[str | None, dict]:
    """The text of ``path/vlmdata.toml`` (None when there is none) and its values ({} when
    it does not parse: it is only shown)."""
    try:
        text = (path / RECORD).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None, {}
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return text, {}


def find_upstream(path: Path, fingerprint: object) -> Path | None:
    """The stage output the output at ``path`` was made from, by the input fingerprint its
    plan records (``{"upstream": stage, "plan_sha256": ...}``): the input its recorded options
    name, else a directory beside it. None when it is not a vlmdata output or is not found."""
    if not (isinstance(fingerprint, dict) and fingerprint.get("upstream") in STAGES):
        return None
    stage = fingerprint["upstream"]
    _, options = recorded_options(path)
    named = [
        Path(options[k]) for k in ("input-dir", "features-dir") if isinstance(options.get(k), str)
    ]
    try:
        siblings = sorted(p for p in path.parent.iterdir() if p.is_dir() and p != path)
    except OSError:
        siblings = []  # a parent that cannot be listed: only the named input is looked at
    for candidate in [*named, *siblings]:
        try:
            if candidate.is_dir() and kind_of(candidate) == stage:
                upstream = read_upstream(candidate, STAGE_DATA_FILES[stage])
                if upstream is not None and upstream.plan_sha256 == fingerprint.get("plan_sha256"):
                    return candidate
        except (UserError, OSError):
            continue  # a damaged or unreadable neighbour is not the one
    return None


def scan(files: list[Path], columns: dict[str, type[pl.DataType] | pl.DataType]) -> pl.LazyFrame:
    """``columns`` (cast to their types) of the parquets ``files``, and the ``shard`` of each
    row; a column a file lacks is null."""
    frame = pl.scan_parquet(files, glob=False, missing_columns="insert", extra_columns="ignore",
                            include_file_paths=_FILE)  # fmt: skip
    return frame.select(
        *(pl.col(name).cast(kind) for name, kind in columns.items()),
        pl.col(_FILE).str.extract(r"([^/]+)\.parquet$", 1).alias(SHARD),
    )


Queries = Callable[[pl.LazyFrame], list[pl.LazyFrame]]
# What reading a damaged parquet raises: a cut or scrambled footer, bad pages, names that are
# not UTF-8 (ValueError), and a panic of polars' reader.
_DAMAGED = (pa.ArrowException, pl.exceptions.PolarsError, pl.exceptions.PanicException,
            OSError, ValueError)  # fmt: skip


def collect(output: StageOutput, columns: dict, queries: Queries) -> list[pl.DataFrame]:
    """The answers of ``queries`` over the finished shards of ``output``. When they fail, the
    parquet that fails alone is a UserError naming it; a failure no file has alone is not the
    data's, and is raised as it came."""
    frames = queries(scan(output.parquets, columns))  # lazy: nothing is read yet
    try:
        return _collect_all(frames)
    except _DAMAGED as e:
        error = e
    # The footers first (a cut file, the common case, is found by them alone), then the data.
    for check in (pq.read_metadata, lambda file: _collect_all(queries(scan([file], columns)))):
        for file in output.parquets:
            try:
                check(file)
            except _DAMAGED as e:
                name = file.name.removesuffix(".parquet")
                raise UserError(
                    f"{file} is damaged ({one_line(e, 160)}); delete {name}.stats.json beside it "
                    f"and rerun {command_of(output.stage)} to redo that shard"
                ) from None
    raise error


def _collect_all(frames: list[pl.LazyFrame]) -> list[pl.DataFrame]:
    """The frames collected by the streaming engine, each scanning on its own: a scan shared
    by several queries would be cached whole in memory (common subplan elimination)."""
    no_shared_scan = pl.QueryOptFlags(comm_subplan_elim=False)
    return pl.collect_all(frames, engine="streaming", optimizations=no_shared_scan)


def log_bin(column: str, per_doubling: int) -> pl.Expr:
    """The bin of each positive value of ``column`` on a log scale: ``per_doubling`` bins
    from each power of two to the next (bin b spans [2^(b/k), 2^((b+1)/k)))."""
    return (pl.col(column).cast(pl.Float64).log(2) * per_doubling).floor().cast(pl.Int32)
