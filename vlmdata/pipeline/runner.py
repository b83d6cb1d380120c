"""The one stage runner: every stage (download, preprocess, encode, ...) runs through
:func:`run_stage`, so what makes a run trustworthy is written once.

The skeleton: refuse an output that is, holds or sits inside the input; refuse a directory that
is not this stage's own (another tool's files, another stage, a lost plan); lock the output;
compare the plan; say "nothing to do" only when every planned shard is really there; run the
unfinished shards with a progress bar; total exactly the planned shards, write whatever the
stage adds (a manifest), and only then mark the run complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vlmdata.errors import UserError
from vlmdata.pipeline.distributor import Work, distribute
from vlmdata.pipeline.finishing import ShardSink, finishing
from vlmdata.pipeline.ray_distributor import RayOptions, ray_distribute, worker_count
from vlmdata.pipeline.shards import (
    PLAN,
    Named,
    ShardFiles,
    atomic_write_json,
    check_plan,
    complete_shard_stats,
    exclusive_output,
    read_state_json,
    stage_of,
)
from vlmdata.pipeline.stats import RunProgress, RunSummary, merge_stats
from vlmdata.pipeline.storage import LEASE, InputCache, RemoteOutput, is_url

S = TypeVar("S", bound=Named)

ROOT_STATS = "stats.json"


@dataclass
class Stage:
    """What :func:`run_stage` needs to know about one stage run."""

    name: str  # "download": recorded in plan.json, named in refusals
    output_dir: Path
    plan: dict  # the input and the options that shape the output
    inputs: list[Path]  # the output may be none of these, inside one, or hold one
    data_files: tuple[str, ...]  # what a done shard holds beside its stats: (".tar", ".parquet")
    planned_shards: list[str] | None = None  # None: learned while reading the input
    unit: str = "url"
    total_rows: int | None = None
    processes: int = 1
    quiet: bool = False
    hint: str = ""  # appended to the "nothing to do" line
    partial_input: bool = False  # only part of an unfinished upstream: never marked complete
    # download --retry-failed: reopen finished shards before the run; returns rows to redo.
    reopen: Callable[[Stage], int] | None = None
    # Written after the shards and before the completion marker (encode's manifest), from
    # the shards' names and stats.
    before_complete: Callable[[Path, list[str], list[dict]], None] | None = None
    run_files: tuple[str, ...] = ()  # what before_complete writes: a complete run has them
    # The current state of the input shard behind each output shard (upstream.input_marker): a
    # shard made from an older state (before a --retry-failed upstream) is redone.
    input_markers: dict[str, str | None] | None = None
    # An object-store output: output_dir is its local staging, shards are published there.
    remote: RemoteOutput | None = None
    input_cache: InputCache | None = None  # an input at a URL: workers fetch shards from it
    ray: RayOptions | None = None  # --distributor ray: run the work on Ray actors

    # What this run found of each shard when it first looked (complete_stats), so a run reads
    # each marker once however many steps ask; a resume of a 28M-row input asks for 2,800.
    _found: dict[str, dict | None] = field(default_factory=dict, init=False, repr=False)
    _listing: dict[str, int] | None = field(default=None, init=False, repr=False)
    _markers: dict[str, bytes] | None = field(default=None, init=False, repr=False)

    @property
    def location(self) -> str:
        """The output as the user named it: a directory, or an object-store URL."""
        return self.remote.url if self.remote else str(self.output_dir)

    def shard_files(self, name: str) -> ShardFiles:
        return ShardFiles(self.output_dir, name)

    def complete_stats(self, name: str) -> dict | None:
        """The stats of shard ``name`` if it was done when this run first looked, else None.
        Done: a whole stats marker, every data file present, no retry pending, made from the
        input shard as it is now. Shards this run finishes or reopens: see :meth:`recheck`."""
        if name not in self._found:
            self.recheck(name)
        return self._found[name]

    def recheck(self, name: str) -> dict | None:
        """:meth:`complete_stats` as shard ``name`` is now, not as the run found it."""
        if self.remote is None:
            stats = complete_shard_stats(self.shard_files(name), self.data_files)
        else:
            if self._listing is None:
                self._listing = self.remote.listing()
                self._markers = self.remote.read_markers(self._listing)
            stats = self.remote.complete_stats(name, self.data_files, self._listing,
                                               self._markers)  # fmt: skip
        if stats is not None and self.input_markers is not None:
            stats = stats if stats.get("input") == self.input_markers.get(name) else None
        self._found[name] = stats
        return stats

    def look_again(self) -> None:
        """Forget what this run found of every shard (a reopen changed some)."""
        self._found.clear()
        self._listing = self._markers = None

    def save_state(self, name: str, value: dict) -> None:
        """Write the state file ``name`` (stats.json) of the output."""
        atomic_write_json(self.output_dir / name, value)
        if self.remote is not None:
            self.remote.push(name)

    def shard_stats(self, name: str) -> dict:
        """The stats marker of shard ``name``, whole or one line saying what is wrong."""
        if self.remote is None:
            return read_state_json(self.shard_files(name).stats)  # type: ignore[return-value]
        marker = self.shard_files(name).stats.name
        stats = self.remote.read_json(marker)
        if stats is None:
            raise UserError(f"{self.location}/{marker} is missing; rerun the stage")
        return stats

    def is_complete(self, name: str) -> bool:
        return self.complete_stats(name) is not None


def run_stage(stage: Stage, shards: Callable[[Stage], Iterable[S]], work: Work) -> RunSummary:
    """Run ``work`` over the unfinished shards of ``shards(stage)`` and total the output.

    ``shards`` is called once the output is locked and checked; it may use
    ``stage.is_complete`` to skip reading finished shards.
    """
    out, remote = stage.output_dir, stage.remote
    if stage.ray is not None:
        worker_count(stage.ray)  # a cluster that cannot place a worker: one line, before work
    if remote is None:
        check_output_location(out, stage.inputs)
    check_ownership(out, stage.name, remote)  # before the lock: leave a foreign one untouched
    with exclusive_output(out) if remote is None else remote.lease() as lease:
        if remote is not None:  # the run state, copied down: the local logic reads it there
            remote.prepare_staging(remote.read_json(PLAN))
            remote.pull(ROOT_STATS, *stage.run_files)
            for name in (ROOT_STATS, *stage.run_files):  # derived: a damaged one is made again
                if not _is_whole_state_file(out / name):
                    (out / name).unlink(missing_ok=True)
        new_plan = not (out / PLAN).exists()
        check_plan(out, stage.plan, shown_as=stage.location)
        if remote is not None and new_plan:
            remote.push(PLAN)
        done = completed_run(stage)
        if done and not stage.reopen:
            return done
        _mark_incomplete(stage)  # from here on, no reader may take the output for complete
        retried = 0
        if stage.reopen:
            retried = stage.reopen(stage)
            stage.look_again()  # what reopen looked at, it may have changed
        if done and not retried:
            stage.save_state(ROOT_STATS, done.totals)  # nothing reopened: still complete
            return done
        progress = RunProgress(stage.total_rows, stage.quiet, unit=stage.unit)
        started = time.monotonic()
        planned: list[str] = []  # every shard the input yields, done or not
        todo = _unfinished(stage, shards(stage), progress, planned)
        sink = ShardSink(out, stage.data_files, remote, stage.plan, stage.input_cache)
        try:
            if stage.ray is not None:
                ray_distribute(work, todo, progress, stage.ray, sink)
            else:
                wrapped = finishing(work, sink) if remote or stage.input_cache else work
                distribute(wrapped, todo, stage.processes, progress)
        finally:
            progress.close()
        if lease is not None:
            lease.check()  # another run may have written meanwhile: no totals over its work
        return close_run(stage, planned, progress, started, retried)


def path_argument(text: str, name: str = "OUTPUT_DIR", written: bool = False) -> Path:
    """A directory argument (one this command writes, if ``written``) as a path; an empty one
    is refused (``Path("")`` would mean ``.``), and so is an object-store URL (the commands
    that take one read it with :func:`output_location` or :func:`input_location`)."""
    if not str(text).strip():
        raise UserError(f"{name} is empty; pass a path")
    if is_url(text):
        fix = "write to a local path and copy it up" if written else "copy it to a local path"
        raise UserError(
            f"{name} {text}: this command reads and writes local paths; {fix} (object-store "
            "URLs work for download, preprocess, encode and labels classify)"
        )
    return Path(text)


def output_location(
    text: str, name: str = "OUTPUT_DIR", inputs: tuple[str, ...] = ()
) -> tuple[Path, RemoteOutput | None]:
    """Where a stage writes: a directory, or the staging directory of an object-store URL
    (refused when it is, sits inside or holds one of the ``inputs`` URLs)."""
    if not is_url(text):
        return path_argument(text, name, written=True), None
    target = text.rstrip("/") + "/"
    for source in (s.rstrip("/") + "/" for s in inputs if is_url(s)):
        if target.startswith(source) or source.startswith(target):
            raise UserError(
                f"{name} {text} must differ from the input {source.rstrip('/')}, "
                "neither inside it nor holding it; pass a prefix outside the input"
            )
    remote = RemoteOutput(text)
    return remote.staging, remote


def input_location(
    text: str, name: str, lazy: tuple[str, ...] = ()
) -> tuple[Path, InputCache | None]:
    """A stage's input as a local path: an object-store URL becomes its local cache (files
    with a ``lazy`` suffix fetched by the worker that reads them, see :class:`InputCache`)."""
    if is_url(text):
        cache = InputCache(text)
        return cache.sync(lazy), cache
    return path_argument(text, name), None


def check_output_location(out: Path, inputs: list[Path], name: str = "OUTPUT_DIR") -> None:
    """Refuse an output directory (``name`` in messages) that is, sits inside or holds an
    input."""
    target = out.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise UserError(
                f"{name} {out} must differ from the input {path}, neither inside it nor "
                "holding it; pass a directory outside the input"
            )


def check_ownership(out: Path, stage: str, remote: RemoteOutput | None = None) -> None:
    """Refuse to write into a directory (or the object-store prefix ``remote``, staged in
    ``out``) that is neither empty nor this stage's own output."""
    if remote is not None:
        entries = sorted(name for name in remote.listing() if name != LEASE)
        plan = remote.read_json(PLAN) if entries else None
        owner = None if plan is None else str(plan.get("stage", "unknown"))
        where, kind, other = remote.url, "objects", "URL"
        fix = "write to an empty prefix"
    else:
        if not out.is_dir():
            return  # created by the lock; a file in the way is refused there
        entries = sorted(p.name for p in out.iterdir() if p.name != ".lock")
        owner = stage_of(out) if entries else None
        where, kind, other = str(out), "entries", "directory"
        fix = "write to an empty directory (a resume needs the directory's own plan.json)"
    if not entries or owner == stage:
        return
    if owner is not None:
        raise UserError(f"{where} holds a {owner} output; write the {stage} output to another "
                        f"{other}")  # fmt: skip
    listed = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise UserError(
        f"{where} is not empty and holds no vlmdata plan.json ({len(entries)} {kind}: {listed}); "
        f"{fix}"
    )


