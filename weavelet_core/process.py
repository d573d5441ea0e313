"""The trainer's side of weavelet: :class:`WeaveletProcess`, one incarnation of a run.

Each trainer start is a new **incarnation** of its run: an id (:attr:`WeaveletProcess.incarnation`) and a start
time, carried in every status and outcome. The trainer calls :meth:`WeaveletProcess.poll` at each optimizer-step
boundary (one shared-integer read when nothing changed), applies what it returns, and tells the outcome with
:meth:`WeaveletProcess.report_outcome`; :meth:`WeaveletProcess.report` hands over step, epoch, metrics and the
active optimizer. None of these ever blocks or raises: a dead, stalled or disconnected sidecar never holds
training up.

The jobs are split by module, each rule in one place:

- :mod:`weavelet_core.supervisor`: spawning, restarting and stopping the sidecar (one escalation policy);
- :mod:`weavelet_core.ledger`: outcomes kept until a sidecar stored them, bounded, fitted to the wire;
- :mod:`weavelet_core.recorder`: the status and the one throttle on snapshots;
- this module: the lifecycle, the incarnation and the per-step fast path.

What the incarnation does at start (the sidecar carries it out on its first connection, see
:mod:`weavelet_core.sidecar`):

- **Ownership.** A second trainer on a run whose owner is live (a heartbeat younger than ``stale_after``) is
  refused with :class:`~weavelet_core.RunOwned` naming the owner's pid, host and heartbeat age, unless
  ``takeover=True``; a stale owner is taken over with a warning. An owner that was taken over stops its remote
  control (state ``failed``, saying by whom) at its next heartbeat.
- **Fresh start** (``resume=False``): the desired config an earlier incarnation left is not inherited silently.
  ``fresh="reset"`` (default) writes a new, empty revision on top of it, so the store says what runs;
  ``fresh="adopt"`` applies its hyperparameters. One line on stderr says what the store held and what was done.
- **Resume** (``resume=True``, e.g. from a checkpoint): revisions newer than ``after`` are reconciled as before.
- In every case, commands (``stop``, ``checkpoint``, ...) stored before the incarnation started never act in it:
  the revision that was newest at start is handed out marked as the *baseline* (:meth:`is_baseline`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

from weavelet_core import authored, exithooks
from weavelet_core.channel import Channel
from weavelet_core.errors import ProtocolError, RunOwned
from weavelet_core.ledger import OutcomeLedger
from weavelet_core.lifecycle import CREATED, FAILED, RUNNING, STARTING, STOPPED, STOPPING, Lifecycle
from weavelet_core.plugins import default_url, get_registry, mask_password, open_transport
from weavelet_core.protocol import (
    OUTCOME_RESULTS,
    Outcome,
    Revision,
    from_dict,
    new_incarnation,
    truncate,
    validate_run_id,
)
from weavelet_core.recorder import DEFAULT_INTERVAL, StatusRecorder
from weavelet_core.sidecar import SidecarConfig
from weavelet_core.signing import TrustedKeys, TrustedSource, resolve_trusted_keys
from weavelet_core.supervisor import SidecarSupervisor

log = logging.getLogger(__name__)

FreshPolicy = Literal["reset", "adopt"]
FRESH_POLICIES: tuple[str, ...] = ("reset", "adopt")
STATUS_FLUSH_INTERVAL = DEFAULT_INTERVAL
"""Default shortest time between two status snapshots handed to the sidecar."""
DEFAULT_KEEPALIVE = 5.0
"""Default ``heartbeat_interval``: seconds between two publications of an unchanged status. A changed status is
published at once; an idle sidecar wakes up for nothing else."""
MAX_SIGNATURES = 64
"""Signature verdicts kept for revisions received but not yet answered."""


def default_stale_after(heartbeat_interval: float) -> float:
    """Seconds without a heartbeat after which an owner counts as stale: ``max(10, 5 * heartbeat_interval)``
    (25 s with the default keepalive of 5 s)."""
    return max(10.0, 5.0 * heartbeat_interval)


class WeaveletProcess:
    """One incarnation of a run: runs its weavelet sidecar and is the trainer's channel to it.

    :param run: the run id (validated here: an invalid one raises :class:`~weavelet_core.InvalidRunId`).
    :param url: transport URL; default ``WEAVELET_URL`` or the per-user ``file://`` directory. Resolved here:
        an unknown scheme raises :class:`~weavelet_core.UnknownTransport`, a missing client library
        :class:`~weavelet_core.MissingDriver`. ``memory://`` is refused (it cannot cross processes).
    :param after: revisions ``<= after`` are already applied (resume from a checkpoint): never handed out.
    :param resume: whether this start continues an earlier incarnation from its checkpoint (default: ``after >
        0``). A resume reconciles with newer revisions; a fresh start follows ``fresh``.
    :param fresh: what a fresh start does with a desired config an earlier incarnation left: ``"reset"``
        (default: write an empty revision on top, so nothing is inherited) or ``"adopt"`` (apply its
        hyperparameters). Commands stored before the start never act, whichever is chosen.
    :param takeover: take the run over from a live owner instead of being refused with ``RunOwned``.
    :param stale_after: seconds without a heartbeat after which an owner may be taken over without
        ``takeover`` (default :func:`default_stale_after`).
    :param heartbeat_interval: the keepalive: longest time in seconds between two status publications (default
        :data:`DEFAULT_KEEPALIVE`, 5 s). A changed status (state, step, epoch, metrics, optimizer, outcome) is
        published as soon as its snapshot is written, at most every ``status_interval``; an unchanged one only
        at the keepalive. It is published in the status as ``keepalive``, and readers count a run as stale after
        three keepalives plus 2 s without a heartbeat.
    :param connect_timeout: deadline of each connection attempt of the sidecar, seconds.
    :param max_restarts: how many times a dead sidecar is restarted (``None``: without limit); when exceeded
        the state becomes ``failed`` and training goes on without remote control.
    :param restart_backoff: ``(first, longest)`` delay in seconds before a restart, doubling per death.
    :param transport_options: keyword arguments for the transport factory (plain, picklable values).
    :param status_interval: shortest time in seconds between two status snapshots (default 0.5); the epoch,
        the optimizer and outcomes are passed on at once. A report that came too soon is written when the
        interval ends, even if no report follows.
    :param log_level: the sidecar's log level (default: the effective level of the ``weavelet_core`` logger).
    :param incarnation: the incarnation id to use (default: a fresh one from
        :func:`~weavelet_core.protocol.new_incarnation`); the ranks of one job do not need one each.
    :param labels: ``key: value`` strings published in the status, for selecting runs (``{"sweep": "3"}``);
        keys and values are non-empty strings of at most 64 characters.
    :param trusted_keys: accept only revisions signed by one of these Ed25519 keys: ``.pub`` files or
        directories of them (see :mod:`weavelet_core.signing`); default ``WEAVELET_TRUSTED_KEYS``, else none
        (every revision is accepted, signed or not). An unsigned revision, one signed by another key, or one whose
        signature does not match its content is answered ``rejected`` with what was wrong and how to fix it, and
        nothing of it is applied; the key that verified a revision is named in its outcome. Loaded here: a bad
        key file raises :class:`~weavelet_core.SigningError`, a missing ``cryptography``
        :class:`~weavelet_core.MissingDriver` (``pip install "weavelet[signing]"``), so a run meant to verify
        never starts without verifying. The empty revision a fresh start writes (``fresh="reset"``) is the
        trainer's own and is not signed.
    """

    def __init__(
        self,
        run: str,
        url: str | None = None,
        *,
        after: int = 0,
        resume: bool | None = None,
        fresh: FreshPolicy = "reset",
        takeover: bool = False,
        stale_after: float | None = None,
        heartbeat_interval: float = DEFAULT_KEEPALIVE,
        connect_timeout: float = 10.0,
        max_restarts: int | None = 10,
        restart_backoff: tuple[float, float] = (0.5, 30.0),
        transport_options: dict[str, object] | None = None,
        status_interval: float = STATUS_FLUSH_INTERVAL,
        log_level: int | None = None,
        incarnation: str | None = None,
        labels: Mapping[str, str] | None = None,
        trusted_keys: TrustedSource | None = None,
    ) -> None:
        self.run: str = validate_run_id(run)
        self.trusted_keys: TrustedKeys | None = resolve_trusted_keys(trusted_keys)
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
        if fresh not in FRESH_POLICIES:
            raise ValueError(f"fresh must be one of {', '.join(map(repr, FRESH_POLICIES))}, got {fresh!r}")
        if stale_after is not None:
            _check_positive(stale_after, "stale_after")
        self.heartbeat_interval = float(heartbeat_interval)
        self.connect_timeout = float(connect_timeout)
        self.resume = bool(after > 0) if resume is None else bool(resume)
        self.fresh: FreshPolicy = fresh
        self.takeover = bool(takeover)
        self.stale_after = float(stale_after) if stale_after is not None else default_stale_after(heartbeat_interval)
        self.log_level = log_level
        self.labels = _check_labels(labels)
        self.incarnation = incarnation or new_incarnation()
        self.started_at = time.time()

        self._lifecycle = Lifecycle()
        self._owner_pid = os.getpid()
        self._supervisor = SidecarSupervisor(
            self,
            multiprocessing.get_context("spawn"),
            max_restarts=max_restarts,
            restart_backoff=(float(low), float(high)),
        )
        self._stop_lock = threading.RLock()
        self._stop_owner: int | None = None
        self._cleaned = False
        self._message: str | None = None
        self._error: str | None = None
        self._connected = False
        self._claimed = False
        self._claimed_baseline = 0

        self._ledger = OutcomeLedger()
        #: What a training loop reads at every step boundary, without a call (see :class:`StepGate`).
        self.gate = StepGate()
        self._recorder = StatusRecorder(status_interval, applied=after, gate=self.gate)
        self._handover = 0  # the recorder's snapshot count when held-back outcomes were last handed over

        # The fast path reads these without a lock.
        self._idle_version: Any = _Counter()
        self.gate.version = self._idle_version
        self._handed_out = after
        self._handed_id = ""
        self._handed_revision: Revision | None = None
        self._baseline = 0
        self._held: list[tuple[Revision, bool]] = []
        self._signatures: dict[str, dict[str, Any]] = {}  # revision id -> the sidecar's verdict, for its outcome

    # -- properties ------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``created``, ``starting``, ``running``, ``stopping``, ``stopped`` or ``failed``."""
        return self._lifecycle.state

    @property
    def applied_revision(self) -> int:
        """The last revision reported ``applied`` (or ``after``)."""
        return self._recorder.applied

    @property
    def handed_out(self) -> int:
        """The newest revision :meth:`poll` has returned (or ``after``)."""
        return self._handed_out

    @property
    def waiting(self) -> bool:
        """Whether a revision has reached the trainer's side and the next :meth:`poll` will look at it."""
        return bool(self.gate.version.value != self.gate.seen)

    @property
    def handed_out_revision(self) -> Revision | None:
        """The newest revision :meth:`poll` has returned in this incarnation, or ``None``."""
        return self._handed_revision

    @property
    def message(self) -> str | None:
        """Why the state is ``failed``, or the latest connection problem; ``None`` when all is well."""
        return self._message

    @property
    def error(self) -> str | None:
        """The name of the error that made the state ``failed`` (``"RunOwned"``, ...), if one did."""
        return self._error

    @property
    def connected(self) -> bool:
        """Whether the sidecar is connected to the transport now."""
        return self._connected and self._lifecycle.state == RUNNING

    @property
    def pid(self) -> int | None:
        """The sidecar's process id, while one is running."""
        return self._supervisor.pid

    @property
    def restarts(self) -> int:
        """How many times a dead sidecar was restarted."""
        return self._supervisor.restarts

    @property
    def lifecycle(self) -> Lifecycle:
        return self._lifecycle

    @property
    def dropped_outcomes(self) -> int:
        """Outcomes forgotten because more than the ledger's bound waited for a sidecar."""
        return self._ledger.dropped

    # -- start -----------------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Start the sidecar and wait at most ``timeout`` seconds for it to connect and claim the run.

        Raises :class:`~weavelet_core.RunOwned` when another live trainer owns the run (and ``takeover`` is
        off). If the transport cannot be reached in time, a warning is logged and ``start`` returns with state
        ``starting``: the sidecar keeps trying in the background. Calling ``start`` on a started process does
        nothing, nor on one whose remote control failed (training goes on; a warning says why); a stopped one
        cannot be started again (create a new one).
        """
        state = self._lifecycle.state
        if state in (STARTING, RUNNING):
            return
        if state == FAILED and not self._cleaned:
            log.warning("weavelet: run %r: remote control is off (%s); training goes on", self.run, self._message)
            return
        if state != CREATED:
            raise RuntimeError(
                f"weavelet for run {self.run!r} is {state}; a WeaveletProcess starts once: create a new one"
            )
        self._lifecycle.move(STARTING)
        try:
            self._supervisor.start()
        except BaseException as exc:
            self._message = f"cannot start the weavelet sidecar: {exc}"
            self._lifecycle.move(FAILED)
            raise
        exithooks.register(self)
        if not self._lifecycle.wait_for((RUNNING, FAILED, STOPPING, STOPPED), timeout):
            log.warning(
                "weavelet: run %r could not connect to %s within %.1fs%s; training continues and the weavelet "
                "keeps retrying in the background",
                self.run,
                mask_password(self.url),
                timeout,
                f" ({self._message})" if self._message else "",
            )
        elif self._lifecycle.state == FAILED and self._error == RunOwned.__name__:
            self.stop()
            raise RunOwned(self._message or f"run {self.run!r} is owned by another live trainer")

    # -- what the supervisor asks of us (supervisor.Owner) ---------------------------------------------
    def sidecar_config(self) -> SidecarConfig:
        return SidecarConfig(
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
            incarnation=self.incarnation,
            started_at=self.started_at,
            resume=self.resume,
            fresh=self.fresh,
            takeover=self.takeover,
            stale_after=self.stale_after,
            claimed=self._claimed,
            baseline=self._claimed_baseline,
            labels=dict(self.labels),
            trusted_keys=self.trusted_keys.lines() if self.trusted_keys is not None else (),
        )

    def attach_channel(self, channel: Channel) -> None:
        self._ledger.restart_sending()
        self._send_unsent(channel)
        self.gate.seen = 0
        self.gate.version = channel.version
        self._connected = False
        self._write_status(channel)

    def detach_channel(self, channel: Channel) -> None:
        self._ledger.ack(int(channel.outcome_ack.value))
        self.gate.version = self._idle_version
        self.gate.seen = 0
        self._held = []

    def on_event(self, event: str, payload: dict[str, Any]) -> None:
        message = payload.get("message")
        text = message if isinstance(message, str) else None
        if event == "claimed":
            self._claimed = True
            after, baseline = payload.get("after"), payload.get("baseline")
            with self._supervisor.lock:
                if isinstance(after, int) and after > self._handed_out and not self._held:
                    # A fresh start settled on this revision itself (its reset, or an empty config): it is
                    # applied, and a restarted sidecar starts after it.
                    self._handed_out = after
                    self._recorder.applied = max(self._recorder.applied, after)
                if isinstance(baseline, int):
                    self._claimed_baseline = baseline
        elif event == "connected":
            self._connected = True
            self._message = None
            self._lifecycle.move_if((STARTING,), RUNNING)
        elif event in ("disconnected", "failed"):
            self._connected = False
            self._message = text
            error = payload.get("error")
            if event == "failed" and isinstance(error, str):
                self._error = error

    def on_restarting(self) -> None:
        self._connected = False
        self._lifecycle.move_if((RUNNING,), STARTING)

    def on_fail(self, message: str) -> None:
        self._message = message or self._message or "the weavelet sidecar stopped on a fatal error"
        log.error("weavelet: run %r: %s", self.run, self._message)
        if self._lifecycle.move_if((STARTING, RUNNING), FAILED):
            self._supervisor.abandon()

    # -- stop ------------------------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0, *, error: BaseException | str | None = None) -> None:
        """End this incarnation within ``timeout`` seconds; idempotent. Does nothing in a forked child.

        The sidecar publishes pending outcomes and a final status, then exits; one that does not exit in time
        is terminated, then killed. With ``error`` (the exception that ended the training loop, or a message)
        the final state is ``failed`` and the status message carries the exception's type and message;
        otherwise it is ``stopped``.
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
                self._stop(deadline, error)
            finally:
                self._stop_owner = None

    def _stop(self, deadline: float, error: BaseException | str | None) -> None:
        state = self._lifecycle.state
        if state == CREATED:
            self._lifecycle.move(STOPPED)
            return
        if self._cleaned:
            return
        reason = describe_error(error) if error is not None else None
        if reason is not None:
            self._message = reason
        if state in (STARTING, RUNNING):
            self._lifecycle.move(STOPPING)

        def before_stop() -> None:
            channel = self._supervisor.channel
            if channel is None:
                return
            self._recorder.flush(channel.status)  # the stop request that follows publishes it
            self._send_unsent(channel, everything=True)
            if reason is not None:
                with contextlib.suppress(Exception):
                    channel.to_sidecar.put(json.dumps({"t": "final", "state": FAILED, "message": reason}).encode())

        self._supervisor.stop(deadline, before_stop)
        self._cleaned = True
        self._lifecycle.move_if((STOPPING,), FAILED if reason is not None else STOPPED)
        exithooks.unregister(self)

    # -- the trainer's per-step calls ------------------------------------------------------------------
    def poll(self) -> Revision | None:
        """The newest revision not yet handed out, or ``None``. Never raises.

        When nothing changed this is one shared-integer read. Revisions that arrived together with a newer
        one are reported ``superseded`` (they are never handed out).
        """
        if self.gate.version.value == self.gate.seen:
            return None
        try:
            return self._drain()
        except Exception as exc:  # a sidecar dying mid-operation must not reach the training loop
            log.debug("weavelet: poll failed: %s", exc)
            return None

    def is_baseline(self, revision: Revision | int) -> bool:
        """Whether ``revision`` was the newest stored when this incarnation started (its commands never act)."""
        number = revision if isinstance(revision, int) else revision.revision
        return number == self._baseline and number > 0

    def _drain(self) -> Revision | None:
        lock = self._supervisor.lock
        if not lock.acquire(blocking=False):
            return None  # a restart or stop is in progress; the next poll looks again
        try:
            channel = self._supervisor.channel
            return None if channel is None else self._drain_channel(channel)
        finally:
            lock.release()

    def _drain_channel(self, channel: Channel) -> Revision | None:
        received = self._held
        self._held = []
        while True:
            try:
                data = channel.to_trainer.get_nowait()
            except queue.Empty:
                break
            self.gate.seen += 1
            try:
                message = json.loads(data)
                if not isinstance(message, dict) or message.get("t") != "revision":
                    raise ProtocolError("not a revision message")
                revision = from_dict(message.get("revision"), Revision)
            except (ValueError, ProtocolError) as exc:
                log.error("weavelet: run %r: dropped an unreadable message from the sidecar: %s", self.run, exc)
                continue
            if revision.run == self.run and revision.revision > self._handed_out:
                received.append((revision, bool(message.get("baseline"))))
                if isinstance(message.get("signature"), dict):
                    self._signatures[revision.id] = message["signature"]
                    while len(self._signatures) > MAX_SIGNATURES:
                        del self._signatures[next(iter(self._signatures))]
        if not received:
            return None
        received.sort(key=lambda item: item[0].revision)
        # The baseline (the revision newest when this incarnation started) is handed out on its own, before
        # anything newer: its commands must be recorded as not ours before a newer revision's are judged.
        cut = next((i for i, (_, baseline) in enumerate(received) if baseline), None)
        if cut is not None and cut < len(received) - 1:
            self._held = received[cut + 1 :]
            self.gate.seen -= len(self._held)  # makes the next poll's one-integer check look again
            received = received[: cut + 1]
        newest, baseline = received[-1]
        for older, _ in received[:-1]:
            self._send(
                Outcome(
                    run=self.run,
                    revision=older.revision,
                    revision_id=older.id,
                    incarnation=self.incarnation,
                    result="superseded",
                    message=f"revision {newest.revision} arrived before revision {older.revision} was applied",
                    detail={"superseded_by": newest.revision},
                )
            )
        if baseline:
            self._baseline = newest.revision
        self._handed_out = newest.revision
        self._handed_id = newest.id
        self._handed_revision = newest
        return newest

    def write(self, changes: Mapping[str, object], author: str, *, replace: bool = False) -> bool:
        """Ask the sidecar to store a revision this trainer authored (see :mod:`weavelet_core.authored`):
        ``changes`` merged onto the newest config, or with ``replace`` the whole config (command tokens kept).
        ``author`` says who and why (cut to 300 characters). Never blocks, never raises; returns whether the
        message was handed to a sidecar (a write is lost if the sidecar restarts before storing it)."""
        channel = self._supervisor.channel
        if channel is None:
            return False
        try:
            channel.to_sidecar.put(json.dumps(authored.write_message(changes, author, replace=replace)).encode())
        except Exception as exc:
            log.error("weavelet: run %r: cannot hand a revision to the sidecar: %s", self.run, exc)
            return False
        return True

    def report_outcome(
        self,
        revision: int,
        result: str,
        *,
        step: int | None = None,
        message: str | None = None,
        detail: Mapping[str, object] | None = None,
    ) -> None:
        """Report what became of a revision :meth:`poll` returned: ``"applied"`` (at ``step``) or
        ``"rejected"`` (with ``message``). Never blocks, never raises; the outcome is kept until a sidecar has
        published it (also across sidecar restarts). Messages longer than
        :data:`~weavelet_core.protocol.MAX_MESSAGE_CHARS` are cut with a marker."""
        try:
            if result not in OUTCOME_RESULTS:
                raise ProtocolError(f"result must be one of {', '.join(OUTCOME_RESULTS)}, got {result!r}")
            text = truncate(message) if isinstance(message, str) else message
            fields: dict[str, Any] = {
                "run": self.run,
                "revision": revision,
                "revision_id": self._handed_id if revision == self._handed_out else "",
                "incarnation": self.incarnation,
                "result": result,
                "step": step,
            }
            signature = self._signatures.get(fields["revision_id"]) if fields["revision_id"] else None
            detail = {**dict(detail or {}), "signature": signature} if signature is not None else detail
            try:
                outcome = Outcome(**fields, message=text, detail=dict(detail or {}))
            except ProtocolError as exc:
                if not detail:
                    raise
                outcome = Outcome(**fields, message=truncate(f"{text or ''} (detail dropped: {exc})".strip()))
            self._recorder.record_outcome(outcome)
            self._send(outcome)
            self._write_status(self._supervisor.channel)
        except Exception as exc:
            self._recorder.errors += 1
            log.error("weavelet: run %r: cannot report outcome of revision %r: %s", self.run, revision, exc)

    def _send(self, outcome: Outcome) -> None:
        self._ledger.add(outcome)
        channel = self._supervisor.channel
        if channel is not None:
            self._send_unsent(channel)

    def _send_unsent(self, channel: Channel, *, everything: bool = False) -> None:
        """Hand waiting outcomes to the sidecar, keeping its queue short (see :mod:`weavelet_core.ledger`);
        ``everything`` at a stop, which the sidecar answers by publishing all it holds."""
        self._ledger.ack(int(channel.outcome_ack.value))
        for data in self._ledger.take_unsent(everything=everything):
            with contextlib.suppress(Exception):
                channel.to_sidecar.put(data)

    def _write_status(self, channel: Channel | None) -> None:
        """Write a status snapshot into the channel's slot and tell the sidecar, which publishes it at once."""
        if channel is not None and self._recorder.flush(channel.status):
            channel.status_written()

    def status_deadline(self) -> float | None:
        """(supervisor.Owner) When a pending report must be written, as ``time.monotonic()``; ``None``: none."""
        return self._recorder.pending_deadline()

    def write_pending_status(self) -> None:
        """(supervisor.Owner) Write the pending report if no report wrote it since; from the supervisor thread."""
        try:
            if self._recorder.pending_deadline() is None:
                return
            channel = self._supervisor.channel
            if channel is None or not self._recorder.flush(channel.status):
                self._recorder.disarm()  # the next report arms it again: never a busy wait on a past deadline
                return
            channel.status_written()
        except Exception as exc:
            self._recorder.errors += 1
            log.debug("weavelet: pending status snapshot failed: %s", exc)

    def report_due(self) -> bool:
        """Whether a status snapshot is due: lets callers skip gathering metrics until it is."""
        return self._recorder.due()

    def report(
        self,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        optimizer: dict[str, object] | None = None,
        schema: dict[str, object] | None = None,
        force: bool = False,
    ) -> None:
        """Record the trainer's status (latest wins). Never blocks, never raises.

        ``schema`` is what the run accepts (see :attr:`weavelet_core.protocol.Status.schema`); a new one is
        passed on at once.

        ``None`` leaves a field as it was. Metrics may be numbers or one-element tensors; others are left out.
        A snapshot goes to the sidecar when one is due (every ``status_interval``), at once when the epoch or
        the optimizer changed, or with ``force``; one that came too soon is written when the interval ends
        (by the supervisor thread), so the last report before a pause is published too.
        """
        try:
            urgent = self._recorder.record(step=step, epoch=epoch, metrics=metrics, optimizer=optimizer, schema=schema)
            channel = self._supervisor.channel
            if urgent or force:
                self._write_status(channel)
            elif self._recorder.arm():
                self._supervisor.wake()  # its thread writes this report when the interval ends, if none does
            if channel is not None and self._ledger.unsent and self._recorder.written != self._handover:
                # Outcomes held back while the sidecar was behind go at most once per snapshot (the supervisor
                # thread's too), from this thread only, so they stay in order.
                self._handover = self._recorder.written
                self._send_unsent(channel)
        except Exception as exc:  # odd values must not reach the training loop
            self._recorder.errors += 1
            log.debug("weavelet: report failed: %s", exc)

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> WeaveletProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(error=exc if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)) else None)

    def __repr__(self) -> str:
        return (
            f"<WeaveletProcess run={self.run!r} incarnation={self.incarnation} url={mask_password(self.url)!r} "
            f"state={self.state}>"
        )


