"""Outputs and inputs at object-store URLs (``s3://``, ``gs://``, ``file://``), through fsspec.

An object store has no rename and no lock, so a stage never writes a shard there piece by
piece. It works in a local *staging* directory exactly as it does on disk (partial tars,
journals, fsyncs: a killed process resumes there), and *publishes* each finished shard: the
data files are uploaded whole (an object appears complete or not at all), the shard's
``NNNNN.stats.json`` last. A reader and a resume trust a shard only when its marker is there and
every data file has the size the marker records; an interrupted upload leaves no marker, so
the shard is done again. Run state (``plan.json``, ``stats.json``, a manifest) is copied down
before the run and up as it changes. The two-runs-one-directory lock becomes a *lease*: an
object naming its holder and an expiry, renewed while the run lives.

An input at a URL becomes a local cache (:class:`InputCache`, the same path on every machine):
the files that planning reads are fetched, shard tars only placed, and each worker fetches the
shards it is handed, so no machine holds more of the input than its own share.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmdata.errors import UserError
from vlmdata.pipeline.shards import (
    PLAN,
    ShardFiles,
    atomic_write_bytes,
    read_state_json,
)

LEASE = ".lease.json"
LEASE_S = 60.0  # a killed run's lease lapses after this long
_RENEW_S = LEASE_S / 4
# Beside a shard's tar or h5: what a worker reads of an input shard (expected keys, marker).
_SHARD_SIBLINGS = (".tar", ".h5", ".parquet", ".stats.json", "_stats.json")
_RELEASED = (".tar", ".h5", ".parquet")  # the bulk of an input shard; its markers stay
_MARKER = ".stats.json"  # a shard's; the run's own is plain stats.json
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", None),
           "gcs": ("gcsfs", None), "az": ("adlfs", None), "abfs": ("adlfs", None)}  # fmt: skip


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` names an object-store URL (``s3://b/x``) rather than a path."""
    return isinstance(location, str) and bool(_URL.match(location))


