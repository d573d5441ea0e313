"""The ``file://DIR`` transport.

Layout, one directory per run::

    DIR/runs/RUN/latest.json                 the newest revision (replaced atomically)
    DIR/runs/RUN/revisions/<20 digits>.json  every kept revision
    DIR/runs/RUN/outcomes/<20 digits>.json   one outcome per revision
    DIR/runs/RUN/status.json                 the latest status
    DIR/runs/RUN/.lock                       serialises compare-and-set writers (flock)

Every file is written to a temporary file in the same directory, flushed, fsynced and renamed over the
target, so a reader (or a writer that crashed half-way) never sees a torn file: the previous revision stays
readable. Watching polls ``latest.json``'s ``stat`` (default every 50 ms), which also works on shared
filesystems where inotify sees no remote writes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from urllib.request import url2pathname

import anyio
import filelock

from weavelet_core.errors import ProtocolError, RevisionConflict, TransportError, TransportUnavailable
from weavelet_core.protocol import Outcome, Revision, Status, decode, encode, validate_run_id
from weavelet_core.transport import Transport

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 1000
DEFAULT_POLL_INTERVAL = 0.05  # a 10 ms poll cost a training loop on 2 cores ~3% per step; see docs/benchmarks.md
LOCK_TIMEOUT = 10.0
_DIGITS = 20
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST})

M = TypeVar("M", Revision, Status, Outcome)


def path_from_url(url: str) -> Path:
    """The directory named by a ``file://`` URL (``file:///abs/dir``)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        raise ValueError(f"not a file:// URL: {url!r}")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"file URL {url!r} names host {parts.netloc!r}; write an absolute local path as file:///path/to/dir"
        )
    if not parts.path:
        raise ValueError(f"file URL {url!r} has no directory; write it as file:///path/to/dir")
    return Path(url2pathname(parts.path)).expanduser()


