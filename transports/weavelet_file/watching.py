"""How the file transport learns that a file changed: Linux inotify, or polling where inotify cannot see writes.

inotify is read through the `asyncinotify <https://pypi.org/project/asyncinotify/>`_ library (a thin binding of
``inotify_init1``, ``inotify_add_watch`` and ``inotify_rm_watch``, without dependencies) and its file descriptor is
waited on in the event loop: no thread, no timer, no wake-up while nothing changes, and an event reaches the
waiting task within microseconds of the ``rename`` that caused it. Where the library cannot be imported (not
Linux, or not installed) :func:`inotify_unavailable` says so and ``auto`` polls.

inotify reports what this host's kernel does. On a network or FUSE filesystem (NFS, CIFS/SMB, sshfs, 9p, Ceph,
Lustre, ...) a write made on another host raises no event here, so there the transport polls: :func:`choose_mode`
reads the store's filesystem type from ``/proc/self/mountinfo`` and picks ``poll`` for the types in
:data:`REMOTE_FILESYSTEMS`. A URL option overrides the choice: ``?watch=poll``, ``?watch=inotify`` or
``?watch=auto`` (the default).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import anyio

if TYPE_CHECKING:
    import asyncinotify

log = logging.getLogger(__name__)

WATCH_MODES = ("auto", "inotify", "poll")
"""Values of the ``watch`` option: ``auto`` picks ``inotify`` unless the store is on a filesystem in
:data:`REMOTE_FILESYSTEMS` (or inotify is unavailable), where it picks ``poll``."""

REMOTE_FILESYSTEMS = frozenset(
    {
        "9p",
        "afs",
        "beegfs",
        "ceph",
        "cifs",
        "davfs",
        "fuse",
        "gfs2",
        "glusterfs",
        "gpfs",
        "lustre",
        "ncpfs",
        "nfs",
        "nfs4",
        "ocfs2",
        "orangefs",
        "smb3",
        "smbfs",
        "vboxsf",
        "virtiofs",
        "vmhgfs",
    }
)
"""Filesystem types (as ``/proc/self/mountinfo`` names them) where other hosts' writes raise no inotify event;
every ``fuse.*`` type (sshfs, s3fs, gcsfuse, ...) counts too. ``fuseblk`` (a local disk through FUSE) does not."""

# <sys/inotify.h>, the values asyncinotify.Mask gives the same names (defined here too, so that this module and its
# masks exist where the library does not)
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

_SELF = IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
ENTRIES = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CLOSE_WRITE | _SELF
"""Mask for a directory whose entries come and go (``runs/``, a run's directory while its ``outcomes/`` may
appear): anything created, renamed in or out, written, or removed, and the directory itself removed or moved."""
RENAMES = IN_MOVED_TO | IN_CLOSE_WRITE | _SELF
"""Mask for a directory of files replaced by a rename (``latest.json``, the outcome files): a file renamed into
place, or written in place and closed (by hand, say), and the directory itself removed or moved. A temporary file
being created wakes nothing."""
MOVES = IN_MOVED_TO | _SELF
"""Mask for a directory whose files only weavelet writes, always by a rename (the outcome files): a file renamed into
place, and the directory itself removed or moved."""
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
"""Event bits saying the watched directory itself went away (its watch is dropped)."""

_READ_EVENTS = 240
"""Events of the longest name one read has room for (about 64 KiB; shorter events fit more)."""
_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")


class Event(NamedTuple):
    """One inotify event: the watched ``directory`` (``None`` for a queue overflow: events were lost, read
    everything again), the ``name`` of the entry in it (empty for the directory itself) and the event ``mask``."""

    directory: Path | None
    name: str
    mask: int


@functools.cache
def inotify_unavailable() -> str | None:
    """Why inotify cannot be used in this process, or ``None`` when it can."""
    if not sys.platform.startswith("linux"):
        return f"inotify is a Linux interface and this is {sys.platform}"
    try:
        import asyncinotify  # noqa: F401
    except ImportError as exc:
        return f"the asyncinotify library cannot be imported ({exc}); install it with pip install asyncinotify"
    except (RuntimeError, OSError) as exc:  # raised on import when the C library has no inotify functions
        return f"the C library has no inotify functions ({exc})"
    return None


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem ``path`` lies on (``ext4``, ``nfs4``, ``fuse.sshfs``, ...), from the text of
    ``/proc/self/mountinfo`` (read when ``mountinfo`` is ``None``); ``None`` when that cannot be read (not Linux).
    ``path`` need not exist: the mount holding its absolute, resolved form decides."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
                mountinfo = f.read()
        except OSError:
            return None
    lines = mountinfo.splitlines()
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in lines:
        left, separator, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not separator or len(fields) < 5 or not rest:
            continue
        mount_point = _MOUNT_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # The longest mount point holding the path; of equal ones the last, which is mounted over the others.
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), rest[0])
    return best[1] if best is not None else None


def is_remote(fs_type: str) -> bool:
    """Whether writes made on other hosts to a filesystem of this type escape inotify (see
    :data:`REMOTE_FILESYSTEMS`)."""
    return fs_type in REMOTE_FILESYSTEMS or fs_type.startswith("fuse.")


def choose_mode(requested: str, path: Path) -> tuple[str, str]:
    """``(mode, reason)``: ``inotify`` or ``poll`` for a store at ``path``, and why, for the ``watch`` option's
    value ``requested`` (one of :data:`WATCH_MODES`).

    Raises ``ValueError`` for an unknown value, and ``OSError`` (its message naming the fix) when ``inotify`` is
    asked for where there is none.
    """
    if requested not in WATCH_MODES:
        raise ValueError(
            f"file transport: unknown watch={requested!r}; use one of {', '.join(WATCH_MODES)} (auto: inotify, "
            "except on network and FUSE filesystems, which are polled)"
        )
    if requested == "poll":
        return "poll", "asked for (watch=poll)"
    unavailable = inotify_unavailable()
    if requested == "inotify":
        if unavailable:
            raise OSError(errno.ENOSYS, f"file transport: watch=inotify: {unavailable}; use watch=poll or auto")
        return "inotify", "asked for (watch=inotify)"
    if unavailable:
        return "poll", unavailable
    fs_type = filesystem_type(path)
    if fs_type is not None and is_remote(fs_type):
        return "poll", f"the store is on {fs_type}, where other hosts' writes raise no inotify event"
    return "inotify", f"the store is on {fs_type or 'a local filesystem'}"


class DirectoryWatcher:
    """One inotify instance watching a few directories (each on its own, not recursively).

    :meth:`add` a directory before reading what it holds: an event for anything that changes after ``add``
    returned is then waiting in :meth:`wait`. Not thread-safe; used by one task. Raises ``OSError`` when the
    instance cannot be created (``EMFILE``: the per-user limit ``fs.inotify.max_user_instances`` is reached).
    """

    def __init__(self) -> None:
        reason = inotify_unavailable()
        if reason:
            raise OSError(errno.ENOSYS, reason)
        from asyncinotify import InitFlags, Inotify

        # Non-blocking, so that read() stops when the queue is empty (asyncinotify's InitFlags.NONBLOCK is
        # O_CLOEXEC's value, so O_NONBLOCK is given as itself).
        try:
            self._inotify = Inotify(InitFlags.CLOEXEC | os.O_NONBLOCK, cache_size=_READ_EVENTS)
        except OSError as exc:
            raise OSError(exc.errno, f"inotify_init1: {exc.strerror}") from None
        self._fd: int = self._inotify.fd
        self._paths: dict[Path, int] = {}
        self._directories: dict[int, Path] = {}

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def watching(self, directory: Path) -> bool:
        """Whether ``directory`` is watched now (added, and neither removed nor moved since)."""
        return directory in self._paths

    def add(self, directory: Path, mask: int = ENTRIES) -> bool:
        """Watch ``directory`` for the events in ``mask`` (:data:`ENTRIES` or :data:`RENAMES`); ``False`` when it
        does not exist (or is not a directory). Raises ``OSError`` for other failures (``ENOSPC``: the per-user
        limit ``fs.inotify.max_user_watches`` is reached)."""
        if directory in self._paths:
            return True
        from asyncinotify import Mask

        try:
            wd = self._inotify.add_watch(directory, Mask(mask)).wd
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise OSError(exc.errno, f"inotify_add_watch {directory}: {exc.strerror}") from None
        previous = self._directories.get(wd)
        if previous is not None and previous != directory:
            self._paths.pop(previous, None)  # the same directory under a new name
        self._paths[directory] = wd
        self._directories[wd] = directory
        return True

    def _remove(self, watch: asyncinotify.Watch) -> None:
        with contextlib.suppress(OSError):  # EINVAL: the kernel dropped it already (its IGNORED event is queued)
            self._inotify.rm_watch(watch)

    def _forget(self, wd: int) -> None:
        directory = self._directories.pop(wd, None)
        if directory is not None and self._paths.get(directory) == wd:
            del self._paths[directory]

    def read(self) -> list[Event]:
        """The events waiting now, without blocking (none: an empty list)."""
        events: list[Event] = []
        while self._fd >= 0:
            try:
                event = self._inotify.sync_get()
            except BlockingIOError:
                break
            if event is None:
                break
            mask = int(event.mask)
            if mask & IN_Q_OVERFLOW:
                events.append(Event(None, "", mask))
                continue
            watch = event.watch
            directory = self._directories.get(watch.wd) if watch is not None else None
            if watch is None or directory is None:
                continue  # a watch dropped earlier; its last events trail behind
            events.append(Event(directory, str(event.name or ""), mask))
            if mask & IN_MOVE_SELF:
                # The directory lives on under another name; what is watched is the path, so let it go.
                self._remove(watch)
            if mask & GONE:
                self._forget(watch.wd)
        return events

    async def wait(self, timeout: float) -> list[Event]:
        """The next events, waiting up to ``timeout`` seconds for one (an empty list when none came). Cancelling the
        caller's scope ends the wait at once."""
        events = self.read()
        if events or self._fd < 0:
            return events
        with anyio.move_on_after(max(0.0, timeout)):
            await anyio.wait_readable(self._fd)
        return self.read()

    def reset(self) -> None:
        """Stop watching every directory and drop the events still queued, ready for reuse by another watch.
        Cheap, unlike :meth:`close`."""
        if self._fd >= 0:
            for watch in self._inotify.watches:
                self._remove(watch)
        self._paths.clear()
        self._directories.clear()
        self.read()  # what was queued belongs to the directories just dropped

    def close(self) -> None:
        """Release the inotify instance. Idempotent. Nobody may be waiting in :meth:`wait` (cancel it first).

        The kernel makes this wait for a grace period of its own (milliseconds, tens of them on a loaded machine):
        an event loop should rather reuse a watcher (:meth:`reset`) or :func:`close_in_background`."""
        fd, self._fd = self._fd, -1
        self._paths.clear()
        self._directories.clear()
        if fd >= 0:
            self._inotify.close()


def close_in_background(watchers: list[DirectoryWatcher]) -> None:
    """Close ``watchers`` in a daemon thread, so that the kernel's wait (see :meth:`DirectoryWatcher.close`) does not
    hold up the caller's event loop."""

    def close_all() -> None:
        for watcher in watchers:
            watcher.close()

    if watchers:
        threading.Thread(target=close_all, name="weavelet-inotify-close", daemon=True).start()


__all__ = [
    "ENTRIES",
    "GONE",
    "MOVES",
    "REMOTE_FILESYSTEMS",
    "RENAMES",
    "WATCH_MODES",
    "DirectoryWatcher",
    "Event",
    "choose_mode",
    "close_in_background",
    "filesystem_type",
    "inotify_unavailable",
    "is_remote",
]
