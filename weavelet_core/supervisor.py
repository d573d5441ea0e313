"""Supervising the sidecar process: spawn it, restart it when it dies, stop it with one escalation policy.

:class:`SidecarSupervisor` owns the sidecar's ``multiprocessing`` process and its channel, and a thread that
waits on three things at once: the process's sentinel (it died), the channel's event pipe (connected,
disconnected, claimed, failed) and a wake-up pipe (stop). A sidecar that exits with
:data:`~weavelet_core.sidecar.EXIT_FATAL` is not restarted (retrying cannot help); any other death is
restarted after an exponential backoff, up to ``max_restarts`` times.

Stop escalation (the one policy for every sidecar, as torch elastic's ``multiprocessing`` API has one for every
child): ask (a ``stop`` message: the sidecar publishes what is pending and a final status), wait up to 80% of
the remaining time, ``SIGTERM``, wait half of what is left, ``SIGKILL`` (which even a stopped process cannot
refuse), wait at most a second more. Then the channel's queues are closed and their feeder threads joined.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnContext
from typing import Any, Protocol

from weavelet_core import spawning
from weavelet_core.channel import Channel
from weavelet_core.sidecar import EXIT_FATAL, SidecarConfig
from weavelet_core.sidecar import main as sidecar_main

log = logging.getLogger("weavelet_core.process")


class Owner(Protocol):
    """What the supervisor needs from the trainer's side (implemented by ``WeaveletProcess``)."""

    run: str

    def sidecar_config(self) -> SidecarConfig:
        """The configuration of the next sidecar."""

    def attach_channel(self, channel: Channel) -> None:
        """A sidecar started on ``channel``: hand it pending outcomes and the status."""

    def detach_channel(self, channel: Channel) -> None:
        """The sidecar on ``channel`` is gone: stop reading it, keep what it did not publish."""

    def on_event(self, event: str, payload: dict[str, Any]) -> None:
        """An event from the sidecar (``connected``, ``disconnected``, ``claimed``, ``failed``)."""

    def on_restarting(self) -> None:
        """A dead sidecar is about to be restarted."""

    def on_fail(self, message: str) -> None:
        """Remote control ended for good (fatal error, restart limit)."""

    def status_deadline(self) -> float | None:
        """``time.monotonic()`` time at which a pending status report must be written; ``None``: none pending."""

    def write_pending_status(self) -> None:
        """Write the pending status report now (called from the supervisor thread when its deadline passed)."""


def exit_code(process: multiprocessing.process.BaseProcess, timeout: float) -> int | None:
    """The exit code of a process whose sentinel fired. The sentinel can fire a moment before the process
    can be reaped (its files are closed first), so ``join`` alone may return with no exit code yet."""
    deadline = time.monotonic() + timeout
    while True:
        process.join(0.01)
        if process.exitcode is not None or time.monotonic() >= deadline:
            return process.exitcode
        time.sleep(0.01)


