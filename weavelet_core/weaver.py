"""The control side: write desired-config revisions, read status, history and outcomes.

:class:`AsyncWeaver` is the asyncio API; :class:`Weaver` wraps it for synchronous code (it runs an event loop
in a background thread). Both are context managers.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, overload

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from weavelet_core.errors import RevisionConflict, TransportUnavailable, WaitTimeout
from weavelet_core.plugins import default_url, mask_password, open_transport
from weavelet_core.protocol import JsonObject, Outcome, Revision, Status, validate_run_id
from weavelet_core.transport import Transport

DEFAULT_WRITE_TIMEOUT = 10.0


def default_author() -> str:
    """``user@host`` of this process, recorded on every revision it writes."""
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def merge_config(base: Mapping[str, Any], changes: Mapping[str, Any]) -> JsonObject:
    """``base`` with ``changes`` applied: nested objects merge key by key; a ``None`` value removes the key.

    ``base`` and ``changes`` are not modified. A nested object in ``changes`` that only removes keys that
    ``base`` does not have adds nothing (no empty object appears); an explicitly empty object ``{}`` is set.
    """
    merged: JsonObject = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            current = merged.get(key)
            sub = merge_config(current if isinstance(current, dict) else {}, value)
            if sub or not value or isinstance(current, dict):
                merged[key] = sub
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class AsyncWeaver:
    """Writes a run's desired config and reads what became of it.

    :param url: transport URL; default ``WEAVELET_URL`` or the per-user ``file://`` directory.
    :param transport: an already built transport to use instead of ``url`` (not closed by the weaver).
    :param author: recorded on each revision; default ``user@host``.
    :param write_timeout: how long :meth:`set` keeps retrying conflicts and outages before giving up.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: Transport | None = None,
        author: str | None = None,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        **options: Any,
    ) -> None:
        self.url = url or (transport.url if transport else default_url())
        self._owns_transport = transport is None
        self._transport = transport if transport is not None else open_transport(self.url, **options)
        self._connected = transport is not None
        self.author = author or default_author()
        self.write_timeout = write_timeout
        # The newest revision this weaver wrote per run: the base of its next write, saving a read. A stale
        # base only costs a compare-and-set conflict and a re-read, never a lost write.
        self._last_written: dict[str, Revision] = {}

    @property
    def transport(self) -> Transport:
        return self._transport

    async def _ready(self) -> Transport:
        if not self._connected:
            await self._transport.connect()
            self._connected = True
        return self._transport

    @overload
    async def set(
        self, run: str, changes: Mapping[str, Any], *, wait: None = None, replace: bool = False
    ) -> Revision: ...

    @overload
    async def set(self, run: str, changes: Mapping[str, Any], *, wait: float, replace: bool = False) -> Outcome: ...

    async def set(
        self, run: str, changes: Mapping[str, Any], *, wait: float | None = None, replace: bool = False
    ) -> Revision | Outcome:
        """Write a new revision: ``changes`` merged onto the current desired config (or replacing it).

        Concurrent writers never lose a write: on a compare-and-set conflict the merge is redone on top of the
        newer revision. Outages are retried until ``write_timeout``. Without ``wait`` returns the stored
        :class:`Revision`; with ``wait`` (seconds) returns its :class:`Outcome`, or raises
        :class:`WaitTimeout` saying what the run was last seen doing.
        """
        validate_run_id(run)
        if not isinstance(changes, Mapping):
            raise TypeError(f"changes must be a mapping of config keys to values, got {type(changes).__name__}")
        transport = await self._ready()
        deadline = time.monotonic() + self.write_timeout
        delay = 0.005
        # A write whose reply was lost may have landed: its id identifies it, so a retry never stores the
        # same change twice.
        unconfirmed: Revision | None = None
        while True:
            try:
                current = self._last_written.pop(run, None) if unconfirmed is None else None
                if current is None:
                    current = await transport.latest(run)
                if unconfirmed is not None and current is not None and current.id == unconfirmed.id:
                    revision = unconfirmed
                    break
                base = current.config if current and not replace else {}
                revision = Revision(
                    run=run,
                    revision=(current.revision if current else 0) + 1,
                    config=merge_config(base, changes),
                    author=self.author,
                )
                unconfirmed = revision
                await transport.put(revision)
                break
            except (RevisionConflict, TransportUnavailable) as exc:
                if time.monotonic() + delay > deadline:
                    if isinstance(exc, RevisionConflict):
                        raise
                    raise TransportUnavailable(
                        f"could not write run {run!r} to {mask_password(self.url)} within "
                        f"{self.write_timeout:g}s: {exc}"
                    ) from exc
                await anyio.sleep(delay if isinstance(exc, TransportUnavailable) else 0)
                delay = min(delay * 2, 0.5)
        self._last_written[run] = revision
        if wait is None:
            return revision
        return await self.wait(run, revision.revision, timeout=wait)

    async def wait(self, run: str, revision: int, *, timeout: float) -> Outcome:
        """Wait up to ``timeout`` seconds for the outcome of ``revision``."""
        transport = await self._ready()
        deadline = time.monotonic() + timeout
        interval = 0.01
        while True:
            with contextlib.suppress(TransportUnavailable):
                found = await transport.outcome(run, revision)
                if found is not None:
                    return found
            if time.monotonic() >= deadline:
                raise WaitTimeout(await self._explain_missing_outcome(run, revision, timeout))
            await anyio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 1.5, 0.1)

    async def _explain_missing_outcome(self, run: str, revision: int, timeout: float) -> str:
        head = f"no outcome for revision {revision} of run {run!r} within {timeout:g}s"
        try:
            status = await self._transport.status(run)
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
        """The run's newest desired revision, or ``None``."""
        validate_run_id(run)
        return await (await self._ready()).latest(run)

    async def status(self, run: str) -> Status | None:
        """The run's latest status, or ``None``."""
        validate_run_id(run)
        return await (await self._ready()).status(run)

    async def history(self, run: str, *, limit: int | None = None) -> list[Revision]:
        """The run's revisions, oldest first."""
        validate_run_id(run)
        return await (await self._ready()).history(run, limit=limit)

    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        """The run's outcomes, by revision, oldest first."""
        validate_run_id(run)
        return await (await self._ready()).outcomes(run, limit=limit)

    async def outcome(self, run: str, revision: int) -> Outcome | None:
        """The outcome of one revision, or ``None`` when it has none yet."""
        validate_run_id(run)
        return await (await self._ready()).outcome(run, revision)

    async def runs(self) -> list[str]:
        """Ids of the runs the transport knows."""
        return await (await self._ready()).runs()

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


