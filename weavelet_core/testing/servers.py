"""One way to run a server as a child process: for tests, benchmarks and ``weavelet server``.

:class:`ManagedServer` is the base that the NATS, Redis, Redis Sentinel and cluster helpers build on. It starts
the process on a loopback port (a free one unless told otherwise, kept across restarts so clients reconnect to
the same URL), waits until the subclass's :meth:`ManagedServer.ready` probe says it serves clients (bounded),
stops it with one bounded escalation (SIGCONT, SIGTERM, then SIGKILL), kills it (SIGKILL, as a crash would),
pauses and resumes it (SIGSTOP / SIGCONT, as a hung machine would) and shows the end of its log.

Standard library only: ``weavelet server`` imports this module, so it must not import pytest or a driver.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from weavelet_core.errors import WeaveletError

DEFAULT_READY_TIMEOUT = 15.0
"""Seconds :meth:`ManagedServer.start` waits for the server to serve clients."""
DEFAULT_STOP_TIMEOUT = 10.0
"""Seconds :meth:`ManagedServer.stop` waits after SIGTERM before it sends SIGKILL."""
RESERVED_PORTS = frozenset({4222, 6222, 8222, 6379, 6380, 26379})
"""Well-known ports where a machine's own servers run; :func:`free_port` never returns them."""

S = TypeVar("S", bound="ManagedServer")


class ServerFailed(WeaveletError, RuntimeError):
    """A managed server exited or did not become ready in time; the message ends with the end of its log."""


BUS_OFFSET = 10000
"""A Redis Cluster node's bus listens on its port + 10000."""
FIRST_PICKED_PORT = 10000
"""The lowest port :func:`free_port` picks at random."""
_handed_out: collections.deque[int] = collections.deque(maxlen=1024)