def _name(number: int) -> str:
    return f"{number:0{_DIGITS}d}.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class FileTransport(Transport):
    """A directory as the store. Safe for many processes on one host (and on filesystems with working
    ``flock``, such as local disks and NFSv4)."""

    def __init__(
        self,
        url: str,
        *,
        history: int = DEFAULT_HISTORY,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        **_ignored: Any,
    ) -> None:
        self.url = url
        self.root = path_from_url(url)
        self.history_limit = max(1, int(history))
        self.poll_interval = poll_interval
        self._closed = False

    # -- paths -------------------------------------------------------------------------------------------
    def _run_dir(self, run: str) -> Path:
        return self.root / "runs" / validate_run_id(run)

    async def connect(self) -> None:
        try:
            (self.root / "runs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._fs_exception("cannot create", self.root, exc) from None
        if not os.access(self.root / "runs", os.W_OK | os.X_OK):
            raise TransportError(
                f"file transport directory {self.root} is not writable by this user; fix its permissions or "
                "choose another directory with --url file:///path or WEAVELET_URL"
            )

    def _fs_exception(self, action: str, path: Path, exc: OSError) -> TransportError:
        """``TransportError`` for what retrying cannot fix (permissions, a file in the way), else
        ``TransportUnavailable``."""
        message = self._fs_error(action, path, exc)
        if exc.errno in _PERMANENT_ERRNOS:
            return TransportError(message)
        return TransportUnavailable(message)

    def _fs_error(self, action: str, path: Path, exc: OSError) -> str:
        reason = exc.strerror or str(exc)
        elsewhere = "choose another directory with --url file:///path or WEAVELET_URL"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"file transport: {action} {path}: {reason}; fix its permissions or {elsewhere}"
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            return (
                f"file transport: {action} {path}: {reason}; part of this path is a file, not a directory: "
                f"move that file away or {elsewhere}"
            )
        return f"file transport: {action} {path}: {reason}"

    def _check_open(self) -> None:
        if self._closed:
            raise TransportUnavailable(f"{self.url}: transport is closed")

    def _read(self, path: Path, kind: type[M]) -> M | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fs_exception("cannot read", path, exc) from None
        try:
            return decode(data, kind)
        except ProtocolError as exc:
            log.warning("skipping unreadable %s: %s", path, exc)
            return None

    # -- revisions ---------------------------------------------------------------------------------------
    async def put(self, revision: Revision) -> None:
        self._check_open()
        data = encode(revision)
        await anyio.to_thread.run_sync(self._put_locked, revision, data)

    def _put_locked(self, revision: Revision, data: bytes) -> None:
        run_dir = self._run_dir(revision.run)
        try:
            (run_dir / "revisions").mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(run_dir / ".lock", timeout=LOCK_TIMEOUT)
            with lock:
                current = self._newest(run_dir)
                current_number = current.revision if current else 0
                if current_number != revision.revision - 1:
                    raise RevisionConflict(revision.run, revision.revision - 1, current_number)
                atomic_write(run_dir / "revisions" / _name(revision.revision), data)
                atomic_write(run_dir / "latest.json", data)
                self._trim(run_dir / "revisions", revision.revision)
        except filelock.Timeout:
            raise TransportUnavailable(
                f"file transport: lock {run_dir / '.lock'} held by another process for over {LOCK_TIMEOUT:g}s"
            ) from None
        except OSError as exc:
            raise self._fs_exception("cannot write", run_dir, exc) from None

    def _trim(self, directory: Path, newest: int) -> None:
        oldest_kept = newest - self.history_limit + 1
        if oldest_kept <= 1:
            return
        for name in os.listdir(directory):
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) < oldest_kept:
                with contextlib.suppress(OSError):
                    os.unlink(directory / name)

    async def latest(self, run: str) -> Revision | None:
        self._check_open()
        return self._newest(self._run_dir(run))

    def _newest(self, run_dir: Path) -> Revision | None:
        """``latest.json``; if that is missing or damaged while revision files exist, the newest of those.

        ``latest.json`` is written last, so a writer that died before replacing it leaves the previous
        revision there; a revision file newer than it is such a half-finished write and does not count.
        """
        latest_path = run_dir / "latest.json"
        newest = self._read(latest_path, Revision)
        if newest is not None or not latest_path.exists():
            return newest
        log.warning("%s is damaged; falling back to the newest revision file", latest_path)
        for number in reversed(self._numbers(run_dir / "revisions")):
            found = self._read(run_dir / "revisions" / _name(number), Revision)
            if found is not None:
                return found
        return None

    def _numbers(self, directory: Path) -> list[int]:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    async def history(self, run: str, *, limit: int | None = None) -> list[Revision]:
        self._check_open()
        run_dir = self._run_dir(run)
        newest = await self.latest(run)
        if newest is None:
            return []
        numbers = [n for n in self._numbers(run_dir / "revisions") if n <= newest.revision]
        if limit:
            numbers = numbers[-limit:]
        found = [self._read(run_dir / "revisions" / _name(n), Revision) for n in numbers]
        return [r for r in found if r is not None]

    async def watch(self, run: str, *, after: int = 0) -> AsyncIterator[Revision]:
        self._check_open()
        run_dir = self._run_dir(run)
        latest_path = run_dir / "latest.json"
        last = after
        seen: tuple[int, int, int] | None = None
        first = True
        while not self._closed:
            try:
                st = os.stat(latest_path)
                signature: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                signature = None
            except OSError as exc:
                log.warning("file transport: cannot stat %s: %s", latest_path, exc)
                signature = None
            if signature is not None and signature != seen:
                seen = signature
                newest = self._read(latest_path, Revision)
                if newest is not None and newest.revision > last:
                    if first:
                        pending = [newest]
                    else:
                        pending = []
                        for number in range(last + 1, newest.revision):
                            found = self._read(run_dir / "revisions" / _name(number), Revision)
                            if found is not None:
                                pending.append(found)
                        pending.append(newest)
                    for revision in pending:
                        last = revision.revision
                        yield revision
            first = False
            await anyio.sleep(self.poll_interval)

    async def runs(self) -> list[str]:
        self._check_open()
        try:
            names = os.listdir(self.root / "runs")
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            try:
                validate_run_id(name)
            except ValueError:
                continue
            run_dir = self.root / "runs" / name
            if (run_dir / "latest.json").exists() or (run_dir / "status.json").exists():
                found.append(name)
        return sorted(found)

    # -- status and outcomes -----------------------------------------------------------------------------
    def _write(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        except OSError as exc:
            raise self._fs_exception("cannot write", path, exc) from None

    async def publish_status(self, status: Status) -> None:
        self._check_open()
        self._write(self._run_dir(status.run) / "status.json", encode(status))

    async def status(self, run: str) -> Status | None:
        self._check_open()
        return self._read(self._run_dir(run) / "status.json", Status)

    async def publish_outcome(self, outcome: Outcome) -> None:
        self._check_open()
        run_dir = self._run_dir(outcome.run)
        self._write(run_dir / "outcomes" / _name(outcome.revision), encode(outcome))
        with contextlib.suppress(OSError):
            self._trim(run_dir / "outcomes", outcome.revision)

    async def outcome(self, run: str, revision: int) -> Outcome | None:
        self._check_open()
        return self._read(self._run_dir(run) / "outcomes" / _name(revision), Outcome)

    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        self._check_open()
        directory = self._run_dir(run) / "outcomes"
        numbers = self._numbers(directory)
        if limit:
            numbers = numbers[-limit:]
        found = [self._read(directory / _name(n), Outcome) for n in numbers]
        return [o for o in found if o is not None]

    async def aclose(self) -> None:
        self._closed = True


__all__ = ["FileTransport", "atomic_write", "path_from_url"]