def open_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it; one line when the package that
    speaks the protocol is missing."""
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError:
        package, extra = _EXTRAS.get(scheme, (f"the fsspec backend for {scheme}://", None))
        how = f"pip install 'vlmdata[{extra}]'" if extra else f"pip install {package}"
        raise UserError(f"{url}: {scheme}:// needs {package}; {how}") from None
    except ValueError as e:  # an unknown protocol
        raise UserError(
            f"{url}: {e}; pass a local path or an s3://, gs:// or file:// URL"
        ) from None
    return fs, path.rstrip("/")


@contextlib.contextmanager
def store_errors(doing: str, location: str) -> Iterator[None]:
    """Turn a failure of the store (no network, no bucket, no credentials: botocore's errors
    are not OSErrors) while ``doing`` ``location`` into one line. A missing object
    (FileNotFoundError) passes through: the callers decide what it means."""
    try:
        yield
    except (UserError, FileNotFoundError):
        raise
    except Exception as e:
        reason = (str(e).splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot {doing} {location} ({type(e).__name__}: {reason}); check the URL, the "
            "credentials and the network, then rerun the same command to resume"
        ) from None


def staging_root() -> Path:
    """Where work for object-store outputs is staged and inputs are cached: the same path on
    every machine of a cluster (``VLMDATA_STAGING``, else the temporary directory)."""
    return Path(os.environ.get("VLMDATA_STAGING") or tempfile.gettempdir()) / "vlmdata-staging"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Lease:
    """This run's hold on an object-store output (see :meth:`RemoteOutput.lease`)."""

    url: str
    holder: str
    lost: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise if the lease was lost: another run may be writing the same shards."""
        if self.lost.is_set():
            raise UserError(
                f"this run lost its lease on {self.url} (renewals failed, or another run took "
                "it); make sure only one run writes there, then rerun the same command"
            )


@dataclass
class RemoteOutput:
    """A stage's output at an object-store URL, worked on in :attr:`staging`. Picklable: a
    worker process or Ray actor publishes its own shards (``VLMDATA_STAGING`` must name the
    same writable path on every machine)."""

    url: str
    staging: Path | None = None

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.staging is None:
            self.staging = staging_root() / f"out-{_digest(self.url)}"
        self.fs, self.root = open_filesystem(self.url)

    def __getstate__(self) -> dict:
        return {"url": self.url, "staging": self.staging}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    # ---- reading ------------------------------------------------------------------------------

    def listing(self) -> dict[str, int]:
        """The objects directly under the output and their sizes (fresh, never cached)."""
        self.fs.invalidate_cache(self.root)
        try:
            with store_errors("list", self.url):
                entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        sizes = {}
        for entry in entries:
            if entry.get("type") == "file":
                sizes[entry["name"].rstrip("/").rsplit("/", 1)[-1]] = int(entry.get("size") or 0)
        return sizes

    def read_json(self, name: str) -> dict | None:
        """A state object as a dict; None when it is missing; one line when it is damaged."""
        try:
            with store_errors("read", f"{self.url}/{name}"):
                data = self.fs.cat_file(self.key(name))
        except FileNotFoundError:
            return None
        return self._state(name, data)

    def _state(self, name: str, data: bytes) -> dict:
        try:
            value = json.loads(data)
        except ValueError as e:
            raise UserError(f"{self.url}/{name} is damaged ({e}); delete it and rerun") from None
        if not isinstance(value, dict):
            raise UserError(
                f"{self.url}/{name} is damaged (not a JSON object); delete it and rerun"
            )
        return value

    def read_markers(self, listing: dict[str, int]) -> dict[str, bytes]:
        """The shard markers (``NNNNN.stats.json``) in ``listing``, read together: the store
        answers them concurrently, where one GET after another made a resume of CapsFusion's
        11,000 shards wait minutes. A marker gone since the listing is left out."""
        names = [name for name in listing if name.endswith(_MARKER)]
        if not names:
            return {}
        with store_errors("read", f"{self.url}/*{_MARKER}"):
            # cat_ranges, not cat: it takes the keys literally (cat globs a "[" in a name).
            found = self.fs.cat_ranges([self.key(name) for name in names], None, None)
        markers = {}
        for name, value in zip(names, found, strict=True):
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, BaseException):
                with store_errors("read", f"{self.url}/{name}"):
                    raise value
            markers[name] = value
        return markers

    def complete_stats(self, name: str, data_files: tuple[str, ...], listing: dict[str, int],
                       markers: dict[str, bytes]) -> dict | None:  # fmt: skip
        """Shard ``name``'s stats when it is published whole: marker and data files listed, the
        data files of the sizes the marker records. None otherwise. ``listing`` and
        ``markers``: what :meth:`listing` and :meth:`read_markers` found."""
        files = ShardFiles(Path("."), name)
        if files.stats.name not in markers or any(
            files.data(s).name not in listing for s in data_files
        ):
            return None
        try:
            stats = self._state(files.stats.name, markers[files.stats.name])
        except UserError:
            return None  # a damaged marker marks nothing: the shard is done again
        if not isinstance(stats.get("rows"), int):
            return None
        sizes = stats.get("sizes")
        if not isinstance(sizes, dict) or any(
            listing.get(files.data(s).name) != sizes.get(s) for s in data_files
        ):
            return None
        return stats

    # ---- writing ------------------------------------------------------------------------------

    def push(self, name: str) -> None:
        """Upload the staged file ``name`` (a state file) over the object of that name."""
        self._put(self.staging / name, name)

    def delete(self, *names: str) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError), store_errors("delete", self.key(name)):
                self.fs.rm_file(self.key(name))

    def publish_shard(self, name: str, data_files: tuple[str, ...]) -> None:
        """Upload staged shard ``name`` (data files whole, then its marker) and free the disk."""
        files = ShardFiles(self.staging, name)
        for suffix in data_files:
            self._put(files.data(suffix), files.data(suffix).name)
        self._put(files.stats, files.stats.name)  # last: it vouches for the rest
        for path in (*(files.data(s) for s in data_files), files.stats):
            path.unlink(missing_ok=True)

    def _put(self, local: Path, name: str) -> None:
        try:
            with store_errors("write", f"{self.url}/{name}"):
                self.fs.put_file(str(local), self.key(name))
        except FileNotFoundError as e:  # the bucket (or container) is not there
            raise UserError(f"cannot write {self.url}/{name} ({e}); create the bucket or "
                            "check the URL") from None  # fmt: skip

    # ---- the run ------------------------------------------------------------------------------

    def prepare_staging(self, plan: dict | None) -> None:
        """Make the staging directory hold only work of this output as planned now: work staged
        for another plan (the output was deleted and made again) is thrown away. Processes of
        one machine that start together take turns (a lock file beside the directory)."""
        self.staging.parent.mkdir(parents=True, exist_ok=True)
        with open(self.staging.with_name(f".{self.staging.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            marker = self.staging / PLAN
            staged = None
            with contextlib.suppress(UserError):
                staged = read_state_json(marker, missing_ok=True)
            if plan is None or staged != json.loads(json.dumps(plan)):
                shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True, exist_ok=True)
            if plan is not None and staged != json.loads(json.dumps(plan)):
                atomic_write_bytes(marker, json.dumps(plan, indent=2).encode() + b"\n")

    def pull(self, *names: str) -> None:
        """Copy the state objects ``names`` into staging (a missing one is removed there)."""
        for name in names:
            try:
                with store_errors("read", f"{self.url}/{name}"):
                    data = self.fs.cat_file(self.key(name))
            except FileNotFoundError:
                (self.staging / name).unlink(missing_ok=True)
                continue
            atomic_write_bytes(self.staging / name, data)

    @contextlib.contextmanager
    def lease(self) -> Iterator[Lease]:
        """Hold the output for this run: an object naming its holder with an expiry, renewed
        while the run lives and removed at its end (a run killed outright leaves it to lapse).
        A renewal that finds another holder, or renewals failing until the lease could have
        lapsed, mark it lost (:meth:`Lease.check`)."""
        lease = Lease(self.url, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
        if getattr(self.fs, "local_file", False):  # file://: a directory, made as a path's is
            with store_errors("create", self.url):
                self.fs.makedirs(self.root, exist_ok=True)
        held = self._held_lease()
        if held and held.get("holder") != lease.holder and float(held["expires"]) > time.time():
            until = time.strftime("%H:%M:%S", time.localtime(float(held["expires"])))
            raise UserError(
                f"another vlmdata run ({held.get('holder')}) holds {self.url} (its lease runs "
                f"to {until} unless renewed); wait for it or use another URL"
            )
        self._write_lease(lease.holder)
        time.sleep(0.2)  # a run that read the same free lease wrote its own meanwhile
        if (self._held_lease() or {}).get("holder") != lease.holder:
            raise UserError(f"another vlmdata run took {self.url} just now; wait for it or "
                            "use another URL")  # fmt: skip
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(lease, stop), name="vlmdata-lease",
                                   daemon=True)  # fmt: skip
        renewer.start()
        try:
            yield lease
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(Exception):
                if (self._held_lease() or {}).get("holder") == lease.holder:
                    self.delete(LEASE)

    def _renew(self, lease: Lease, stop: threading.Event) -> None:
        renewed = time.monotonic()
        while not stop.wait(_RENEW_S):
            try:
                if (self._held_lease() or {}).get("holder") != lease.holder:
                    lease.lost.set()  # taken: writing it again would take it back unseen
                    return
                self._write_lease(lease.holder)
                renewed = time.monotonic()
            except Exception:  # the store unreachable for a while: the lease may lapse
                if time.monotonic() - renewed > LEASE_S / 2:
                    lease.lost.set()
                    return

    def _held_lease(self) -> dict | None:
        """The lease object; a damaged one holds nothing."""
        try:
            held = self.read_json(LEASE)
        except UserError as e:
            if "damaged" in str(e):
                return None
            raise
        if held is None or not isinstance(held.get("expires"), int | float):
            return None
        return held

    def _write_lease(self, holder: str) -> None:
        body = json.dumps({"holder": holder, "expires": time.time() + LEASE_S}).encode()
        try:
            with store_errors("write", f"{self.url}/{LEASE}"):
                self.fs.pipe_file(self.key(LEASE), body)
        except FileNotFoundError as e:
            raise UserError(f"cannot write {self.url} ({e}); create the bucket or check the "
                            "URL") from None  # fmt: skip


@dataclass
class InputCache:
    """The local copy of an input at an object-store URL, at the same path on every machine.

    :meth:`sync` brings it up to date on the machine that plans the run and records every
    file's version (size, ETag or modification time), which travels with the run to the
    workers. Files with a ``lazy`` suffix (shard tars: the bulk of an input) are only *placed*
    there: an empty sparse file of the right size beside a ``.NAME.pending`` mark, which is all
    planning reads of them. :meth:`fetch_shard` fetches a shard's files where its work runs,
    just before, whenever the copy there is missing, placed, or of another version."""

    url: str
    root: Path | None = None
    versions: dict[str, list] = field(default_factory=dict)  # relative path -> version

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.root is None:
            self.root = staging_root() / f"in-{_digest(self.url)}"

    def sync(self, lazy: tuple[str, ...] = ()) -> Path:
        """Bring the cache up to date; the local path of the input (file or directory)."""
        fs, path = open_filesystem(self.url)
        try:
            with store_errors("read", self.url):
                single = fs.isfile(path)
                if single:
                    entries, base = {path: fs.info(path)}, path.rsplit("/", 1)[0]
                else:
                    entries, base = fs.find(path, detail=True), path
        except FileNotFoundError:  # no such bucket
            entries = {}
        if not entries:
            raise UserError(f"{self.url} does not exist or is empty; check the URL")
        self.versions = {}
        for name, entry in entries.items():
            relative = name[len(base) :].lstrip("/")
            if not relative or any(part.startswith(".") for part in relative.split("/")):
                continue
            version = _version(entry)
            self.versions[relative] = version
            target = self.root / relative
            placed_here = not single and relative.endswith(lazy)
            if _cached_version(target) == version and (
                placed_here or not _pending(target).exists()  # placed for another stage
            ):
                continue
            if placed_here:
                _place(target, version)
            else:
                _fetch(fs, name, target, version)
        for mark in list(self.root.rglob(".*.version")) if self.root.is_dir() else []:
            cached = mark.with_name(mark.name[1 : -len(".version")])
            if str(cached.relative_to(self.root)) not in self.versions:  # removed at the URL
                cached.unlink(missing_ok=True)
                mark.unlink()
                _pending(cached).unlink(missing_ok=True)
        return self.root / path[len(base) :].lstrip("/") if single else self.root

    def fetch_shard(self, data: Path) -> None:
        """Fetch the files of the input shard whose data file (tar, h5) is ``data`` that this
        machine lacks, only placed, or holds in another version than was planned."""
        if not data.is_relative_to(self.root):
            return
        fs, path = open_filesystem(self.url)
        for suffix in _SHARD_SIBLINGS:
            target = data.with_name(f"{data.stem}{suffix}")
            relative = str(target.relative_to(self.root))
            version = self.versions.get(relative)
            if version is None or (_cached_version(target) == version and
                                   not _pending(target).exists()):  # fmt: skip
                continue
            try:
                _fetch(fs, f"{path}/{relative}", target, version)
            except FileNotFoundError:
                raise UserError(
                    f"{self.url}/{relative} was removed since this run read the input; rerun "
                    "once the input is left alone"
                ) from None

    def release_shard(self, data: Path) -> None:
        """Give back the disk of the input shard whose data file is ``data`` once its work is
        done: its bulky files become placed again (fetched anew if a later run needs them)."""
        if not data.is_relative_to(self.root):
            return
        for suffix in _RELEASED:
            target = data.with_name(f"{data.stem}{suffix}")
            version = _cached_version(target)
            if version is not None and not _pending(target).exists():
                _place(target, version)


def _version(entry: dict) -> list:
    """What identifies one version of an object: its size, tag and modification time."""
    modified = entry.get("LastModified") or entry.get("mtime") or entry.get("created")
    if hasattr(modified, "timestamp"):
        modified = modified.timestamp()
    tag = entry.get("ETag") or entry.get("etag") or ""
    return [int(entry.get("size") or 0), str(tag), float(modified or 0)]


def _version_mark(path: Path) -> Path:
    return path.with_name(f".{path.name}.version")


def _pending(path: Path) -> Path:
    return path.with_name(f".{path.name}.pending")


def _cached_version(path: Path) -> list | None:
    try:
        return json.loads(_version_mark(path).read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _place(target: Path, version: list) -> None:
    """An empty stand-in of the object's size, marked pending: enough for planning."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _pending(target).touch()  # first: a placed file never looks fetched
    with open(target, "wb") as f:  # "wb" empties a fetched copy: the disk is given back
        f.truncate(version[0])
    _stamp(target, version)


def _fetch(fs: Any, name: str, target: Path, version: list) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    with store_errors("read", name):
        fs.get_file(name, str(partial))
    os.replace(partial, target)
    _stamp(target, version)
    _pending(target).unlink(missing_ok=True)


def _stamp(target: Path, version: list) -> None:
    """Record ``version`` beside ``target`` and give it the object's modification time, so
    that a fingerprint of the cached file is the same on every machine and after a re-fetch."""
    if version[2]:
        os.utime(target, (version[2], version[2]))
    atomic_write_bytes(_version_mark(target), json.dumps(version).encode())
