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


def staging_root() -> Path:
    """Where work for object-store outputs is staged and inputs are cached: the same path on
    every machine of a cluster (``VLMDATA_STAGING``, else the temporary directory)."""
    return Path(os.environ.get("VLMDATA_STAGING") or tempfile.gettempdir()) / "vlmdata-staging"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RemoteOutput:
    """A stage's output at an object-store URL, worked on in :attr:`staging`. Picklable: a
    worker process or Ray actor publishes its own shards."""

    url: str
    staging: Path = field(default=None)  # type: ignore[assignment]
    _fs: Any = field(default=None, init=False, repr=False, compare=False)

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
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise UserError(
                f"cannot list {self.url} ({e}); check the URL and credentials"
            ) from None
        sizes = {}
        for entry in entries:
            if entry.get("type") == "file":
                sizes[entry["name"].rstrip("/").rsplit("/", 1)[-1]] = int(entry.get("size") or 0)
        return sizes

    def read_json(self, name: str) -> dict | None:
        """A state object as a dict; None when it is missing; one line when it is damaged."""
        try:
            data = self.fs.cat_file(self.key(name))
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except ValueError as e:
            raise UserError(f"{self.url}/{name} is damaged ({e}); delete it and rerun") from None
        if not isinstance(value, dict):
            raise UserError(
                f"{self.url}/{name} is damaged (not a JSON object); delete it and rerun"
            )
        return value

    def complete_stats(self, name: str, data_files: tuple[str, ...], listing: dict[str, int]
                       ) -> dict | None:  # fmt: skip
        """Shard ``name``'s stats when it is published whole: marker and data files listed, the
        data files of the sizes the marker records. None otherwise."""
        files = ShardFiles(Path("."), name)
        if files.stats.name not in listing or any(
            files.data(s).name not in listing for s in data_files
        ):
            return None
        try:
            stats = self.read_json(files.stats.name)
        except UserError:
            return None  # a damaged marker marks nothing: the shard is done again
        if stats is None or not isinstance(stats.get("rows"), int):
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
            with contextlib.suppress(FileNotFoundError):
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
            self.fs.put_file(str(local), self.key(name))
        except FileNotFoundError:
            raise
        except OSError as e:
            raise UserError(
                f"cannot write {self.url}/{name} ({e}); check the URL, credentials and "
                "permissions, then rerun the same command to resume"
            ) from None

    # ---- the run ------------------------------------------------------------------------------

    def prepare_staging(self, plan: dict | None) -> None:
        """Make the staging directory hold only work of this output as planned now: work staged
        for another plan (the output was deleted and made again) is thrown away."""
        marker = self.staging / PLAN
        staged = None
        with contextlib.suppress(UserError):
            staged = read_state_json(marker, missing_ok=True)
        if plan is None or staged != json.loads(json.dumps(plan)):
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        if plan is not None:
            atomic_write_bytes(marker, json.dumps(plan, indent=2).encode() + b"\n")

    def pull(self, *names: str) -> None:
        """Copy the state objects ``names`` into staging (a missing one is removed there)."""
        for name in names:
            try:
                data = self.fs.cat_file(self.key(name))
            except FileNotFoundError:
                (self.staging / name).unlink(missing_ok=True)
                continue
            atomic_write_bytes(self.staging / name, data)

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold the output for this run: an object with an expiry, renewed while the run
        lives and removed at its end. A run killed outright leaves it to lapse."""
        me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        held = self.read_json(LEASE)
        if held and held.get("holder") != me and float(held.get("expires", 0)) > time.time():
            until = time.strftime("%H:%M:%S", time.localtime(float(held["expires"])))
            raise UserError(
                f"another vlmdata run ({held.get('holder')}) holds {self.url} (its lease runs "
                f"to {until} unless renewed); wait for it or use another URL"
            )
        self._write_lease(me)
        time.sleep(0.2)  # a run that read the same free lease wrote its own meanwhile
        if (self.read_json(LEASE) or {}).get("holder") != me:
            raise UserError(f"another vlmdata run took {self.url} just now; wait for it or "
                            "use another URL")  # fmt: skip
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(_RENEW_S):
                with contextlib.suppress(OSError):
                    self._write_lease(me)

        renewer = threading.Thread(target=renew, name="vlmdata-lease", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(OSError, UserError):
                if (self.read_json(LEASE) or {}).get("holder") == me:
                    self.delete(LEASE)

    def _write_lease(self, holder: str) -> None:
        body = {"holder": holder, "expires": time.time() + LEASE_S}
        self.fs.pipe_file(self.key(LEASE), json.dumps(body).encode())


# Beside a shard's tar: what a worker reads of the input shard (expected keys, its marker).
_SHARD_SIBLINGS = (".tar", ".parquet", ".stats.json", "_stats.json")


@dataclass
class InputCache:
    """The local copy of an input at an object-store URL, at the same path on every machine.

    :meth:`sync` brings it up to date on the machine that plans the run: a file is fetched
    again when its size or version (ETag or modification time) changed, one removed at the URL
    is removed here. Files with a ``lazy`` suffix (shard tars: the bulk of an input) are only
    *placed*: an empty sparse file of the right size beside a ``.NAME.pending`` mark, which is
    all planning reads of them; :meth:`fetch_shard` fetches a shard's files where its work
    runs, just before."""

    url: str
    root: Path = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.root is None:
            self.root = staging_root() / f"in-{_digest(self.url)}"

    def sync(self, lazy: tuple[str, ...] = ()) -> Path:
        """Bring the cache up to date; the local path of the input (file or directory)."""
        fs, path = open_filesystem(self.url)
        try:
            single = fs.isfile(path)
            if single:
                entries, base = {path: fs.info(path)}, path.rsplit("/", 1)[0]
            else:
                entries, base = fs.find(path, detail=True), path
        except OSError as e:
            raise UserError(
                f"cannot read {self.url} ({e}); check the URL and credentials"
            ) from None
        if not entries:
            raise UserError(f"{self.url} does not exist or is empty; check the URL")
        index_path = self.root / ".index.json"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
        wanted = {}
        for name, entry in entries.items():
            relative = name[len(base) :].lstrip("/")
            if not relative or any(part.startswith(".") for part in relative.split("/")):
                continue
            size = int(entry.get("size") or 0)
            version = [size, str(entry.get("ETag") or entry.get("mtime") or
                                 entry.get("LastModified") or "")]  # fmt: skip
            target = self.root / relative
            if index.get(relative) != version or not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                if not single and relative.endswith(lazy):
                    _pending(target).touch()  # first: a placed file never looks fetched
                    with open(target, "wb") as f:
                        f.truncate(size)
                else:
                    self._fetch(fs, name, target)
            wanted[relative] = version
        for relative in set(index) - set(wanted):
            (self.root / relative).unlink(missing_ok=True)
            _pending(self.root / relative).unlink(missing_ok=True)
        atomic_write_bytes(index_path, json.dumps(wanted).encode())
        return self.root / path[len(base) :].lstrip("/") if single else self.root

    def fetch_shard(self, tar: Path) -> None:
        """Fetch the files of the input shard ``tar`` that this machine lacks or only placed."""
        if not tar.is_relative_to(self.root):
            return
        fs, path = open_filesystem(self.url)
        for suffix in _SHARD_SIBLINGS:
            target = tar.with_name(f"{tar.stem}{suffix}")
            if target.is_file() and not _pending(target).exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # not every shard has every sibling
                self._fetch(fs, f"{path}/{target.relative_to(self.root)}", target)

    @staticmethod
    def _fetch(fs: Any, name: str, target: Path) -> None:
        partial = target.with_name(f".{target.name}.part")
        try:
            fs.get_file(name, str(partial))
        except FileNotFoundError:
            raise
        except OSError as e:
            raise UserError(f"cannot read {name} ({e}); check the URL and credentials") from None
        os.replace(partial, target)
        _pending(target).unlink(missing_ok=True)


def _pending(path: Path) -> Path:
    return path.with_name(f".{path.name}.pending")
