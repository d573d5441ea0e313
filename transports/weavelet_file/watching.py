"""How the file transport learns that a file changed: Linux inotify, or polling where inotify cannot see writes.

inotify is read straight from the C library (``inotify_init1``, ``inotify_add_watch``) and waited on as a file
descriptor in the event loop: no thread, no timer, no wake-up while nothing changes, and an event reaches the
waiting task within microseconds of the ``rename`` that caused it.

inotify reports what this host's kernel does. On a network or FUSE filesystem (NFS, CIFS/SMB, sshfs, 9p, Ceph,
Lustre, ...) a write made on another host raises no event here, so there the transport polls: :func:`choose_mode`
reads the store's filesystem type from ``/proc/self/mountinfo`` and picks ``poll`` for the types in
:data:`REMOTE_FILESYSTEMS`. A URL option overrides the choice: ``?watch=poll``, ``?watch=inotify`` or
``?watch=auto`` (the default).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import re
import struct
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import anyio

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

# <sys/inotify.h>
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
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC

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

_EVENT = struct.Struct("iIII")
_READ_SIZE = 64 * 1024
_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")


class Event(NamedTuple):
    """One inotify event: the watched ``directory`` (``None`` for a queue overflow: events were lost, read
    everything again), the ``name`` of the entry in it (empty for the directory itself) and the event ``mask``."""

    directory: Path | None
    name: str
    mask: int


class _Inotify:
    """The three C functions, or why they are not there."""

    def __init__(self) -> None:
        self.reason = ""
        self.init1: ctypes._NamedFuncPointer | None = None
        self.add_watch: ctypes._NamedFuncPointer | None = None
        self.rm_watch: ctypes._NamedFuncPointer | None = None
        if not sys.platform.startswith("linux"):
            self.reason = f"inotify is a Linux interface and this is {sys.platform}"
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols, which include the C library's
            self.init1 = libc.inotify_init1
            self.add_watch = libc.inotify_add_watch
            self.rm_watch = libc.inotify_rm_watch
        except (OSError, AttributeError) as exc:
            self.reason = f"the C library has no inotify functions ({exc})"
            return
        self.init1.argtypes, self.init1.restype = [ctypes.c_int], ctypes.c_int
        self.add_watch.argtypes, self.add_watch.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
        self.rm_watch.argtypes, self.rm_watch.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int


@functools.cache
def _inotify() -> _Inotify:
    return _Inotify()


def inotify_unavailable() -> str | None:
    """Why inotify cannot be used in this process, or ``None`` when it can."""
    return _inotify().reason or None


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
        lib = _inotify()
        if lib.init1 is None:
            raise OSError(errno.ENOSYS, lib.reason)
        fd = int(lib.init1(_IN_NONBLOCK | _IN_CLOEXEC))
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self._fd: int = fd
        self._lib = lib
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
        assert self._lib.add_watch is not None
        wd = int(self._lib.add_watch(self._fd, os.fsencode(directory), mask))
        if wd < 0:
            code = ctypes.get_errno()
            if code in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise OSError(code, f"inotify_add_watch {directory}: {os.strerror(code)}")
        previous = self._directories.get(wd)
        if previous is not None and previous != directory:
            self._paths.pop(previous, None)  # the same directory under a new name
        self._paths[directory] = wd
        self._directories[wd] = directory
        return True

    def _forget(self, wd: int) -> None:
        directory = self._directories.pop(wd, None)
        if directory is not None and self._paths.get(directory) == wd:
            del self._paths[directory]

    def read(self) -> list[Event]:
        """The events waiting now, without blocking (none: an empty list)."""
        events: list[Event] = []
        while self._fd >= 0:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length].split(b"\0", 1)[0]
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    events.append(Event(None, "", mask))
                    continue
                directory = self._directories.get(wd)
                if directory is None:
                    continue  # a watch dropped earlier; its last events trail behind
                events.append(Event(directory, os.fsdecode(raw), mask))
                if mask & IN_MOVE_SELF and self._lib.rm_watch is not None:
                    # The directory lives on under another name; what is watched is the path, so let it go.
                    self._lib.rm_watch(self._fd, wd)
                if mask & GONE:
                    self._forget(wd)
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
        if self._fd >= 0 and self._lib.rm_watch is not None:
            for wd in list(self._directories):
                self._lib.rm_watch(self._fd, wd)
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
            os.close(fd)


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