class _Counter:
    """The version counter read while no sidecar runs: always 0."""

    value = 0


class StepGate:
    """What a training loop reads at every optimizer-step boundary to learn, in a few hundred instructions and
    without a call, that there is nothing to do: no revision arrived (``version.value == seen``) and no status
    report is due (``time.monotonic() < report_at``). Then it may skip :meth:`WeaveletProcess.poll` and
    :meth:`WeaveletProcess.report_due`, which would answer ``None`` and ``False``. The step hooks read the three
    fields inline (``gate.version.value == gate.seen and time.monotonic() < gate.report_at``): a method call would
    cost about as much again as the check itself (``benchmarks/bench_steps.py``).

    Kept current by its :class:`WeaveletProcess` (``version`` is the shared counter of the running sidecar's
    channel, swapped when the sidecar restarts; ``seen`` the revisions the trainer has taken; ``report_at`` the
    :func:`time.monotonic` time of the next report) and read by the integrations' step hooks. Read only.
    """

    __slots__ = ("report_at", "seen", "version")

    def __init__(self) -> None:
        self.version: Any = _Counter()
        self.seen = 0
        self.report_at = 0.0


def describe_error(error: BaseException | str) -> str:
    """``"TypeName: message"`` of an exception (or the text itself), cut to the message cap."""
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return truncate(f"the training loop raised {text}")
    return truncate(error)


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    checked: dict[str, str] = {}
    for key, value in (labels or {}).items():
        for part in (key, value):
            if not isinstance(part, str) or not part or len(part) > 64:
                raise ValueError(
                    f"labels: keys and values must be non-empty strings of at most 64 characters, got {key!r}: "
                    f"{value!r}"
                )
        checked[key] = value
    return checked


def _check_int(value: object, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


__all__ = [
    "DEFAULT_KEEPALIVE",
    "FRESH_POLICIES",
    "FreshPolicy",
    "WeaveletProcess",
    "default_stale_after",
    "describe_error",
]
