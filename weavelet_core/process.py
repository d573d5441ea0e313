"""The trainer's side of weavelet: :class:`WeaveletProcess` starts, supervises and stops the sidecar.

The trainer calls :meth:`WeaveletProcess.poll` at each optimizer-step boundary (one shared-integer read when
nothing changed), applies what it returns, and tells the outcome with :meth:`WeaveletProcess.report_outcome`.
:meth:`WeaveletProcess.report` hands over step, epoch, metrics and the active optimizer for the heartbeat.
None of these ever blocks or raises: a dead, stalled or disconnected sidecar never holds training up.

A supervisor thread restarts a sidecar that died (exponential backoff, a restart limit); the new sidecar
reconciles from the newest revision, starting after the last one handed to the trainer, so no revision is
handed out twice or silently skipped (skipped ones are reported ``superseded``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
from types import TracebackType
from typing import Any

from weavelet_core import exithooks, spawning
from weavelet_core.channel import Channel
from weavelet_core.errors import ProtocolError
from weavelet_core.lifecycle import (
    CREATED,
    FAILED,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
    Lifecycle,
)
from weavelet_core.plugins import default_url, get_registry, mask_password, open_transport
from weavelet_core.protocol import OUTCOME_RESULTS, Outcome, Revision, decode, to_dict, validate_run_id
from weavelet_core.sidecar import EXIT_FATAL, SidecarConfig
from weavelet_core.sidecar import main as sidecar_main

log = logging.getLogger(__name__)

STATUS_FLUSH_INTERVAL = 0.05
"""Shortest time between two status snapshots handed to the sidecar; calls in between only record."""


class WeaveletProcess:
    """Runs the weavelet sidecar for one training run and is the trainer's channel to it.

    :param run: the run id (validated here: an invalid one raises :class:`~weavelet_core.InvalidRunId`).
    :param url: transport URL; default ``WEAVELET_URL`` or the per-user ``file://`` directory. Resolved here:
        an unknown scheme raises :class:`~weavelet_core.UnknownTransport`, a missing client library
        :class:`~weavelet_core.MissingDriver`. ``memory://`` is refused (it cannot cross processes).
    :param after: revisions ``<= after`` are already applied (resume from a checkpoint): never handed out.
    :param heartbeat_interval: seconds between status publications.
    :param connect_timeout: deadline of each connection attempt of the sidecar.
    :param max_restarts: how many times a dead sidecar is restarted (``None``: without limit); when exceeded
        the state becomes ``failed`` and training goes on without remote control.
    :param restart_backoff: ``(first, longest)`` delay before a restart, doubling per consecutive death.
    :param transport_options: keyword arguments for the transport factory (plain, picklable values).
    :param status_interval: shortest time between two status snapshots handed to the sidecar.
    :param log_level: the sidecar's log level (default: the effective level of the ``weavelet_core`` logger).
    """

    def __init__(
        self,
        run: str,
        url: str | None = None,
        *,
        after: int = 0,
        heartbeat_interval: float = 1.0,
        connect_timeout: float = 10.0,
        max_restarts: int | None = 10,
        restart_backoff: tuple[float, float] = (0.5, 30.0),
        transport_options: dict[str, object] | None = None,
        status_interval: float = STATUS_FLUSH_INTERVAL,
        log_level: int | None = None,
    ) -> None:
        self.run: str = validate_run_id(run)
        resolved = url or default_url()
        loaded = get_registry().resolve(resolved)
        if "memory" in loaded.spec.schemes:
            raise ValueError(
                f"{resolved!r}: the memory transport lives inside one process and cannot reach the weavelet "
                "sidecar; use file:///path/to/dir (or a NATS or Redis URL)"
            )
        self._options: dict[str, Any] = dict(transport_options or {})
        try:
            open_transport(resolved, **self._options)  # builds without I/O: catches malformed URLs now
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot use transport URL {mask_password(resolved)!r}: {exc}") from exc
        self.url: str = resolved
        _check_int(after, "after", minimum=0)
        _check_positive(heartbeat_interval, "heartbeat_interval")
        _check_positive(connect_timeout, "connect_timeout")
        if max_restarts is not None:
            _check_int(max_restarts, "max_restarts", minimum=0)
        low, high = restart_backoff
        _check_positive(low, "restart_backoff[0]")
        if high < low:
            raise ValueError(f"restart_backoff: longest delay {high} is shorter than the first {low}")
        self.heartbeat_interval = float(heartbeat_interval)
        self.connect_timeout = float(connect_timeout)
        self.max_restarts = max_restarts
        self.restart_backoff = (float(low), float(high))
        self.status_interval = max(0.0, float(status_interval))
        self.log_level = log_level

        self._lifecycle = Lifecycle()
        self._owner_pid = os.getpid()
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.RLock()  # guards the current sidecar and channel
        self._stop_lock = threading.RLock()
        self._stop_owner: int | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._channel: Channel | None = None
        self._supervisor: threading.Thread | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._stopping = False
        self._cleaned = False
        self._message: str | None = None
        self._connected = False
        self.restarts = 0

        # Fast paths read these without a lock.
        self._idle_version: Any = ctypes.c_uint64(0)
        self._version: Any = self._idle_version
        self._seen = 0
        self._handed_out = after
        self._applied = after

        # Status, recorded by report() and flushed to the shared slot at most every status_interval.
        self._step = 0
        self._epoch = 0
        self._metrics: dict[str, float] | None = None
        self._optimizer: dict[str, object] | None = None
        self._next_flush = 0.0
        self._dirty = False
        self._flush_lock = threading.Lock()

        # Outcomes not yet confirmed published by a sidecar: (seq, message bytes).
        self._outcome_seq = 0
        self._pending: collections.deque[tuple[int, bytes]] = collections.deque()
        self._pending_lock = threading.Lock()
        self._report_errors = 0

    # -- properties ------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``created``, ``starting``, ``running``, ``stopping``, ``stopped`` or ``failed``."""
        return self._lifecycle.state

    @property
    def applied_revision(self) -> int:
        """The last revision reported ``applied`` (or ``after``)."""
        return self._applied

    @property
    def handed_out(self) -> int:
        """The newest revision :meth:`poll` has returned (or ``after``)."""
        return self._handed_out

    @property
    def message(self) -> str | None:
        """Why the state is ``failed``, or the latest connection problem; ``None`` when all is well."""
        return self._message

    @property
    def connected(self) -> bool:
        """Whether the sidecar is connected to the transport now."""
        return self._connected and self._lifecycle.state == RUNNING

    @property
    def pid(self) -> int | None:
        """The sidecar's process id, while one is running."""
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    @property
    def lifecycle(self) -> Lifecycle:
        return self._lifecycle

    # -- start -----------------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Start the sidecar and wait at most ``timeout`` seconds for it to connect.

        If it has not connected by then (a transport outage), a warning is logged and ``start`` returns with
        state ``starting``: the sidecar keeps trying in the background. Calling ``start`` on a started process
        does nothing; a stopped or failed one cannot be started again (create a new one).
        """
        with self._lock:
            state = self._lifecycle.state
            if state in (STARTING, RUNNING):
                return
            if state != CREATED:
                raise RuntimeError(
                    f"weavelet for run {self.run!r} is {state}; a WeaveletProcess starts once: create a new one"
                )
            self._lifecycle.move(STARTING)
            spawning.install()
            self._wake_r, self._wake_w = os.pipe()
            try:
                self._spawn()
            except BaseException as exc:
                self._message = f"cannot start the weavelet sidecar: {exc}"
                self._lifecycle.move(FAILED)
                self._cleanup_pipes()
                raise
            exithooks.register(self)
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"weavelet-supervisor-{self.run}", daemon=True
            )
            self._supervisor.start()
        if not self._lifecycle.wait_for((RUNNING, FAILED, STOPPING, STOPPED), timeout):
            log.warning(
                "weavelet: run %r could not connect to %s within %.1fs%s; training continues and the weavelet "
                "keeps retrying in the background",
                self.run,
                mask_password(self.url),
                timeout,
                f" ({self._message})" if self._message else "",
            )

    def _spawn(self) -> None:
        """Start a sidecar with a fresh channel; carry unpublished outcomes and the status over."""
        channel = Channel(self._ctx)
        config = SidecarConfig(
            run=self.run,
            url=self.url,
            after=self._handed_out,
            heartbeat_interval=self.heartbeat_interval,
            connect_timeout=self.connect_timeout,
            transport_options=self._options,
            trainer_pid=os.getpid(),
            log_level=self.log_level
            if self.log_level is not None
            else logging.getLogger("weavelet_core").getEffectiveLevel(),
        )
        process = self._ctx.Process(
            target=sidecar_main,
            args=(config, channel),
            name=f"{spawning.SIDECAR_NAME_PREFIX}-{self.run}",
            daemon=True,
        )
        process.start()
        channel.after_spawn()
        with self._pending_lock:
            carried = [data for _seq, data in self._pending]
        for data in carried:
            channel.to_sidecar.put(data)
        self._channel = channel
        self._process = process
        self._seen = 0
        self._version = channel.version
        self._connected = False
        self._flush_status(time.monotonic())

    # -- supervision -----------------------------------------------------------------------------------
    def _supervise(self) -> None:
        try:
            self._supervise_loop()
        except Exception as exc:  # a bug here must not pass silently: remote control would quietly stop
            if not self._stopping:
                log.exception("weavelet: the supervisor of run %r failed", self.run)
                self._fail(f"the weavelet supervisor failed: {exc!r}")

    def _supervise_loop(self) -> None:
        consecutive = 0
        while True:
            with self._lock:
                process, channel = self._process, self._channel
            if self._stopping or process is None or channel is None:
                return
            started = time.monotonic()
            events_open = True
            while True:
                waitables: list[Any] = [process.sentinel, self._wake_r]
                if events_open:
                    waitables.append(channel.events_reader)
                try:
                    ready = multiprocessing.connection.wait(waitables)
                except (OSError, ValueError):  # closed under us: only stop() does that
                    return
                if self._stopping:
                    return
                if events_open and channel.events_reader in ready:
                    events_open = self._read_events(channel)
                if process.sentinel in ready:
                    break
            code = _exit_code(process, timeout=1.0)
            if self._stopping:
                return
            if code == EXIT_FATAL:
                self._fail(self._message or "the weavelet sidecar stopped on a fatal error")
                return
            if time.monotonic() - started > 10 * self.restart_backoff[1]:
                consecutive = 0
            if self.max_restarts is not None and self.restarts >= self.max_restarts:
                self._fail(
                    f"the weavelet sidecar died {self.restarts + 1} times (last exit code {code}); the restart "
                    f"limit is {self.max_restarts}: remote control of run {self.run!r} is off, training goes on"
                )
                return
            low, high = self.restart_backoff
            delay = min(low * (2**consecutive), high)
            consecutive += 1
            log.warning(
                "weavelet: the sidecar of run %r exited (code %s); restarting in %.1fs (restart %d of %s); "
                "training is not affected",
                self.run,
                code,
                delay,
                self.restarts + 1,
                self.max_restarts if self.max_restarts is not None else "unlimited",
            )
            self._connected = False
            self._lifecycle.move_if((RUNNING,), STARTING)
            with contextlib.suppress(OSError):
                multiprocessing.connection.wait([self._wake_r], timeout=delay)
            with self._lock:
                if self._stopping:
                    return
                self._retire(channel)
                self._process = self._channel = None
                try:
                    self._spawn()
                except Exception as exc:
                    self._fail(f"cannot restart the weavelet sidecar: {exc}")
                    return
                self.restarts += 1

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
                if not isinstance(event, dict):
                    continue
                self._on_event(str(event.get("event")), event.get("message"))
        except (EOFError, OSError):
            return False
        return True

    def _on_event(self, event: str, message: object) -> None:
        text = message if isinstance(message, str) else None
        if event == "connected":
            self._connected = True
            self._message = None
            self._lifecycle.move_if((STARTING,), RUNNING)
        elif event in ("disconnected", "failed"):
            self._connected = False
            self._message = text

    def _fail(self, message: str) -> None:
        self._message = message
        log.error("weavelet: run %r: %s", self.run, message)
        with self._lock:
            moved = self._lifecycle.move_if((STARTING, RUNNING), FAILED)
            if moved:
                process, channel = self._process, self._channel
                if process is not None:
                    process.join(0.1)
                if channel is not None:
                    self._retire(channel)
                self._process = None
                self._channel = None

    def _retire(self, channel: Channel) -> None:
        """Stop using ``channel`` (its sidecar is gone)."""
        self._prune_pending(int(channel.outcome_ack.value))
        self._version = self._idle_version
        self._seen = 0
        channel.close()

    # -- stop ------------------------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        """Stop the sidecar within ``timeout`` seconds; idempotent. Does nothing in a forked child process.

        The sidecar publishes pending outcomes and a final ``stopped`` status, then exits. One that does not
        exit in time is terminated, then killed. Queues are closed and their threads joined.
        """
        if os.getpid() != self._owner_pid:
            return  # a forked copy (a DataLoader worker, say) must not stop its parent's sidecar
        deadline = time.monotonic() + max(0.1, timeout)
        me = threading.get_ident()
        if self._stop_owner == me:
            return  # re-entered from a signal handler while this thread is already stopping
        with self._stop_lock:
            self._stop_owner = me
            try:
                self._stop(deadline)
            finally:
                self._stop_owner = None

    def _stop(self, deadline: float) -> None:
        state = self._lifecycle.state
        if state == CREATED:
            self._lifecycle.move(STOPPED)
            return
        if self._cleaned:
            return
        self._stopping = True
        if state in (STARTING, RUNNING):
            self._lifecycle.move(STOPPING)
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(max(0.05, min(1.0, deadline - time.monotonic())))
        with self._lock:
            process, channel = self._process, self._channel
            if process is not None and channel is not None:
                self._flush_status(time.monotonic(), force=True)
                remaining = max(0.0, deadline - time.monotonic())
                with contextlib.suppress(Exception):
                    message = {"t": "stop", "timeout": round(remaining * 0.6, 3)}
                    channel.to_sidecar.put(json.dumps(message).encode())
                process.join(max(0.05, remaining * 0.8))
                if process.is_alive():
                    log.warning("weavelet: sidecar of run %r did not stop in time; terminating it", self.run)
                    process.terminate()
                    process.join(max(0.05, (deadline - time.monotonic()) * 0.5))
                if process.is_alive():
                    process.kill()  # cannot be refused, even by a stopped (SIGSTOP) process
                    process.join(min(1.0, max(0.1, deadline - time.monotonic())))
                self._retire(channel)
                if process.exitcode is not None:
                    process.close()
            self._process = None
            self._channel = None
        if supervisor is not None and supervisor.is_alive() and supervisor is not threading.current_thread():
            supervisor.join(max(0.05, deadline - time.monotonic()))
        self._cleanup_pipes()
        self._cleaned = True
        self._lifecycle.move_if((STOPPING,), STOPPED)
        exithooks.unregister(self)

    def _cleanup_pipes(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- the trainer's per-step calls ------------------------------------------------------------------
    def poll(self) -> Revision | None:
        """The newest revision not yet handed out, or ``None``. Never raises.

        When nothing changed this is one shared-integer read. Revisions that arrived together with a newer
        one are reported ``superseded`` (they are never handed out).
        """
        if self._version.value == self._seen:
            return None
        try:
            return self._drain()
        except Exception as exc:  # a sidecar dying mid-operation must not reach the training loop
            log.debug("weavelet: poll failed: %s", exc)
            return None

    def _drain(self) -> Revision | None:
        if not self._lock.acquire(blocking=False):
            return None  # a restart or stop is in progress; the next poll looks again
        try:
            return self._drain_locked()
        finally:
            self._lock.release()

    def _drain_locked(self) -> Revision | None:
        channel = self._channel
        if channel is None:
            return None
        received: list[Revision] = []
        while True:
            try:
                data = channel.to_trainer.get_nowait()
            except queue.Empty:
                break
            self._seen += 1
            try:
                revision = decode(data, Revision)
            except ProtocolError as exc:
                log.error("weavelet: run %r: dropped an unreadable revision from the sidecar: %s", self.run, exc)
                continue
            if revision.run == self.run and revision.revision > self._handed_out:
                received.append(revision)
        if not received:
            return None
        received.sort(key=lambda r: r.revision)
        newest = received[-1]
        for older in received[:-1]:
            if older.revision < newest.revision:
                self._send_outcome(
                    Outcome(
                        run=self.run,
                        revision=older.revision,
                        result="superseded",
                        message=f"revision {newest.revision} arrived before revision {older.revision} was applied",
                    )
                )
        self._handed_out = newest.revision
        return newest

    def report_outcome(
        self,
        revision: int,
        result: str,
        *,
        step: int | None = None,
        message: str | None = None,
        detail: dict[str, object] | None = None,
    ) -> None:
        """Report what became of a revision :meth:`poll` returned: ``"applied"`` (at ``step``) or
        ``"rejected"`` (with ``message``). Never blocks, never raises; the outcome is kept until a sidecar has
        published it (also across sidecar restarts)."""
        try:
            if result not in OUTCOME_RESULTS:
                raise ProtocolError(f"result must be one of {', '.join(OUTCOME_RESULTS)}, got {result!r}")
            try:
                outcome = Outcome(
                    run=self.run, revision=revision, result=result, step=step, message=message, detail=detail or {}
                )
            except ProtocolError as exc:
                if detail:
                    outcome = Outcome(
                        run=self.run,
                        revision=revision,
                        result=result,
                        step=step,
                        message=f"{message or ''} (detail dropped: {exc})".strip(),
                    )
                else:
                    raise
            if result == "applied" and revision > self._applied:
                self._applied = revision
            if step is not None and step > self._step:
                self._step = step
            self._send_outcome(outcome)
            self._flush_status(time.monotonic(), force=True)
        except Exception as exc:
            self._report_errors += 1
            log.error("weavelet: run %r: cannot report outcome of revision %r: %s", self.run, revision, exc)

    def _send_outcome(self, outcome: Outcome) -> None:
        self._outcome_seq += 1
        seq = self._outcome_seq
        data = json.dumps({"t": "outcome", "seq": seq, "outcome": to_dict(outcome)}).encode()
        with self._pending_lock:
            self._pending.append((seq, data))
        channel = self._channel
        if channel is not None:
            self._prune_pending(int(channel.outcome_ack.value))
            with contextlib.suppress(Exception):
                channel.to_sidecar.put(data)

    def _prune_pending(self, ack: int) -> None:
        """Forget outcomes up to sequence number ``ack``: a sidecar has published them."""
        with self._pending_lock:
            while self._pending and self._pending[0][0] <= ack:
                self._pending.popleft()

    def report(
        self,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: dict[str, float] | None = None,
        optimizer: dict[str, object] | None = None,
    ) -> None:
        """Record the trainer's status for the heartbeat (latest wins). Never blocks, never raises.

        ``None`` leaves a field as it was. The snapshot the sidecar publishes is refreshed at most every
        ``status_interval`` seconds, and at once when the epoch or the optimizer changes; :meth:`stop` and
        :meth:`report_outcome` refresh it too.
        """
        try:
            urgent = False
            if step is not None:
                self._step = step
            if epoch is not None:
                urgent = epoch != self._epoch
                self._epoch = epoch
            if metrics is not None:
                self._metrics = metrics
            if optimizer is not None:
                try:
                    urgent = urgent or optimizer != self._optimizer
                except Exception:
                    urgent = True
                self._optimizer = optimizer
            now = time.monotonic()
            if urgent or now >= self._next_flush:
                self._flush_status(now)
            else:
                self._dirty = True
        except Exception as exc:  # odd values (arrays compared with !=) must not reach the training loop
            self._report_errors += 1
            log.debug("weavelet: report failed: %s", exc)

    def _flush_status(self, now: float, *, force: bool = False) -> None:
        """Write the recorded status into the shared slot. Never blocks (skips if another thread writes)."""
        channel = self._channel
        if channel is None:
            self._dirty = True
            return
        if not self._flush_lock.acquire(blocking=False):
            self._dirty = True
            return
        try:
            self._next_flush = now + self.status_interval
            self._dirty = False
            fields: dict[str, Any] = {
                "step": _non_negative_int(self._step),
                "epoch": _non_negative_int(self._epoch),
                "applied_revision": self._applied,
                "metrics": _clean_metrics(self._metrics),
                "optimizer": self._optimizer,
            }
            try:
                data = json.dumps(fields, allow_nan=False, default=str).encode()
            except (TypeError, ValueError):
                fields["optimizer"] = None
                data = json.dumps(fields, allow_nan=False, default=str).encode()
            if not channel.status.write(data):
                fields["metrics"], fields["optimizer"] = {}, None
                channel.status.write(json.dumps(fields).encode())
        except Exception as exc:
            if not force:
                self._report_errors += 1
                log.debug("weavelet: status snapshot failed: %s", exc)
        finally:
            self._flush_lock.release()

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> WeaveletProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<WeaveletProcess run={self.run!r} url={mask_password(self.url)!r} state={self.state}>"


def _exit_code(process: multiprocessing.process.BaseProcess, timeout: float) -> int | None:
    """The exit code of a process whose sentinel fired. The sentinel can fire a moment before the process
    can be reaped (its files are closed first), so ``join`` alone may return with no exit code yet."""
    deadline = time.monotonic() + timeout
    while True:
        process.join(0.01)
        if process.exitcode is not None or time.monotonic() >= deadline:
            return process.exitcode
        time.sleep(0.01)


def _check_int(value: object, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _non_negative_int(value: object) -> int:
    try:
        number: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(0, number)


def _clean_metrics(metrics: dict[str, float] | None) -> dict[str, float]:
    """Metrics as finite floats keyed by strings; anything else (NaN loss, tensors that will not convert)
    is left out rather than breaking the heartbeat."""
    if not metrics:
        return {}
    clean: dict[str, float] = {}
    for key, value in list(metrics.items()):
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            clean[str(key)] = number
    return clean


__all__ = ["WeaveletProcess"]
