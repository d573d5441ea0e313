"""The transport interface: what a message system must do to carry weavelet's desired state.

A transport stores, per run, the revisions of its desired config, its latest status and one outcome per
revision. It is asynchronous and runs on anyio's asyncio backend. It is built by a plugin's factory from a URL
(no I/O), opened with :meth:`Transport.connect` (or ``async with``) and closed with :meth:`Transport.aclose`.

Implementations raise :class:`~weavelet_core.errors.TransportUnavailable` when the server or directory cannot
be reached (the caller may retry), :class:`~weavelet_core.errors.AuthenticationFailed` when credentials are
refused (final), and :class:`~weavelet_core.errors.RevisionConflict` when a compare-and-set write loses.
Bytes read from the store are decoded with :func:`weavelet_core.protocol.decode`; an entry that does not
decode is skipped (and logged), never passed on.

``weavelet_core.testing.TransportConformance`` is the executable form of this contract.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType

from weavelet_core.protocol import Outcome, Revision, Status


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
        revision 0.
        """

    @abc.abstractmethod
    async def latest(self, run: str) -> Revision | None:
        """The run's newest revision, or ``None`` if the run has none."""

    @abc.abstractmethod
    def watch(self, run: str, *, after: int = 0) -> AsyncIterator[Revision]:
        """Yield the run's revisions as they are written.

        First the newest stored revision, if its number is greater than ``after``; then every revision
        written later, in order. Never one twice, never out of order, never one ``<= after``. The iterator
        keeps going across reconnects (it re-reads the newest revision after an outage, so nothing newer is
        missed) until the consumer stops iterating or the transport is closed. Implement as an ``async def``
        generator.
        """

    @abc.abstractmethod
    async def history(self, run: str, *, limit: int | None = None) -> list[Revision]:
        """The run's stored revisions, oldest first; with ``limit``, only the newest ``limit``.

        A transport may keep a bounded history; it always keeps the newest revision.
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
        """Store the outcome of ``outcome.revision``; a later outcome for the same revision replaces it."""

    @abc.abstractmethod
    async def outcome(self, run: str, revision: int) -> Outcome | None:
        """The outcome stored for one revision, or ``None`` if none has been published yet."""

    @abc.abstractmethod
    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        """The run's stored outcomes ordered by revision, oldest first; with ``limit``, only the newest."""

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
