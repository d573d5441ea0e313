"""The transport interface: what a message system must do to carry weavelet's desired state.

A transport stores, per run, the revisions of its desired config, its latest status and one outcome per
revision. It is asynchronous and runs on anyio's asyncio backend. It is built by a plugin's factory from a URL
(no I/O), opened with :meth:`Transport.connect` (or ``async with``) and closed with :meth:`Transport.aclose`.

Implementations raise :class:`~weavelet_core.errors.TransportUnavailable` when the server or directory cannot
be reached (the caller may retry), :class:`~weavelet_core.errors.AuthenticationFailed` when credentials are
refused (final), :class:`~weavelet_core.errors.PermissionDenied` when they lack a permission (final, naming the
subject or key and the permission), and :class:`~weavelet_core.errors.RevisionConflict` when a compare-and-set
write loses. Bytes read from the store are decoded with :func:`weavelet_core.protocol.decode`.

Undecodable revisions are never mistaken for "no revision": the newest one makes :meth:`Transport.latest`
raise :class:`~weavelet_core.errors.CorruptEntry`, and :meth:`Transport.watch` and :meth:`Transport.history`
return a ``CorruptEntry`` instance in its place. It keeps its number (the one the store records, else one
more than the newest readable revision before it), and :meth:`Transport.put` numbers on top of it. An
undecodable status or outcome is skipped and logged.

Every method returns or raises promptly when its caller's cancel scope is cancelled, so that callers can bound
every call (``anyio.fail_after``) even against a stopped (SIGSTOP) server.

Waiting for the answer to a write: :meth:`Transport.watch_outcome` yields the outcome of one revision as it is
stored. The default polls :meth:`Transport.outcome` (so a third-party transport works unchanged); the built-in
transports override it with a watch of their own (a key-value watch, a blocking stream read, inotify), so that
:meth:`weavelet_core.Weaver.wait` learns of an outcome within a round trip of its being stored.

``weavelet_core.testing.TransportConformance`` is the executable form of this contract.
"""

from __future__ import annotations

import abc
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import TypeVar

import anyio

from weavelet_core.errors import CorruptEntry, TransportError, TransportUnavailable
from weavelet_core.protocol import Outcome, Revision, Status

log = logging.getLogger(__name__)

Entry = Revision | CorruptEntry
"""What ``watch`` and ``history`` yield: a revision, or the stand-in for one that cannot be read."""

CONCURRENT_READS = 64
"""How many reads the default :meth:`Transport.statuses` and :meth:`Transport.latests` keep in flight at once."""

OUTCOME_POLL_FIRST = 0.01
OUTCOME_POLL_MAX = 0.1
"""Seconds between two reads of the default :meth:`Transport.watch_outcome`: the first, growing 1.5 times a read
up to the most."""

_T = TypeVar("_T")


class DeleteUnsupported(TransportError, NotImplementedError):
    """The transport cannot delete a run's records (its plugin does not implement :meth:`Transport.delete`)."""


class SchemaApartUnsupported(TransportError, NotImplementedError):
    """The transport cannot store a run's schema apart from its status (its plugin does not implement
    :meth:`Transport.publish_schema`): the status carries the schema inline."""


class StatusVersionsUnsupported(TransportError, NotImplementedError):
    """The transport cannot store a status conditionally (its plugin does not implement
    :meth:`Transport.replace_status`): a sidecar reads the status before each one it publishes."""


@contextlib.contextmanager
def decoding_many() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a batched read decodes many messages that it keeps.

    Decoded messages hold no reference cycles, so a collection during the loop frees nothing; but every few hundred
    new objects one runs, and the full ones traverse everything kept so far: decoding 10,000 trainer statuses (a
    few hundred JSON nodes each) took twice as long as decoding them one by one and dropping them. The collector is
    enabled again on leaving (if it was), whatever happens; wrap synchronous loops only, so nothing else runs
    meanwhile.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def gather_by_run(
    runs: Sequence[str], read: Callable[[str], Awaitable[_T]], limit: int = CONCURRENT_READS
) -> dict[str, _T]:
    """``{run: await read(run)}`` for every run, at most ``limit`` reads in flight at once. The first
    exception any read raises propagates (the others are cancelled)."""
    found: dict[str, _T] = {}
    semaphore = anyio.Semaphore(max(1, limit))

    async def one(run: str) -> None:
        async with semaphore:
            found[run] = await read(run)

    async with anyio.create_task_group() as tg:
        for run in dict.fromkeys(runs):
            tg.start_soon(one, run)
    return {run: found[run] for run in runs}


