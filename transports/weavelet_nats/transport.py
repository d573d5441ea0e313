"""The ``nats://`` transport: desired config, status and outcomes in JetStream key-value buckets.

Layout (``PREFIX`` is ``weavelet`` unless the URL says ``?prefix=``)::

    PREFIX-desired    key RUNKEY            every revision of the run's desired config (history: 64 by default)
    PREFIX-status     key RUNKEY            the run's latest status
    PREFIX-outcomes   key RUNKEY.REVISION   the outcome of one revision

``RUNKEY`` is the run id with each ``.`` written as ``=`` (a ``.`` separates tokens in NATS subjects).
Buckets use file storage and are created on first connect if missing.

Compare-and-set: a write sends ``Nats-Expected-Last-Subject-Sequence`` (``KeyValue.update(last=...)``) with
the sequence of the entry holding revision ``N - 1``, so exactly one of two racing writers wins.

Connections are set up for a long-lived process: pings every few seconds, reconnect forever once connected,
every callback set. The first connect has a deadline, and its error names the cause: refused, authentication
or TLS. While the connection is down every call fails at once with :class:`TransportUnavailable` (nothing is
buffered to be sent later); ``watch`` iterators wait, then recreate their watcher after the reconnect and
re-read the newest revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from weavelet_core.errors import (
    AuthenticationFailed,
    ProtocolError,
    RevisionConflict,
    TransportUnavailable,
)
from weavelet_core.plugins import mask_password
from weavelet_core.protocol import Outcome, Revision, Status, decode, encode, validate_run_id
from weavelet_core.transport import Transport
from weavelet_nats.url import NatsSettings, parse_url

log = logging.getLogger(__name__)

M = TypeVar("M", Revision, Status, Outcome)

WATCH_POLL = 0.25
"""Seconds a watch waits for an update before checking for a reconnect or a close."""
CLOSE_TIMEOUT = 5.0


def run_key(run: str) -> str:
    """The key-value key of a run (its id with ``.`` written as ``=``)."""
    return validate_run_id(run).replace(".", "=")


def key_run(key: str) -> str | None:
    """The run id of a key, or ``None`` if the key is not one this transport writes."""
    run = key.replace("=", ".")
    try:
        return validate_run_id(run)
    except ValueError:
        return None


async def _next_update(watcher: KeyValue.KeyWatcher, timeout: float) -> object:
    """The watcher's next item: an entry, ``None`` (end of initial values) or its stop sentinel."""
    return await watcher.updates(timeout=timeout)  # type: ignore[no-untyped-call]


async def _stop(watcher: KeyValue.KeyWatcher) -> None:
    """Stop a watcher, bounded and shielded (it may run while the caller is being cancelled)."""
    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]


def _is_auth_error(exc: BaseException) -> bool:
    if isinstance(exc, (nats.errors.AuthorizationError, nats.errors.InvalidUserCredentialsError)):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


def _is_tls_error(exc: BaseException) -> bool:
    return isinstance(
        exc,
        (
            ssl.SSLError,
            nats.errors.SecureConnRequiredError,
            nats.errors.SecureConnWantedError,
            nats.errors.SecureConnFailedError,
        ),
    )