def completed_run(stage: Stage) -> RunSummary | None:
    """A "nothing to do" summary when every planned shard is complete, else None."""
    root = read_state_json(stage.output_dir / ROOT_STATS, missing_ok=True)
    if not root or not root.get("complete"):
        return None
    names = root.get("shard_names")
    if not isinstance(names, list) or (
        stage.planned_shards is not None and names != stage.planned_shards
    ):
        return None
    if not all(stage.is_complete(name) for name in names):
        return None
    if not all(_is_whole_state_file(stage.output_dir / name) for name in stage.run_files):
        return None
    return RunSummary(stage.location, root, nothing_to_do=True, hint=stage.hint)


def close_run(
    stage: Stage, names: list[str], progress: RunProgress, started: float, retried: int
) -> RunSummary:
    """Total the shards ``names`` into ``stats.json`` and mark the run complete, if it is."""
    out = stage.output_dir
    stage.look_again()  # most of them finished during the run
    found = [stage.recheck(name) for name in names]
    # An unfinished shard still counts with what its marker says (a missing one is an error).
    stats = [s if s is not None else stage.shard_stats(name)
             for name, s in zip(names, found, strict=True)]  # fmt: skip
    totals = merge_stats(stats)
    complete = not stage.partial_input and all(s is not None for s in found)
    if complete and stage.before_complete:
        stage.before_complete(out, names, stats)
        if stage.remote is not None:
            for name in stage.run_files:
                stage.remote.push(name)
    stage.save_state(ROOT_STATS, {**totals, "shard_names": names, "complete": complete})
    return RunSummary(
        stage.location, totals,
        elapsed_s=time.monotonic() - started,
        rows_this_run=sum(progress.status.values()),
        images_this_run=progress.status["success"],
        bytes_this_run=progress.bytes,
        retried=retried,
        partial_input=stage.partial_input,
    )  # fmt: skip


