"""The control side: write desired-config revisions, read status, history and outcomes.

:class:`AsyncWeaver` is the asyncio API; :class:`Weaver` wraps it for synchronous code (it runs an event loop
in a background daemon thread, so a script that never closes its ``Weaver`` still exits at once). Both are
context managers.

Outcome identity: every revision carries a unique ``id``, and every outcome the ``id`` of the write it answers.
:meth:`AsyncWeaver.wait` matches on the id, so an outcome of an older write that happened to get the same number
(a store whose numbering was reset) is never taken for the answer. Every public timeout holds to within about a
second, also against a stopped server: each transport call runs under the caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import getpass
import logging
import os
import random
import secrets
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

import anyio
from anyio.from_thread import BlockingPortal

from weavelet_core import signing
from weavelet_core.errors import CorruptEntry, RevisionConflict, RunEnded, TransportUnavailable, WaitTimeout
from weavelet_core.plugins import default_url, mask_password, open_transport
from weavelet_core.protocol import JsonObject, Outcome, Revision, Status, validate_run_id
from weavelet_core.schema import check_rollback_fields as schema_check_rollback
from weavelet_core.statuses import read_status
from weavelet_core.transport import Entry, Transport

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_WRITE_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 10.0
STATUS_RECHECK = 1.0
"""Seconds between two looks at the run's status while waiting for an outcome (has its incarnation ended?)."""
STATUS_FIRST = 0.05
"""Seconds before the first of them: an answer that comes sooner (the usual case) is not slowed by the read."""
COMMAND_TOKEN_BYTES = 8
READ_RETRY_FIRST = 0.1
READ_RETRY_MAX = 1.0
"""Backoff (seconds) between two tries of a read that met an outage, doubling from the first to the most."""


def default_author() -> str:
    """``user@host`` of this process, recorded on every revision it writes."""
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def merge_config(base: Mapping[str, Any], changes: Mapping[str, Any], *, whole: Collection[str] = ()) -> JsonObject:
    """``base`` with ``changes`` applied: nested objects merge key by key; a ``None`` value removes the key.

    ``base`` and ``changes`` are not modified. A nested object in ``changes`` that only removes keys that
    ``base`` does not have adds nothing (no empty object appears); an explicitly empty object ``{}`` is set.
    Top-level keys in ``whole`` take their new value as it is, never merged (a command's token object: a field
    left over from an earlier value must not make it malformed).
    """
    merged: JsonObject = {key: _copy(value) for key, value in base.items()}
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        elif key in whole:
            merged[key] = _copy(value)
        elif isinstance(value, Mapping):
            current = merged.get(key)
            sub = merge_config(current if isinstance(current, dict) else {}, value)
            if sub or not value or isinstance(current, dict):
                merged[key] = sub
        else:
            merged[key] = _copy(value)
    return merged


def _copy(value: Any) -> Any:
    """A copy of a config value: its mappings and lists copied, recursively, JSON scalars shared (anything else
    deep-copied). A third of ``copy.deepcopy``'s cost, on the path of every write."""
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_copy(item) for item in value)
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return copy.deepcopy(value)


