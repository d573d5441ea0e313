"""``memory://NAME``: an in-process transport for tests and examples.

All transports opened on the same ``memory://NAME`` inside one Python process share one store, also across
threads and event loops. Nothing crosses a process boundary: a weavelet sidecar (its own process) cannot use
it; use ``file://`` for that.

Revisions are kept as the encoded bytes a network store would hold, with the number the store records for each
(as Redis records a stream field), and decoded on write: an entry stored with :meth:`MemoryTransport.put_raw`
that does not decode is a :class:`~weavelet_core.errors.CorruptEntry` under that number. Outcomes are kept per
``(revision, incarnation)``: those of the newest ``history`` revisions, at most
:data:`OUTCOME_INCARNATIONS` incarnations (the newest) per revision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from weavelet_core.errors import CorruptEntry, ProtocolError, RevisionConflict, TransportUnavailable
from weavelet_core.hookspecs import hookimpl
from weavelet_core.protocol import Outcome, Revision, Status, decode, encode, validate_run_id
from weavelet_core.specs import TransportSpec
from weavelet_core.transport import Entry, Transport

DEFAULT_HISTORY = 1000
OUTCOME_INCARNATIONS = 8
"""Outcomes kept per revision, one per incarnation: the newest (greatest ``at``) this many."""


def decode_stored(run: str, number: int, data: bytes) -> Entry:
    """The entry a store holds under revision ``number`` of ``run``: the decoded revision, or a
    :class:`CorruptEntry` when ``data`` does not decode or names another run or number."""
    try:
        revision = decode(data, Revision)
    except ProtocolError as exc:
        return CorruptEntry(run, number, str(exc))
    if revision.run != run:
        return CorruptEntry(run, number, f"it is stored under run {run!r} but names run {revision.run!r}")
    if revision.revision != number:
        return CorruptEntry(run, number, f"it is stored as revision {number} but names revision {revision.revision}")
    return revision


@dataclasses.dataclass
class _Run:
    revisions: list[tuple[int, Entry]] = dataclasses.field(default_factory=list)
    status: Status | None = None
    unreadable_status: bool = False  # a status stored raw that does not decode (put_raw_status): read as none
    schema: bytes | None = None  # stored apart from the status (publish_schema)
    status_version: int = 0  # the store's count of status writes when this run's status was last written
    outcomes: dict[tuple[int, str], Outcome] = dataclasses.field(default_factory=dict)


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, _Run] = {}
        self.status_writes = 0  # every run's status writes, counted: a status's version (replace_status)
        self.waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def notify(self) -> None:
        with self.lock:
            waiters = list(self.waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its watcher is gone
                with self.lock:
                    self.waiters.discard((loop, event))


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def _store_for(name: str) -> _Store:
    with _stores_lock:
        return _stores.setdefault(name, _Store())


class MemoryTransport(Transport):
    """Keeps everything in a process-wide dict keyed by the URL's name."""

    def __init__(self, url: str, *, history: int = DEFAULT_HISTORY, **_ignored: Any) -> None:
        self.url = url
        self._name = url.split("://", 1)[1]
        self._store = _store_for(self._name)
        self._history = max(1, int(history))
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise TransportUnavailable(f"{self.url}: transport is closed")

    async def put(self, revision: Revision) -> None:
        self._check_open()
        self._append(revision.run, revision.revision, revision, expected=revision.revision - 1)

    def _append(self, run: str, number: int, entry: Entry, *, expected: int | None) -> None:
        if isinstance(entry, Revision):
            encode(entry)  # the same size cap as every other transport
        store = self._store
        with store.lock:
            state = store.runs.setdefault(run, _Run())
            current = state.revisions[-1][0] if state.revisions else 0
            if expected is not None and current != expected:
                raise RevisionConflict(run, expected, current)
            state.revisions.append((number, entry))
            del state.revisions[: -self._history]
        store.notify()

    async def put_raw(self, run: str, number: int, data: bytes) -> None:
        """Store ``data`` as revision ``number`` of ``run``, without any check (for tests of unreadable
        entries: ``data`` that does not decode is read back as a :class:`CorruptEntry` numbered ``number``)."""
        self._check_open()
        validate_run_id(run)
        self._append(run, number, decode_stored(run, number, data), expected=None)

    async def latest(self, run: str) -> Revision | None:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            newest = state.revisions[-1][1] if state and state.revisions else None
        if isinstance(newest, CorruptEntry):
            raise newest
        return newest

    async def watch(self, run: str, *, after: int = 0) -> AsyncIterator[Entry]:
        self._check_open()
        validate_run_id(run)
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        store = self._store
        with store.lock:
            store.waiters.add(waiter)
        last = after
        first = True
        try:
            while not self._closed:
                event.clear()
                with store.lock:
                    state = store.runs.get(run)
                    revisions = list(state.revisions) if state else []
                if first:
                    pending = revisions[-1:] if revisions and revisions[-1][0] > last else []
                    first = False
                else:
                    pending = [r for r in revisions if r[0] > last]
                for number, entry in pending:
                    if number <= last:
                        continue
                    last = number
                    yield entry
                if not pending:
                    await event.wait()
        finally:
            with store.lock:
                store.waiters.discard(waiter)

    async def history(self, run: str, *, limit: int | None = None) -> list[Entry]:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            revisions = [entry for _, entry in state.revisions] if state else []
        return revisions[-limit:] if limit else revisions

    async def runs(self) -> list[str]:
        self._check_open()
        with self._store.lock:
            return sorted(
                name for name, r in self._store.runs.items() if r.revisions or r.status or r.unreadable_status
            )

    async def publish_status(self, status: Status) -> None:
        self._check_open()
        encode(status)
        with self._store.lock:
            self._store_status(status.run, status)

    def _store_status(self, run: str, status: Status | None) -> int:
        """Store ``status`` (None: an unreadable one) as the run's; return its version. Hold the store's lock."""
        state = self._store.runs.setdefault(run, _Run())
        self._store.status_writes += 1
        state.status, state.unreadable_status = status, status is None
        state.status_version = self._store.status_writes
        return state.status_version

    async def replace_status(self, status: Status, expected: int | None) -> int | None:
        """Store ``status`` while the stored one is version ``expected`` (see :meth:`Transport.replace_status`)."""
        self._check_open()
        encode(status)
        with self._store.lock:
            state = self._store.runs.get(status.run)
            if expected is not None and (state is None or state.status_version != expected):
                return None
            return self._store_status(status.run, status)

    async def put_raw_status(self, run: str, data: bytes) -> None:
        """Store ``data`` as the status of ``run``, without any check (for tests of unreadable statuses: ``data``
        that does not decode to a status of ``run`` is read back as no status, while the run is still listed)."""
        self._check_open()
        validate_run_id(run)
        try:
            status = decode(data, Status)
        except ProtocolError:
            status = None
        if status is not None and status.run != run:
            status = None
        with self._store.lock:
            self._store_status(run, status)

    async def publish_schema(self, run: str, data: bytes) -> None:
        """Store the run's schema apart from its status (see :meth:`Transport.publish_schema`)."""
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            self._store.runs.setdefault(run, _Run()).schema = bytes(data)

    async def read_schema(self, run: str) -> bytes | None:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            return state.schema if state else None

    async def status(self, run: str) -> Status | None:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            return state.status if state else None

    async def publish_outcome(self, outcome: Outcome) -> None:
        self._check_open()
        encode(outcome)
        with self._store.lock:
            outcomes = self._store.runs.setdefault(outcome.run, _Run()).outcomes
            outcomes[(outcome.revision, outcome.incarnation)] = outcome
            same = sorted((o.at, key) for key, o in outcomes.items() if key[0] == outcome.revision)
            for _, key in same[:-OUTCOME_INCARNATIONS]:
                del outcomes[key]
            numbers = sorted({key[0] for key in outcomes})
            if len(numbers) > self._history:
                oldest_kept = numbers[-self._history]
                for key in [key for key in outcomes if key[0] < oldest_kept]:
                    del outcomes[key]
        self._store.notify()

    async def outcome(self, run: str, revision: int) -> Outcome | None:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            found = [o for key, o in state.outcomes.items() if key[0] == revision] if state else []
        return max(found, key=lambda o: o.at, default=None)

    async def watch_outcome(self, run: str, revision: int) -> AsyncIterator[Outcome]:
        """The newest outcome of the revision each time it changes, woken by every write to the store (no polling);
        ends when the transport is closed."""
        self._check_open()
        validate_run_id(run)
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        store = self._store
        with store.lock:
            store.waiters.add(waiter)
        last: Outcome | None = None
        try:
            while not self._closed:
                event.clear()  # before reading: a write after the read sets it again
                with store.lock:
                    state = store.runs.get(run)
                    found = [o for key, o in state.outcomes.items() if key[0] == revision] if state else []
                newest = max(found, key=lambda o: o.at, default=None)
                if newest is not None and newest != last:
                    last = newest
                    yield newest
                else:
                    await event.wait()
        finally:
            with store.lock:
                store.waiters.discard(waiter)

    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            found = sorted(state.outcomes.values(), key=lambda o: (o.revision, o.at)) if state else []
        return found[-limit:] if limit else found

    async def statuses(self, runs: Sequence[str]) -> dict[str, Status | None]:
        """Every status in one pass under the lock (no task per run)."""
        self._check_open()
        with self._store.lock:
            found = {run: (state.status if (state := self._store.runs.get(run)) else None) for run in runs}
        return found

    async def latests(self, runs: Sequence[str]) -> dict[str, Revision | CorruptEntry | None]:
        """Every newest revision in one pass under the lock (no task per run)."""
        self._check_open()
        with self._store.lock:
            found = {
                run: (state.revisions[-1][1] if (state := self._store.runs.get(run)) and state.revisions else None)
                for run in runs
            }
        return found

    async def delete(self, run: str) -> None:
        """Forget everything stored for ``run``."""
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            self._store.runs.pop(run, None)
        self._store.notify()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._store.notify()


def _make(url: str, **options: Any) -> Transport:
    return MemoryTransport(url, **options)


@hookimpl
def weavelet_transports() -> list[TransportSpec]:
    return [
        TransportSpec(
            name="memory",
            schemes=("memory",),
            factory=_make,
            description="in-process store for tests; shared by every transport of one process",
        )
    ]
