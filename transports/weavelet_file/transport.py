"""The ``file://DIR`` transport.

Layout, one directory per run::

    DIR/runs/RUN/latest.json                 the newest revision (replaced atomically)
    DIR/runs/RUN/revisions/<20 digits>.json  every kept revision
    DIR/runs/RUN/outcomes/<20 digits>.<incarnation>.json
                                             the outcome of one revision from one incarnation (an outcome
                                             without incarnation, as version 1 wrote: <20 digits>.json)
    DIR/runs/RUN/status.json                 the latest status
    DIR/runs/RUN/schema.json                 what the run's trainer accepts, named by digest in its status
    DIR/runs/RUN/.lock                       serialises compare-and-set writers (flock)

Every file is written to a temporary file in the same directory, flushed, fsynced and renamed over the
target, so a reader (or a writer that crashed half-way) never sees a torn file: the previous revision stays
readable.

Watching (``watch``, ``watch_outcome``) waits for inotify events on the run's directories (see
:mod:`weavelet_file.watching`): a rename wakes the watcher at once, and an idle watcher costs nothing but a
look every :data:`INOTIFY_RECHECK` seconds. On network and FUSE filesystems, where other hosts' writes raise no
event, and with ``?watch=poll``, it polls ``stat`` every ``poll_interval`` (default 50 ms) instead. Either way it
arms its watch before it reads, so a write in between is never missed, and closing the transport ends it.

A revision file that does not decode is a :class:`~weavelet_core.errors.CorruptEntry` numbered by its file
name; a damaged ``latest.json`` falls back to the newest revision file, or is a ``CorruptEntry`` numbered by
the ``revision`` it still shows. Loops over revisions go over the files that exist (one directory listing),
never over the numbers between two revisions, however far apart. Kept: the newest ``history`` revisions, and
the outcomes of the newest ``history`` revisions, at most :data:`OUTCOME_INCARNATIONS` per revision.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import logging
import os
import pwd
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit
from urllib.request import url2pathname

import anyio
import anyio.lowlevel
import anyio.to_thread
import filelock

from weavelet_core.errors import (
    CorruptEntry,
    ProtocolError,
    RevisionConflict,
    TransportError,
    TransportUnavailable,
)
from weavelet_core.protocol import (
    MAX_PAYLOAD_BYTES,
    Outcome,
    Revision,
    Status,
    decode,
    encode,
    lenient_revision_number,
    validate_run_id,
)
from weavelet_core.transport import Entry, Transport, decoding_many
from weavelet_file.watching import (
    ENTRIES,
    GONE,
    MOVES,
    RENAMES,
    WATCH_MODES,
    DirectoryWatcher,
    Event,
    choose_mode,
    close_in_background,
)

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 1000
DEFAULT_POLL_INTERVAL = 0.05  # a 10 ms poll cost a training loop on 2 cores ~3% per step; see docs/benchmarks.md
LOCK_TIMEOUT = 10.0
IDLE_WATCHERS = 4
"""inotify instances a transport keeps for its next watches once a watch ends (closing one costs the kernel a
grace period, milliseconds; reusing one costs nothing)."""
INOTIFY_RECHECK = 10.0
"""Seconds an inotify watch waits without an event before it looks at the files anyway (a bound, not a poll)."""
_DIGITS = 20
_ENTRY_NAME = re.compile(r"(\d{1,40})(?:\.([A-Za-z0-9_%\-]{1,64}))?\.json")
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{1,64}")
OUTCOME_INCARNATIONS = 8
"""Outcomes kept per revision, one per incarnation: the newest (greatest ``at``) this many."""
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


def _outcome_name(number: int, incarnation: str) -> str:
    """``<20 digits>.json`` for an outcome without incarnation (as version 1 wrote), else
    ``<20 digits>.<incarnation>.json``; an incarnation that is not a safe file name token is hashed."""
    if not incarnation:
        return _name(number)
    token = (
        incarnation if _TOKEN.fullmatch(incarnation) else "%" + hashlib.sha256(incarnation.encode()).hexdigest()[:32]
    )
    return f"{number:0{_DIGITS}d}.{token}.json"


def _group_id(name: str) -> int:
    """The id of group ``name`` (or a number); ``ValueError`` naming the fix when there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ValueError(
            f"file transport: group {name!r} does not exist on this host; create it (groupadd {name}) or fix "
            "?group= in the URL"
        ) from None


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def read_capped(path: str | Path, cap: int = MAX_PAYLOAD_BYTES) -> bytes:
    """The first ``cap + 1`` bytes of ``path`` at most: enough for the decoder to refuse an oversized entry, never
    a whole hostile multi-gigabyte file in memory. Raises ``OSError`` (``FileNotFoundError`` when it is missing).

    Plain ``os.read`` calls, without a buffered file object: half the cost per file, which counts when a listing
    reads thousands."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        left = cap + 1
        while left > 0:  # at most cap + 1 bytes in all; usually one read, then the end of the file
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int | None = None, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new content, never a mix.

    The file is created ``0600`` (``mkstemp``); ``mode`` sets other permission bits (``0o660`` for a team store).
    ``durable`` (default): the data reaches the disk (``fsync``) before the rename. Without it a crash of the
    machine may leave the previous content (or, on filesystems that do not order a replacing rename after its data,
    an empty file): for a status, which the next keepalive writes again.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _LockBusy(Exception):
    """The run's lock is held by another writer (raised only when asked not to wait for it)."""