class AsyncWeaver:
    """Writes a run's desired config and reads what became of it.

    :param url: transport URL; default ``WEAVELET_URL`` or the per-user ``file://`` directory.
    :param transport: an already built transport to use instead of ``url`` (not closed by the weaver).
    :param author: recorded on each revision; default ``user@host``.
    :param write_timeout: seconds :meth:`set` keeps retrying conflicts and outages before giving up (default
        10); also the bound on connecting.
    :param read_timeout: seconds a read (:meth:`get`, :meth:`status`, :meth:`history`, ...) may take before it
        raises :class:`~weavelet_core.TransportUnavailable` (default 10), also against a stopped server.
    :param signing_key: sign every revision written (commands and reverts too) with this Ed25519 key: the path of
        a private key file (``weavelet keygen``) or a key object; default ``WEAVELET_SIGNING_KEY``, else none (see
        :mod:`weavelet_core.signing`). A signing weaver never merges onto a stored revision it cannot verify
        (:class:`~weavelet_core.UntrustedRevision`; a command is merged onto the newest one it can, with a
        warning), so its signature never vouches for a config someone else chose.
    :param trusted_keys: with ``signing_key``, other signers' ``.pub`` files (or directories of them) whose
        revisions this weaver builds on as on its own; default ``WEAVELET_TRUSTED_KEYS``, else only its own key.
        Both raise :class:`~weavelet_core.SigningError` here for a bad key file, and
        :class:`~weavelet_core.MissingDriver` without ``cryptography`` (``pip install "weavelet[signing]"``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: Transport | None = None,
        author: str | None = None,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        signing_key: signing.SigningKeySource | None = None,
        trusted_keys: signing.TrustedSource | None = None,
        **options: Any,
    ) -> None:
        self._signer = signing.resolve_signing_key(signing_key)
        self._trusted = None if self._signer is None else _builds_on(self._signer, trusted_keys)
        self.url = url or (transport.url if transport else default_url())
        self._owns_transport = transport is None
        self._transport = transport if transport is not None else open_transport(self.url, **options)
        self._connected = transport is not None
        self.author = author or default_author()
        self.write_timeout = write_timeout
        self.read_timeout = read_timeout
        # The newest revision this weaver wrote per run: the base of its next write, saving a read. A stale
        # base only costs a compare-and-set conflict and a re-read, never a lost write.
        self._last_written: dict[str, Revision] = {}

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def signing_key(self) -> signing.SigningKey | None:
        """The key this weaver signs with, or ``None``."""
        return self._signer

    def trusts(self, revision: Revision) -> bool:
        """Whether this weaver may build on ``revision``: always when it does not sign; when it signs, when the
        revision verifies with its own or its trusted keys, or its config is empty."""
        return self._trusted is None or signing.safe_base(revision, self._trusted)

    async def _safe_base(self, transport: Transport, current: Revision, number: int, fallback: bool) -> Revision | None:
        """For a signing weaver and a ``current`` revision it cannot build on: raise
        :class:`~weavelet_core.UntrustedRevision`, or with ``fallback`` (a command: the brake must work) warn and
        return the newest revision it can build on (``None``: an empty base)."""
        assert self._trusted is not None
        if not fallback:
            raise signing.untrusted(current, self._trusted, "merge a change onto it")
        base = await signing.newest_safe_base(transport, current.run, number, self._trusted)
        problem = signing.untrusted(current, self._trusted, "build on it")
        on = f"revision {base.revision}'s config" if base is not None else "an empty config"
        warnings.warn(
            f"{str(problem).split(';')[0]}; signed on top of {on} instead (the newest this weaver can verify), so "
            "nothing of it is signed as yours",
            RuntimeWarning,
            stacklevel=2,
        )
        return base

    async def _ready(self) -> Transport:
        if not self._connected:
            with anyio.move_on_after(self.write_timeout) as scope:
                await self._transport.connect()
            if scope.cancelled_caught:
                raise TransportUnavailable(
                    f"cannot connect to {mask_password(self.url)} within {self.write_timeout:g}s: no answer; check "
                    "that the server runs and is reachable from here"
                )
            self._connected = True
        return self._transport

    async def _read(self, call: Callable[[Transport], Awaitable[T]]) -> T:
        """``call(transport)``, bounded by ``read_timeout`` (``TransportUnavailable`` when it runs out).

        Reads are idempotent, so an outage met once connected (a cluster electing a new stream leader, a
        sentinel failover, a dropped connection) is retried with backoff until ``read_timeout``; the last error
        is raised when the next try would not fit. A failed first connection is not retried: a stopped server
        is reported at once.
        """
        deadline = time.monotonic() + self.read_timeout
        delay = READ_RETRY_FIRST
        last: TransportUnavailable | None = None
        with anyio.move_on_after(self.read_timeout):
            transport = await self._ready()
            while True:
                try:
                    return await call(transport)
                except TransportUnavailable as exc:
                    last = exc
                    if time.monotonic() + delay >= deadline:
                        raise
                await anyio.sleep(delay)
                delay = min(delay * 2, READ_RETRY_MAX)
        reason = f"; the last try failed: {last}" if last is not None else ""
        raise TransportUnavailable(
            f"no answer from {mask_password(self.url)} within {self.read_timeout:g}s (read_timeout); check that the "
            f"server runs and is reachable from here{reason}"
        )

    @overload
    async def set(
        self,
        run: str,
        changes: Mapping[str, Any],
        *,
        wait: None = None,
        replace: bool = False,
        over_unreadable: bool = False,
        whole: Collection[str] = (),
    ) -> Revision: ...

    @overload
    async def set(
        self,
        run: str,
        changes: Mapping[str, Any],
        *,
        wait: float,
        replace: bool = False,
        over_unreadable: bool = False,
        whole: Collection[str] = (),
    ) -> Outcome: ...

    async def set(
        self,
        run: str,
        changes: Mapping[str, Any],
        *,
        wait: float | None = None,
        replace: bool = False,
        over_unreadable: bool = False,
        whole: Collection[str] = (),
    ) -> Revision | Outcome:
        """Write a new revision: ``changes`` merged onto the current desired config (or replacing it).

        Concurrent writers never lose a write: on a compare-and-set conflict the merge is redone on top of the
        newer revision, after a short randomised backoff. Outages are retried until ``write_timeout`` (seconds),
        which holds even against a stopped server. Without ``wait`` returns the stored :class:`Revision`; with
        ``wait`` (seconds) returns its :class:`Outcome` (see :meth:`wait`).

        Raises :class:`~weavelet_core.CorruptEntry` when the newest stored revision cannot be read and
        ``replace`` is false (there is nothing to merge onto; ``replace=True`` writes on top of it, and
        ``over_unreadable=True`` merges onto the newest *readable* revision and writes on top of the unreadable
        one, as commands do). Top-level keys in ``whole`` are replaced, not merged (see :func:`merge_config`).
        :class:`~weavelet_core.TransportUnavailable` when the write did not go through in time,
        :class:`~weavelet_core.RevisionConflict` when other writers kept winning until then.
        """
        validate_run_id(run)
        if not isinstance(changes, Mapping):
            raise TypeError(f"changes must be a mapping of config keys to values, got {type(changes).__name__}")
        deadline = time.monotonic() + self.write_timeout
        revision: Revision | None = None
        with anyio.move_on_after(self.write_timeout) as scope:
            revision = await self._write(run, changes, replace, deadline, over_unreadable, whole=whole)
        if revision is None or scope.cancelled_caught:
            raise TransportUnavailable(
                f"could not write run {run!r} to {mask_password(self.url)} within {self.write_timeout:g}s: no "
                "answer; the write may or may not have been stored (check with weavelet get)"
            )
        self._last_written[run] = revision
        if wait is None:
            return revision
        return await self.wait(run, revision.revision, timeout=wait, revision_id=revision.id)

    async def _write(
        self,
        run: str,
        changes: Mapping[str, Any],
        replace: bool,
        deadline: float,
        over_unreadable: bool = False,
        author: str | None = None,
        reverts: int = 0,
        whole: Collection[str] = (),
    ) -> Revision:
        transport = await self._ready()
        delay = 0.005
        # A write whose reply was lost may have landed: its id identifies it, so a retry never stores the
        # same change twice.
        unconfirmed: Revision | None = None
        while True:
            try:
                current: Revision | None = self._last_written.pop(run, None) if unconfirmed is None else None
                number: int
                if current is None:
                    try:
                        current = await transport.latest(run)
                    except CorruptEntry as exc:
                        if not (replace or over_unreadable):
                            raise
                        current, number = None, exc.revision
                        if over_unreadable and not replace:
                            # Merge onto the newest readable config, numbered on top of the unreadable entry.
                            # (Its number is not what is written: ``number`` is; a signing weaver checks it as stored.)
                            readable = [e for e in await transport.history(run) if isinstance(e, Revision)]
                            current = readable[-1] if readable else None
                    else:
                        number = current.revision if current else 0
                else:
                    number = current.revision
                if unconfirmed is not None and current is not None and current.id == unconfirmed.id:
                    return unconfirmed  # the earlier attempt landed: its reply was lost
                if current is not None and not replace and not self.trusts(current):
                    current = await self._safe_base(transport, current, number, over_unreadable)
                base = current.config if current and not replace else {}
                revision = Revision(
                    run=run,
                    revision=number + 1,
                    config=merge_config(base, changes, whole=whole),
                    author=author or self.author,
                    reverts=reverts,
                )
                if self._signer is not None:
                    revision = self._signer.sign(revision)
                unconfirmed = revision
                await transport.put(revision)
                return revision
            except (RevisionConflict, TransportUnavailable) as exc:
                if time.monotonic() + delay > deadline:
                    if isinstance(exc, RevisionConflict):
                        raise
                    raise TransportUnavailable(
                        f"could not write run {run!r} to {mask_password(self.url)} within "
                        f"{self.write_timeout:g}s: {exc}"
                    ) from exc
                # Randomised, growing backoff for conflicts too: racing writers spread out instead of
                # hammering the store in lockstep.
                await anyio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    async def command(
        self,
        run: str,
        name: str,
        *,
        wait: float | None = None,
        incarnation: str | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> Revision | Outcome:
        """Send the command ``name`` (``"stop"``, ``"checkpoint"``, ...) to the run's live incarnation.

        Writes ``{name: {"token": <fresh>, "incarnation": <live id>}}``: a command acts once, and only in the
        incarnation that was live when it was written, never in a later one. It is written even over an
        unreadable newest entry (merged onto the newest readable config). ``incarnation`` names it
        explicitly; by default it is read from the run's status. Raises :class:`~weavelet_core.RunEnded` when
        the run has no live incarnation (nothing would act on the command). ``wait`` as in :meth:`set`.
        ``fields``: more fields of the command object (``rollback``'s ``to`` and ``set``; see :meth:`rollback`).
        """
        validate_run_id(run)
        if not isinstance(name, str) or not name:
            raise ValueError(f"command name must be a non-empty string, got {name!r}")
        if incarnation is None:
            status = await self.status(run)
            if status is None or not status.live or not status.incarnation or status.stale():
                raise RunEnded(_not_live(run, status, f"a {name} command would act in no incarnation", command=True))
            incarnation = status.incarnation
        token: dict[str, Any] = {
            **dict(fields or {}),
            "token": secrets.token_hex(COMMAND_TOKEN_BYTES),
            "incarnation": incarnation,
        }
        # The emergency brake works over an unreadable newest entry too: merged onto the newest readable config.
        # The token replaces the command's value whole: a stray field from an earlier write cannot disable it.
        if wait is None:
            return await self.set(run, {name: token}, over_unreadable=True, whole=(name,))
        return await self.set(run, {name: token}, wait=wait, over_unreadable=True, whole=(name,))

    async def rollback(
        self,
        run: str,
        to: str | int = "latest",
        changes: Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
        incarnation: str | None = None,
    ) -> Revision | Outcome:
        """Ask the run's live incarnation to roll back to a checkpoint in place, then apply ``changes`` on top.

        Writes the command ``{"rollback": {"token", "incarnation", "to", "set"}}`` (see :meth:`command`): at its
        next optimizer-step boundary the trainer restores the model, every optimizer and scheduler (and the
        GradScaler, and weavelet's own state) from the checkpoint, applies ``changes`` and rewrites the desired
        config to the checkpoint's plus ``changes`` (so a bad value written after the checkpoint does not come
        back). The step counter and the data position keep moving forward.

        :param to: ``"latest"`` (default: the newest checkpoint of the run), ``"snapshot"`` (the newest in-memory
            snapshot), a step (``int`` >= 0: the newest checkpoint at or before it) or a checkpoint path on the
            trainer's machine.
        :param changes: keys to set after restoring (``{"lr_scale": 0.5}``), as in :meth:`set`; no commands.
        :param wait: seconds to wait for the outcome (then an :class:`Outcome` is returned; its ``detail``
            holds ``rollback``: the checkpoint's path, its step and the step the rollback took effect at).
        :raises ValueError: for a bad ``to`` or ``changes`` (nothing written).
        :raises RunEnded: when the run has no live incarnation.
        """
        fields: dict[str, Any] = {"to": to}
        if changes:
            fields["set"] = dict(changes)
        try:
            schema_check_rollback(fields)
        except ValueError as exc:
            raise ValueError(f"{exc} (nothing was written)") from None
        return await self.command(run, "rollback", wait=wait, incarnation=incarnation, fields=fields)

    async def wait(self, run: str, revision: int, *, timeout: float, revision_id: str | None = None) -> Outcome:
        """Wait up to ``timeout`` seconds for the outcome of ``revision`` and return it.

        With ``revision_id`` (the :attr:`Revision.id` of the write) only an outcome answering that write
        counts. The outcome is watched (:meth:`~weavelet_core.Transport.watch_outcome`), so it is returned within
        a round trip of being stored; the run's status is read every :data:`STATUS_RECHECK` seconds. Raises
        :class:`~weavelet_core.RunEnded` at once when the run's incarnation has ended (stopped or failed, or no
        heartbeat for too long) without answering, and :class:`~weavelet_core.WaitTimeout` when the time runs
        out, saying what the run was last seen doing. The revision stays desired in either case. Errors the
        transport raises that retrying cannot fix (``PermissionDenied``, ...) are raised as they are.
        """
        transport = await self._ready()
        deadline = time.monotonic() + timeout
        # The whole wait, with its last look at the run's status, holds within half a second of ``timeout``.
        with anyio.move_on_after(timeout + 0.5) as scope:
            return await self._wait(transport, run, revision, revision_id, deadline, timeout)
        assert scope.cancelled_caught
        raise WaitTimeout(
            f"no outcome for revision {revision} of run {run!r} within {timeout:g}s; the transport did not answer "
            "in time (a stopped or unreachable server?); the revision stays desired"
        )

    async def _wait(
        self, transport: Transport, run: str, revision: int, revision_id: str | None, deadline: float, timeout: float
    ) -> Outcome:
        """Follow the outcome of ``revision`` with :meth:`Transport.watch_outcome` while the run's status is read every
        :data:`STATUS_RECHECK` seconds from :data:`STATUS_FIRST` on (has its incarnation ended?), until an answer, the
        end of the run, or ``deadline``."""
        answer: list[Outcome] = []
        failure: list[Exception] = []
        ended: Status | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow_outcome, transport, run, revision, revision_id, answer, failure, tg.cancel_scope)
            await anyio.sleep(min(STATUS_FIRST, max(0.0, deadline - time.monotonic())))
            while True:
                with contextlib.suppress(TransportUnavailable):
                    status = await self._bounded(transport.status(run), deadline)
                    if status is not None and (not status.live or status.stale()):
                        # A last look: the answer may have been stored just before the incarnation ended.
                        found = await self._bounded(transport.outcome(run, revision), deadline)
                        if found is not None and _answers(found, revision_id):
                            answer.append(found)
                        else:
                            ended = status
                        tg.cancel_scope.cancel()
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tg.cancel_scope.cancel()
                    break
                await anyio.sleep(min(STATUS_RECHECK, remaining))
        if failure:
            raise failure[0]
        if answer:
            return answer[0]
        if ended is not None:
            raise RunEnded(_not_live(run, ended, f"revision {revision} will not be answered"))
        raise WaitTimeout(await self._explain_missing_outcome(run, revision, timeout))

    @staticmethod
    async def _follow_outcome(
        transport: Transport,
        run: str,
        revision: int,
        revision_id: str | None,
        answer: list[Outcome],
        failure: list[Exception],
        done: anyio.CancelScope,
    ) -> None:
        """Watch the outcome of ``revision`` until one answers ``revision_id``: append it to ``answer`` and cancel
        ``done``. An outage restarts the watch after a backoff; any other error goes to ``failure`` (and cancels
        ``done``). A watch that ends (the transport was closed) leaves the rest to the status checks and the
        deadline."""
        delay = READ_RETRY_FIRST
        while True:
            watcher = transport.watch_outcome(run, revision)
            try:
                async for outcome in watcher:
                    if _answers(outcome, revision_id):
                        answer.append(outcome)
                        done.cancel()
                        return
                return
            except TransportUnavailable as exc:
                log.debug("weaver: watching the outcome of revision %d of run %r: %s", revision, run, exc)
            except Exception as exc:
                failure.append(exc)
                done.cancel()
                return
            finally:
                with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                    await watcher.aclose()  # type: ignore[attr-defined]
            await anyio.sleep(delay)
            delay = min(delay * 2, READ_RETRY_MAX)

    @staticmethod
    async def _bounded(call: Awaitable[T], deadline: float) -> T:
        """``await call``, giving up (``TransportUnavailable``) a quarter second past ``deadline``."""
        with anyio.move_on_after(max(0.0, deadline - time.monotonic()) + 0.25):
            return await call
        raise TransportUnavailable("no answer from the transport in time")

    async def _explain_missing_outcome(self, run: str, revision: int, timeout: float) -> str:
        head = f"no outcome for revision {revision} of run {run!r} within {timeout:g}s"
        try:
            with anyio.fail_after(0.25):
                status = await self._transport.status(run)
        except TimeoutError:
            return f"{head}; the transport did not answer (a stopped or unreachable server?)"
        except TransportUnavailable as exc:
            return f"{head}; the transport is unreachable ({exc})"
        if status is None:
            return (
                f"{head}; no trainer has reported for this run yet: is it running with weavelet, against "
                f"{mask_password(self.url)}?"
            )
        return (
            f"{head}; the run was last seen {status.age():.1f}s ago in state {status.state!r} at step "
            f"{status.step} (applied revision {status.applied_revision}); the revision stays desired and is "
            "applied when the trainer picks it up"
        )

    async def get(self, run: str) -> Revision | None:
        """The run's newest desired revision, or ``None``; raises :class:`~weavelet_core.CorruptEntry` when it
        cannot be read."""
        validate_run_id(run)
        return await self._read(lambda t: t.latest(run))

    async def status(self, run: str) -> Status | None:
        """The run's latest status with its schema (joined from where the trainer stored it: see
        :mod:`weavelet_core.statuses`), or ``None``."""
        validate_run_id(run)
        return await self._read(lambda t: read_status(t, run))

    async def check(
        self, run: str, changes: Mapping[str, Any], *, replace: bool = False, status: Status | None = None
    ) -> list[str]:
        """What the live trainer of ``run`` would refuse in ``changes`` (merged onto the current desired config,
        or replacing it with ``replace``), in the trainer's own words (``lr: -1 is negative; send a value >= 0``,
        ``unknown key 'lrr'; did you mean 'lr'? ...``); empty when nothing visible is wrong. See
        :func:`weavelet_core.schema.check` for what is checked.

        Judged against the schema the live run publishes in its status (``status``: one already read). A run with
        no live status, or a trainer that publishes no schema, gives an empty list: nothing to check against
        (tell the two apart with :meth:`status`). Nothing is written.

        Raises :class:`~weavelet_core.InvalidRunId` for a bad run id, and what :meth:`status` raises.
        """
        from weavelet_core import schema

        validate_run_id(run)
        if status is None:
            status = await self.status(run)
        if status is None or not status.live or not status.schema:
            return []
        base: Mapping[str, Any] = {}
        if not replace:
            with contextlib.suppress(CorruptEntry):
                previous = await self.get(run)
                base = previous.config if previous is not None else {}
        return schema.check(status.schema, changes, base)

    async def history(self, run: str, *, limit: int | None = None) -> list[Entry]:
        """The run's revisions, oldest first; an unreadable one appears as a :class:`~weavelet_core.CorruptEntry`."""
        validate_run_id(run)
        return await self._read(lambda t: t.history(run, limit=limit))

    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        """The run's outcomes of every incarnation, ordered by revision then time, oldest first."""
        validate_run_id(run)
        return await self._read(lambda t: t.outcomes(run, limit=limit))

    async def outcome(self, run: str, revision: int) -> Outcome | None:
        """The outcome of one revision, or ``None`` when it has none yet."""
        validate_run_id(run)
        return await self._read(lambda t: t.outcome(run, revision))

    async def runs(self) -> list[str]:
        """Ids of the runs the transport knows."""
        return await self._read(lambda t: t.runs())

    async def statuses(self, runs: Sequence[str]) -> dict[str, Status | None]:
        """The latest status of each of ``runs`` (``None`` for one without), in one batched or concurrent read
        (see :meth:`~weavelet_core.Transport.statuses`). A status whose trainer stores its schema apart comes without
        it (``schema`` is ``None``, ``schema_digest`` set): read one run's with :meth:`status`."""
        for run in runs:
            validate_run_id(run)
        return await self._read(lambda t: t.statuses(list(runs)))

    async def latests(self, runs: Sequence[str]) -> dict[str, Revision | CorruptEntry | None]:
        """The newest revision of each of ``runs`` (a :class:`~weavelet_core.CorruptEntry` in place of an
        unreadable one, ``None`` for a run without), in one batched or concurrent read."""
        for run in runs:
            validate_run_id(run)
        return await self._read(lambda t: t.latests(list(runs)))

    async def revision(self, run: str, number: int) -> Revision:
        """Revision ``number`` of ``run``, from its kept history.

        Raises ``ValueError`` when the run has no such revision (it was never written, or is older than the
        history the transport keeps) and :class:`~weavelet_core.CorruptEntry` when it cannot be read.
        """
        validate_run_id(run)
        entries = await self._read(lambda t: t.history(run))
        for entry in entries:
            if entry.revision == number:
                if isinstance(entry, CorruptEntry):
                    raise entry
                return entry
        kept = f"revisions {entries[0].revision}-{entries[-1].revision}" if entries else "no revisions"
        raise ValueError(f"run {run!r} has no revision {number} (the store keeps {kept}); see: weavelet history {run}")

    async def revert(self, run: str, revision: int, *, wait: float | None = None) -> Revision | Outcome:
        """Write a new revision whose config equals revision ``revision``'s (an undo), recorded as such in its
        :attr:`~weavelet_core.Revision.reverts`.

        Commands (``stop``, ``checkpoint``, ...) keep their current values instead of the old ones: a command
        acts when its value changes, and an undo must not repeat or revive one. Returns the new
        :class:`Revision`, or with ``wait`` its :class:`Outcome` (see :meth:`wait`). Raises ``ValueError`` when
        the revision is not kept, :class:`~weavelet_core.CorruptEntry` when it cannot be read, and what
        :meth:`set` raises.
        """
        old = await self.revision(run, revision)
        if not self.trusts(old):
            assert self._trusted is not None
            raise signing.untrusted(old, self._trusted, "revert to it")
        try:
            current = await self.get(run)
        except CorruptEntry:
            current = None
        if current is not None and not self.trusts(current):  # its commands must not be signed as ours
            current = await self._safe_base(await self._ready(), current, current.revision, True)
        config = {key: value for key, value in old.config.items() if key not in COMMAND_KEYS}
        if current is not None:
            config.update({key: value for key, value in current.config.items() if key in COMMAND_KEYS})
        deadline = time.monotonic() + self.write_timeout
        written: Revision | None = None
        with anyio.move_on_after(self.write_timeout):
            written = await self._write(run, config, True, deadline, reverts=revision)
        if written is None:
            raise TransportUnavailable(
                f"could not write run {run!r} to {mask_password(self.url)} within {self.write_timeout:g}s"
            )
        self._last_written[run] = written
        if wait is None:
            return written
        return await self.wait(run, written.revision, timeout=wait, revision_id=written.id)

    async def diff(self, run: str, a: int, b: int) -> dict[str, tuple[Any, Any]]:
        """What differs between revisions ``a`` and ``b`` of ``run``: ``{dotted.key: (value in a, value in b)}``,
        ``None`` standing for a key that is absent. Raises what :meth:`revision` raises."""
        first, second = await self.revision(run, a), await self.revision(run, b)
        old, new = _flatten(first.config), _flatten(second.config)
        return {
            key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)
        }

    async def delete(self, run: str) -> None:
        """Remove everything stored for ``run`` (revisions, status, outcomes). Raises
        :class:`~weavelet_core.transport.DeleteUnsupported` when the transport cannot delete."""
        validate_run_id(run)
        await (await self._ready()).delete(run)

    async def aclose(self) -> None:
        if self._owns_transport:
            await self._transport.aclose()

    async def __aenter__(self) -> AsyncWeaver:
        await self._ready()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