def _unfinished(
    stage: Stage, shards: Iterable[S], progress: RunProgress, planned: list[str]
) -> Iterator[S]:
    """The shards still to do; finished ones are counted as skipped. Every name goes to
    ``planned``: the totals count exactly these shards."""
    for shard in shards:
        planned.append(shard.name)
        files = stage.shard_files(shard.name)
        if (stats := stage.complete_stats(shard.name)) is not None:
            progress.skip(stats["rows"])
            files.journal.unlink(missing_ok=True)  # left by a kill just after the marker
            continue
        if stage.remote is None:
            _discard_stale(stage, files)
        else:
            _discard_stale_remote(stage, shard.name)
        yield shard


def _discard_stale(stage: Stage, files: ShardFiles) -> None:
    """Before an unfinished shard is redone, drop what would be trusted wrongly: a marker whose
    data files are gone (or that an input rewritten since invalidates) and the pending retry
    of a shard whose tar is gone. Appended work in progress is kept: it resumes."""
    for path in (files.stats, *(files.data(suffix) for suffix in stage.data_files)):
        if path.is_dir():  # not ours to remove, and no file can be written in its place
            raise UserError(f"{path} is a directory where the shard's file goes; move it "
                            "away, then rerun the same command")  # fmt: skip
    # A marker there, yet not complete: made from an older state of the input, or damaged.
    stale_input = stage.input_markers is not None and files.stats.exists()
    missing = not all(files.data(suffix).exists() for suffix in stage.data_files)
    if stale_input or missing:
        files.stats.unlink(missing_ok=True)  # the marker first: it vouches for the rest
    if stale_input:
        for suffix in stage.data_files:
            files.data(suffix).unlink(missing_ok=True)
    if missing or stale_input:
        files.retry_journal.unlink(missing_ok=True)
        files.retry_tar.unlink(missing_ok=True)


def _discard_stale_remote(stage: Stage, name: str) -> None:
    """:func:`_discard_stale` for a published shard: a marker that vouches for missing or
    outdated objects goes first, then the outdated objects."""
    assert stage.remote is not None and stage._listing is not None
    files = stage.shard_files(name)
    data = [files.data(suffix).name for suffix in stage.data_files]
    if files.stats.name not in stage._listing:
        return
    stale_input = stage.input_markers is not None
    stage.remote.delete(files.stats.name)
    if stale_input:
        stage.remote.delete(*(n for n in data if n in stage._listing))


def _is_whole_state_file(path: Path) -> bool:
    try:
        return read_state_json(path, missing_ok=True) is not None
    except UserError:
        return False  # damaged: written again by the run


def _mark_incomplete(stage: Stage) -> None:
    root = read_state_json(stage.output_dir / ROOT_STATS, missing_ok=True)
    if root and root.get("complete"):
        stage.save_state(ROOT_STATS, {**root, "complete": False})