class NatsTransport(Transport):
    """A NATS server (or cluster) with JetStream as the store. See the module docstring for the layout.

    :param url: ``nats://`` or ``tls://`` URL; see :mod:`weavelet_nats.url` for the forms and options.
    :param options: the URL's query options given as keywords (they take precedence over the URL's).
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.settings: NatsSettings = parse_url(url, options)
        self.url = mask_password(url)
        self._nc: Client | None = None
        self._buckets: dict[str, KeyValue] = {}
        self._closed = False
        self._generation = 0
        self._watchers: set[KeyValue.KeyWatcher] = set()
        self._scopes: set[anyio.CancelScope] = set()
        # run -> (revision number, stream sequence) of the newest entry this client has seen; lets ``put``
        # send its compare-and-set without reading first. A stale entry only costs a re-read.
        self._seen: dict[str, tuple[int, int]] = {}

    # -- connection --------------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self._nc is not None:
            return
        if self._closed:
            raise TransportUnavailable(f"{self.url}: transport is closed; open a new one")
        nc = Client()
        errors: list[BaseException] = []
        final = asyncio.Event()
        connected = False

        async def error_cb(exc: Exception) -> None:
            if not connected:
                errors.append(exc)
                if _is_auth_error(exc) or (isinstance(exc, ssl.SSLCertVerificationError)):
                    final.set()
                return
            if nc.is_connected:
                log.warning("NATS %s: %s", self.settings.display, exc)
            else:  # every failed reconnect attempt reports here; the disconnect was logged once
                log.debug("NATS %s: %s", self.settings.display, exc)

        async def disconnected_cb() -> None:
            for scope in list(self._scopes):
                scope.cancel()
            if connected and not self._closed:
                log.warning("NATS %s: disconnected; reconnecting", self.settings.display)

        async def reconnected_cb() -> None:
            self._generation += 1
            log.info("NATS %s: reconnected", self.settings.display)

        async def closed_cb() -> None:
            log.debug("NATS %s: connection closed", self.settings.display)

        s = self.settings
        kwargs: dict[str, Any] = {
            "servers": list(s.servers),
            "name": s.name,
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            "closed_cb": closed_cb,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": s.reconnect_wait,
            "connect_timeout": min(2.0, s.connect_timeout),
            "ping_interval": s.ping_interval,
            "max_outstanding_pings": 2,
            "user": s.user,
            "password": s.password,
            "token": s.token,
        }
        if s.tls:
            kwargs["tls"] = self._ssl_context()
            if s.tls_hostname:
                kwargs["tls_hostname"] = s.tls_hostname
        if s.creds:
            try:
                import nkeys  # type: ignore[import-not-found]  # noqa: F401
            except ImportError:
                raise TransportUnavailable(
                    "the creds option needs the nkeys package, which is not installed; install it with: "
                    "pip install nkeys"
                ) from None
            kwargs["user_credentials"] = s.creds

        connecting = asyncio.ensure_future(nc.connect(**kwargs))
        gave_up = asyncio.ensure_future(final.wait())
        try:
            await asyncio.wait({connecting, gave_up}, timeout=s.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # The client retries the first connect for ever; stop it at the deadline or a final error.
            for task in (connecting, gave_up):
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({connecting, gave_up})
                failure = None if connecting.cancelled() else connecting.exception()
                if failure is not None:
                    errors.append(failure)
                connected = not connecting.cancelled() and failure is None and nc.is_connected
                if not connected:
                    await self._close_client(nc)
        if not connected:
            raise self._connect_error(errors)
        self._nc = nc
        js = nc.jetstream(timeout=s.request_timeout)
        try:
            with self._mapped("open buckets"):
                for role, history in (("desired", s.history), ("status", 1), ("outcomes", 1)):
                    self._buckets[role] = await self._bucket(js, role, history)
        except BaseException:
            self._nc = None
            await self._close_client(nc)
            raise

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        try:
            context = ssl.create_default_context(cafile=s.tls_ca)
            if s.tls_cert:
                context.load_cert_chain(s.tls_cert, s.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise TransportUnavailable(
                f"NATS TLS files: {exc}; check the tls_ca, tls_cert and tls_key options"
            ) from None
        return context

    def _connect_error(self, errors: list[BaseException]) -> Exception:
        where = self.settings.display
        deadline = f"{self.settings.connect_timeout:g}s"
        for exc in errors:
            if _is_auth_error(exc):
                return AuthenticationFailed(
                    f"NATS server {where} refused the credentials (authentication failed); check the user and "
                    "password, token or creds file in the URL"
                )
        for exc in errors:
            if _is_tls_error(exc):
                hint = "give the server's CA with ?tls_ca=/path/ca.pem"
                if isinstance(exc, nats.errors.SecureConnRequiredError):
                    hint = "the server requires TLS: use a tls:// URL"
                elif isinstance(exc, nats.errors.SecureConnWantedError):
                    hint = "the server does not offer TLS: use a nats:// URL without TLS options"
                reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
                return TransportUnavailable(f"TLS with NATS server {where} failed ({reason}); {hint}")
        for exc in reversed(errors):
            if isinstance(exc, ConnectionRefusedError):
                return TransportUnavailable(
                    f"no NATS server at {where} (connection refused for {deadline}); start one with "
                    "'weavelet server' or check the host and port"
                )
        if errors:
            last = errors[-1]
            return TransportUnavailable(
                f"cannot connect to NATS server {where} within {deadline}: {type(last).__name__}: {last}"
            )
        return TransportUnavailable(f"cannot connect to NATS server {where} within {deadline} (no answer)")

    async def _bucket(self, js: JetStreamContext, role: str, history: int) -> KeyValue:
        name = f"{self.settings.prefix}-{role}"
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await js.create_key_value(
                bucket=name,
                history=history,
                storage=api.StorageType.FILE,
                description=f"weavelet {role}",
            )
        except nats.js.errors.BadRequestError:
            return await js.key_value(name)  # created by another client meanwhile

    @staticmethod
    async def _close_client(nc: Client) -> None:
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            with contextlib.suppress(Exception):
                if nc.is_connected:
                    await nc.flush(timeout=1)
            with contextlib.suppress(Exception):
                await nc.close()

    def _kv(self, role: str) -> KeyValue:
        """The bucket for ``role`` (desired, status, outcomes), once connected and while connected."""
        self._ready()
        return self._buckets[role]

    def _ready(self) -> None:
        if self._closed:
            raise TransportUnavailable(f"{self.url}: transport is closed")
        if self._nc is None:
            raise TransportUnavailable(f"{self.url}: not connected; call connect() first")
        if not self._nc.is_connected:
            raise TransportUnavailable(
                f"NATS server {self.settings.display} is unreachable (reconnecting); retry once it is back"
            )

    @contextlib.contextmanager
    def _mapped(self, action: str) -> Iterator[None]:
        """Turn the client's connection errors into :class:`TransportUnavailable`.

        The body is also cancelled when the connection drops while it runs: the client does not fail
        requests in flight on a disconnect, they would wait for their whole timeout.
        """
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                yield
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            raise TransportUnavailable(
                f"NATS server {self.settings.display}: JetStream is not available ({exc}); start the server "
                "with JetStream enabled (nats-server -js, as 'weavelet server' does)"
            ) from None
        except (
            nats.errors.TimeoutError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.ConnectionDrainingError,
            nats.errors.OutboundBufferLimitError,
            nats.errors.StaleConnectionError,
            asyncio.TimeoutError,
            OSError,
        ) as exc:
            raise TransportUnavailable(
                f"NATS server {self.settings.display}: {action} failed ({type(exc).__name__}: {exc})"
            ) from None
        finally:
            self._scopes.discard(scope)
        if scope.cancelled_caught:
            raise TransportUnavailable(
                f"NATS server {self.settings.display}: connection lost while trying to {action}; retry once it is back"
            )

    def _decode(self, data: bytes | None, kind: type[M], what: str) -> M | None:
        if not data:
            return None
        try:
            return decode(data, kind)
        except ProtocolError as exc:
            log.warning("NATS %s: skipping unreadable %s: %s", self.settings.display, what, exc)
            return None

    async def _entry(self, kv: KeyValue, key: str) -> KeyValue.Entry | None:
        try:
            return await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None

    # -- revisions ---------------------------------------------------------------------------------------
    async def _current(self, run: str, key: str) -> tuple[int, int]:
        """(revision number, stream sequence) of the run's newest entry; (0, 0) when it has none."""
        entry = await self._entry(self._buckets["desired"], key)
        if entry is None or entry.revision is None:
            return 0, 0
        revision = self._decode(entry.value, Revision, f"revision of run {run!r}")
        number = revision.revision if revision is not None else 0
        self._seen[run] = (number, entry.revision)
        return number, entry.revision

    async def put(self, revision: Revision) -> None:
        key = run_key(revision.run)
        data = encode(revision)
        desired = self._kv("desired")
        expected = revision.revision - 1
        with self._mapped(f"write revision {revision.revision} of run {revision.run!r}"):
            seen = self._seen.get(revision.run)
            if expected == 0:
                last = 0
            elif seen is not None and seen[0] == expected:
                last = seen[1]
            else:
                current, last = await self._current(revision.run, key)
                if current != expected:
                    raise RevisionConflict(revision.run, expected, current)
            for _attempt in range(3):
                try:
                    sequence = await desired.update(key, data, last=last)
                except nats.js.errors.KeyWrongLastSequenceError:
                    current, found = await self._current(revision.run, key)
                    if current != expected or found == last:
                        raise RevisionConflict(revision.run, expected, current) from None
                    last = found  # our cached sequence was stale, but the run is where the writer expected
                    continue
                self._seen[revision.run] = (revision.revision, sequence)
                return
            raise RevisionConflict(revision.run, expected, (await self._current(revision.run, key))[0])

    async def latest(self, run: str) -> Revision | None:
        key = run_key(run)
        desired = self._kv("desired")
        with self._mapped(f"read run {run!r}"):
            entry = await self._entry(desired, key)
        if entry is None:
            return None
        revision = self._decode(entry.value, Revision, f"revision of run {run!r}")
        if revision is not None and entry.revision is not None:
            self._seen[run] = (revision.revision, entry.revision)
        return revision

    async def history(self, run: str, *, limit: int | None = None) -> list[Revision]:
        key = run_key(run)
        desired = self._kv("desired")
        with self._mapped(f"read the history of run {run!r}"):
            try:
                entries = await desired.history(key)
            except nats.js.errors.NoKeysError:
                return []
        found: list[Revision] = []
        for entry in entries:
            if entry.operation in (KV_DEL, KV_PURGE):
                found.clear()
                continue
            revision = self._decode(entry.value, Revision, f"revision of run {run!r}")
            if revision is not None:
                found.append(revision)
        return found[-limit:] if limit else found

    async def watch(self, run: str, *, after: int = 0) -> AsyncIterator[Revision]:
        key = run_key(run)
        if self._nc is None:
            self._ready()  # never connected (or closed): say so instead of waiting for ever
        last = after
        delay = 0.05
        while not self._closed:
            generation = self._generation
            try:
                desired = self._kv("desired")
                with self._mapped(f"watch run {run!r}"):
                    reconciled = await self._entry(desired, key)
                    watcher = await desired.watch(key)
            except TransportUnavailable as exc:
                if self._closed:
                    return
                log.debug("NATS watch of %r waits: %s", run, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            self._watchers.add(watcher)
            try:
                if reconciled is not None:
                    revision = self._decode(reconciled.value, Revision, f"revision of run {run!r}")
                    if revision is not None and revision.revision > last:
                        last = revision.revision
                        yield revision
                while not self._closed and generation == self._generation:
                    try:
                        entry = await _next_update(watcher, WATCH_POLL)
                    except nats.errors.TimeoutError:
                        continue
                    if entry is None:
                        continue  # end of the initial values
                    if not isinstance(entry, KeyValue.Entry):
                        break  # the watcher was stopped
                    if entry.operation in (KV_DEL, KV_PURGE):
                        continue
                    revision = self._decode(entry.value, Revision, f"revision of run {run!r}")
                    if revision is None or revision.revision <= last:
                        continue
                    last = revision.revision
                    seen = self._seen.get(run)
                    if entry.revision is not None and (seen is None or seen[0] < revision.revision):
                        self._seen[run] = (revision.revision, entry.revision)
                    yield revision
            finally:
                self._watchers.discard(watcher)
                await _stop(watcher)

    async def runs(self) -> list[str]:
        buckets = (self._kv("desired"), self._kv("status"))
        found: set[str] = set()
        with self._mapped("list runs"):
            for kv in buckets:
                try:
                    keys = await kv.keys()
                except nats.js.errors.NoKeysError:
                    continue
                found.update(r for r in map(key_run, keys) if r is not None)
        return sorted(found)

    # -- status and outcomes -----------------------------------------------------------------------------
    async def publish_status(self, status: Status) -> None:
        key = run_key(status.run)
        data = encode(status)
        bucket = self._kv("status")
        with self._mapped(f"publish the status of run {status.run!r}"):
            await bucket.put(key, data)

    async def status(self, run: str) -> Status | None:
        key = run_key(run)
        bucket = self._kv("status")
        with self._mapped(f"read the status of run {run!r}"):
            entry = await self._entry(bucket, key)
        return None if entry is None else self._decode(entry.value, Status, f"status of run {run!r}")

    async def publish_outcome(self, outcome: Outcome) -> None:
        key = f"{run_key(outcome.run)}.{outcome.revision}"
        data = encode(outcome)
        outcomes = self._kv("outcomes")
        with self._mapped(f"publish the outcome of revision {outcome.revision} of run {outcome.run!r}"):
            await outcomes.put(key, data)

    async def outcome(self, run: str, revision: int) -> Outcome | None:
        key = f"{run_key(run)}.{int(revision)}"
        outcomes = self._kv("outcomes")
        with self._mapped(f"read the outcome of revision {revision} of run {run!r}"):
            entry = await self._entry(outcomes, key)
        return None if entry is None else self._decode(entry.value, Outcome, f"outcome of run {run!r}")

    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        key = run_key(run)
        outcomes = self._kv("outcomes")
        found: dict[int, Outcome] = {}
        with self._mapped(f"read the outcomes of run {run!r}"):
            watcher = await outcomes.watch(f"{key}.*", ignore_deletes=True)
            try:
                while True:
                    entry = await _next_update(watcher, self.settings.request_timeout)
                    if not isinstance(entry, KeyValue.Entry):
                        break
                    outcome = self._decode(entry.value, Outcome, f"outcome of run {run!r}")
                    if outcome is not None and outcome.run == run:
                        found[outcome.revision] = outcome
            finally:
                await _stop(watcher)
        ordered = [found[number] for number in sorted(found)]
        return ordered[-limit:] if limit else ordered

    # -- closing -----------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for scope in list(self._scopes):
            scope.cancel()
        for watcher in list(self._watchers):
            with contextlib.suppress(Exception):
                watcher._updates.put_nowait(watcher.STOP_ITER)
        nc, self._nc = self._nc, None
        if nc is not None:
            await self._close_client(nc)


__all__ = ["NatsTransport", "key_run", "run_key"]
