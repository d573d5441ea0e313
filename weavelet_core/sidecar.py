"""The weavelet sidecar: the child process that talks to the transport on behalf of one trainer.

It runs :func:`main` in a ``spawn``-started process and never imports torch or Lightning. It

- connects with a deadline (``connect_timeout``) and, after any outage, reconnects forever with backoff;
- watches its run's desired config from the last revision it forwarded (so a reconnect or a restart
  reconciles from the newest revision), validates each revision and forwards only newer ones to the trainer;
  revisions it skips over are reported ``superseded`` unless they already have an outcome;
- publishes every outcome the trainer reports, in order, retrying until it is stored, and the trainer's status
  as a heartbeat (every ``heartbeat_interval`` seconds);
- exits by itself within a second when the trainer dies (parent-process sentinel plus a ``getppid`` check),
  publishing a ``failed`` status that says so when the transport allows;
- on the trainer's stop request, SIGTERM or SIGINT publishes what is pending and a final ``stopped`` status
  (bounded), then exits.

Exit codes: :data:`EXIT_OK`, :data:`EXIT_FATAL` (authentication refused or driver missing: retrying cannot
help), :data:`EXIT_ORPHANED` (the trainer died).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import queue
import signal
import sys
import time
from typing import Any

import anyio
import anyio.abc

from weavelet_core.channel import Channel, reader_fileno
from weavelet_core.errors import AuthenticationFailed, PluginError, ProtocolError
from weavelet_core.plugins import mask_password, open_transport
from weavelet_core.protocol import Outcome, Revision, Status, encode, from_dict
from weavelet_core.transport import Transport

log = logging.getLogger("weavelet_core.sidecar")

EXIT_OK = 0
EXIT_FATAL = 3
EXIT_ORPHANED = 4

PARENT_CHECK_INTERVAL = 0.25
RECONNECT_DELAY = (0.1, 5.0)
ORPHAN_FINAL_TIMEOUT = 0.5
SIGNAL_FINAL_TIMEOUT = 2.0
MAX_SUPERSEDE_SCAN = 1000
"""At most this many skipped revision numbers are checked for a missing outcome on each forward."""


@dataclasses.dataclass(frozen=True)
class SidecarConfig:
    """What the trainer tells a new sidecar (plain values only)."""

    run: str
    url: str
    after: int
    heartbeat_interval: float
    connect_timeout: float
    transport_options: dict[str, Any]
    trainer_pid: int
    log_level: int = logging.WARNING


class _Stop(Exception):
    pass


class Sidecar:
    """The sidecar's state and tasks; :meth:`run` returns the process exit code."""

    def __init__(self, config: SidecarConfig, channel: Channel) -> None:
        self.config = config
        self.channel = channel
        self.run_id = config.run
        self.url = mask_password(config.url)
        self.last_forwarded = config.after
        self.outbox: list[tuple[int | None, Outcome]] = []
        self.unscanned: list[tuple[int, int]] = []
        self.transport: Transport | None = None
        self.exit_code = EXIT_OK
        self.final_state = "stopped"
        self.final_message: str | None = None
        self.final_timeout = SIGNAL_FINAL_TIMEOUT
        self._kick = anyio.Event()
        self._last_status: dict[str, Any] = {}
        self._cancel: anyio.CancelScope | None = None
        self._original_ppid = os.getppid()
        self._outage_since: float | None = None

    # -- entry -----------------------------------------------------------------------------------------
    async def run(self) -> int:
        async with anyio.create_task_group() as tg:
            self._cancel = tg.cancel_scope
            tg.start_soon(self._watch_parent)
            tg.start_soon(self._watch_signals)
            tg.start_soon(self._read_inbox)
            tg.start_soon(self._connection_loop)
        await self._finish()
        return self.exit_code

    def _shutdown(self, state: str, code: int, timeout: float, message: str | None = None) -> None:
        if self._cancel is None or self._cancel.cancel_called:
            return
        self.final_state, self.exit_code, self.final_timeout, self.final_message = state, code, timeout, message
        self._cancel.cancel()

    async def _finish(self) -> None:
        """Publish pending outcomes and the final status, within ``final_timeout``; close the transport."""
        with anyio.move_on_after(self.final_timeout, shield=True):
            transport = self.transport
            if transport is None and self.exit_code != EXIT_FATAL:
                transport = await self._open_once()
            if transport is not None:
                try:
                    await self._publish_outbox(transport)
                    await transport.publish_status(self._status(self.final_state, self.final_message))
                except Exception as exc:
                    log.warning("weavelet: could not publish the final status of run %r: %s", self.run_id, exc)
        if self.transport is not None:
            with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                await self.transport.aclose()
        # The trainer reads nothing more: do not wait for unsent revisions at exit.
        self.channel.to_trainer.cancel_join_thread()

    async def _open_once(self) -> Transport | None:
        transport: Transport | None = None
        try:
            transport = open_transport(self.config.url, **self.config.transport_options)
            await transport.connect()
            self.transport = transport
            return transport
        except Exception as exc:
            log.warning("weavelet: cannot reach %s to publish the final status: %s", self.url, exc)
            if transport is not None:
                with contextlib.suppress(Exception):
                    await transport.aclose()
            return None

    # -- trainer liveness and signals ------------------------------------------------------------------
    async def _watch_parent(self) -> None:
        parent = multiprocessing.parent_process()
        sentinel = parent.sentinel if parent is not None else None
        while True:
            if sentinel is not None:
                with anyio.move_on_after(PARENT_CHECK_INTERVAL):
                    await anyio.wait_readable(sentinel)
                    break
            else:
                await anyio.sleep(PARENT_CHECK_INTERVAL)
            if os.getppid() != self._original_ppid:
                break
        message = (
            f"the trainer process (pid {self.config.trainer_pid}) ended without stopping its weavelet; "
            "the run is no longer controlled"
        )
        log.warning("weavelet: %s", message)
        self._shutdown("failed", EXIT_ORPHANED, ORPHAN_FINAL_TIMEOUT, message)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("weavelet: sidecar of run %r got %s; stopping", self.run_id, signal.Signals(signum).name)
                self._shutdown("stopped", EXIT_OK, SIGNAL_FINAL_TIMEOUT)
                return

    # -- trainer -> sidecar ----------------------------------------------------------------------------
    async def _read_inbox(self) -> None:
        inbox = self.channel.to_sidecar
        fd = reader_fileno(inbox)
        while True:
            await anyio.wait_readable(fd)
            while True:
                try:
                    data = inbox.get_nowait()
                except queue.Empty:
                    break
                except (EOFError, OSError) as exc:  # the trainer's end is gone; the parent watch ends us
                    log.debug("weavelet: inbox closed: %s", exc)
                    await anyio.sleep(PARENT_CHECK_INTERVAL)
                    break
                self._handle(data)

    def _handle(self, data: object) -> None:
        try:
            message = json.loads(data) if isinstance(data, (bytes, str)) else None
            kind = message.get("t") if isinstance(message, dict) else None
            if kind == "outcome":
                assert isinstance(message, dict)
                outcome = from_dict(message["outcome"], Outcome)
                self.outbox.append((int(message["seq"]), outcome))
                self._kick.set()
            elif kind == "stop":
                assert isinstance(message, dict)
                timeout = float(message.get("timeout", SIGNAL_FINAL_TIMEOUT))
                self._shutdown("stopped", EXIT_OK, timeout if math.isfinite(timeout) else SIGNAL_FINAL_TIMEOUT)
            else:
                log.error("weavelet: ignoring an unknown message from the trainer: %.200r", data)
        except (ValueError, KeyError, TypeError, AssertionError, ProtocolError) as exc:
            log.error("weavelet: ignoring a malformed message from the trainer (%s): %.200r", exc, data)

    # -- transport -------------------------------------------------------------------------------------
    async def _connection_loop(self) -> None:
        low, high = RECONNECT_DELAY
        delay = low
        while True:
            transport: Transport | None = None
            try:
                transport = open_transport(self.config.url, **self.config.transport_options)
                with anyio.fail_after(self.config.connect_timeout):
                    await transport.connect()
            except (AuthenticationFailed, PluginError) as exc:
                await self._close_quietly(transport)
                self._fatal(exc)
                return
            except Exception as exc:
                await self._close_quietly(transport)
                reason = f"no answer within {self.config.connect_timeout:g}s" if isinstance(exc, TimeoutError) else exc
                self._lost(f"cannot connect to {self.url}: {reason}", delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, high)
                continue
            self.transport = transport
            self.channel.send_event("connected")
            if self._outage_since is not None:
                log.warning(
                    "weavelet: run %r connected to %s after %.1fs of retrying",
                    self.run_id,
                    self.url,
                    time.monotonic() - self._outage_since,
                )
                self._outage_since = None
            else:
                log.info("weavelet: sidecar of run %r connected to %s", self.run_id, self.url)
            delay = low
            failure: list[BaseException] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._guard, self._watch_revisions, transport, failure, tg.cancel_scope)
                tg.start_soon(self._guard, self._publish_loop, transport, failure, tg.cancel_scope)
            # Only reached when a task failed: a shutdown cancels this whole loop before it gets here.
            self.transport = None
            await self._close_quietly(transport)
            error = failure[0] if failure else RuntimeError("transport tasks ended")
            if isinstance(error, (AuthenticationFailed, PluginError)):
                self._fatal(error)
                return
            self._lost(f"lost {self.url}: {error}", delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, high)

    async def _guard(
        self, task: Any, transport: Transport, failure: list[BaseException], scope: anyio.CancelScope
    ) -> None:
        try:
            await task(transport)
        except Exception as exc:
            failure.append(exc)
            scope.cancel()

    def _lost(self, message: str, delay: float) -> None:
        """Report a failed attempt: the first of an outage as a warning, the retries that follow at debug level
        (an outage of hours must not flood the trainer's log)."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("weavelet: %s; retrying in %.1fs (training is not affected)", message, delay)
        else:
            log.debug("weavelet: %s; retrying in %.1fs", message, delay)
        self.channel.send_event("disconnected", message)

    def _fatal(self, exc: BaseException) -> None:
        message = str(exc) or f"{self.url} refused the credentials ({type(exc).__name__})"
        log.error("weavelet: %s; remote control of run %r is off", message, self.run_id)
        self.channel.send_event("failed", message)
        self._shutdown("failed", EXIT_FATAL, 0.0, message)

    @staticmethod
    async def _close_quietly(transport: Transport | None) -> None:
        if transport is not None:
            with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                await transport.aclose()

    async def _watch_revisions(self, transport: Transport) -> None:
        await self._supersede_skipped(transport)
        watcher = transport.watch(self.run_id, after=self.last_forwarded)
        try:
            async for revision in watcher:
                await self._forward(transport, revision)
        finally:
            with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                await watcher.aclose()  # type: ignore[attr-defined]

    async def _forward(self, transport: Transport, revision: object) -> None:
        if not isinstance(revision, Revision):
            log.error("weavelet: transport %s yielded %s, not a Revision; skipped", self.url, type(revision))
            return
        if revision.run != self.run_id:
            log.error(
                "weavelet: transport %s yielded revision %d of run %r while watching run %r; skipped",
                self.url,
                revision.revision,
                revision.run,
                self.run_id,
            )
            return
        number = revision.revision
        if number <= self.last_forwarded:
            log.debug("weavelet: revision %d of run %r already handled; skipped", number, self.run_id)
            return
        skipped_from = self.last_forwarded + 1
        try:
            data = encode(revision)
        except ProtocolError as exc:
            self._queue_outcome(Outcome(run=self.run_id, revision=number, result="rejected", message=str(exc)))
            log.error("weavelet: revision %d of run %r rejected: %s", number, self.run_id, exc)
        else:
            self.channel.forward(data)
        self.last_forwarded = number
        if skipped_from < number:
            self.unscanned.append((skipped_from, number))
        # After forwarding, so that the trainer is not kept waiting by the bookkeeping.
        await self._supersede_skipped(transport)

    async def _supersede_skipped(self, transport: Transport) -> None:
        """Report ``superseded`` for skipped revisions (``unscanned`` ranges) that never reached the trainer
        and have no outcome yet, at most the last :data:`MAX_SUPERSEDE_SCAN` of each range. A range leaves
        ``unscanned`` only once fully checked, so an outage in the middle is resumed after reconnecting."""
        while self.unscanned:
            first, number = self.unscanned[0]
            await self._supersede_range(transport, first, number)
            self.unscanned.pop(0)

    async def _supersede_range(self, transport: Transport, first: int, number: int) -> None:
        for skipped in range(max(first, number - MAX_SUPERSEDE_SCAN), number):
            if await transport.outcome(self.run_id, skipped) is None:
                self._queue_outcome(
                    Outcome(
                        run=self.run_id,
                        revision=skipped,
                        result="superseded",
                        message=f"revision {number} arrived before revision {skipped} was applied",
                    )
                )

    def _queue_outcome(self, outcome: Outcome) -> None:
        self.outbox.append((None, outcome))
        self._kick.set()

    async def _publish_loop(self, transport: Transport) -> None:
        while True:
            await self._publish_outbox(transport)
            await transport.publish_status(self._status("running"))
            with anyio.move_on_after(self.config.heartbeat_interval):
                await self._kick.wait()
            self._kick = anyio.Event()

    async def _publish_outbox(self, transport: Transport) -> None:
        while self.outbox:
            seq, outcome = self.outbox[0]
            await transport.publish_outcome(outcome)
            self.outbox.pop(0)
            if seq is not None:
                self.channel.outcome_ack.value = seq

    def _status(self, state: str, message: str | None = None) -> Status:
        snapshot = self.channel.status.read()
        if snapshot is not None:
            try:
                fields = json.loads(snapshot[1])
                if isinstance(fields, dict):
                    self._last_status = fields
            except ValueError as exc:
                log.debug("weavelet: unreadable status snapshot: %s", exc)
        fields = self._last_status
        try:
            return Status(
                run=self.run_id,
                state=state,
                pid=self.config.trainer_pid,
                message=message,
                step=fields.get("step", 0),
                epoch=fields.get("epoch", 0),
                applied_revision=fields.get("applied_revision", self.config.after),
                optimizer=fields.get("optimizer"),
                metrics=fields.get("metrics", {}),
                heartbeat=time.time(),
            )
        except (ProtocolError, ValueError, TypeError) as exc:
            log.warning(
                "weavelet: status of run %r not publishable (%s); sending the lifecycle state only", self.run_id, exc
            )
            return Status(
                run=self.run_id, state=state, pid=self.config.trainer_pid, message=message, heartbeat=time.time()
            )


def _configure_logging(level: int) -> None:
    root = logging.getLogger("weavelet_core")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s weavelet-sidecar[{os.getpid()}] %(levelname)s %(message)s")
        )
        root.addHandler(handler)
    for name in ("weavelet_file", "weavelet_nats", "weavelet_redis"):
        logging.getLogger(name).setLevel(level)
        if not logging.getLogger(name).handlers:
            logging.getLogger(name).handlers = root.handlers


def main(config: SidecarConfig, channel: Channel) -> None:
    """The sidecar process's target: run until stopped, then exit with the code described in the module."""
    # Out of the trainer's process group: a Ctrl-C in the terminal reaches the trainer, which stops us.
    with contextlib.suppress(OSError, AttributeError):
        os.setpgid(0, 0)
    _configure_logging(config.log_level)
    channel.in_sidecar()
    code = anyio.run(Sidecar(config, channel).run, backend="asyncio")
    sys.exit(code)


__all__ = ["EXIT_FATAL", "EXIT_OK", "EXIT_ORPHANED", "Sidecar", "SidecarConfig", "main"]
