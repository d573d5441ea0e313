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

``weavelet_core.testing.TransportConformance`` is the executable form of this contract.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType

from weavelet_core.errors import CorruptEntry
from weavelet_core.protocol import Outcome, Revision, Status

Entry = Revision | CorruptEntry
"""What ``watch`` and ``history`` yield: a revision, or the stand-in for one that cannot be read."""


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