class FileTransport(Transport):
    """A directory as the store. Safe for many processes on one host (and on filesystems with working
    ``flock``, such as local disks and NFSv4)."""

    def __init__(
        self,
        url: str,
        *,
        history: int = DEFAULT_HISTORY,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        group: str | None = None,
        watch: str = "auto",
        **_ignored: Any,
    ) -> None:
        self.url = url
        self.root = path_from_url(url)
        query = dict(parse_qsl(urlsplit(url).query))
        self.history_limit = max(1, int(query.get("history", history)))
        self.poll_interval = float(query.get("poll_interval", poll_interval))
        self.watch_option = str(query.get("watch", watch)).lower()
        if self.watch_option not in WATCH_MODES:
            raise ValueError(
                f"file transport: unknown watch={self.watch_option!r} in {url!r}; use one of "
                f"{', '.join(WATCH_MODES)} (auto: inotify, except on network and FUSE filesystems, which are polled)"
            )
        self.watch_mode = "poll" if self.watch_option == "poll" else ""
        """How watches learn of changes: ``inotify`` or ``poll``, decided by :meth:`connect` (see
        :func:`weavelet_file.watching.choose_mode`)."""
        self.watch_reason = ""
        self._waits: set[anyio.CancelScope] = set()
        self._idle_watchers: list[DirectoryWatcher] = []
        self._warned_inotify = False
        group = group if group is not None else query.get("group")
        self.group: str | None = group or None
        self._gid: int | None = _group_id(group) if group else None
        self._dir_mode = 0o2770 if self._gid is not None else 0o700
        self._file_mode = 0o660 if self._gid is not None else None
        self._runs_root = os.path.join(self.root, "runs")
        self._trusted: dict[str, tuple[int, int, int, int]] = {}
        self._closed = False

    # -- paths -------------------------------------------------------------------------------------------
    def _run_dir(self, run: str) -> Path:
        """The run's directory, after checking that it can be trusted (when it exists)."""
        return Path(self._run_path(run))

    def _run_path(self, run: str) -> str:
        """:meth:`_run_dir` as a string (no ``Path`` objects: batched reads call it once per run)."""
        path = os.path.join(self._runs_root, validate_run_id(run))
        self._check_trusted(path)
        return path

    async def connect(self) -> None:
        """Create the store (``0700``; ``02770`` and the group with ``group``) if it is missing and check that it
        can be trusted (see :meth:`_check_trusted`). A store this user may only read still opens: reads work,
        writes raise ``TransportError`` saying the store is read-only."""
        runs = self.root / "runs"
        try:
            self._makedirs(runs)
        except OSError as exc:
            if not (exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and runs.is_dir()):
                raise self._fs_exception("cannot create", self.root, exc) from None
        self._check_parents(self.root)
        self._check_trusted(self.root)
        self._check_trusted(runs)
        self._resolve_watch_mode()

    def _resolve_watch_mode(self) -> str:
        """Decide (once) between ``inotify`` and ``poll``; ``TransportError`` when ``watch=inotify`` cannot be had."""
        if not self.watch_mode:
            try:
                self.watch_mode, self.watch_reason = choose_mode(self.watch_option, self.root)
            except OSError as exc:
                raise TransportError(str(exc.strerror or exc)) from None
            log.debug("file transport %s: watching by %s: %s", self.root, self.watch_mode, self.watch_reason)
        return self.watch_mode

    def _makedirs(self, path: Path) -> None:
        """``mkdir -p`` with this store's mode (and group) on every directory it creates."""
        if path.is_dir():
            return
        if path.parent != path:
            self._makedirs(path.parent)
        try:
            os.mkdir(path, self._dir_mode & 0o777)
        except FileExistsError:
            if not path.is_dir():
                raise
            return
        if self._gid is not None:
            os.chown(path, -1, self._gid)
        os.chmod(path, self._dir_mode)  # mkdir's mode is masked by the umask, and drops the setgid bit

    def _check_parents(self, path: Path) -> None:
        """Refuse a store below a directory that others may write without the sticky bit: they could replace it."""
        for parent in path.resolve().parents:
            try:
                st = os.stat(parent)
            except OSError:
                continue
            if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
                raise TransportError(
                    f"file transport: refusing store {self.root}: its parent {parent} is writable by every user "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}), so anyone could replace the store; fix it with "
                    f"'chmod o-w {parent}' (or 'chmod +t {parent}'), or choose another directory with --url "
                    "file:///path or WEAVELET_URL"
                )

    def _check_trusted(self, path: str | Path) -> None:
        """Refuse ``path`` (a store or run directory) unless this user owns it (or, with ``group``, the group does)
        and no one else may write it, as OpenSSH's StrictModes does. Raise ``TransportError`` saying how to fix."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._fs_exception("cannot read", path, exc) from None
        signature = (st.st_ino, st.st_uid, st.st_gid, st.st_mode)
        key = os.fspath(path)
        if self._trusted.get(key) == signature:
            return
        me = os.geteuid()
        mode = stat.S_IMODE(st.st_mode)
        team = f"the team group {_group_name(self._gid)}" if self._gid is not None else ""
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise TransportError(
                f"file transport: refusing {path}: it is not a plain directory (a symbolic link or a file another "
                "user may have put there); remove it, or choose another directory with --url file:///path"
            )
        owned = st.st_uid == me or (self._gid is not None and st.st_gid == self._gid)
        if not owned:
            fix = f"'chown -R {_user_name(me).split(' ')[0]} {path}'"
            if self._gid is None:
                fix += ", or for a team directory give its group: --url 'file://...?group=GROUP'"
            else:
                fix += f" or 'chgrp -R {self.group} {path}'"
            raise TransportError(
                f"file transport: refusing {path}: it is owned by {_user_name(st.st_uid)} and group "
                f"{_group_name(st.st_gid)}, not by you ({_user_name(me)}){' or ' + team if team else ''}, so its "
                f"revisions may not be yours; if it is yours, fix it with {fix}"
            )
        if mode & stat.S_IWOTH:
            raise TransportError(
                f"file transport: refusing {path}: every user may write it (mode {mode:04o}), so anyone could "
                f"change a run's desired config; fix it with 'chmod -R o-w {path}'"
            )
        if mode & stat.S_IWGRP and st.st_gid not in (self._gid, os.getegid()):
            raise TransportError(
                f"file transport: refusing {path}: group {_group_name(st.st_gid)} may write it (mode {mode:04o}) "
                f"and is not the store's group; fix it with 'chmod -R g-w {path}', or name that group with "
                "?group= if it is your team's"
            )
        self._trusted[key] = signature

    def _fs_exception(self, action: str, path: str | Path, exc: OSError) -> TransportError:
        """``TransportError`` for what retrying cannot fix (permissions, a file in the way), else
        ``TransportUnavailable``."""
        message = self._fs_error(action, path, exc)
        if exc.errno in _PERMANENT_ERRNOS:
            return TransportError(message)
        return TransportUnavailable(message)

    def _fs_error(self, action: str, path: str | Path, exc: OSError) -> str:
        reason = exc.strerror or str(exc)
        elsewhere = "choose another directory with --url file:///path or WEAVELET_URL"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            if action == "cannot write":
                return (
                    f"file transport: {action} {path}: {reason}; the store is read-only for this user (reading "
                    f"still works: weavelet get, status, history, runs); to write, fix its permissions or {elsewhere}"
                )
            return f"file transport: {action} {path}: {reason}; fix its permissions or {elsewhere}"
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            return (
                f"file transport: {action} {path}: {reason}; part of this path is a file, not a directory: "
                f"move that file away or {elsewhere}"
            )
        return f"file transport: {action} {path}: {reason}; {elsewhere}"

    def _check_open(self) -> None:
        if self._closed:
            raise TransportUnavailable(f"{self.url}: transport is closed")

    def _read_bytes(self, path: str | Path) -> bytes | None:
        """The file's bytes, capped (:func:`read_capped`); ``None`` when it does not exist."""
        try:
            return read_capped(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fs_exception("cannot read", path, exc) from None

    def _read(self, path: str | Path, kind: type[M]) -> M | None:
        data = self._read_bytes(path)
        if data is None:
            return None
        try:
            return decode(data, kind)
        except ProtocolError as exc:
            log.warning("skipping unreadable %s: %s", path, exc)
            return None

    # -- revisions ---------------------------------------------------------------------------------------
    async def put(self, revision: Revision) -> None:
        """Compare-and-set under the run's lock. When the lock is free (the usual case) the write is done at once, in
        the caller's thread; only a lock held by another writer is waited for in a worker thread."""
        self._check_open()
        data = encode(revision)
        try:
            self._put_locked(revision.run, revision.revision, data, True, wait=False)
            return
        except _LockBusy:
            pass
        # A cancelled caller does not wait for the thread, and the thread gives up waiting for the lock as soon as
        # it sees the cancellation: a write the caller was told timed out does not land seconds later.
        cancelled = threading.Event()
        try:
            await anyio.to_thread.run_sync(
                self._put_locked, revision.run, revision.revision, data, True, cancelled, abandon_on_cancel=True
            )
        except BaseException:
            cancelled.set()
            raise

    async def put_raw(self, run: str, number: int, data: bytes) -> None:
        """Store ``data`` as revision ``number`` of ``run`` (revision file and ``latest.json``) without any check.

        For tests of unreadable entries: bytes that do not decode read back as a :class:`CorruptEntry`.
        """
        self._check_open()
        validate_run_id(run)
        await anyio.to_thread.run_sync(self._put_locked, run, number, data, False, abandon_on_cancel=True)

    def _put_locked(
        self,
        run: str,
        number: int,
        data: bytes,
        compare: bool,
        cancelled: threading.Event | None = None,
        *,
        wait: bool = True,
    ) -> None:
        """Write under the run's lock; without ``wait``, raise :class:`_LockBusy` at once when another writer holds
        it."""
        run_dir = self._run_dir(run)
        try:
            self._makedirs(run_dir / "revisions")
            lock = filelock.FileLock(run_dir / ".lock", timeout=LOCK_TIMEOUT, mode=0o660 if self._gid else 0o600)
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:  # bounded by LOCK_TIMEOUT; gives up at once when the caller is gone
                try:
                    lock.acquire(timeout=0.05, blocking=wait)
                    break
                except filelock.Timeout:
                    if not wait:
                        raise _LockBusy from None
                    if (cancelled is not None and cancelled.is_set()) or time.monotonic() >= deadline:
                        raise
            try:
                if compare:
                    current = self._newest(run, run_dir)
                    current_number = current.revision if current is not None else 0
                    if current_number != number - 1:
                        raise RevisionConflict(run, number - 1, current_number)
                atomic_write(run_dir / "revisions" / _name(number), data, self._file_mode)
                atomic_write(run_dir / "latest.json", data, self._file_mode)
                self._trim(run_dir / "revisions", number)
            finally:
                lock.release()
        except filelock.Timeout:
            raise TransportUnavailable(
                f"file transport: lock {run_dir / '.lock'} held by another process for over {LOCK_TIMEOUT:g}s"
            ) from None
        except OSError as exc:
            raise self._fs_exception("cannot write", run_dir, exc) from None

    def _trim(self, directory: Path, newest: int) -> None:
        """Delete the files of revisions older than the newest ``history`` (one pass over the directory)."""
        oldest_kept = newest - self.history_limit + 1
        if oldest_kept <= 1:
            return
        for name, number, _ in self._listing(directory):
            if number < oldest_kept:
                with contextlib.suppress(OSError):
                    os.unlink(directory / name)

    async def latest(self, run: str) -> Revision | None:
        self._check_open()
        newest = self._newest(run, self._run_dir(run))
        if isinstance(newest, CorruptEntry):
            raise newest
        return newest

    def _newest(self, run: str, run_dir: str | Path) -> Entry | None:
        """The run's newest entry: ``latest.json``, or, if that is damaged, the newest revision file.

        ``latest.json`` is written last, so a writer that died before replacing it leaves the previous
        revision there; a revision file newer than it is such a half-finished write and does not count. When
        ``latest.json`` does not decode, the newer of the number it still shows (if it is a JSON object with an
        integer ``revision``) and the newest revision file decides; an unreadable newest entry is a
        :class:`CorruptEntry` with that number.
        """
        latest_path = os.path.join(run_dir, "latest.json")
        data = self._read_bytes(latest_path)
        if data is None:
            return None
        try:
            return decode(data, Revision)
        except ProtocolError as exc:
            reason = str(exc)
            # Debug only: a watch reads it every poll, and the caller reports the CorruptEntry itself, once.
            log.debug("file transport: unreadable %s: %s", latest_path, exc)
        claimed = lenient_revision_number(data)
        run_dir = Path(run_dir)
        numbers = self._numbers(run_dir / "revisions")
        if numbers and (claimed is None or numbers[-1] >= claimed):
            log.debug("%s is damaged; falling back to the newest revision file", latest_path)
            found = self._read_revision(run, run_dir, numbers[-1])
            if found is not None:
                return found
        if claimed is not None:
            return CorruptEntry(run, claimed, f"{latest_path}: {reason}")
        return CorruptEntry(run, numbers[-1] + 1 if numbers else 1, f"{latest_path}: {reason}")

    def _read_revision(self, run: str, run_dir: Path, number: int) -> Entry | None:
        """Revision file ``number``: the revision, a :class:`CorruptEntry` if it does not decode (or names
        another run or number), ``None`` if it is gone."""
        path = run_dir / "revisions" / _name(number)
        data = self._read_bytes(path)
        if data is None:
            return None
        try:
            revision = decode(data, Revision)
        except ProtocolError as exc:
            return CorruptEntry(run, number, f"{path}: {exc}")
        if revision.run != run or revision.revision != number:
            return CorruptEntry(
                run, number, f"{path} holds revision {revision.revision} of run {revision.run!r}, not this one"
            )
        return revision

    def _listing(self, directory: Path) -> list[tuple[str, int, str | None]]:
        """``(file name, revision number, incarnation token or None)`` of each entry file in ``directory``."""
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = _ENTRY_NAME.fullmatch(name)
            if match:
                found.append((name, int(match.group(1)), match.group(2)))
        return found

    def _numbers(self, directory: Path) -> list[int]:
        return sorted({number for _, number, _ in self._listing(directory)})

    async def history(self, run: str, *, limit: int | None = None) -> list[Entry]:
        self._check_open()
        run_dir = self._run_dir(run)
        newest = self._newest(run, run_dir)
        if newest is None:
            return []
        numbers = [n for n in self._numbers(run_dir / "revisions") if n < newest.revision]
        if limit:
            numbers = numbers[len(numbers) - limit + 1 :] if limit > 1 else []
        found: list[Entry] = []
        for number in numbers:
            entry = self._read_revision(run, run_dir, number)
            if entry is not None:
                found.append(entry)
        found.append(newest)
        return found[-limit:] if limit else found

    async def watch(self, run: str, *, after: int = 0) -> AsyncIterator[Entry]:
        self._check_open()
        run_dir = self._run_dir(run)
        latest_path = run_dir / "latest.json"
        watcher = self._open_watcher()
        last = after
        seen: tuple[int, int, int] | None = None
        first = True
        try:
            while not self._closed:
                # Armed before reading: a write from here on wakes the wait below.
                armed = self._arm(watcher, (run_dir, RENAMES))
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
                    self._check_trusted(run_dir)  # replaced meanwhile by someone else's directory?
                    newest = self._newest(run, run_dir)
                    if newest is not None and newest.revision > last:
                        pending: list[Entry] = []
                        if not first:
                            # Revisions written since the last look: the files that exist between the two numbers
                            # (one listing, however far the number jumped), then the newest.
                            for number in self._numbers(run_dir / "revisions"):
                                if last < number < newest.revision:
                                    entry = self._read_revision(run, run_dir, number)
                                    if entry is not None:
                                        pending.append(entry)
                        pending.append(newest)
                        for entry in pending:
                            if entry.revision <= last:
                                continue
                            last = entry.revision
                            yield entry
                            await anyio.lowlevel.checkpoint()
                first = False
                await self._next_change(watcher, armed, lambda event: _touches(event, run_dir, ("latest.json",)))
        finally:
            self._release_watcher(watcher)

    async def watch_outcome(self, run: str, revision: int) -> AsyncIterator[Outcome]:
        """The newest outcome of the revision each time it changes, woken by inotify on the run's ``outcomes``
        directory (or polled every ``poll_interval``, see the module docstring); ends when the transport is
        closed."""
        self._check_open()
        run_dir = self._run_dir(run)
        directory = run_dir / "outcomes"
        watcher = self._open_watcher()
        last: Outcome | None = None
        try:
            while not self._closed:
                # Armed afresh at each look (a run's directory renamed away takes its outcomes/ with it, unseen):
                # runs/ and outcomes/ once that exists, else the run's directory, to hear of outcomes/ appearing.
                if watcher is not None:
                    watcher.reset()
                if directory.is_dir():
                    armed = self._arm(watcher, (directory, MOVES))
                else:
                    armed = self._arm(watcher, (run_dir, ENTRIES), (directory, MOVES))
                self._check_trusted(run_dir)  # replaced meanwhile by someone else's directory?
                found = self._newest_outcome(run_dir, revision)
                if found is not None and found != last:
                    last = found
                    yield found
                await self._next_change(watcher, armed, lambda event: _answers_revision(event, run_dir, revision))
        finally:
            self._release_watcher(watcher)

    # -- change notification -----------------------------------------------------------------------------
    def _open_watcher(self) -> DirectoryWatcher | None:
        """An inotify watcher, or ``None`` to poll (the store is polled, or inotify could not be had: then polling
        is logged once, with the fix)."""
        if self._resolve_watch_mode() != "inotify":
            return None
        if self._idle_watchers:
            return self._idle_watchers.pop()
        try:
            return DirectoryWatcher()
        except OSError as exc:
            hint = (
                "; raise the per-user limit, e.g. sysctl fs.inotify.max_user_instances=1024"
                if exc.errno == errno.EMFILE
                else ""
            )
            if self.watch_option == "inotify":
                raise TransportError(f"file transport: cannot watch {self.root} with inotify: {exc}{hint}") from None
            if not self._warned_inotify:
                self._warned_inotify = True
                log.warning(
                    "file transport: cannot watch %s with inotify (%s%s); polling every %gs instead",
                    self.root,
                    exc,
                    hint,
                    self.poll_interval,
                )
            return None

    def _release_watcher(self, watcher: DirectoryWatcher | None) -> None:
        """Keep a watcher whose watch ended for the next watch (up to :data:`IDLE_WATCHERS`), else close it without
        holding up the event loop."""
        if watcher is None or watcher.closed:
            return
        if self._closed or len(self._idle_watchers) >= IDLE_WATCHERS:
            close_in_background([watcher])
            return
        watcher.reset()
        self._idle_watchers.append(watcher)

    def _arm(self, watcher: DirectoryWatcher | None, *directories: tuple[Path, int]) -> bool:
        """Watch ``runs/`` and those of ``directories`` (each with its inotify mask, nested in this order) that exist:
        one that appears later is announced by an event in its parent and armed on the next look. ``False`` when
        a watch could not be set up (the inotify limits): then the caller polls."""
        if watcher is None:
            return False
        for directory, mask in ((self.root / "runs", ENTRIES), *directories):
            if watcher.watching(directory):
                continue
            try:
                if not watcher.add(directory, mask):
                    return True  # missing: its parent announces it; what lies below it is missing too
            except OSError as exc:
                if not self._warned_inotify:
                    self._warned_inotify = True
                    log.warning(
                        "file transport: cannot watch %s with inotify (%s; raise fs.inotify.max_user_watches); "
                        "polling every %gs instead",
                        directory,
                        exc,
                        self.poll_interval,
                    )
                return False
        return True

    async def _next_change(
        self, watcher: DirectoryWatcher | None, armed: bool, wanted: Callable[[Event], bool]
    ) -> None:
        """Return when something ``wanted`` may have changed: an event it accepts (or one saying events were lost
        or a watched directory went away), :data:`INOTIFY_RECHECK` seconds without one (``poll_interval`` when
        polling or not ``armed``), or at once when the transport is closed."""
        watched = watcher is not None and armed
        deadline = time.monotonic() + (INOTIFY_RECHECK if watched else self.poll_interval)
        while not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with anyio.CancelScope() as scope:
                self._waits.add(scope)
                try:
                    if watcher is None:
                        await anyio.sleep(remaining)
                        return
                    events = await watcher.wait(remaining)
                finally:
                    self._waits.discard(scope)
            if scope.cancelled_caught:
                return
            if any(event.directory is None or event.mask & GONE or wanted(event) for event in events):
                return

    def _newest_outcome(self, run_dir: Path, revision: int) -> Outcome | None:
        """The newest outcome (greatest ``at``) stored for ``revision``."""
        directory = run_dir / "outcomes"
        found = [
            outcome
            for name, number, _ in self._listing(directory)
            if number == revision and (outcome := self._read(directory / name, Outcome)) is not None
        ]
        return max(found, key=lambda o: o.at, default=None)

    async def runs(self) -> list[str]:
        """Runs whose directory holds a ``latest.json`` or a ``status.json`` (one listing, read in a worker thread)."""
        self._check_open()
        return await anyio.to_thread.run_sync(self._list_runs)

    def _list_runs(self) -> list[str]:
        try:
            names = os.listdir(self._runs_root)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            try:
                validate_run_id(name)
            except ValueError:
                continue
            run_dir = os.path.join(self._runs_root, name)
            if os.path.exists(os.path.join(run_dir, "latest.json")) or os.path.exists(
                os.path.join(run_dir, "status.json")
            ):
                found.append(name)
        return sorted(found)

    # -- status and outcomes -----------------------------------------------------------------------------
    def _write(self, path: Path, data: bytes, *, durable: bool = True) -> None:
        try:
            self._makedirs(path.parent)
            atomic_write(path, data, self._file_mode, durable=durable)
        except OSError as exc:
            raise self._fs_exception("cannot write", path, exc) from None

    async def publish_status(self, status: Status) -> None:
        self._check_open()
        # Not fsync'd: a status is written again at the next change or keepalive, and an fsync per keepalive is most
        # of an idle sidecar's wake-ups (the disk's journal commit).
        self._write(self._run_dir(status.run) / "status.json", encode(status), durable=False)

    async def status(self, run: str) -> Status | None:
        self._check_open()
        return self._read(self._run_dir(run) / "status.json", Status)

    async def publish_schema(self, run: str, data: bytes) -> None:
        """Write the run's schema to ``schema.json`` beside its status (atomically, like the status)."""
        self._check_open()
        self._write(self._run_dir(run) / "schema.json", bytes(data))

    async def read_schema(self, run: str) -> bytes | None:
        self._check_open()
        return self._read_bytes(self._run_dir(run) / "schema.json")

    async def publish_outcome(self, outcome: Outcome) -> None:
        self._check_open()
        directory = self._run_dir(outcome.run) / "outcomes"
        self._write(directory / _outcome_name(outcome.revision, outcome.incarnation), encode(outcome))
        with contextlib.suppress(OSError):
            self._trim(directory, outcome.revision)
            same = [name for name, number, _ in self._listing(directory) if number == outcome.revision]
            if len(same) > OUTCOME_INCARNATIONS:
                kept = sorted(
                    ((o.at, name) for name in same if (o := self._read(directory / name, Outcome)) is not None),
                )
                for _, name in kept[: len(kept) - OUTCOME_INCARNATIONS]:
                    os.unlink(directory / name)

    async def outcome(self, run: str, revision: int) -> Outcome | None:
        self._check_open()
        return self._newest_outcome(self._run_dir(run), revision)

    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        self._check_open()
        directory = self._run_dir(run) / "outcomes"
        found = []
        for name, _, _ in self._listing(directory):
            outcome = self._read(directory / name, Outcome)
            if outcome is not None:
                found.append(outcome)
            await anyio.lowlevel.checkpoint()
        found.sort(key=lambda o: (o.revision, o.at))
        return found[-limit:] if limit else found

    async def statuses(self, runs: Sequence[str]) -> dict[str, Status | None]:
        """Every run's ``status.json``, read in one worker thread (no task per run; the event loop stays free)."""
        self._check_open()

        def read() -> dict[str, Status | None]:
            with decoding_many():
                return {run: self._read(os.path.join(self._run_path(run), "status.json"), Status) for run in runs}

        return await anyio.to_thread.run_sync(read)

    async def latests(self, runs: Sequence[str]) -> dict[str, Entry | None]:
        """Every run's newest revision, read in one worker thread (an unreadable one as its ``CorruptEntry``)."""
        self._check_open()

        def read() -> dict[str, Entry | None]:
            with decoding_many():
                return {run: self._newest(run, self._run_path(run)) for run in runs}

        return await anyio.to_thread.run_sync(read)

    async def delete(self, run: str) -> None:
        """Remove the run's directory (under its lock, so no write interleaves). The directory is first renamed
        out of the way, so readers never see half of it."""
        self._check_open()
        run_dir = self._run_dir(run)
        if not run_dir.exists():
            return
        graveyard = self.root / f".deleted-{run}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            with filelock.FileLock(run_dir / ".lock", timeout=LOCK_TIMEOUT):
                os.replace(run_dir, graveyard)
        except filelock.Timeout:
            raise TransportUnavailable(
                f"file transport: lock {run_dir / '.lock'} held by another process for over {LOCK_TIMEOUT:g}s"
            ) from None
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._fs_exception("cannot delete", run_dir, exc) from None
        shutil.rmtree(graveyard, ignore_errors=True)

    async def aclose(self) -> None:
        """Close the transport: running watches end at once. Idempotent."""
        self._closed = True
        for scope in list(self._waits):
            scope.cancel()
        idle, self._idle_watchers = self._idle_watchers, []
        close_in_background(idle)


def _touches(event: Event, run_dir: Path, names: Sequence[str]) -> bool:
    """Whether ``event`` concerns the run's directory itself (created, removed) or one of ``names`` in it."""
    if event.directory == run_dir.parent:
        return event.name == run_dir.name
    return event.directory == run_dir and event.name in names


def _answers_revision(event: Event, run_dir: Path, revision: int) -> bool:
    """Whether ``event`` may bring an outcome of ``revision``: an outcome file of that number written or renamed
    into place, or the run's ``outcomes`` directory (or the run's directory) created or removed."""
    if event.directory == run_dir / "outcomes":
        match = _ENTRY_NAME.fullmatch(event.name)
        return match is not None and int(match.group(1)) == revision
    return _touches(event, run_dir, ("outcomes",))


__all__ = ["FileTransport", "atomic_write", "path_from_url"]