def ephemeral_port_low() -> int:
    """The lowest port the kernel gives outgoing connections (``/proc/sys/net/ipv4/ip_local_port_range``; 32768
    where that cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", *, below: int = 65536) -> int:
    """A TCP port free on ``host`` now, below ``below`` (a Redis Cluster node needs its port + 10000 free too, so
    at most 55535), never one of :data:`RESERVED_PORTS`, and not one this process handed out lately.

    Picked at random below the kernel's ephemeral range, with room for the port + 10000 below it too: an
    outgoing connection (a client of another server in the same test run) is given ephemeral ports, so it never
    takes the port between this pick and the server's bind. Where that range leaves no room, the kernel picks.
    """
    top = min(below, ephemeral_port_low() - BUS_OFFSET)
    if top - FIRST_PICKED_PORT >= 1000:
        for _attempt in range(200):
            port = random.randrange(FIRST_PICKED_PORT, top)
            if port in RESERVED_PORTS or port in _handed_out or not port_is_free(port, host):
                continue
            if below <= 65536 - BUS_OFFSET and not port_is_free(port + BUS_OFFSET, host):
                continue
            _handed_out.append(port)
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS and port < below and port not in _handed_out:
            _handed_out.append(port)
            return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (a bind test, so it also sees listeners of other users).

    Connections left in TIME_WAIT by a stopped server do not count: servers reuse such a port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def wait_until_stopped(pid: int, timeout: float = 5.0) -> bool:
    """Wait until process ``pid`` is stopped (after a SIGSTOP), at most ``timeout`` seconds; whether it is.

    A stop takes effect a moment after the signal: a request sent in that moment may still be answered, which a test
    of a hung server must not count on. Reads ``/proc/PID/stat``; where there is none (not Linux) returns ``True``
    at once.
    """
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("T", "t"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


class ManagedServer:
    """A server child process on ``host:port``, its files under ``directory``.

    Subclasses implement :meth:`command` (the command line, using :attr:`port`) and :meth:`ready` (whether it
    serves clients now); they may set :attr:`kind` (for messages) and :attr:`extra_ports` (more ports to pick,
    such as a cluster port). The process's stdout and stderr are appended to :attr:`log_path`.

    :param directory: working directory of the server (log, configuration, data); created on start.
    :param port: TCP port; ``None`` picks a free one on the first start and keeps it afterwards.
    :param host: address to listen on, loopback by default.
    :param die_with_parent: on Linux, have the server receive SIGTERM when the thread that started it ends
        (for a foreground command such as ``weavelet server``, which starts it from its main thread).
    """

    kind = "server"
    """Name used in messages (``nats-server``, ``redis-server``...)."""
    log_name = "server.log"
    address_in_use = "address already in use"
    port_below = 65536
    """Ports picked for this server are below this."""
    """Text of the server's log, lowercased, that means its port was taken (a free port is then picked again)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        die_with_parent: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.host = host
        self.port: int | None = port
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    # -- to implement -------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The command line that runs the server on :attr:`port` (set before this is called)."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the server serves clients now. Called every 20 ms while starting; must return within ~1 s."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Called before each start, after :attr:`port` is chosen: write configuration files and the like."""

    # -- addresses ----------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``host:port`` (after the first start, or when a port was given)."""
        if self.port is None:
            raise RuntimeError(f"the {self.kind} has not been started yet, so it has no port")
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The file the server's output goes to."""
        return self.directory / self.log_name

    @property
    def running(self) -> bool:
        """Whether the process is alive (a paused one counts)."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while started, else ``None``."""
        return self.process.pid if self.process is not None else None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self: S, timeout: float = DEFAULT_READY_TIMEOUT) -> S:
        """Start the server (again, on the same port with the same files after :meth:`stop` or :meth:`kill`) and
        return once :meth:`ready`; raise :class:`ServerFailed` (with the end of its log) if it exits or is not
        ready within ``timeout`` seconds. A server already running is left as it is."""
        if self.running:
            return self
        # A port once used is kept (clients reconnect to the same URL); only a first start picks again when
        # another process took the free port it picked in the meantime.
        attempts = 1 if self.port is not None else 3
        for attempt in range(attempts):
            self.launch(timeout)
            try:
                self.wait_ready(timeout)
                return self
            except ServerFailed:
                in_use = self.address_in_use in self.log_tail(5).lower()
                if not in_use or attempt + 1 == attempts:
                    raise
                self.port = None
        raise AssertionError("unreachable")  # pragma: no cover

    def pick_extra_ports(self) -> None:
        """Pick any further ports the server needs; called when :attr:`port` is picked (first start)."""

    def choose_ports(self) -> None:
        """Pick :attr:`port` (and :meth:`pick_extra_ports`) if not chosen yet; a group calls it on every member
        before it writes any member's configuration."""
        if self.port is None:
            self.port = free_port(self.host, below=self.port_below)
            self.pick_extra_ports()

    def launch(self, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Start the process without waiting until it is ready (a cluster member is ready only once a quorum
        of members runs); follow with :meth:`wait_ready`. Waits up to ``timeout`` (at most 5 s) for a port
        that an earlier run of this server still holds."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.choose_ports()
        if not port_is_free(self.port or 0, self.host):
            self._wait_port_free(min(timeout, 5.0))
        self.prepare()
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting: {' '.join(cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                preexec_fn=_die_with_parent if self.die_with_parent and sys.platform == "linux" else None,
            )
        self.paused = False

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Return once :meth:`ready`; kill the process and raise :class:`ServerFailed` (with the end of its log)
        if it exits or is not ready within ``timeout`` seconds."""
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_port_free(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not port_is_free(self.port or 0, self.host):
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"port {self.host}:{self.port} is in use by another process; stop it or choose another port"
                )
            time.sleep(0.05)

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"{self.kind} exited with status {self.process.returncode} while starting on {self.address}; "
                    f"end of its log ({self.log_path}):\n{self.log_tail()}"
                )
            if self.ready():
                return
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"{self.kind} on {self.address} was not ready within {timeout:g}s; end of its log "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop gracefully: SIGCONT (if paused), SIGTERM, and SIGKILL if it has not exited after ``timeout``
        seconds. Returns within ``timeout`` plus a few seconds. Idempotent."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10.0)
        self._forget()

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash or an OOM kill. Idempotent."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(10.0)
        self._forget()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections open but answers nothing (a hung machine)."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"cannot pause the {self.kind}: it is not running")
        self.process.send_signal(signal.SIGSTOP)
        wait_until_stopped(self.process.pid)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: undo :meth:`pause`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self: S, timeout: float = DEFAULT_READY_TIMEOUT) -> S:
        """Stop, then start on the same port with the same files."""
        self.stop()
        return self.start(timeout)

    def _forget(self) -> None:
        self.process = None
        self.paused = False

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's log (``(no log)`` when there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "paused" if self.paused else ("running" if self.running else "stopped")
        where = self.address if self.port is not None else "no port yet"
        return f"<{type(self).__name__} {where} {state} dir={self.directory}>"


class ServerGroup:
    """Several managed servers stopped together (a cluster, a master with replicas and sentinels).

    :meth:`close` stops every member, each with its own bounded escalation, and never raises.
    """

    def __init__(self) -> None:
        self.members: list[ManagedServer] = []

    def add(self, server: S) -> S:
        self.members.append(server)
        return server

    def close(self, timeout: float = 5.0) -> None:
        """Stop every member (SIGTERM, SIGKILL after ``timeout`` seconds each); errors are swallowed."""
        for server in self.members:
            with contextlib.suppress(Exception):
                server.stop(timeout)


__all__ = [
    "DEFAULT_READY_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "RESERVED_PORTS",
    "ManagedServer",
    "ServerFailed",
    "ServerGroup",
    "free_port",
    "port_is_free",
]
