"""The weavelet sidecar: the child process that talks to the transport on behalf of one trainer.

It runs :func:`main` in a ``spawn``-started process and never imports torch or Lightning. It

- connects with a deadline (``connect_timeout``) and, after any outage, reconnects forever with backoff;
- on the first connection of its incarnation, **claims** the run: refuses to take it from another live owner
  (:class:`~weavelet_core.RunOwned`, exit :data:`EXIT_FATAL`) unless told to take over or the owner is stale;
  then applies the fresh-start policy (see :mod:`weavelet_core.process`) and prints one line on stderr saying
  what the store held and what was done with it. Until the claim succeeds it publishes nothing;
- watches its run's desired config from the last revision it forwarded (so a reconnect or a restart
  reconciles from the newest revision), validates each revision and forwards only newer ones to the trainer,
  the one that was newest at the claim marked as the *baseline*; an entry that cannot be read is reported
  ``rejected`` with the reason; stored revisions it skips over are reported ``superseded`` unless they
  already have an outcome;
- with trusted keys (:mod:`weavelet_core.signing`), verifies each revision's signature before forwarding it: one
  that does not verify is answered ``rejected`` saying why, and never reaches the trainer;
- publishes every outcome the trainer reports, in order, retrying outages until it is stored; an outcome the
  store refuses for good (it cannot be encoded) is dropped with a log line and never blocks those behind it;
- publishes the trainer's status when it changed (the trainer writes a snapshot at most every
  ``status_interval`` and says so on the channel) and, unchanged, as a keepalive every ``heartbeat_interval``
  seconds (the status's ``keepalive``, default 5 s); before each, checks that the run is still its own: a
  newer live incarnation (one that took over) ends this one's remote control without overwriting the new
  owner's status. Where the transport versions statuses (``Transport.replace_status``), a status stored only
  while nobody wrote since this sidecar's last one needs no check; the check reads the status otherwise;
- exits by itself within a second when the trainer dies, publishing a ``failed`` status that says so when the
  transport allows. It waits, without any timer, on a pidfd of the trainer (``os.pidfd_open``: readable when
  the trainer exits, even if a process it forked keeps the parent sentinel's pipe open) and on the
  parent-process sentinel; where pidfds are missing (not Linux, or a kernel before 5.3) it falls back to the
  sentinel plus a ``getppid`` check every :data:`PARENT_CHECK_INTERVAL` seconds.

An idle sidecar has no timed wake-up but the keepalive (and whatever its transport's client needs: pings).
- on the trainer's stop request, SIGTERM or SIGINT publishes what is pending and a final ``stopped`` status
  (bounded), then exits.

Exit codes: :data:`EXIT_OK`, :data:`EXIT_FATAL` (authentication or permission refused, driver missing, run
owned by another trainer: retrying cannot help), :data:`EXIT_ORPHANED` (the trainer died).

Every loop over revisions is bounded and yields to the event loop, so the parent watch always gets to run.
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

from weavelet_core import authored, signing
from weavelet_core.channel import Channel, reader_fileno
from weavelet_core.errors import (
    AuthenticationFailed,
    CorruptEntry,
    PermissionDenied,
    PluginError,
    ProtocolError,
    RevisionConflict,
    RunOwned,
    TransportError,
    TransportUnavailable,
)
from weavelet_core.plugins import mask_password, open_transport
from weavelet_core.protocol import FUTURE_SLACK, Outcome, Revision, Status, encode, from_dict, to_dict, truncate
from weavelet_core.recorder import outcome_summary
from weavelet_core.statuses import StatusPublisher
from weavelet_core.transport import Transport

log = logging.getLogger("weavelet_core.sidecar")

EXIT_OK = 0
EXIT_FATAL = 3
EXIT_ORPHANED = 4

PARENT_CHECK_INTERVAL = 0.25
"""Seconds between two ``getppid`` checks where no pidfd of the trainer can be opened (the fallback only)."""
RECONNECT_DELAY = (0.1, 5.0)
ORPHAN_FINAL_TIMEOUT = 0.5
SIGNAL_FINAL_TIMEOUT = 2.0
MAX_OWN_REVISIONS = 64
"""Revisions the sidecar stored for its trainer that it remembers, to trust them without a signature."""
MAX_SUPERSEDE_SCAN = 1000
"""At most this many skipped stored revisions are checked for a missing outcome on each forward (one history
read and one outcomes read, sized to what was skipped)."""
MAX_OUTCOME_ATTEMPTS = 5
"""Tries to store one outcome across outages before it is dropped (it must not block those behind it)."""
STABLE_CONNECTION = 10.0
"""Seconds a connection must last before the reconnect backoff starts again from its shortest delay."""
FINAL_ERRORS = (AuthenticationFailed, PermissionDenied, PluginError, RunOwned)
"""Errors that retrying cannot fix: the sidecar exits with :data:`EXIT_FATAL`."""


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
    incarnation: str = ""
    started_at: float = 0.0
    resume: bool = False
    fresh: str = "reset"
    takeover: bool = False
    stale_after: float = 10.0
    claimed: bool = False
    baseline: int = 0
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    trusted_keys: tuple[str, ...] = ()
    """``ssh-ed25519 BASE64 NAME`` lines: when given, only revisions signed by one of these keys reach the
    trainer (see :mod:`weavelet_core.signing`)."""


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
        self.transport: Transport | None = None
        self.exit_code = EXIT_OK
        self.final_state = "stopped"
        self.final_message: str | None = None
        self.final_timeout = SIGNAL_FINAL_TIMEOUT
        self._kick = anyio.Event()
        self._last_status: dict[str, Any] = {}
        self._statuses = StatusPublisher()  # the schema goes apart from the status where the transport can
        self._cancel: anyio.CancelScope | None = None
        self._original_ppid = os.getppid()
        self._outage_since: float | None = None
        self.claimed = config.claimed
        self._publish_failures = 0
        self.baseline = config.baseline
        self.last_outcome_seen: dict[str, Any] | None = None
        self._trusted = signing.TrustedKeys.from_lines(config.trusted_keys) if config.trusted_keys else None
        self._refused: dict[str, Any] | None = None  # the newest revision refused for its signature, for the status
        self._own: dict[str, Revision] = {}  # revisions stored for the trainer, by id (see _is_own)
        self.writes: list[dict[str, Any]] = []  # revisions the trainer asked to store (see weavelet_core.authored)

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
            if transport is None and self.exit_code != EXIT_FATAL and self.claimed:
                transport = await self._open_once()
            if transport is not None:
                try:
                    await self._publish_outbox(transport)
                    if self.claimed:  # never overwrite the status of a run this incarnation does not own
                        await self._statuses.publish(transport, self._status(self.final_state, self.final_message))
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
        pidfd = _open_pidfd(self._original_ppid)
        try:
            if pidfd is not None and os.getppid() == self._original_ppid:  # not a recycled pid: still our parent
                async with anyio.create_task_group() as tg:
                    for fd in (pidfd, sentinel):
                        if fd is not None:
                            tg.start_soon(_readable_then_cancel, fd, tg.cancel_scope)
            else:
                await self._poll_parent(sentinel)
        finally:
            if pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(pidfd)
        message = (
            f"the trainer process (pid {self.config.trainer_pid}) ended without stopping its weavelet; "
            "the run is no longer controlled"
        )
        log.warning("weavelet: %s", message)
        self._shutdown("failed", EXIT_ORPHANED, ORPHAN_FINAL_TIMEOUT, message)

    async def _poll_parent(self, sentinel: int | None) -> None:
        """The fallback without a pidfd: the sentinel, and ``getppid`` every :data:`PARENT_CHECK_INTERVAL`."""
        while True:
            if sentinel is not None:
                with anyio.move_on_after(PARENT_CHECK_INTERVAL):
                    await anyio.wait_readable(sentinel)
                    return
            else:
                await anyio.sleep(PARENT_CHECK_INTERVAL)
            if os.getppid() != self._original_ppid:
                return

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
            elif kind == "status":  # a new snapshot in the status slot: publish it if it changed
                self.channel.status_taken.value += 1
                self._kick.set()
            elif kind == "final":
                assert isinstance(message, dict)
                self.final_state = "failed" if message.get("state") == "failed" else "stopped"
                text = message.get("message")
                self.final_message = truncate(text) if isinstance(text, str) else None
            elif kind == "write":
                assert isinstance(message, dict)
                self.writes = [*self.writes, message][-authored.MAX_PENDING_WRITES :]
                self._kick.set()
            elif kind == "stop":
                assert isinstance(message, dict)
                timeout = float(message.get("timeout", SIGNAL_FINAL_TIMEOUT))
                timeout = timeout if math.isfinite(timeout) else SIGNAL_FINAL_TIMEOUT
                self._shutdown(self.final_state, EXIT_OK, timeout, self.final_message)
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
            doing = f"connect to {self.url}"
            try:
                transport = open_transport(self.config.url, **self.config.transport_options)
                with anyio.fail_after(self.config.connect_timeout):
                    await transport.connect()
                if not self.claimed:
                    doing = f"claim run {self.run_id!r} on {self.url}"
                    with anyio.fail_after(max(self.config.connect_timeout, 5.0)):
                        await self._claim(transport)
            except FINAL_ERRORS as exc:
                await self._close_quietly(transport)
                self._fatal(exc)
                return
            except Exception as exc:
                await self._close_quietly(transport)
                reason = f"no answer within {self.config.connect_timeout:g}s" if isinstance(exc, TimeoutError) else exc
                self._lost(f"cannot {doing}: {reason}", delay)
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
            connected_at = time.monotonic()
            failure: list[BaseException] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._guard, self._watch_revisions, transport, failure, tg.cancel_scope)
                tg.start_soon(self._guard, self._publish_loop, transport, failure, tg.cancel_scope)
            # Only reached when a task failed: a shutdown cancels this whole loop before it gets here.
            self.transport = None
            await self._close_quietly(transport)
            error = failure[0] if failure else RuntimeError("transport tasks ended")
            if isinstance(error, FINAL_ERRORS):
                self._fatal(error)
                return
            if time.monotonic() - connected_at > STABLE_CONNECTION:
                delay = low  # a connection that held for a while: this is a new outage
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
        message = truncate(str(exc) or f"{self.url} refused the credentials ({type(exc).__name__})")
        log.error("weavelet: %s; remote control of run %r is off", message, self.run_id)
        self.channel.send_event("failed", message, error=type(exc).__name__)
        self._shutdown("failed", EXIT_FATAL, 0.0 if not self.claimed else SIGNAL_FINAL_TIMEOUT, message)

    @staticmethod
    async def _close_quietly(transport: Transport | None) -> None:
        if transport is not None:
            with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                await transport.aclose()

    # -- claiming the run ----------------------------------------------------------------------------
    async def _claim(self, transport: Transport) -> None:
        """Take ownership of the run for this incarnation and apply the fresh-start policy (once)."""
        config = self.config
        current = await transport.status(self.run_id)
        if current is not None and current.incarnation and current.incarnation != config.incarnation and current.live:
            age = current.age()
            if age < -FUTURE_SLACK:
                log.warning(
                    "weavelet: run %r: the owner's heartbeat is %.0fs in the future (clocks disagree); taking over",
                    self.run_id,
                    -age,
                )
                age = config.stale_after + 1
            owner = (
                f"pid {current.pid} on host {current.host}, incarnation {current.incarnation}, "
                f"last heartbeat {age:.1f}s ago"
            )
            if config.takeover:
                log.warning("weavelet: run %r: taking over from a live trainer (%s) as asked", self.run_id, owner)
            elif age <= config.stale_after:
                raise RunOwned(
                    f"run {self.run_id!r} is owned by a live trainer ({owner}); stop it first "
                    f"(weavelet stop {self.run_id}), use another run id, or take over explicitly (takeover=True); "
                    f"an owner without a heartbeat for {config.stale_after:g}s is taken over without asking"
                )
            else:
                log.warning(
                    "weavelet: run %r: taking over from a stale trainer (%s; the limit is %gs)",
                    self.run_id,
                    owner,
                    config.stale_after,
                )
        try:
            latest: Revision | None = await transport.latest(self.run_id)
            number = latest.revision if latest is not None else 0
            unreadable: CorruptEntry | None = None
        except CorruptEntry as exc:
            latest, number, unreadable = None, exc.revision, exc
        line = await self._start_policy(transport, latest, number, unreadable, first_start=current is None)
        await self._statuses.publish(transport, self._status("running"))
        self.claimed = True  # only once the run's status is ours: a failed claim is tried again on reconnecting
        self.channel.send_event("claimed", line, after=self.last_forwarded, baseline=self.baseline)
        print(f"weavelet: run {self.run_id!r}, incarnation {config.incarnation}: {line}", file=sys.stderr, flush=True)

    async def _start_policy(
        self,
        transport: Transport,
        latest: Revision | None,
        number: int,
        unreadable: CorruptEntry | None,
        *,
        first_start: bool = False,
    ) -> str:
        """Carry out the fresh-start or resume policy; return the line that tells what was done.

        ``first_start``: the run has never reported a status, so no earlier incarnation exists and a stored
        config was written ahead of this start, for it: it is applied (its commands are not)."""
        config = self.config
        held = (
            f"revision {number} ({_describe(latest.config)})"
            if latest is not None
            else f"revision {number}, which cannot be read ({unreadable.reason})"
            if unreadable is not None
            else ""
        )
        ignored = "commands stored before this start are not carried out"
        if config.resume:
            if number <= config.after:
                return f"resuming after revision {config.after}; the store holds nothing newer"
            self.baseline = number
            return f"resuming after revision {config.after}; newer {held} is reconciled at the next step ({ignored})"
        if number == 0:
            return "fresh start; the store held no desired config"
        if first_start and latest is not None:
            self.baseline = number
            await self._supersede_range(transport, 1, number)
            return f"first start of this run; applying {held}, written ahead of it ({ignored})"
        if config.fresh == "adopt" and latest is not None:
            self.baseline = number
            await self._supersede_range(transport, 1, number)  # what no incarnation answered is superseded
            return f"fresh start; adopting {held} as asked (fresh='adopt'); {ignored}"
        if latest is not None and not latest.config:
            self.last_forwarded = max(self.last_forwarded, number)
            await self._supersede_range(transport, 1, number)
            if await transport.outcome(self.run_id, number) is None:
                await transport.publish_outcome(
                    self._fresh_outcome(latest, "fresh start: the desired config is empty", number)
                )
            return f"fresh start; the store held revision {number} with an empty config"
        cleared = await self._write_reset(transport, number)
        await self._supersede_range(transport, 1, cleared)
        return (
            f"fresh start; the store held {held} from an earlier incarnation; not inherited: cleared it with "
            f"revision {cleared} (fresh='reset'; fresh='adopt' applies it instead)"
        )

    async def _write_reset(self, transport: Transport, number: int) -> int:
        """Write an empty revision on top of ``number`` (compare-and-set, re-read on conflict); return its number."""
        for _attempt in range(20):
            revision = Revision(
                run=self.run_id,
                revision=number + 1,
                config={},
                author=f"weavelet (fresh start of incarnation {self.config.incarnation})",
            )
            self._remember_own(revision)  # before the put: a watch may deliver it before the put returns
            try:
                await transport.put(revision)
            except RevisionConflict as exc:
                number = exc.current
                await anyio.sleep(0.01)
                continue
            self.last_forwarded = revision.revision
            await transport.publish_outcome(
                self._fresh_outcome(
                    revision,
                    "fresh start: the desired config an earlier incarnation left was cleared; the training script's "
                    "own settings are in effect",
                    number,
                )
            )
            return revision.revision
        raise RevisionConflict(self.run_id, number, number)

    def _fresh_outcome(self, revision: Revision, message: str, cleared: int) -> Outcome:
        """The outcome of the revision a fresh start settles on: applied at step 0, by the start itself."""
        return Outcome(
            run=self.run_id,
            revision=revision.revision,
            revision_id=revision.id,
            incarnation=self.config.incarnation,
            result="applied",
            step=0,
            message=message,
            detail={"fresh_start": True, "cleared_revision": cleared},
        )

    # -- desired config --------------------------------------------------------------------------------
    async def _watch_revisions(self, transport: Transport) -> None:
        watcher = transport.watch(self.run_id, after=self.last_forwarded)
        try:
            async for entry in watcher:
                if isinstance(entry, CorruptEntry):
                    await self._unreadable(transport, entry)
                else:
                    await self._forward(transport, entry)
                await anyio.lowlevel.checkpoint()
        finally:
            with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                await watcher.aclose()  # type: ignore[attr-defined]

    async def _unreadable(self, transport: Transport, entry: CorruptEntry) -> None:
        """Report an entry that cannot be decoded as a rejection of its number (it is never applied)."""
        if entry.revision <= self.last_forwarded:
            return
        log.error("weavelet: run %r: %s", self.run_id, entry)
        await self._supersede_range(transport, self.last_forwarded + 1, entry.revision)
        await transport.publish_outcome(self._unreadable_outcome(entry))
        self.last_forwarded = entry.revision

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
        # Skipped stored revisions get their outcomes *before* the newer one is handed over: a sidecar killed
        # in between reconciles again from the same point, so no skipped revision is left unanswered.
        await self._supersede_range(transport, self.last_forwarded + 1, number)
        message: dict[str, Any] = {"t": "revision", "baseline": number == self.baseline}
        if self._trusted is not None:
            if self._is_own(revision):
                message["signature"] = {"verified": True, "local": True, "key": "trainer"}
            else:
                verdict = self._trusted.verify(revision)
                if not verdict.ok:
                    await self._refuse(transport, revision, verdict)
                    return
                message["signature"] = verdict.detail()
        try:
            encode(revision)
            data = json.dumps({**message, "revision": to_dict(revision)}, ensure_ascii=False).encode()
        except (ProtocolError, ValueError, TypeError) as exc:
            await transport.publish_outcome(
                Outcome(
                    run=self.run_id,
                    revision=number,
                    revision_id=revision.id,
                    incarnation=self.config.incarnation,
                    result="rejected",
                    message=truncate(str(exc)),
                )
            )
            log.error("weavelet: revision %d of run %r rejected: %s", number, self.run_id, exc)
        else:
            self.channel.forward(data)
        self.last_forwarded = number

    def _is_own(self, revision: Revision) -> bool:
        """Whether ``revision`` is, field for field, one this sidecar stored for its trainer (a rollback's rewrite,
        the spike guard's command): local, so trusted without a signature. A stored copy changed in any field is
        not."""
        own = self._own.get(revision.id)
        return own is not None and own == revision

    def _trusts(self, revision: Revision) -> bool:
        """Whether a trainer-authored write may build on ``revision``: always without trusted keys; with them,
        only on one of its own revisions or one signed by a trusted key."""
        return self._trusted is None or self._is_own(revision) or self._trusted.verify(revision).ok

    def _remember_own(self, revision: Revision) -> None:
        self._own[revision.id] = revision
        while len(self._own) > MAX_OWN_REVISIONS:
            del self._own[next(iter(self._own))]

    async def _refuse(self, transport: Transport, revision: Revision, verdict: signing.Verdict) -> None:
        """Answer a revision whose signature does not verify ``rejected``; it never reaches the trainer."""
        outcome = Outcome(
            run=self.run_id,
            revision=revision.revision,
            revision_id=revision.id,
            incarnation=self.config.incarnation,
            result="rejected",
            message=truncate(verdict.message),
            detail={"signature": verdict.detail()},
        )
        await transport.publish_outcome(outcome)
        log.warning("weavelet: run %r: %s", self.run_id, verdict.message)
        self.last_forwarded = revision.revision
        self._refused = outcome_summary(outcome)
        self._kick.set()

    async def _supersede_range(self, transport: Transport, first: int, number: int) -> None:
        """Publish ``superseded`` for stored revisions in ``[first, number)`` that never reached the trainer and
        have no outcome yet (an unreadable one gets ``rejected``), at most the newest
        :data:`MAX_SUPERSEDE_SCAN`. Only revisions the store holds are looked at: a number that was never
        written (a jump) has no revision to answer, and a jump costs one history read, not a loop over it."""
        if first >= number:
            return
        stored = [
            entry
            for entry in await transport.history(self.run_id, limit=MAX_SUPERSEDE_SCAN + 1)
            if first <= entry.revision < number
        ][-MAX_SUPERSEDE_SCAN:]
        if not stored:
            return
        # One read of the newest outcomes answers most lookups; older revisions are looked up one by one.
        wanted = 4 * len(stored) + 8
        recent = await transport.outcomes(self.run_id, limit=wanted)
        answered = {o.revision for o in recent}
        floor = min(answered) if len(recent) >= wanted and answered else 0
        for entry in stored:
            await anyio.lowlevel.checkpoint()
            if entry.revision in answered:
                continue
            if entry.revision < floor and await transport.outcome(self.run_id, entry.revision) is not None:
                continue
            if isinstance(entry, CorruptEntry):
                await transport.publish_outcome(self._unreadable_outcome(entry))
                continue
            await transport.publish_outcome(
                Outcome(
                    run=self.run_id,
                    revision=entry.revision,
                    revision_id=entry.id,
                    incarnation=self.config.incarnation,
                    result="superseded",
                    message=f"revision {number} arrived before revision {entry.revision} was applied",
                    detail={"superseded_by": number},
                )
            )

    def _unreadable_outcome(self, entry: CorruptEntry) -> Outcome:
        return Outcome(
            run=self.run_id,
            revision=entry.revision,
            incarnation=self.config.incarnation,
            result="rejected",
            message=truncate(f"not applied: {entry}"),
        )

    async def _publish_loop(self, transport: Transport) -> None:
        """Publish outcomes as they come, the status when it changed and, unchanged, every keepalive.

        The only timed wake-up is the keepalive: everything else (an outcome, a new status snapshot, a
        trainer-authored write, a refused revision) sets ``_kick``."""
        keepalive = self.config.heartbeat_interval
        published: dict[str, Any] | None = None  # the last status published on this connection, less heartbeat
        next_keepalive = 0.0
        while True:
            self._kick = anyio.Event()  # before the work: a kick that comes during it is not lost
            await self._publish_outbox(transport)
            status = self._status("running")
            content = {**to_dict(status), "heartbeat": None}
            if content != published or time.monotonic() >= next_keepalive:
                # Nobody wrote the status since this sidecar did: no takeover to look for (one round trip).
                if not await self._statuses.publish_unless_replaced(transport, status):
                    await self._check_owner(transport)
                    await self._statuses.publish(transport, status)
                published, next_keepalive = content, time.monotonic() + keepalive
            with anyio.move_on_after(max(0.0, next_keepalive - time.monotonic())):
                await self._kick.wait()

    async def _check_owner(self, transport: Transport) -> None:
        """Raise ``RunOwned`` if a newer live incarnation publishes this run's status (it took the run over)."""
        current = await transport.status(self.run_id)
        if current is None or (
            current.incarnation == self.config.incarnation and current.schema_digest != self._statuses.stored_digest
        ):
            self._statuses.stored_digest = None  # the run was removed (weavelet rm): store the schema again
        if (
            current is None
            or not current.incarnation
            or current.incarnation == self.config.incarnation
            or not current.live
            or current.started_at <= self.config.started_at
        ):
            return
        self.claimed = False  # the status is the new owner's now: never overwrite it
        raise RunOwned(
            f"run {self.run_id!r} was taken over by incarnation {current.incarnation} (pid {current.pid} on host "
            f"{current.host}); this trainer trains on without remote control"
        )

    async def _publish_outbox(self, transport: Transport) -> None:
        while self.outbox:
            seq, outcome = self.outbox[0]
            try:
                await transport.publish_outcome(outcome)
            except (ProtocolError, ValueError, TypeError) as exc:
                self._drop_outcome(outcome, exc)  # the store refuses it for good
            except TransportError as exc:
                # An outage is retried, but never for ever: an outcome that still cannot be stored after a few
                # tries (its key is refused, a file name too long, a directory in the way) is dropped, so it
                # never blocks the outcomes and heartbeats behind it. Other errors (permissions) end the sidecar.
                if isinstance(exc, (AuthenticationFailed, PermissionDenied)):
                    raise
                self._publish_failures += 1
                if self._publish_failures < MAX_OUTCOME_ATTEMPTS and isinstance(exc, TransportUnavailable):
                    raise
                self._drop_outcome(outcome, exc)
            self._publish_failures = 0
            self.outbox.pop(0)
            if seq is not None:
                self.channel.outcome_ack.value = seq
            await anyio.lowlevel.checkpoint()
        while self.writes:  # revisions the trainer authored (a rollback's rewrite, the spike guard's commands)
            await authored.write(
                transport, self.run_id, self.writes[0], trusts=self._trusts, remember=self._remember_own
            )
            self.writes.pop(0)

    def _drop_outcome(self, outcome: Outcome, exc: BaseException) -> None:
        log.error(
            "weavelet: run %r: the outcome of revision %d cannot be stored and is dropped: %s",
            self.run_id,
            outcome.revision,
            exc,
        )

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
        last_outcome = fields.get("last_outcome")
        if self._refused is not None and (
            not isinstance(last_outcome, dict) or _older(last_outcome.get("revision"), self._refused["revision"])
        ):
            last_outcome = self._refused  # a newer revision refused for its signature: the status says why
        identity: dict[str, Any] = {
            "incarnation": self.config.incarnation,
            "started_at": self.config.started_at,
            "keepalive": self.config.heartbeat_interval,
            "labels": self.config.labels,
        }
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
                last_outcome=last_outcome,
                schema=fields.get("schema"),
                **identity,
            )
        except (ProtocolError, ValueError, TypeError) as exc:
            log.warning(
                "weavelet: status of run %r not publishable (%s); sending the lifecycle state only", self.run_id, exc
            )
            return Status(
                run=self.run_id,
                state=state,
                pid=self.config.trainer_pid,
                message=message,
                heartbeat=time.time(),
                **identity,
            )


def _open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits), or ``None`` where the OS has none (then the caller polls)."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None or pid <= 1:
        return None
    try:
        fd: int = opener(pid)
    except OSError as exc:  # ENOSYS (kernel < 5.3), ESRCH (already gone), EPERM (seccomp)
        log.debug("weavelet: no pidfd of the trainer (pid %d): %s; polling getppid instead", pid, exc)
        return None
    return fd


async def _readable_then_cancel(fd: int, scope: anyio.CancelScope) -> None:
    """Wait until ``fd`` is readable (a pidfd: the process exited; the sentinel: end of file), then end ``scope``."""
    await anyio.wait_readable(fd)
    scope.cancel()


def _older(number: object, than: int) -> bool:
    """Whether an outcome of revision ``number`` (from the trainer's status) is older than one of ``than``."""
    return not isinstance(number, int) or number < than


def _describe(config: dict[str, Any], limit: int = 200) -> str:
    """``key=value, ...`` of a config's top-level keys, cut to ``limit`` characters."""
    if not config:
        return "empty"
    text = ", ".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in config.items())
    return truncate(text, limit)


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