class SidecarSupervisor:
    """Runs one sidecar at a time for ``owner``; see the module docstring for the policies.

    :param max_restarts: restarts allowed (``None``: no limit).
    :param restart_backoff: ``(first, longest)`` delay in seconds, doubling per consecutive death; a sidecar
        that lived ``10 * longest`` seconds resets the doubling.
    """

    def __init__(
        self,
        owner: Owner,
        ctx: SpawnContext,
        *,
        max_restarts: int | None,
        restart_backoff: tuple[float, float],
    ) -> None:
        self.owner = owner
        self.ctx = ctx
        self.max_restarts = max_restarts
        self.restart_backoff = restart_backoff
        self.restarts = 0
        self.lock = threading.RLock()  # guards process and channel
        self.process: multiprocessing.process.BaseProcess | None = None
        self.channel: Channel | None = None
        self.stopping = False
        self._thread: threading.Thread | None = None
        self._wake_r = -1
        self._wake_w = -1

    # -- start -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the first sidecar and the supervising thread; raise what spawning raised."""
        spawning.install()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)  # wake() from the training loop never blocks, even if unread
        try:
            self._spawn()
        except BaseException:
            self.close_pipes()
            raise
        self._thread = threading.Thread(
            target=self._supervise, name=f"weavelet-supervisor-{self.owner.run}", daemon=True
        )
        self._thread.start()

    def _spawn(self) -> None:
        channel = Channel(self.ctx)
        process = self.ctx.Process(
            target=sidecar_main,
            args=(self.owner.sidecar_config(), channel),
            name=f"{spawning.SIDECAR_NAME_PREFIX}-{self.owner.run}",
            daemon=True,
        )
        process.start()
        channel.after_spawn()
        self.channel = channel
        self.process = process
        self.owner.attach_channel(channel)

    def wake(self) -> None:
        """Make the supervisor thread look at the owner's :meth:`Owner.status_deadline` again. Never blocks."""
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"w")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.is_alive() else None

    # -- supervision -----------------------------------------------------------------------------------
    def _supervise(self) -> None:
        try:
            self._supervise_loop()
        except Exception as exc:  # a bug here must not pass silently: remote control would quietly stop
            if not self.stopping:
                log.exception("weavelet: the supervisor of run %r failed", self.owner.run)
                self.owner.on_fail(f"the weavelet supervisor failed: {exc!r}")

    def _supervise_loop(self) -> None:
        consecutive = 0
        while True:
            with self.lock:
                process, channel = self.process, self.channel
            if self.stopping or process is None or channel is None:
                return
            started = time.monotonic()
            if not self._wait_for_death(process, channel):
                return
            code = exit_code(process, timeout=1.0)
            if self.stopping:
                return
            if code == EXIT_FATAL:
                self.owner.on_fail("")
                return
            if time.monotonic() - started > 10 * self.restart_backoff[1]:
                consecutive = 0
            if self.max_restarts is not None and self.restarts >= self.max_restarts:
                self.owner.on_fail(
                    f"the weavelet sidecar died {self.restarts + 1} times (last exit code {code}); the restart "
                    f"limit is {self.max_restarts}: remote control of run {self.owner.run!r} is off, training goes on"
                )
                return
            low, high = self.restart_backoff
            delay = min(low * (2**consecutive), high)
            consecutive += 1
            log.warning(
                "weavelet: the sidecar of run %r exited (code %s); restarting in %.1fs (restart %d of %s); "
                "training is not affected",
                self.owner.run,
                code,
                delay,
                self.restarts + 1,
                self.max_restarts if self.max_restarts is not None else "unlimited",
            )
            self.owner.on_restarting()
            until = time.monotonic() + delay
            while not self.stopping and (left := until - time.monotonic()) > 0:
                try:
                    if multiprocessing.connection.wait([self._wake_r], timeout=left):
                        self._drain_wake()  # a report's wake-up: no sidecar to hand a status to now
                except (OSError, ValueError):
                    break
            with self.lock:
                if self.stopping:
                    return
                self._retire(channel)
                try:
                    self._spawn()
                except Exception as exc:
                    self.owner.on_fail(f"cannot restart the weavelet sidecar: {exc}")
                    return
                self.restarts += 1

    def _wait_for_death(self, process: multiprocessing.process.BaseProcess, channel: Channel) -> bool:
        """Handle events until the sidecar dies (``True``) or a stop begins (``False``); write a pending status
        report when its deadline passes (the only timed wake-up, armed only while a report is pending)."""
        events_open = True
        while True:
            waitables: list[Any] = [process.sentinel, self._wake_r]
            if events_open:
                waitables.append(channel.events_reader)
            deadline = self.owner.status_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ready = multiprocessing.connection.wait(waitables, timeout)
            except (OSError, ValueError):  # closed under us: only stop() does that
                return False
            if self.stopping:
                return False
            if self._wake_r in ready:
                self._drain_wake()
            if deadline is not None and time.monotonic() >= deadline:
                self.owner.write_pending_status()
            if events_open and channel.events_reader in ready:
                events_open = self._read_events(channel)
            if process.sentinel in ready:
                if events_open:  # events written just before dying (a fatal error's reason) still count
                    self._read_events(channel)
                return True

    def _read_events(self, channel: Channel) -> bool:
        """Handle the sidecar's events; return ``False`` once its end of the pipe is closed."""
        reader = channel.events_reader
        try:
            while reader.poll():
                data = reader.recv_bytes()
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self.owner.on_event(str(event.get("event")), event)
        except (EOFError, OSError):
            return False
        return True

    def _retire(self, channel: Channel) -> None:
        self.owner.detach_channel(channel)
        channel.close()
        if self.channel is channel:
            self.channel = None
            self.process = None

    def abandon(self) -> None:
        """Forget the current sidecar after a fatal end (it exited or is about to)."""
        with self.lock:
            process, channel = self.process, self.channel
            if process is not None:
                process.join(0.1)
            if channel is not None:
                self._retire(channel)
            self.process = self.channel = None

    # -- stop ------------------------------------------------------------------------------------------
    def stop(self, deadline: float, before_stop: Callable[[], None]) -> None:
        """Stop the sidecar by ``deadline`` (``time.monotonic()``), escalating as the module says.

        ``before_stop`` runs just before the stop request is sent (the owner's last status snapshot).
        """
        self.stopping = True
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.05, min(1.0, deadline - time.monotonic())))
        with self.lock:
            process, channel = self.process, self.channel
            if process is not None and channel is not None:
                before_stop()
                remaining = max(0.0, deadline - time.monotonic())
                with contextlib.suppress(Exception):
                    message = {"t": "stop", "timeout": round(remaining * 0.6, 3)}
                    channel.to_sidecar.put(json.dumps(message).encode())
                process.join(max(0.05, remaining * 0.8))
                if process.is_alive():
                    log.warning("weavelet: sidecar of run %r did not stop in time; terminating it", self.owner.run)
                    process.terminate()
                    process.join(max(0.05, (deadline - time.monotonic()) * 0.5))
                if process.is_alive():
                    process.kill()
                    process.join(min(1.0, max(0.1, deadline - time.monotonic())))
                self._retire(channel)
                if process.exitcode is not None:
                    process.close()
            self.process = None
            self.channel = None
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(max(0.05, deadline - time.monotonic()))
        self.close_pipes()

    def close_pipes(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1


__all__ = ["Owner", "SidecarSupervisor", "exit_code"]
