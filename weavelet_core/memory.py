"""``memory://NAME``: an in-process transport for tests and examples.

All transports opened on the same ``memory://NAME`` inside one Python process share one store, also across
threads and event loops. Nothing crosses a process boundary: a weavelet sidecar (its own process) cannot use
it; use ``file://`` for that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from typing import Any

from weavelet_core.errors import RevisionConflict, TransportUnavailable
from weavelet_core.hookspecs import hookimpl
from weavelet_core.protocol import Outcome, Revision, Status, encode, validate_run_id
from weavelet_core.specs import TransportSpec
from weavelet_core.transport import Transport

DEFAULT_HISTORY = 1000


@dataclasses.dataclass
class _Run:
    revisions: list[Revision] = dataclasses.field(default_factory=list)
    status: Status | None = None
    outcomes: dict[int, Outcome] = dataclasses.field(default_factory=dict)


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, _Run] = {}
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
        self._history = history
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise TransportUnavailable(f"{self.url}: transport is closed")

    async def put(self, revision: Revision) -> None:
        self._check_open()
        encode(revision)  # the same size cap as every other transport
        store = self._store
        with store.lock:
            run = store.runs.setdefault(revision.run, _Run())
            current = run.revisions[-1].revision if run.revisions else 0
            if current != revision.revision - 1:
                raise RevisionConflict(revision.run, revision.revision - 1, current)
            run.revisions.append(revision)
            del run.revisions[: -self._history]
        store.notify()

    async def latest(self, run: str) -> Revision | None:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            return state.revisions[-1] if state and state.revisions else None

    async def watch(self, run: str, *, after: int = 0) -> AsyncIterator[Revision]:
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
                    pending = revisions[-1:] if revisions and revisions[-1].revision > last else []
                    first = False
                else:
                    pending = [r for r in revisions if r.revision > last]
                for revision in pending:
                    last = revision.revision
                    yield revision
                if not pending:
                    await event.wait()
        finally:
            with store.lock:
                store.waiters.discard(waiter)

    async def history(self, run: str, *, limit: int | None = None) -> list[Revision]:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            revisions = list(state.revisions) if state else []
        return revisions[-limit:] if limit else revisions

    async def runs(self) -> list[str]:
        self._check_open()
        with self._store.lock:
            return sorted(name for name, r in self._store.runs.items() if r.revisions or r.status)

    async def publish_status(self, status: Status) -> None:
        self._check_open()
        encode(status)
        with self._store.lock:
            self._store.runs.setdefault(status.run, _Run()).status = status

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
            self._store.runs.setdefault(outcome.run, _Run()).outcomes[outcome.revision] = outcome

    async def outcome(self, run: str, revision: int) -> Outcome | None:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            return state.outcomes.get(revision) if state else None

    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        self._check_open()
        validate_run_id(run)
        with self._store.lock:
            state = self._store.runs.get(run)
            found = [state.outcomes[k] for k in sorted(state.outcomes)] if state else []
        return found[-limit:] if limit else found

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
