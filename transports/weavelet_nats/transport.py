"""The ``nats://`` transport: desired config, status and outcomes in JetStream key-value buckets.

Layout (``PREFIX`` is ``weavelet`` unless the URL says ``?prefix=``)::

    PREFIX-desired    key RUNKEY            every revision of the run's desired config (history: 64 by default)
    PREFIX-status     key RUNKEY            the run's latest status
    PREFIX-outcomes   key RUNKEY.REVISION   the newest outcome of one revision (greatest ``at``)
                      key RUNKEY.REVISION.INC   one incarnation's outcome of it (see :func:`incarnation_token`)
                      key RUNKEY.schema     what the run's trainer accepts, named by digest in its status (kept
                                            here, not in the status bucket, so listing statuses never reads it and
                                            a trainer writes it with the permissions its outcomes need)

``RUNKEY`` is the run id with each ``.`` written as ``=`` (a ``.`` separates tokens in NATS subjects).
Buckets use file storage and are created on first connect if missing.

Compare-and-set: a write sends ``Nats-Expected-Last-Subject-Sequence`` (``KeyValue.update(last=...)``) with
the sequence of the entry holding revision ``N - 1``, so exactly one of two racing writers wins.

Connections are set up for a long-lived process: pings every few seconds, reconnect forever once connected,
every callback set. The first connect has a deadline, and its error names the cause: refused, authentication
or TLS. While the connection is down every call fails at once with :class:`TransportUnavailable` (nothing is
buffered to be sent later); ``watch`` iterators wait, then recreate their watcher after the reconnect and
re-read the newest revision.

A value that does not decode as a revision is a :class:`~weavelet_core.errors.CorruptEntry` numbered by the
integer ``revision`` of its JSON, else one past the entry before it; writers number on top of it. A permission
violation the server reports (asynchronously, to the error callback) cancels the calls it concerns, which raise
:class:`~weavelet_core.errors.PermissionDenied`. Listings never use ``KeyValue.keys()`` (which can end early):
they read until the consumer has nothing pending. ``runs()``, and ``statuses()``/``latests()`` of many runs, read
each bucket in one pass (an ordered consumer delivering the newest message of every key), not a request per run.
``delete()`` purges the run's subjects from the buckets' streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

from weavelet_core.errors import (
    AuthenticationFailed,
    CorruptEntry,
    PermissionDenied,
    ProtocolError,
    RevisionConflict,
    TransportUnavailable,
)
from weavelet_core.plugins import mask_password
from weavelet_core.protocol import Outcome, Revision, Status, decode, encode, lenient_revision_number, validate_run_id
from weavelet_core.transport import Entry, Transport, decoding_many, gather_by_run
from weavelet_nats.url import NatsSettings, parse_url

log = logging.getLogger(__name__)

M = TypeVar("M", Revision, Status, Outcome)

WATCH_CHECK = 15.0
"""Seconds between a quiet watch's reads of the run's newest revision, its only timed wake-up. A newer one that the
watcher has not delivered by the next read means its consumer is gone: the watch is recreated. This is the safety
net; a watch wakes up for events only: an update, a close, a reconnect, and the leader election of the bucket's
stream in a cluster (the JetStream advisory), each of which stops its watcher so that it is made again."""
ADVISORY = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}"
"""The subject on which a JetStream cluster announces a new leader of a stream: the consumer of a watch lived on the
old one, so every watch of the bucket is recreated (and reconciled with a read) at once."""
OUTCOME_RECHECK = 1.0
"""Seconds a quiet outcome watch waits for the server before it reads the key itself and checks for a reconnect or
a close."""
CLOSE_TIMEOUT = 5.0
LIST_PAGES = 1000
"""Most pages of subjects :meth:`NatsTransport._runs_key_by_key` asks a stream for (up to 100,000 subjects a
page)."""
SCAN_FROM = 32
"""Batched reads (:meth:`NatsTransport.statuses`, :meth:`NatsTransport.latests`) of at least this many runs read the
whole bucket in one pass; fewer runs are read key by key, concurrently."""
SCAN_RATIO = 16
"""... unless the bucket's stream holds more than this many messages per run asked for: then reading those keys one
by one costs less than reading every key."""
SCAN_INACTIVE = 30.0
"""Seconds after which the server removes the consumer of a bucket scan that its client abandoned."""
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_DENIED = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"\s]+)\"?")


def incarnation_token(incarnation: str) -> str:
    """The key token of an incarnation id: itself when it is a safe token, ``=`` when empty, else ``=`` and a hash."""
    if _TOKEN.fullmatch(incarnation):
        return incarnation
    if not incarnation:
        return "="
    return "=" + hashlib.sha256(incarnation.encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class _Newest:
    """The newest message of one key, as a bucket scan read it (``deleted``: a delete or purge marker)."""

    value: bytes
    sequence: int
    deleted: bool


def _is_marker(msg: Msg) -> bool:
    """Whether a key-value message is a delete or purge marker (``KV-Operation``, or a server-placed marker)."""
    headers = msg.headers
    if not headers:
        return False
    return headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers


def _position(msg: Msg) -> tuple[int, int]:
    """``(stream sequence, messages pending after it)`` of a message a consumer delivered: read from its reply
    subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``), or from
    nats-py's parse of the longer form some servers send."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[8])
    meta = msg.metadata
    return meta.sequence.stream, meta.num_pending


@dataclasses.dataclass
class _Denial:
    """A permission violation the server reported while a call was waiting (``kind``: publish or subscription)."""

    kind: str
    subject: str


def run_key(run: str) -> str:
    """The key-value key of a run (its id with ``.`` written as ``=``)."""
    return validate_run_id(run).replace(".", "=")


def schema_key(run: str) -> str:
    """The outcomes-bucket key of a run's schema (``RUNKEY.schema``: no revision number is a word)."""
    return f"{run_key(run)}.schema"


def key_run(key: str) -> str | None:
    """The run id of a key, or ``None`` if the key is not one this transport writes."""
    run = key.replace("=", ".")
    try:
        return validate_run_id(run)
    except ValueError:
        return None