class Weaver:
    """Synchronous :class:`AsyncWeaver`: same arguments, same methods, blocking calls.

    Use it as a context manager, or call :meth:`close` when done::

        with Weaver() as weaver:
            weaver.set("demo", {"lr": 1e-4})
            print(weaver.status("demo"))
    """

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        self._portal_cm = start_blocking_portal(backend="asyncio")
        self._portal: BlockingPortal = self._portal_cm.__enter__()
        try:
            self._async: AsyncWeaver = self._portal.call(self._build, url, kwargs)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closed = False

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

    def wait(self, run: str, revision: int, *, timeout: float) -> Outcome:
        """See :meth:`AsyncWeaver.wait`."""
        return self._portal.call(lambda: self._async.wait(run, revision, timeout=timeout))

    def get(self, run: str) -> Revision | None:
        return self._portal.call(self._async.get, run)

    def status(self, run: str) -> Status | None:
        return self._portal.call(self._async.status, run)

    def history(self, run: str, *, limit: int | None = None) -> list[Revision]:
        return self._portal.call(lambda: self._async.history(run, limit=limit))

    def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        return self._portal.call(lambda: self._async.outcomes(run, limit=limit))

    def outcome(self, run: str, revision: int) -> Outcome | None:
        return self._portal.call(self._async.outcome, run, revision)

    def runs(self) -> list[str]:
        return self._portal.call(self._async.runs)

    def close(self) -> None:
        """Close the transport and stop the background event loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._portal.call(self._async.aclose)
        finally:
            # Cancel calls still running, such as a set(wait=...) interrupted by Ctrl-C, instead of waiting them out.
            with contextlib.suppress(RuntimeError):
                self._portal.call(self._portal.stop, True)
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> Weaver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