class Transport(abc.ABC):
    """Base class of every transport. Subclass it and implement the abstract methods."""

    #: The URL this transport was built from, with any password masked. Used in messages and ``repr``.
    url: str = ""

    async def connect(self) -> None:
        """Open connections; return when ready or raise ``TransportUnavailable``/``AuthenticationFailed``.

        Called once before any other method; the default does nothing.
        """

    @abc.abstractmethod
    async def put(self, revision: Revision) -> None:
        """Store ``revision`` as the run's newest, if and only if the stored newest is ``revision.revision - 1``.

        Atomic compare-and-set: with two writers racing for the same number, exactly one wins and the other
        gets ``RevisionConflict`` (with ``current`` set to what it found). A run with no revisions has current
        revision 0; an unreadable newest entry counts as the number :class:`CorruptEntry` gives it.
        """

    @abc.abstractmethod
    async def latest(self, run: str) -> Revision | None:
        """The run's newest revision, or ``None`` if the run has none.

        Raises :class:`CorruptEntry` if the newest stored entry cannot be decoded.
        """

    @abc.abstractmethod
    def watch(self, run: str, *, after: int = 0) -> AsyncIterator[Entry]:
        """Yield the run's revisions as they are written.

        First the newest stored revision, if its number is greater than ``after``; then every revision
        written later, in order. Never one twice, never out of order, never one ``<= after``. An entry that
        cannot be decoded is yielded as a :class:`CorruptEntry` with its number, in its place. The iterator
        keeps going across reconnects (it re-reads the newest revision after an outage, so nothing newer is
        missed) until the consumer stops iterating or the transport is closed. Implement as an ``async def``
        generator.
        """

    @abc.abstractmethod
    async def history(self, run: str, *, limit: int | None = None) -> list[Entry]:
        """The run's stored revisions, oldest first; with ``limit``, only the newest ``limit``.

        A transport may keep a bounded history; it always keeps the newest revision. Undecodable entries
        appear as :class:`CorruptEntry` instances in their place.
        """

    @abc.abstractmethod
    async def runs(self) -> list[str]:
        """Ids of runs that have a revision or a status, sorted."""

    @abc.abstractmethod
    async def publish_status(self, status: Status) -> None:
        """Store ``status`` as the run's latest status (the previous one is replaced)."""

    @abc.abstractmethod
    async def status(self, run: str) -> Status | None:
        """The run's latest status, or ``None``. Readable by a client that connects after it was published."""

    @abc.abstractmethod
    async def publish_outcome(self, outcome: Outcome) -> None:
        """Store ``outcome``, keyed by its revision *and* its incarnation.

        A later outcome of the same revision from the same incarnation replaces the earlier one; outcomes of
        other incarnations for that revision are kept (a resumed trainer may apply a revision its earlier
        incarnation also applied: both records are true).
        """

    @abc.abstractmethod
    async def outcome(self, run: str, revision: int) -> Outcome | None:
        """The newest outcome stored for one revision (greatest ``at`` over its incarnations), or ``None``."""

    @abc.abstractmethod
    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        """The run's stored outcomes, every incarnation's, ordered by ``(revision, at)``; with ``limit``, only the
        newest ``limit`` of that order."""

    # -- optional: defaults built on the methods above; a transport may override them -----------------------

    async def statuses(self, runs: Sequence[str]) -> dict[str, Status | None]:
        """The latest status of each of ``runs`` (``None`` for one without), keyed and ordered like ``runs``.

        Optional. The default calls :meth:`status` concurrently, :data:`CONCURRENT_READS` at a time; a transport
        that can read many keys in one request (a pipeline, a key-value listing) overrides it. Raises what
        :meth:`status` raises.
        """
        return await gather_by_run(runs, self.status)

    async def latests(self, runs: Sequence[str]) -> dict[str, Revision | CorruptEntry | None]:
        """The newest revision of each of ``runs``: a :class:`Revision`, a :class:`CorruptEntry` in place of
        one that cannot be read (never raised here), or ``None`` for a run without revisions.

        Optional. The default calls :meth:`latest` concurrently, :data:`CONCURRENT_READS` at a time; a transport
        with a batched read overrides it. Raises what :meth:`latest` raises, except ``CorruptEntry``.
        """

        async def read(run: str) -> Revision | CorruptEntry | None:
            try:
                return await self.latest(run)
            except CorruptEntry as exc:
                return exc

        return await gather_by_run(runs, read)

    async def watch_outcome(self, run: str, revision: int) -> AsyncIterator[Outcome]:
        """Yield the newest outcome of revision ``revision`` of ``run`` (what :meth:`outcome` returns) each time it
        changes: first the stored one, if there is one, then each newer one as it is stored.

        Nothing is missed: an implementation arms its watch first and reads the stored outcome after, so an
        outcome stored in between is seen by one or the other. It never yields an outcome of another revision; it
        may yield the same outcome twice (after a reconnect it reads again). It keeps going across outages (it
        reads again once the store is back) until the consumer stops iterating, and returns promptly when the
        consumer's cancel scope is cancelled. The built-in transports also end it when the transport is closed.
        Raises what :meth:`outcome` raises, except :class:`~weavelet_core.errors.TransportUnavailable`.

        Optional. The default polls :meth:`outcome`, every :data:`OUTCOME_POLL_FIRST` seconds at first, growing
        to every :data:`OUTCOME_POLL_MAX` seconds, and ends only when the consumer stops; a transport that can
        watch a key overrides it. Implement as an ``async def`` generator.
        """
        last: Outcome | None = None
        interval = OUTCOME_POLL_FIRST
        while True:
            try:
                found = await self.outcome(run, revision)
            except TransportUnavailable as exc:
                log.debug("waiting for the outcome of revision %d of run %r: %s", revision, run, exc)
                found = None
            if found is not None and found != last:
                last = found
                yield found
            await anyio.sleep(interval)
            interval = min(interval * 1.5, OUTCOME_POLL_MAX)

    async def publish_schema(self, run: str, data: bytes) -> None:
        """Store ``data``, the schema of ``run`` (:func:`~weavelet_core.protocol.encode_schema`), apart from its
        status, replacing the one stored before.

        A trainer's schema (what it accepts: a few kilobytes) rarely changes, while its status is republished at
        every heartbeat and read for every run by ``weavelet runs``. Stored apart, the status names it by digest
        (:attr:`~weavelet_core.protocol.Status.schema_digest`) and stays a few hundred bytes; see
        :mod:`weavelet_core.statuses` for who writes and joins the two.

        Optional. The default raises :class:`SchemaApartUnsupported`: the trainer's status then carries its
        schema inline, as before. A transport that overrides it overrides :meth:`read_schema` too, and removes
        the schema in :meth:`delete`.
        """
        raise SchemaApartUnsupported(f"the {type(self).__name__} transport stores a run's schema in its status")

    async def replace_status(self, status: Status, expected: int | None) -> int | None:
        """Store ``status`` as the run's latest status while the stored one is still version ``expected``; return
        the new version, or ``None``, storing nothing, when it is not.

        ``expected`` is a version an earlier call returned for the same run (``None``: store whatever is stored,
        as :meth:`publish_status` does). Versions are integers the store assigns, valid for one run; a status
        another writer stored since, or the run's removal, changes it. A sidecar checks that no newer incarnation
        took its run over before each status it publishes (its keepalive: every 5 s): where nothing was written
        since its own last status, this is one round trip instead of a read and a write.

        Optional. The default raises :class:`StatusVersionsUnsupported`, and the sidecar reads the status before
        each publish instead. Raises what :meth:`publish_status` raises.

        Example (``t`` a connected transport)::

            version = await t.replace_status(Status(run="r", state="running", step=1), None)
            assert await t.replace_status(Status(run="r", state="running", step=2), version) is not None
            assert await t.replace_status(Status(run="r", state="running", step=3), version) is None  # stale
        """
        raise StatusVersionsUnsupported(f"the {type(self).__name__} transport does not version statuses")

    async def read_schema(self, run: str) -> bytes | None:
        """The bytes :meth:`publish_schema` stored for ``run``, or ``None`` when there are none. Optional; the
        default returns ``None``. Raises ``TransportUnavailable`` like :meth:`status`."""
        return None

    async def delete(self, run: str) -> None:
        """Remove everything stored for ``run``: its revisions, status (and schema) and outcomes. Deleting a run that
        has nothing stored does nothing. Afterwards :meth:`runs` no longer lists it, and a new revision of it is
        numbered 1 again.

        Optional. The default raises :class:`DeleteUnsupported`, naming the transport.
        """
        raise DeleteUnsupported(
            f"the {type(self).__name__} transport at {self.url or '?'} cannot delete runs (its plugin does not "
            "implement Transport.delete); remove the run with that system's own tools"
        )

    async def aclose(self) -> None:
        """Release connections. Idempotent; afterwards running ``watch`` iterators end. Default: nothing."""

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