COMMAND_KEYS = frozenset({"stop", "checkpoint", "rollback"})
"""Config keys that are commands (act once per token); a revert leaves them out."""


def _builds_on(signer: signing.SigningKey, trusted_keys: signing.TrustedSource | None) -> signing.TrustedKeys:
    """The keys whose revisions a signing weaver builds on: its own and ``trusted_keys`` (or the environment's)."""
    own = signer.trusted()
    trusted = signing.resolve_trusted_keys(trusted_keys)
    if trusted is None:
        return signing.TrustedKeys([own])
    if own.key_id in trusted:
        return trusted
    if own.name in trusted.names():
        own = dataclasses.replace(own, name=f"this weaver's key {own.key_id}")
    return trusted.merged([own])


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _answers(outcome: Outcome, revision_id: str | None) -> bool:
    """Whether ``outcome`` answers the write with ``revision_id`` (any write when ``None``)."""
    return revision_id is None or outcome.revision_id == revision_id


def _not_live(run: str, status: Status | None, consequence: str, *, command: bool = False) -> str:
    later = (
        ". A trainer started later does not act on commands written before it"
        if command
        else ("; the revision stays desired")
    )
    if status is None:
        return f"run {run!r} has no trainer reporting; {consequence}. Start the trainer first"
    who = f"incarnation {status.incarnation}" if status.incarnation else "its trainer"
    if status.live:  # stale: no heartbeat for too long (or from the future)
        age = status.age()
        seen = f"{age:.0f}s ago" if age >= 0 else f"{-age:.0f}s in the future (the clocks disagree)"
        return (
            f"run {run!r} has no live incarnation ({who} was last heard from {seen}, at step {status.step}: its "
            f"trainer or host is gone, or its weavelet cannot reach the store); {consequence}{later}"
        )
    reason = f": {status.message}" if status.message else ""
    return (
        f"run {run!r} has no live incarnation ({who} ended {status.state} at step {status.step}, "
        f"{status.age():.0f}s ago{reason}); {consequence}{later}"
    )