class _NamedConsumers:
    """A JetStream context whose push subscriptions create *named* consumers.

    nats-py's key-value watcher creates an unnamed ordered consumer, on the API subject
    ``$JS.API.CONSUMER.CREATE.<stream>``, which does not name the key. A named one is created on
    ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter subject>``, so server permissions can allow a user to watch
    one run's key and no other (see docs/deploy.md).
    """

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def subscribe(self, subject: str, **kwargs: Any) -> Any:
        if kwargs.get("config") is None:
            kwargs["config"] = api.ConsumerConfig(name=f"weavelet-{uuid.uuid4().hex[:16]}")
        return await self._js.subscribe(subject, **kwargs)


async def _named_watch(kv: KeyValue, keys: str, **kwargs: Any) -> KeyValue.KeyWatcher:
    """``kv.watch(keys, **kwargs)`` over a named consumer (see :class:`_NamedConsumers`)."""
    named = KeyValue(
        name=kv._name,
        stream=kv._stream,
        pre=kv._pre,
        js=cast(JetStreamContext, _NamedConsumers(kv._js)),
        direct=kv._direct,
    )
    return await named.watch(keys, **kwargs)


def _quiet(watcher: KeyValue.KeyWatcher) -> None:
    """Take the timer out of a key-value watcher: nats-py polls every 0.25 s (a task per watcher) whether a flow
    control request of the server can be answered; answer each one as it comes instead. A watch of one key has at
    most a few messages in flight, so it is always caught up. Where nats-py's internals differ, nothing is changed."""
    jsi = getattr(getattr(getattr(watcher, "_sub", None), "_sub", None), "_jsi", None)
    task = getattr(jsi, "_fctask", None)
    conn = getattr(jsi, "_conn", None)
    if jsi is None or task is None or conn is None or not hasattr(jsi, "schedule_flow_control_response"):
        return
    task.cancel()
    jsi._fctask = None
    pending: set[asyncio.Task[None]] = set()

    def answer(reply: str) -> None:
        jsi._active = True
        if reply:
            reply_task = asyncio.ensure_future(conn.publish(reply))
            pending.add(reply_task)
            reply_task.add_done_callback(pending.discard)

    jsi.schedule_flow_control_response = answer


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
        self._epoch = 0  # one more at each disconnect and reconnect: the high bits of a status version
        self._watchers: set[KeyValue.KeyWatcher] = set()
        self._scopes: set[anyio.CancelScope] = set()
        # calls waiting on the server: scope -> (buckets they use, the denial that cancelled them)
        self._calls: dict[anyio.CancelScope, tuple[tuple[str, ...], list[_Denial]]] = {}
        # run -> (revision number, stream sequence) of the newest entry this client has seen; lets ``put``
        # send its compare-and-set without reading first. A stale entry only costs a re-read.
        self._seen: dict[str, tuple[int, int]] = {}
        # role -> (stream state before the scan, what the scan read): see _read_bucket
        self._snapshots: dict[str, tuple[tuple[int, int], dict[str, _Newest]]] = {}
        # Outcome subscriptions (see watch_outcome): lowercased subject -> callbacks that end them (refused, closed).
        self._outcome_subscriptions: dict[str, list[Callable[[], None]]] = {}
        self._outcome_subscribe_refused = False
        self._advisories: Any = None  # the subscription to the desired bucket's leader elections (see ADVISORY)

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
            denied = _DENIED.search(str(exc).lower())
            if denied is not None and denied.group(2).startswith("$js.event.advisory."):
                # Optional: without it a watch notices a cluster's leader change at its next check.
                log.debug(
                    "NATS %s: no leader advisories (%s); watches rely on their checks", self.settings.display, exc
                )
                return
            if denied is not None:
                if denied.group(1) == "subscription" and self._refused_subscription(denied.group(2)):
                    return
                self._deny(_Denial(kind=denied.group(1), subject=denied.group(2)))
                return
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
            self._epoch += 1  # status versions from before this connection are refused (see replace_status)
            for scope in list(self._scopes):
                scope.cancel()
            if connected and not self._closed:
                log.warning("NATS %s: disconnected; reconnecting", self.settings.display)

        async def reconnected_cb() -> None:
            self._generation += 1
            self._epoch += 1
            self._restart_watches()
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
            "inbox_prefix": s.inbox_prefix,
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
                failures: list[Exception] = []

                async def open_bucket(role: str, history: int) -> None:
                    try:
                        self._buckets[role] = await self._bucket(js, role, history)
                    except Exception as exc:  # raised below as itself, not as an exception group
                        failures.append(exc)

                # At once: in a cluster electing a stream leader each may wait for the request timeout.
                async with anyio.create_task_group() as tg:
                    for role, history in (("desired", s.history), ("status", 1), ("outcomes", 1)):
                        tg.start_soon(open_bucket, role, history)
                if failures:
                    raise failures[0]
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
        """The bucket of ``role``, created (with ``history`` and the ``replicas`` setting) if missing.

        While a cluster elects the bucket's stream leader (a few seconds after losing a node) its requests get no
        answer: they are retried every 0.25 s until ``connect_timeout``, so a client reconnecting then is ready
        as soon as the stream is, instead of failing the whole connect.
        """
        name = f"{self.settings.prefix}-{role}"
        replicas = self.settings.replicas
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            try:
                kv = await js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                if time.monotonic() + 0.25 > deadline:
                    raise
                await anyio.sleep(0.25)
                continue
            if replicas > 1:
                await self._check_replicas(kv, name)
            return kv
        try:
            return await js.create_key_value(
                bucket=name,
                history=history,
                storage=api.StorageType.FILE,
                description=f"weavelet {role}",
                replicas=replicas,
                # reads by key go to $JS.API.DIRECT.GET.<stream>.<subject>, which permissions can limit per run
                direct=True,
            )
        except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as exc:
            try:
                return await js.key_value(name)  # created by another client meanwhile
            except nats.js.errors.BucketNotFoundError:
                pass
            reason = exc.description or exc
            hint = "check the server's JetStream limits and this user's permission to create streams"
            if replicas > 1:
                hint = (
                    f"{replicas} replicas need a JetStream cluster of at least {replicas} servers: run one, or lower "
                    "?replicas="
                )
            raise TransportUnavailable(
                f"NATS server {self.settings.display} cannot create bucket {name!r} with {replicas} replica(s) "
                f"({reason}); {hint}"
            ) from None

    async def _check_replicas(self, kv: KeyValue, name: str) -> None:
        """Warn when an existing bucket keeps fewer replicas than the ``replicas`` setting asks for."""
        status = await kv.status()
        have = status.stream_info.config.num_replicas or 1
        if have < self.settings.replicas:
            log.warning(
                "NATS %s: bucket %r keeps %d replica(s), fewer than replicas=%d; weavelet sets replicas only "
                "when it creates a bucket: raise it with 'nats stream edit KV_%s --replicas %d'",
                self.settings.display,
                name,
                have,
                self.settings.replicas,
                name,
                self.settings.replicas,
            )

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

    def _deny(self, denial: _Denial) -> None:
        """Cancel the calls a permission violation concerns: those using the bucket its subject names, or every
        waiting call when it names none of them (an inbox or JetStream API subject, which every call needs)."""
        names_a_bucket = self._bucket_subject(denial.subject)
        concerned = 0
        for scope, (buckets, denials) in list(self._calls.items()):
            if names_a_bucket and buckets:
                names = [f"{self.settings.prefix}-{role}".lower() for role in buckets]
                if not any(name in denial.subject for name in names):
                    continue
            denials.append(denial)
            scope.cancel()
            concerned += 1
        if not concerned:
            log.warning(
                "NATS %s: permission violation for %s to %s", self.settings.display, denial.kind, denial.subject
            )

    def _bucket_subject(self, subject: str) -> bool:
        """Whether ``subject`` (lowercased) names one of this transport's buckets."""
        return any(f"{self.settings.prefix}-{role}".lower() in subject for role in ("desired", "status", "outcomes"))

    @contextlib.contextmanager
    def _mapped(self, action: str, *buckets: str, subject: str = "") -> Iterator[None]:
        """Turn the client's connection errors into :class:`TransportUnavailable`, and a permission violation the
        server reports meanwhile into :class:`PermissionDenied`.

        The body is also cancelled when the connection drops while it runs: the client does not fail
        requests in flight on a disconnect, they would wait for their whole timeout. ``buckets`` are the roles
        of the buckets it uses and ``subject`` the main subject it publishes to (for messages).
        """
        scope = anyio.CancelScope()
        denials: list[_Denial] = []
        self._scopes.add(scope)
        self._calls[scope] = (buckets, denials)
        try:
            with scope:
                yield
        except nats.js.errors.NoStreamResponseError:
            # A publish nobody stored: in a cluster, the stream is electing a new leader (a second or two).
            raise TransportUnavailable(
                f"NATS server {self.settings.display}: no JetStream stream answered while trying to {action} (in a "
                "cluster, the stream is electing a new leader after losing one); retry in a moment"
            ) from None
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            raise TransportUnavailable(
                f"NATS server {self.settings.display}: JetStream is not available ({exc}); start the server "
                "with JetStream enabled (nats-server -js, as 'weavelet server' does), or, in a cluster that just "
                "lost a node, retry once it has elected new stream leaders"
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
            if denials:
                raise self._permission_error(action, denials[0], subject) from None
            raise TransportUnavailable(
                f"NATS server {self.settings.display}: {action} failed ({type(exc).__name__}: {exc})"
            ) from None
        finally:
            self._scopes.discard(scope)
            self._calls.pop(scope, None)
        if denials:
            raise self._permission_error(action, denials[0], subject)
        if scope.cancelled_caught:
            raise TransportUnavailable(
                f"NATS server {self.settings.display}: connection lost while trying to {action}; retry once it is back"
            )

    def _permission_error(self, action: str, denial: _Denial, subject: str) -> PermissionDenied:
        shown = subject if subject and subject.lower() == denial.subject else denial.subject
        if shown.startswith(f"{self.settings.inbox_prefix.lower()}."):
            shown = f"{self.settings.inbox_prefix}.>"  # the client's reply subjects (the server's text is lowercased)
        if denial.kind == "publish":
            needed, rule = "publish", f'publish: {{ allow: ["{shown}"] }}'
        else:
            needed, rule = "subscribe", f'subscribe: {{ allow: ["{shown}"] }}'
        return PermissionDenied(
            f"NATS server {self.settings.display}: permission denied to {action}: the user may not {needed} to "
            f"{shown!r}; grant it in the server's authorization block ({rule}; weavelet needs publish on "
            f"$JS.API.> and $KV.{self.settings.prefix}-desired.>, $KV.{self.settings.prefix}-status.>, "
            f"$KV.{self.settings.prefix}-outcomes.> and subscribe on {self.settings.inbox_prefix}.>; per-run "
            "rules: docs/deploy.md)"
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
    def _read_entry(self, run: str, data: bytes | None, previous: int) -> Entry:
        """The revision a key-value entry holds, or a :class:`CorruptEntry` in its place: numbered by the
        ``revision`` its JSON still shows, else one more than ``previous`` (the number of the entry before it)."""
        try:
            revision = decode(data or b"", Revision)
        except ProtocolError as exc:
            number = lenient_revision_number(data)
            log.warning("NATS %s: a revision of run %r is unreadable: %s", self.settings.display, run, exc)
            return CorruptEntry(run, number if number is not None else previous + 1, str(exc))
        if revision.run != run:
            return CorruptEntry(run, revision.revision, f"the entry holds a revision of run {revision.run!r}")
        return revision

    async def _newest(self, run: str, key: str) -> tuple[Entry, int] | None:
        """The run's newest entry and its stream sequence, or ``None`` when the run has none."""
        desired = self._buckets["desired"]
        entry = await self._entry(desired, key)
        if entry is None or entry.revision is None:
            return None
        found = self._read_entry(run, entry.value, 0)
        if isinstance(found, CorruptEntry) and lenient_revision_number(entry.value) is None:
            # Not even a number: one more than the newest entry before it, from the key's history.
            numbered = await self._numbered(run, await self._key_history(desired, key))
            found = next((e for seq, e in reversed(numbered) if seq == entry.revision), found)
        self._seen[run] = (found.revision, entry.revision)
        return found, entry.revision

    async def _key_history(self, kv: KeyValue, key: str) -> list[KeyValue.Entry]:
        return await self._read_all(kv, key, include_history=True)

    async def _read_all(self, kv: KeyValue, keys: str, *, include_history: bool = False) -> list[KeyValue.Entry]:
        """Every entry of ``keys`` (a key or a pattern) the bucket holds now: the newest of each key, or with
        ``include_history`` every kept one, oldest first, deletes included.

        Unlike nats-py's ``keys()`` and ``history()``, which stop at the watcher's end-of-initial-values marker
        (sent early when messages are in flight as the consumer is inspected: nats.py #995, #842), this counts
        what the consumer will deliver and reads until the entry that has nothing pending after it.
        """
        watcher = await _named_watch(kv, keys, include_history=include_history)
        found: list[KeyValue.Entry] = []
        try:
            assert watcher._sub is not None
            info = await watcher._sub.consumer_info()
            pending = int(info.num_pending or 0) + int(info.delivered.consumer_seq or 0)
            while pending > 0:
                update = await _next_update(watcher, self.settings.request_timeout)
                if update is None:
                    continue  # nats-py's marker, which may come early: keep counting
                if not isinstance(update, KeyValue.Entry):
                    break  # stopped
                found.append(update)
                pending = update.delta or 0
        finally:
            await _stop(watcher)
        return found

    async def _numbered(self, run: str, entries: list[KeyValue.Entry]) -> list[tuple[int, Entry]]:
        """``(stream sequence, entry)`` of a key's history (oldest first), deletes ending what came before."""
        found: list[tuple[int, Entry]] = []
        for entry in entries:
            if entry.operation in (KV_DEL, KV_PURGE):
                found.clear()
                continue
            previous = found[-1][1].revision if found else 0
            found.append((entry.revision or 0, self._read_entry(run, entry.value, previous)))
            await anyio.lowlevel.checkpoint()
        return found

    async def _current(self, run: str, key: str) -> tuple[int, int]:
        """(revision number, stream sequence) of the run's newest entry; (0, 0) when it has none. An unreadable
        entry counts with its number, so writers number on top of it."""
        newest = await self._newest(run, key)
        if newest is None:
            return 0, 0
        return newest[0].revision, newest[1]

    async def put(self, revision: Revision) -> None:
        key = run_key(revision.run)
        data = encode(revision)
        desired = self._kv("desired")
        expected = revision.revision - 1
        subject = f"$KV.{self.settings.prefix}-desired.{key}"
        with self._mapped(f"write revision {revision.revision} of run {revision.run!r}", "desired", subject=subject):
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
        self._kv("desired")
        with self._mapped(f"read run {run!r}", "desired"):
            newest = await self._newest(run, key)
        if newest is None:
            return None
        if isinstance(newest[0], CorruptEntry):
            raise newest[0]
        return newest[0]

    async def history(self, run: str, *, limit: int | None = None) -> list[Entry]:
        key = run_key(run)
        desired = self._kv("desired")
        with self._mapped(f"read the history of run {run!r}", "desired"):
            numbered = await self._numbered(run, await self._key_history(desired, key))
        found = [entry for _, entry in numbered]
        return found[-limit:] if limit else found

    async def watch(self, run: str, *, after: int = 0) -> AsyncIterator[Entry]:
        key = run_key(run)
        if self._nc is None:
            self._ready()  # never connected (or closed): say so instead of waiting for ever
        last = after
        delay = 0.05
        while not self._closed:
            generation = self._generation
            try:
                desired = self._kv("desired")
                with self._mapped(f"watch run {run!r}", "desired"):
                    await self._follow_leaders(desired)
                    watcher = await _named_watch(desired, key)
                    _quiet(watcher)
                    reconciled = await self._newest(run, key)  # after the watch is armed: nothing falls between
            except TransportUnavailable as exc:
                if self._closed:
                    return
                log.debug("NATS watch of %r waits: %s", run, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            self._watchers.add(watcher)
            # the number of the newest entry read from the key, readable or not (numbers the next unreadable one)
            previous = last
            try:
                if reconciled is not None:
                    entry, _ = reconciled
                    previous = max(previous, entry.revision)
                    if entry.revision > last:
                        last = entry.revision
                        yield entry
                checked = time.monotonic()
                suspect = 0  # a newer revision the last check found that the watcher had not delivered yet
                while not self._closed and generation == self._generation:
                    try:
                        update = await _next_update(watcher, max(0.05, WATCH_CHECK - (time.monotonic() - checked)))
                    except nats.errors.TimeoutError:
                        if time.monotonic() - checked < WATCH_CHECK:
                            continue
                        checked = time.monotonic()
                        newest = await self._check_newest(run, key)
                        if suspect and last < suspect:
                            # Two checks apart, still undelivered: the watcher's consumer is gone (in a cluster it
                            # lives on the stream leader, and the connection to a surviving node stays up).
                            log.info("NATS %s: watch of run %r fell behind; recreating it", self.settings.display, run)
                            break
                        suspect = newest if newest > last else 0
                        continue
                    if update is None:
                        continue  # end of the initial values
                    if not isinstance(update, KeyValue.Entry):
                        break  # the watcher was stopped
                    if update.operation in (KV_DEL, KV_PURGE):
                        continue
                    if reconciled is not None and update.revision == reconciled[1]:
                        continue  # the entry read before the watch started
                    found = self._read_entry(run, update.value, previous)
                    previous = found.revision
                    if found.revision <= last:
                        continue
                    last = found.revision
                    seen = self._seen.get(run)
                    if update.revision is not None and (seen is None or seen[0] < found.revision):
                        self._seen[run] = (found.revision, update.revision)
                    yield found
            finally:
                self._watchers.discard(watcher)
                await _stop(watcher)

    def _restart_watches(self) -> None:
        """Stop every key-value watcher of this transport: each watch makes its own again and reconciles."""
        for watcher in list(self._watchers):
            with contextlib.suppress(Exception):
                watcher._updates.put_nowait(watcher.STOP_ITER)

    async def _follow_leaders(self, kv: KeyValue) -> None:
        """Subscribe (once per transport) to the leader elections of ``kv``'s stream: each restarts the watches.
        Best effort: a server that is not clustered never sends one; a user without the permission is told so in
        the debug log, and the watches rely on :data:`WATCH_CHECK`."""
        if self._advisories is not None or self._nc is None:
            return

        async def elected(msg: Any) -> None:
            log.info("NATS %s: new leader of %s; recreating watches", self.settings.display, kv._stream)
            self._restart_watches()

        try:
            self._advisories = await self._nc.subscribe(ADVISORY.format(stream=kv._stream), cb=elected)
        except Exception as exc:  # never fatal: the watch works without it
            log.debug("NATS %s: cannot follow leader elections: %s", self.settings.display, exc)

    async def _check_newest(self, run: str, key: str) -> int:
        """The number of the run's newest revision, or 0 when it has none or the server cannot say now."""
        newest = None
        try:
            with anyio.move_on_after(WATCH_CHECK), self._mapped(f"check run {run!r}", "desired"):
                newest = await self._newest(run, key)  # best effort: never holds the watch up for long
        except TransportUnavailable:
            return 0
        return 0 if newest is None else newest[0].revision

    async def runs(self) -> list[str]:
        """Runs with a revision or a status: the keys of the two buckets whose newest entry is not a delete marker,
        each bucket read in one pass (:meth:`_read_bucket`), never with a key-value ``keys()`` listing, which can
        end early. A user who may not read a whole bucket through a consumer gets the slower listing of
        :meth:`_runs_key_by_key`."""
        self._kv("desired")
        found: set[str] = set()
        try:
            with self._mapped("list runs", "desired", "status"):
                # One after the other: a permission error on the first then stops both (and no late one from the
                # second can interrupt the slower listing).
                scans = [await self._read_bucket(role) for role in ("desired", "status")]
        except PermissionDenied as exc:
            log.debug("NATS %s: listing runs key by key: %s", self.settings.display, exc)
            return await self._runs_key_by_key()
        for scan in scans:
            for key, newest in scan.items():
                run = None if newest.deleted else key_run(key)
                if run is not None:
                    found.add(run)
        return sorted(found)

    async def _runs_key_by_key(self) -> list[str]:
        """:meth:`runs` with less permission (stream info and direct gets only): the subjects the two buckets'
        streams hold (one stream-info request per 100,000 subjects), less those whose key was deleted (a read of
        each, :data:`~weavelet_core.transport.CONCURRENT_READS` at a time)."""
        desired, status = self._kv("desired"), self._kv("status")
        with self._mapped("list runs", "desired", "status"):
            listed = {role: await self._stream_subjects(role) for role in ("desired", "status")}

            async def present(run: str) -> bool:
                key = run_key(run)
                for role, kv in (("desired", desired), ("status", status)):
                    if run in listed[role] and await self._entry(kv, key) is not None:
                        return True
                return False

            found = await gather_by_run(sorted(listed["desired"] | listed["status"]), present)
        return [run for run, there in found.items() if there]

    async def _stream_subjects(self, role: str) -> set[str]:
        """Run ids with at least one message in the bucket's stream (deleted keys included), page by page."""
        assert self._nc is not None
        bucket = f"{self.settings.prefix}-{role}"
        prefix = f"$KV.{bucket}."
        runs: set[str] = set()
        offset = 0
        for _page in range(LIST_PAGES):
            request = json.dumps({"subjects_filter": f"{prefix}>", "offset": offset}).encode()
            reply = await self._nc.request(
                f"$JS.API.STREAM.INFO.KV_{bucket}", request, timeout=self.settings.request_timeout
            )
            info = json.loads(reply.data)
            if "error" in info:
                raise TransportUnavailable(
                    f"NATS server {self.settings.display}: cannot list the keys of bucket {bucket}: "
                    f"{info['error'].get('description', info['error'])}"
                )
            subjects = (info.get("state") or {}).get("subjects") or {}
            for subject in subjects:
                if subject.startswith(prefix):
                    run = key_run(subject[len(prefix) :])
                    if run is not None:
                        runs.add(run)
            offset += len(subjects)
            total = info.get("total", 0)
            if not subjects or not isinstance(total, int) or offset >= total:
                break
        return runs

    async def _stream_state(self, role: str) -> tuple[int, int]:
        """``(last sequence, message count)`` of the stream of the bucket of ``role``: any write raises the first,
        any removal (a purge, an expiry) lowers the second."""
        kv = self._kv(role)
        info = await kv._js.stream_info(kv._stream)
        return int(info.state.last_seq or 0), int(info.state.messages or 0)

    async def _read_bucket(self, role: str, state: tuple[int, int] | None = None) -> dict[str, _Newest]:
        """The newest message of every key in the bucket of ``role``: what the previous :meth:`_scan` of it read
        when the bucket's stream has not changed since (its state, read before that scan, is still ``state``),
        else a fresh scan. So ``runs()`` followed by ``latests()`` and ``statuses()`` reads each bucket once when
        nothing is written meanwhile, and never returns what was true before a write."""
        if state is None:
            state = await self._stream_state(role)
        kept = self._snapshots.get(role)
        if kept is not None and kept[0] == state:
            return kept[1]
        scan = await self._scan(role)
        self._snapshots[role] = (state, scan)
        return scan

    async def _scan(self, role: str) -> dict[str, _Newest]:
        """The newest message of every key in the bucket of ``role`` (delete markers included), keyed by key.

        One ordered consumer delivering the last message per subject, read until the server says nothing is
        pending after a message, or until as many messages as it held when the consumer was made have arrived (so
        a bucket written to without pause cannot keep the scan going). Bounded: raises ``TimeoutError`` (which
        :meth:`_mapped` turns into ``TransportUnavailable``) when no message arrives for ``request_timeout``
        seconds while some are due. Call it inside :meth:`_mapped`.
        """
        kv = self._kv(role)
        prefix = kv._pre
        found: dict[str, _Newest] = {}
        done = asyncio.Event()
        received = 0
        target: int | None = None

        async def on_message(msg: Msg) -> None:
            nonlocal received
            sequence, pending = _position(msg)
            found[msg.subject[len(prefix) :]] = _Newest(msg.data, sequence, _is_marker(msg))
            received += 1
            if pending == 0 or (target is not None and received >= target):
                done.set()

        js = cast(JetStreamContext, _NamedConsumers(kv._js))
        sub = await js.subscribe(
            f"{prefix}>",
            stream=kv._stream,
            cb=on_message,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=SCAN_INACTIVE,
        )
        try:
            info = await sub.consumer_info()
            delivered = info.delivered.consumer_seq if info.delivered is not None else 0
            target = int(info.num_pending or 0) + int(delivered or 0)
            if received >= target:
                done.set()
            progress = -1
            while not done.is_set():
                if received == progress:
                    raise asyncio.TimeoutError(
                        f"no entry of bucket {kv._name} for {self.settings.request_timeout:g}s after {received} of "
                        f"{target}"
                    )
                progress = received
                with anyio.move_on_after(self.settings.request_timeout):
                    await done.wait()
        finally:
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        return found

    async def _bucket_for(self, role: str, count: int) -> dict[str, _Newest] | None:
        """The bucket of ``role`` read whole (:meth:`_read_bucket`) when that costs less than reading ``count`` keys
        one by one, else ``None``: fewer than :data:`SCAN_FROM` keys, or a stream holding more than
        :data:`SCAN_RATIO` messages per key asked for (unless the previous read of it is still current)."""
        if count < SCAN_FROM:
            return None
        state = await self._stream_state(role)
        kept = self._snapshots.get(role)
        if state[1] > count * SCAN_RATIO and not (kept is not None and kept[0] == state):
            return None
        return await self._read_bucket(role, state)

    async def _scan_for(self, role: str, count: int, action: str) -> dict[str, _Newest] | None:
        """:meth:`_bucket_for` inside :meth:`_mapped` (``action`` names the read in errors), or ``None`` also for a
        user who may not read the whole bucket: the caller then reads key by key."""
        self._kv(role)
        try:
            with self._mapped(action, role):
                return await self._bucket_for(role, count)
        except PermissionDenied as exc:
            log.debug("NATS %s: %s key by key: %s", self.settings.display, action, exc)
            return None

    async def statuses(self, runs: Sequence[str]) -> dict[str, Status | None]:
        """The latest status of each of ``runs`` (``None`` for one without, or one that cannot be read: it is
        logged), keyed and ordered like ``runs``.

        From :data:`SCAN_FROM` runs on, one pass over the status bucket (see :meth:`_scan`), unless the bucket is
        much larger than the request (:data:`SCAN_RATIO`); fewer runs, or a user who may not read the whole bucket,
        are read key by key, concurrently. Raises ``TransportUnavailable`` like :meth:`status`.
        """
        keys = {run: run_key(run) for run in runs}
        scan = await self._scan_for("status", len(keys), f"read the statuses of {len(keys)} runs")
        if scan is None:
            return await gather_by_run(runs, self.status)
        found: dict[str, Status | None] = {}
        with decoding_many():
            for run, key in keys.items():
                newest = scan.get(key)
                if newest is None or newest.deleted:
                    found[run] = None
                else:
                    found[run] = self._decode(newest.value, Status, f"status of run {run!r}")
        return {run: found[run] for run in runs}

    async def latests(self, runs: Sequence[str]) -> dict[str, Entry | None]:
        """The newest revision of each of ``runs``: a :class:`Revision`, a :class:`CorruptEntry` in place of one
        that cannot be read, or ``None`` for a run without revisions; keyed and ordered like ``runs``.

        Read like :meth:`statuses` (one pass over the desired bucket from :data:`SCAN_FROM` runs on). An unreadable
        entry whose JSON shows no revision number is numbered from its key's history, read for it alone.
        """
        keys = {run: run_key(run) for run in runs}
        scan = await self._scan_for("desired", len(keys), f"read the newest revisions of {len(keys)} runs")
        if scan is None:
            return await super().latests(runs)
        found: dict[str, Entry | None] = {}
        unnumbered: list[str] = []
        with decoding_many():
            for run, key in keys.items():
                newest = scan.get(key)
                if newest is None or newest.deleted:
                    found[run] = None
                    continue
                entry = self._read_entry(run, newest.value, 0)
                if isinstance(entry, CorruptEntry) and lenient_revision_number(newest.value) is None:
                    unnumbered.append(run)  # rare: numbered from the key's history, as latest() does
                    continue
                found[run] = entry
                seen = self._seen.get(run)
                if seen is None or seen[1] < newest.sequence:
                    self._seen[run] = (entry.revision, newest.sequence)
        if unnumbered:
            with self._mapped(f"read the newest revisions of {len(unnumbered)} runs", "desired"):
                for run in unnumbered:
                    numbered = await self._newest(run, keys[run])
                    found[run] = None if numbered is None else numbered[0]
        return {run: found[run] for run in runs}

    async def delete(self, run: str) -> None:
        """Remove the run's keys from the three buckets: the messages of its subjects are purged from each bucket's
        stream (no delete marker is left, so a new revision of the run is numbered 1 again).

        Needs permission to publish to ``$JS.API.STREAM.PURGE.KV_PREFIX-desired`` (``-status``, ``-outcomes``).
        A watcher of the run is not told: its trainer keeps its config, and ignores revisions numbered from 1
        again until it restarts. Raises ``TransportUnavailable`` or ``PermissionDenied``.
        """
        key = run_key(run)
        self._kv("desired")
        for role, subject in (("desired", key), ("outcomes", f"{key}.>"), ("status", key)):
            kv = self._kv(role)
            purge = f"$JS.API.STREAM.PURGE.{kv._stream}"
            with self._mapped(f"delete run {run!r} from bucket {kv._name}", role, subject=purge):
                await kv._js.purge_stream(kv._stream, subject=f"{kv._pre}{subject}")
        self._seen.pop(run, None)

    # -- status and outcomes -----------------------------------------------------------------------------
    async def publish_status(self, status: Status) -> None:
        await self.replace_status(status, None)

    async def replace_status(self, status: Status, expected: int | None) -> int | None:
        """Store ``status`` while the key's last sequence is the one in ``expected`` (a KV update with
        ``Nats-Expected-Last-Subject-Sequence``). A removal purges the key, so it changes the sequence too.

        The version is the key's stream sequence below bit 64 and the connection's epoch (one more at each
        disconnect and reconnect) above it: a version from before a disconnect is refused without a write. The
        server may have come back without its store (a lost volume; writes not yet synced, nats-server syncing
        every 2 minutes by default), its sequences starting over, and a newer incarnation's status may hold the
        very sequence this writer remembers. It costs one read of the status after each reconnect. Left open: a
        conditional write already in nats-py's buffer when the connection drops is sent after the reconnect
        under the old expectation."""
        key = run_key(status.run)
        data = encode(status)
        bucket = self._kv("status")
        subject = f"$KV.{self.settings.prefix}-status.{key}"
        if expected is not None and expected >> 64 != self._epoch:
            return None
        with self._mapped(f"publish the status of run {status.run!r}", "status", subject=subject):
            if expected is None:
                sequence = int(await bucket.put(key, data))
            else:
                try:
                    sequence = int(await bucket.update(key, data, last=expected & (1 << 64) - 1))
                except nats.js.errors.KeyWrongLastSequenceError:
                    return None
        return self._epoch << 64 | sequence  # the epoch of the server that answered

    async def status(self, run: str) -> Status | None:
        key = run_key(run)
        bucket = self._kv("status")
        with self._mapped(f"read the status of run {run!r}", "status"):
            entry = await self._entry(bucket, key)
        return None if entry is None else self._decode(entry.value, Status, f"status of run {run!r}")

    async def publish_schema(self, run: str, data: bytes) -> None:
        """Store the run's schema under ``RUNKEY.schema`` in the outcomes bucket (see the module's layout)."""
        key = schema_key(run)
        outcomes = self._kv("outcomes")
        subject = f"$KV.{self.settings.prefix}-outcomes.{key}"
        with self._mapped(f"publish the schema of run {run!r}", "outcomes", subject=subject):
            await outcomes.put(key, bytes(data))

    async def read_schema(self, run: str) -> bytes | None:
        key = schema_key(run)
        outcomes = self._kv("outcomes")
        with self._mapped(f"read the schema of run {run!r}", "outcomes"):
            entry = await self._entry(outcomes, key)
        return None if entry is None or not entry.value else bytes(entry.value)

    async def publish_outcome(self, outcome: Outcome) -> None:
        """Store the outcome under ``RUNKEY.REVISION.INCARNATION``, then make it the revision's newest under
        ``RUNKEY.REVISION`` unless a newer one (greater ``at``) is there (compare-and-set on that key).

        The first outcome of a revision, the usual case, costs one round trip: both keys are written at once, the
        newest one with a create that fails if the key exists (then it is read and compared as above)."""
        newest_key = f"{run_key(outcome.run)}.{outcome.revision}"
        own_key = f"{newest_key}.{incarnation_token(outcome.incarnation)}"
        data = encode(outcome)
        outcomes = self._kv("outcomes")
        subject = f"$KV.{self.settings.prefix}-outcomes.{own_key}"
        with self._mapped(
            f"publish the outcome of revision {outcome.revision} of run {outcome.run!r}", "outcomes", subject=subject
        ):
            own, first = await asyncio.gather(
                outcomes.put(own_key, data), outcomes.create(newest_key, data), return_exceptions=True
            )
            if isinstance(own, BaseException):
                raise own
            if not isinstance(first, BaseException):
                return
            if not isinstance(first, (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyDeletedError)):
                raise first
            current = await self._entry(outcomes, newest_key)
            stored = None if current is None else self._decode(current.value, Outcome, "outcome")
            if current is not None and current.value and stored is not None and not stored.incarnation:
                legacy_key = f"{newest_key}.{incarnation_token('')}"
                if legacy_key != own_key and await self._entry(outcomes, legacy_key) is None:
                    await outcomes.put(legacy_key, current.value)  # a version-1 outcome keeps its own record
            for _attempt in range(5):
                if stored is not None and stored.at > outcome.at:
                    return
                try:
                    if current is None or current.revision is None:
                        await outcomes.create(newest_key, data)
                    else:
                        await outcomes.update(newest_key, data, last=current.revision)
                    return
                except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyDeletedError):
                    current = await self._entry(outcomes, newest_key)
                    stored = None if current is None else self._decode(current.value, Outcome, "outcome")
            log.warning(
                "NATS %s: the newest outcome of revision %d of run %r kept changing; left as it is",
                self.settings.display,
                outcome.revision,
                outcome.run,
            )

    async def watch_outcome(self, run: str, revision: int) -> AsyncIterator[Outcome]:
        """The newest outcome of the revision (key ``RUNKEY.REVISION``), then each newer one, as the server stores it.

        A plain subscription to the key's subject, then a read of the key (the subscription is made first, so an
        outcome stored in between is seen by one or the other): no JetStream consumer is made for a wait. A user
        the server does not let subscribe to ``$KV.PREFIX-outcomes.>`` gets a key-value watch instead (a named
        consumer, as every watch; decided once per transport, at the first refusal). Either way it reads the key
        every :data:`OUTCOME_RECHECK` seconds while quiet and after a reconnect. Ends when the transport is closed.
        """
        key = f"{run_key(run)}.{int(revision)}"
        if self._nc is None:
            self._ready()  # never connected (or closed): say so instead of waiting for ever
        action = f"watch the outcome of revision {revision} of run {run!r}"
        if not self._outcome_subscribe_refused:
            async with contextlib.aclosing(self._subscribe_outcome(run, revision, key, action)) as followed:
                async for outcome in followed:
                    yield outcome
            if self._closed:
                return
            log.debug("NATS %s: %s with a key-value watch (subscribing was refused)", self.settings.display, action)
        async with contextlib.aclosing(self._watch_outcome_key(run, revision, key, action)) as watched:
            async for outcome in watched:
                yield outcome

    async def _subscribe_outcome(self, run: str, revision: int, key: str, action: str) -> AsyncGenerator[Outcome, None]:
        """Follow ``key`` through a plain subscription to its subject (see :meth:`watch_outcome`); returns when the
        server refuses the subscription (then ``_outcome_subscribe_refused`` is set) or the transport is closed."""
        subject = f"$KV.{self.settings.prefix}-outcomes.{key}"
        arrived: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def on_message(msg: Any) -> None:
            arrived.put_nowait(msg.data)

        def end() -> None:
            arrived.put_nowait(None)

        ends = self._outcome_subscriptions.setdefault(subject.lower(), [])
        ends.append(end)
        subscription: Any = None
        last: Outcome | None = None
        reread = True  # the first look, and after a reconnect or a quiet spell
        generation = self._generation
        delay = 0.05
        try:
            while not self._closed and not self._outcome_subscribe_refused:
                found: list[bytes | None] = []
                try:
                    outcomes = self._kv("outcomes")
                    with self._mapped(action, "outcomes"):
                        if subscription is None:
                            assert self._nc is not None
                            subscription = await self._nc.subscribe(subject, cb=on_message)
                        if reread or generation != self._generation:
                            generation, reread = self._generation, False
                            entry = await self._entry(outcomes, key)
                            found.append(None if entry is None else entry.value)
                except TransportUnavailable as exc:
                    if self._closed:
                        return
                    log.debug("NATS %s: %s waits: %s", self.settings.display, action, exc)
                    reread = True
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                delay = 0.05
                if not found:
                    with anyio.move_on_after(OUTCOME_RECHECK) as quiet:
                        data = await arrived.get()
                        if data is None:
                            continue  # refused or closed: the loop's condition says which
                        found.append(data)
                    reread = quiet.cancelled_caught
                for data in found:
                    outcome = self._decode(data, Outcome, f"outcome of run {run!r}")  # a delete is empty: skipped
                    if outcome is not None and outcome.revision == revision and outcome != last:
                        last = outcome
                        yield outcome
        finally:
            with contextlib.suppress(ValueError):
                ends.remove(end)
            if not ends:
                self._outcome_subscriptions.pop(subject.lower(), None)
            if subscription is not None:
                with anyio.move_on_after(CLOSE_TIMEOUT, shield=True), contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    def _refused_subscription(self, subject: str) -> bool:
        """Whether ``subject`` (lowercased, as the server's error says it) is an outcome subscription: then every
        outcome wait of this transport uses a key-value watch from now on, and the waits on it switch at once."""
        ends = self._outcome_subscriptions.pop(subject, None)
        if ends is None:
            return False
        if not self._outcome_subscribe_refused:
            self._outcome_subscribe_refused = True
            log.info(
                "NATS %s: this user may not subscribe to $KV.%s-outcomes.>; waits for outcomes use key-value watches "
                "(grant that subscription to save a JetStream consumer per wait: docs/deploy.md)",
                self.settings.display,
                self.settings.prefix,
            )
        for end in ends:
            end()
        return True

    async def _watch_outcome_key(self, run: str, revision: int, key: str, action: str) -> AsyncGenerator[Outcome, None]:
        """A key-value watch of ``key``: the stored outcome, then each newer one as the server pushes it. While quiet
        it reads the key every :data:`OUTCOME_RECHECK` seconds (a watch whose consumer a cluster lost delivers
        nothing more); after a reconnect the watch is made again. Ends when the transport is closed."""
        last: Outcome | None = None
        delay = 0.05
        while not self._closed:
            generation = self._generation
            try:
                outcomes = self._kv("outcomes")
                with self._mapped(action, "outcomes"):
                    watcher = await _named_watch(outcomes, key)
            except TransportUnavailable as exc:
                if self._closed:
                    return
                log.debug("NATS %s: %s waits: %s", self.settings.display, action, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            self._watchers.add(watcher)
            try:
                while not self._closed and generation == self._generation:
                    try:
                        update = await _next_update(watcher, OUTCOME_RECHECK)
                    except nats.errors.TimeoutError:
                        update = await self._reread(outcomes, key, action)
                    if update is None:
                        continue  # the end of the initial value, or a quiet key
                    if not isinstance(update, KeyValue.Entry):
                        break  # the watcher was stopped
                    if update.operation in (KV_DEL, KV_PURGE):
                        continue
                    found = self._decode(update.value, Outcome, f"outcome of run {run!r}")
                    if found is not None and found.revision == revision and found != last:
                        last = found
                        yield found
            finally:
                self._watchers.discard(watcher)
                await _stop(watcher)

    async def _reread(self, kv: KeyValue, key: str, action: str) -> KeyValue.Entry | None:
        """The key's entry, read directly (best effort: ``None`` when it has none or the server cannot say now)."""
        try:
            with anyio.move_on_after(OUTCOME_RECHECK), self._mapped(action, "outcomes"):
                return await self._entry(kv, key)
        except TransportUnavailable:
            pass
        return None

    async def outcome(self, run: str, revision: int) -> Outcome | None:
        key = f"{run_key(run)}.{int(revision)}"
        outcomes = self._kv("outcomes")
        with self._mapped(f"read the outcome of revision {revision} of run {run!r}", "outcomes"):
            entry = await self._entry(outcomes, key)
        return None if entry is None else self._decode(entry.value, Outcome, f"outcome of run {run!r}")

    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        key = run_key(run)
        outcomes = self._kv("outcomes")
        with self._mapped(f"read the outcomes of run {run!r}", "outcomes"):
            entries = await self._read_all(outcomes, f"{key}.>")
        own: list[Outcome] = []
        newest: dict[int, Outcome] = {}
        schema = schema_key(run)
        for entry in entries:
            if entry.operation in (KV_DEL, KV_PURGE) or entry.key == schema:
                continue
            outcome = self._decode(entry.value, Outcome, f"outcome of run {run!r}")
            if outcome is None or outcome.run != run:
                continue
            if entry.key.count(".") == 2:
                own.append(outcome)
            else:
                newest[outcome.revision] = outcome
        # A revision whose only outcome was written by version 1 of weavelet has only its newest key.
        recorded = {o.revision for o in own}
        found = [*own, *(o for number, o in newest.items() if number not in recorded)]
        found.sort(key=lambda o: (o.revision, o.at))
        return found[-limit:] if limit else found

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
        self._snapshots.clear()
        for ends in list(self._outcome_subscriptions.values()):
            for end in list(ends):
                end()
        nc, self._nc = self._nc, None
        if nc is not None:
            await self._close_client(nc)


__all__ = ["NatsTransport", "key_run", "run_key", "schema_key"]