class _LoopThread:
    """An asyncio event loop in a daemon thread, reached through a :class:`BlockingPortal`.

    A daemon thread, unlike anyio's ``start_blocking_portal`` (a non-daemon pool thread that interpreter exit
    waits for), never keeps a process alive: a script that forgets to close its ``Weaver`` exits at once.
    :meth:`call` hands a coroutine to the loop with ``asyncio.run_coroutine_threadsafe``, half the cost of the
    portal's own ``call`` (which starts a task in its task group, under a cancel scope): it is on the path of every
    synchronous call, ``Weaver.set()`` included.
    """

    def __init__(self, name: str = "weavelet-weaver") -> None:
        self._ready = threading.Event()
        self._portal: BlockingPortal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0) or self._portal is None or self._loop is None:
            raise RuntimeError(f"the weaver's event loop did not start: {self._error!r}")
        self.portal: BlockingPortal = self._portal
        self.loop: asyncio.AbstractEventLoop = self._loop

    def _main(self) -> None:
        try:
            anyio.run(self._serve, backend="asyncio")
        except BaseException as exc:  # reported by __init__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self._portal = portal
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await portal.sleep_until_stopped()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the loop, from another thread; its result, or its exception raised here. An
        interruption while waiting (Ctrl-C) cancels it on the loop, and is raised."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a Weaver method was called from its own event loop; await AsyncWeaver's there")

        async def run() -> T:
            return await fn(*args)

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self, timeout: float = 2.0) -> None:
        """Cancel what still runs and end the loop within ``timeout`` seconds. Idempotent."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            future = self.portal.start_task_soon(self.portal.stop, True)
            future.result(timeout)
        self._thread.join(timeout)


def _close_at_exit(loop: _LoopThread, weaver: AsyncWeaver) -> None:
    """Close a ``Weaver`` nobody closed, bounded, when it is collected or at interpreter exit."""
    with contextlib.suppress(Exception):
        loop.portal.start_task_soon(weaver.aclose).result(2.0)
    loop.close(timeout=2.0)


class Weaver:
    """Synchronous :class:`AsyncWeaver`: same arguments, same methods, blocking calls.

    Use it as a context manager, or call :meth:`close` when done::

        with Weaver() as weaver:
            weaver.set("demo", {"lr": 1e-4})
            print(weaver.status("demo"))
    """

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        self._loop = _LoopThread()
        try:
            self._async: AsyncWeaver = self._loop.call(self._build, url, kwargs)
        except BaseException:
            self._loop.close()
            raise
        self._portal = self._loop
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_at_exit, self._loop, self._async)

    @staticmethod
    async def _build(url: str | None, kwargs: dict[str, Any]) -> AsyncWeaver:
        weaver = AsyncWeaver(url, **kwargs)
        await weaver._ready()
        return weaver

    @property
    def url(self) -> str:
        return self._async.url

    @overload
    def set(self, run: str, changes: Mapping[str, Any], *, wait: None = None, replace: bool = False) -> Revision: ...

    @overload
    def set(self, run: str, changes: Mapping[str, Any], *, wait: float, replace: bool = False) -> Outcome: ...

    def set(
        self, run: str, changes: Mapping[str, Any], *, wait: float | None = None, replace: bool = False
    ) -> Revision | Outcome:
        """See :meth:`AsyncWeaver.set`."""

        async def call() -> Revision | Outcome:
            if wait is None:
                return await self._async.set(run, changes, replace=replace)
            return await self._async.set(run, changes, wait=wait, replace=replace)

        return self._portal.call(call)

    def wait(self, run: str, revision: int, *, timeout: float, revision_id: str | None = None) -> Outcome:
        """See :meth:`AsyncWeaver.wait`."""
        return self._portal.call(lambda: self._async.wait(run, revision, timeout=timeout, revision_id=revision_id))

    def command(
        self, run: str, name: str, *, wait: float | None = None, incarnation: str | None = None
    ) -> Revision | Outcome:
        """See :meth:`AsyncWeaver.command`."""
        return self._portal.call(lambda: self._async.command(run, name, wait=wait, incarnation=incarnation))

    def rollback(
        self,
        run: str,
        to: str | int = "latest",
        changes: Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
        incarnation: str | None = None,
    ) -> Revision | Outcome:
        """See :meth:`AsyncWeaver.rollback`."""
        return self._portal.call(lambda: self._async.rollback(run, to, changes, wait=wait, incarnation=incarnation))

    def get(self, run: str) -> Revision | None:
        return self._portal.call(self._async.get, run)

    @property
    def signing_key(self) -> signing.SigningKey | None:
        """See :attr:`AsyncWeaver.signing_key`."""
        return self._async.signing_key

    def trusts(self, revision: Revision) -> bool:
        """See :meth:`AsyncWeaver.trusts`."""
        return self._async.trusts(revision)

    def status(self, run: str) -> Status | None:
        return self._portal.call(self._async.status, run)

    def check(
        self, run: str, changes: Mapping[str, Any], *, replace: bool = False, status: Status | None = None
    ) -> list[str]:
        """What the live trainer of ``run`` would refuse in ``changes``; see :meth:`AsyncWeaver.check`."""
        return self._portal.call(lambda: self._async.check(run, changes, replace=replace, status=status))

    def history(self, run: str, *, limit: int | None = None) -> list[Entry]:
        return self._portal.call(lambda: self._async.history(run, limit=limit))

    def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        return self._portal.call(lambda: self._async.outcomes(run, limit=limit))

    def outcome(self, run: str, revision: int) -> Outcome | None:
        return self._portal.call(self._async.outcome, run, revision)

    def runs(self) -> list[str]:
        return self._portal.call(self._async.runs)

    def statuses(self, runs: Sequence[str]) -> dict[str, Status | None]:
        """See :meth:`AsyncWeaver.statuses`."""
        return self._portal.call(self._async.statuses, runs)

    def latests(self, runs: Sequence[str]) -> dict[str, Revision | CorruptEntry | None]:
        """See :meth:`AsyncWeaver.latests`."""
        return self._portal.call(self._async.latests, runs)

    def revision(self, run: str, number: int) -> Revision:
        """See :meth:`AsyncWeaver.revision`."""
        return self._portal.call(self._async.revision, run, number)

    def revert(self, run: str, revision: int, *, wait: float | None = None) -> Revision | Outcome:
        """See :meth:`AsyncWeaver.revert`."""
        return self._portal.call(lambda: self._async.revert(run, revision, wait=wait))

    def diff(self, run: str, a: int, b: int) -> dict[str, tuple[Any, Any]]:
        """See :meth:`AsyncWeaver.diff`."""
        return self._portal.call(self._async.diff, run, a, b)

    def delete(self, run: str) -> None:
        """See :meth:`AsyncWeaver.delete`."""
        self._portal.call(self._async.delete, run)

    def close(self) -> None:
        """Close the transport and stop the background event loop, within a few seconds. Idempotent.

        Calls still running (a ``set(wait=...)`` interrupted by Ctrl-C) are cancelled, not waited out.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        _close_at_exit(self._loop, self._async)

    def __enter__(self) -> Weaver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
