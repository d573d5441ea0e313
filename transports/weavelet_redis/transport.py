"""The ``redis://`` transport: Redis streams for revisions, hashes for status and outcomes.

Key layout (prefix ``weavelet:`` by default, see :class:`weavelet_redis.config.KeyLayout`)::

    weavelet:runs                    set     every run id with a revision or a status
    weavelet:run:RUN                 hash    revision -> newest number, status -> latest status (JSON),
                                             schema -> what the trainer accepts (JSON; see publish_schema)
    weavelet:run:RUN:revisions       stream  one entry per revision: revision, data (JSON); MAXLEN ~ history
    weavelet:run:RUN:status          stream  every published status: data (JSON); MAXLEN ~ status_history
    weavelet:run:RUN:outcomes        hash    N -> newest outcome of revision N; N:INCARNATION -> that
                                             incarnation's outcome; N# -> incarnations kept (JSON)
    weavelet:run:RUN:outcomes:index  zset    revision numbers with outcomes (the newest ``history`` kept)
    weavelet:run:RUN:outcomes:stream stream  one entry per outcome stored: revision, data (the revision's
                                             newest outcome); MAXLEN ~ 100: what a waiting weaver reads

A write is a Lua script (compare-and-set on the stream's newest ``revision`` field, ``XADD``, record the
number), so two writers never both win. A watcher reads the newest entry (``XREVRANGE COUNT 1``), then waits
with ``XREAD BLOCK`` (``block`` seconds, 15 by default, then again) from the id of the last entry it read, on its
own connection. A weaver waiting for an outcome does the same on the run's outcome stream (``watch_outcome``), on
a pool of connections kept for blocking reads. Those connections wait ``block`` plus a second for a reply, and
:meth:`RedisTransport.aclose` cancels the reads and disconnects them, so a blocked read ends at once when the
transport closes. After a
lost connection it reconnects with backoff, re-reads the newest entry and resumes from its last id; revisions are
delivered only when newer than the last one delivered, so nothing is delivered twice even if the server lost its
data.

Batched reads (``statuses()``, ``latests()`` of many runs) take one request per thousand runs: on one server a
script reading every run's field or newest entry, on a Redis Cluster (where runs sit in different slots) a
pipeline redis-py splits by node. ``delete()`` removes a run's keys (one ``DEL``: one slot), then its index entry.

An entry whose data does not decode is a :class:`~weavelet_core.errors.CorruptEntry` numbered by its ``revision``
field (see :func:`entry_number`); the compare-and-set script and the batched read number it the same way. ``NOPERM`` is
:class:`~weavelet_core.errors.PermissionDenied`. Calls are plain awaits on redis-py, so a caller's cancel
scope (``anyio.fail_after``) ends them at once, also against a stopped server.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Coroutine, Sequence
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import EqualJitterBackoff, ExponentialBackoff, NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from weavelet_core.errors import (
    AuthenticationFailed,
    CorruptEntry,
    PermissionDenied,
    ProtocolError,
    RevisionConflict,
    TransportError,
    TransportUnavailable,
)
from weavelet_core.protocol import Outcome, Revision, Status, decode, encode, validate_run_id
from weavelet_core.transport import Entry as StoredEntry
from weavelet_core.transport import Transport, decoding_many
from weavelet_redis import scripts
from weavelet_redis.config import RedisSettings, parse_url
from weavelet_redis.errors import translate

log = logging.getLogger(__name__)

T_Message = TypeVar("T_Message", Status, Outcome)
Entry = tuple[bytes, dict[bytes, bytes]]

WATCH_BATCH = 100
"""Most entries one ``XREAD`` returns; a watcher that fell behind catches up in batches of this size."""
RECONNECT_BACKOFF = EqualJitterBackoff(cap=1.0, base=0.05)
"""Delay between a watcher's reconnect attempts: 50-100 ms at first, doubling, 0.5-1 s at most."""
_STREAM_START = b"0-0"
_NUMBER = re.compile(rb"[1-9][0-9]*")
OUTCOME_INCARNATIONS = 8
"""Outcomes kept per revision, one per incarnation: the newest (greatest ``at``) this many."""
BATCH = 1000
"""Runs per request of a batched read (:meth:`RedisTransport.statuses`, :meth:`RedisTransport.latests`): one
pipeline or one script call each, so that no single reply, and no script blocking the server, grows with the store."""
OUTCOME_STREAM_LENGTH = 100
"""Entries kept (``MAXLEN ~``) in a run's outcome stream: notices for waiting weavers, not a record."""


def field_number(fields: dict[bytes, bytes]) -> int | None:
    """The number a stream entry records in its ``revision`` field, or ``None`` if it has no usable one."""
    value = fields.get(b"revision")
    return int(value) if value is not None and _NUMBER.fullmatch(value) else None


def entry_number(fields: dict[bytes, bytes], older: list[Entry]) -> int:
    """The revision number of a stream entry: its ``revision`` field; for an entry without a usable one, one
    more than the nearest numbered entry among ``older`` (the entries before it, newest first, at most
    :data:`~weavelet_redis.scripts.NUMBER_SCAN`), counting the unnumbered ones in between; with none, one more
    than how many there are. The compare-and-set script numbers entries the same way."""
    number = field_number(fields)
    if number is not None:
        return number
    for distance, (_, older_fields) in enumerate(older[: scripts.NUMBER_SCAN], start=1):
        found = field_number(older_fields)
        if found is not None:
            return found + distance
    return min(len(older), scripts.NUMBER_SCAN) + 1


def _stream_id(entry_id: bytes) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition(b"-")
    return int(milliseconds), int(sequence or b"0")


STATUS_SEQUENCE_BITS = 64
"""A status version is its stream entry's id ``MS-SEQ`` as one integer, ``MS << 64 | SEQ``: both parts are 64-bit
in Redis, and a sequence grows past a few a millisecond where the stream's last id is ahead of the server's clock
(after a failover to a master whose clock is behind, every entry takes the last id's millisecond)."""


def _status_version(entry_id: bytes) -> int:
    milliseconds, sequence = _stream_id(entry_id)
    return milliseconds << STATUS_SEQUENCE_BITS | sequence


def _status_entry_id(version: int) -> str:
    return f"{version >> STATUS_SEQUENCE_BITS}-{version & ((1 << STATUS_SEQUENCE_BITS) - 1)}"


class RedisTransport(Transport):
    """A Redis server (5.0 or newer; 6.0 or newer for ``user:password``) as the store.

    :param url: ``redis://[USER:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]`` or ``rediss://...`` for TLS.
    :param options: ``prefix``, ``history``, ``status_history``, ``connect_timeout``, ``block``,
        ``socket_timeout``; see :mod:`weavelet_redis.config`.

    Building it does no I/O. :meth:`connect` checks the server within ``connect_timeout`` and raises
    ``TransportUnavailable`` or ``AuthenticationFailed``; the transport stays usable afterwards and each call
    reconnects on its own, so a caller may retry and a watcher started while the server is down starts
    delivering once it is up.
    """

    def __init__(self, url: str, **options: object) -> None:
        self.settings: RedisSettings = parse_url(url, **options)
        self.url = self.settings.display_url
        self.keys = self.settings.keys
        self._client: aioredis.Redis | None = None
        self._blocking_client: aioredis.Redis | None = None  # a pool for watch_outcome's blocking reads
        self._watch_clients: set[aioredis.Redis] = set()
        self._blocking_scopes: set[anyio.CancelScope] = set()  # blocked XREADs: aclose() cancels them
        self._sentinels: list[Sentinel] = []
        self._closed = False
        self._outcome_stream_denied = False
        # Runs this transport put in the run index: a write adds its run there once per connection (and with every
        # revision 1, which follows a delete), not with every revision, which would cost a second round trip each.
        self._indexed: set[str] = set()

    # -- connections -------------------------------------------------------------------------------------
    def _new_client(self, *, retries: int, blocking: bool = False) -> aioredis.Redis:
        """A client of the URL's kind: one server, the master Sentinel names, or a Redis Cluster; ``blocking``:
        for ``XREAD BLOCK``, waiting :attr:`~weavelet_redis.config.RedisSettings.blocking_timeout` for replies."""
        s = self.settings
        backoff = ExponentialBackoff(cap=0.1, base=0.01) if retries else NoBackoff()
        common: dict[str, Any] = {
            "socket_timeout": s.blocking_timeout if blocking else s.socket_timeout,
            "socket_connect_timeout": s.connect_timeout,
            "decode_responses": False,
        }
        if s.mode == "sentinel":
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(s.nodes),
                sentinel_kwargs={"socket_timeout": s.connect_timeout, "socket_connect_timeout": s.connect_timeout},
                **dict(s.connection),
                **common,
            )
            self._sentinels.append(sentinel)
            master: aioredis.Redis = sentinel.master_for(s.service, retry=Retry(backoff, retries))
            return master
        if s.mode == "cluster":
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in s.nodes],
                retry=Retry(backoff, max(retries, 1)),
                **dict(s.connection),
                **common,
            )
            # RedisCluster has the same command methods; typed as one client for the code below.
            return cast(aioredis.Redis, cluster)
        return aioredis.Redis.from_url(s.driver_url, retry=Retry(backoff, retries), **common)

    def _redis(self) -> aioredis.Redis:
        if self._closed:
            raise TransportUnavailable(f"redis transport {self.url} is closed")
        if self._client is None:
            # A couple of quick retries ride over a dropped connection; a server that is down fails fast
            # and the caller (the Weaver, the weavelet process) decides how long to keep trying.
            client = self._new_client(retries=2)
            self._put_script = client.register_script(scripts.PUT_REVISION)
            self._status_script = client.register_script(scripts.PUBLISH_STATUS)
            self._outcome_script = client.register_script(scripts.PUBLISH_OUTCOME)
            self._newest_script = client.register_script(scripts.NEWEST_REVISIONS)
            self._statuses_script = client.register_script(scripts.STATUSES)
            self._client = client
        return self._client

    def _blocking_redis(self) -> aioredis.Redis:
        """The client (its own pool) whose connections run ``watch_outcome``'s ``XREAD BLOCK``."""
        if self._closed:
            raise TransportUnavailable(f"redis transport {self.url} is closed")
        if self._blocking_client is None:
            self._blocking_client = self._new_client(retries=0, blocking=True)
        return self._blocking_client

    async def _blocking_call(self, action: str, pending: Awaitable[Any]) -> Any:
        """``_call`` of an ``XREAD BLOCK``, ended at once by :meth:`aclose` (then ``TransportUnavailable``)."""
        with anyio.CancelScope() as scope:
            self._blocking_scopes.add(scope)
            try:
                if self._closed:
                    scope.cancel()
                return await self._call(action, pending)
            finally:
                self._blocking_scopes.discard(scope)
        if isinstance(pending, Coroutine):
            pending.close()  # never awaited when closed before the read began
        raise TransportUnavailable(f"redis transport {self.url} is closed")

    async def _index(self, client: aioredis.Redis, run: str) -> None:
        """Add ``run`` to the run index (its own key, in another cluster slot than the run's: see scripts.py)."""
        await self._call(f"list run {run!r} in {self.keys.runs()}", client.sadd(self.keys.runs(), run))

    async def _replicated(self, pipe: Any, run: str, number: int) -> Any:
        """Run ``pipe`` (a write, then ``WAIT``) and return the write's reply; raise ``TransportError`` (final) when
        fewer than ``wait_replicas`` replicas confirmed the write within ``wait_timeout``."""
        s = self.settings
        pipe.execute_command("WAIT", s.wait_replicas, max(1, round(s.wait_timeout * 1000)))
        reply, acked = await self._call(f"write run {run!r}", pipe.execute())
        if int(acked) < s.wait_replicas:
            # Final, not TransportUnavailable: a retry would find the revision on the master and count it as
            # written without the replicas having it. The caller decides (weavelet get shows it is there).
            raise TransportError(
                f"redis at {self.url}: revision {number} of run {run!r} is on the master, but only {acked} of the "
                f"{s.wait_replicas} replicas asked for (wait_replicas) confirmed it within {s.wait_timeout:g}s, so a "
                "failover now could lose it; check the replicas (INFO replication) and the run (weavelet get)"
            )
        return reply

    async def _call(self, action: str, pending: Awaitable[Any]) -> Any:
        """Await one redis-py call; its errors become weavelet's (see :func:`weavelet_redis.errors.translate`)."""
        try:
            return await pending
        except (RedisError, RedisClusterException, OSError) as exc:
            raise translate(exc, self.url, action, self.keys.prefix) from exc

    async def connect(self) -> None:
        client = self._redis()
        try:
            with anyio.fail_after(self.settings.connect_timeout):
                await self._call("connect", client.ping())
        except TimeoutError:
            raise TransportUnavailable(
                f"cannot connect: no answer from redis at {self.url} within {self.settings.connect_timeout:g}s; "
                "check the host, the port and any firewall in between"
            ) from None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A Redis Cluster client retries a read whose connection closed, blocking again for `block` seconds: blocked
        # reads are cancelled here, whatever the client; their connections are closed below.
        for scope in list(self._blocking_scopes):
            scope.cancel()
        # Blocking reads first: closing their connections (in use ones too) ends a read blocked in XREAD at once.
        clients = [
            *self._watch_clients,
            *(c for c in (self._blocking_client, self._client) if c is not None),
        ]
        self._watch_clients.clear()
        self._client = self._blocking_client = None
        sentinels, self._sentinels = self._sentinels, []
        with anyio.move_on_after(5.0, shield=True):
            for client in clients:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
            for sentinel in sentinels:
                for node in sentinel.sentinels:
                    with contextlib.suppress(RedisError, OSError):
                        await node.aclose()

    # -- revisions ---------------------------------------------------------------------------------------
    def _decode_entry(self, run: str, number: int, fields: dict[bytes, bytes]) -> StoredEntry:
        """The revision a stream entry holds, or a :class:`CorruptEntry` numbered ``number`` in its place."""
        try:
            revision = decode(fields.get(b"data", b""), Revision)
        except ProtocolError as exc:
            log.warning("redis transport %s: revision %d of run %r is unreadable: %s", self.url, number, run, exc)
            return CorruptEntry(run, number, str(exc))
        if revision.run != run or revision.revision != number:
            log.warning("redis transport %s: revision %d of run %r holds another revision", self.url, number, run)
            return CorruptEntry(
                run, number, f"the entry holds revision {revision.revision} of run {revision.run!r}, not this one"
            )
        return revision

    async def _numbered(self, client: aioredis.Redis, run: str, entries: list[Entry]) -> list[tuple[int, Entry]]:
        """``entries`` (oldest first, consecutive in the stream) with their revision numbers."""
        found: list[tuple[int, Entry]] = []
        for entry in entries:
            number = field_number(entry[1])
            if number is None:
                if found:
                    number = found[-1][0] + 1
                else:  # rare: an entry a foreign writer added without a number; look at the ones before it
                    before: list[Entry] = await self._call(
                        f"read run {run!r}",
                        client.xrevrange(self.keys.revisions(run), max=entry[0], count=scripts.NUMBER_SCAN + 1),
                    )
                    number = entry_number(entry[1], before[1:])
            found.append((number, entry))
        return found

    async def put(self, revision: Revision) -> None:
        client = self._redis()
        run = revision.run
        data = encode(revision)
        action = f"write run {run!r}"
        keys = [self.keys.revisions(run), self.keys.run(run)]
        args: list[str | int | bytes] = [str(revision.revision - 1), revision.revision, data, self.settings.history]
        if self.settings.wait_replicas:
            pipe = client.pipeline(transaction=False)  # the WAIT must follow the write on its connection
            await self._put_script(keys=keys, args=args, client=pipe)
            stored, value = await self._replicated(pipe, run, revision.revision)
        else:
            stored, value = await self._call(action, self._put_script(keys=keys, args=args, client=client))
        if stored:
            if revision.revision == 1 or run not in self._indexed:
                await self._index(client, run)
                self._indexed.add(run)
            return
        current = int(value)
        if current == revision.revision:
            # A reply lost on a dropped connection, then retried: the first attempt may have been ours.
            newest = await self._newest_entry(client, run)
            if newest is not None and newest[1].get(b"data") == data:
                if self.settings.wait_replicas:
                    # Confirm it is replicated: a write on this connection, then WAIT for it (replication is in
                    # order, so a replica that has this write has the revision too).
                    pipe = client.pipeline(transaction=False)
                    pipe.hset(self.keys.run(run), "revision", str(revision.revision))
                    await self._replicated(pipe, run, revision.revision)
                await self._index(client, run)
                return
        raise RevisionConflict(run, revision.revision - 1, current)

    async def _newest_entry(self, client: aioredis.Redis, run: str) -> Entry | None:
        entries: list[Entry] = await self._call(
            f"read run {run!r}", client.xrevrange(self.keys.revisions(run), count=1)
        )
        return entries[0] if entries else None

    async def latest(self, run: str) -> Revision | None:
        validate_run_id(run)
        client = self._redis()
        entry = await self._newest_entry(client, run)
        if entry is None:
            return None
        [(number, _)] = await self._numbered(client, run, [entry])
        found = self._decode_entry(run, number, entry[1])
        if isinstance(found, CorruptEntry):
            raise found
        return found

    async def history(self, run: str, *, limit: int | None = None) -> list[StoredEntry]:
        validate_run_id(run)
        client = self._redis()
        key = self.keys.revisions(run)
        action = f"read the history of run {run!r}"
        if limit:
            newest_first: list[Entry] = await self._call(action, client.xrevrange(key, count=limit))
            entries = newest_first[::-1]
        else:
            entries = await self._call(action, client.xrange(key))
        return [
            self._decode_entry(run, number, entry[1]) for number, entry in await self._numbered(client, run, entries)
        ]

    async def watch(self, run: str, *, after: int = 0) -> AsyncIterator[StoredEntry]:
        validate_run_id(run)
        if self._closed:
            raise TransportUnavailable(f"redis transport {self.url} is closed")
        # Its own connection, without redis-py's retries: a blocked XREAD is interrupted by aclose() and
        # reconnects are paced here, where the read position is known.
        client = self._new_client(retries=0, blocking=True)
        self._watch_clients.add(client)
        key = self.keys.revisions(run)
        block_ms = max(1, round(self.settings.block * 1000))
        last = after
        cursor: bytes | None = None
        resync = True
        failures = 0
        warned_stale = False
        try:
            while not self._closed:
                batch: list[Entry] = []
                numbered: list[tuple[int, Entry]] = []
                followed = False
                try:
                    if resync:
                        newest = await self._newest_entry(client, run)
                        cursor, batch = self._resync(run, cursor, newest)
                        resync = False
                    else:
                        assert cursor is not None
                        reply = await self._blocking_call(
                            f"watch run {run!r}",
                            client.xread({key: cursor}, count=WATCH_BATCH, block=block_ms),
                        )
                        if reply:
                            batch = list(reply[0][1])
                            cursor = batch[-1][0]
                            followed = True
                    numbered = await self._numbered(client, run, batch)
                    if failures:
                        log.info("redis transport %s: watching run %r again", self.url, run)
                        failures = 0
                except (AuthenticationFailed, PermissionDenied):
                    raise
                except TransportUnavailable as exc:
                    if self._closed:
                        return
                    failures += 1
                    if failures == 1:
                        log.warning("redis transport %s: %s; reconnecting", self.url, exc)
                    resync = True
                    await anyio.sleep(RECONNECT_BACKOFF.compute(failures))
                    continue
                for number, (_, fields) in numbered:
                    if number > last:
                        last = number
                        yield self._decode_entry(run, number, fields)
                    elif followed and not warned_stale:
                        # Entries after the read position carry older numbers only if the store was reset.
                        warned_stale = True
                        log.warning(
                            "redis transport %s: run %r: skipping revision %d, not newer than revision %d already "
                            "delivered; the server lost its data (no persistence?) and numbering restarted",
                            self.url,
                            run,
                            number,
                            last,
                        )
        finally:
            self._watch_clients.discard(client)
            with anyio.move_on_after(2.0, shield=True):
                await client.aclose()

    def _resync(self, run: str, cursor: bytes | None, newest: Entry | None) -> tuple[bytes, list[Entry]]:
        """Where to read from after (re)connecting, and what to deliver now.

        First read: from the newest entry, which is delivered. Later: from the old position when it is still
        behind the newest entry (the next ``XREAD`` delivers what was written meanwhile, in order); from the
        newest entry when the stream went back or vanished (the server lost its data, or the key was
        deleted), delivering it if it is newer than what was delivered.
        """
        if newest is None:
            if cursor is not None and cursor != _STREAM_START:
                log.warning(
                    "redis transport %s: run %r has no revisions any more (the server lost its data or the key "
                    "was deleted); waiting for new ones",
                    self.url,
                    run,
                )
            return _STREAM_START, []
        newest_id = newest[0]
        if cursor is None:
            return newest_id, [newest]
        if _stream_id(newest_id) < _stream_id(cursor):
            log.warning(
                "redis transport %s: the revisions stream of run %r went back (the server lost its data or the "
                "key was recreated); continuing from its newest entry",
                self.url,
                run,
            )
            return newest_id, [newest]
        return cursor, []

    async def latests(self, runs: Sequence[str]) -> dict[str, StoredEntry | None]:
        """The newest revision of each of ``runs``: a :class:`Revision`, a :class:`CorruptEntry` in place of one
        that cannot be read, or ``None`` for a run without revisions; keyed and ordered like ``runs``.

        :data:`BATCH` runs a request: on one server (or a Sentinel's master), one script call that reads each
        stream's newest entry; on a Redis Cluster, where the runs' keys sit in different slots, a pipeline of
        ``XREVRANGE ... COUNT 1`` that redis-py splits by node. Raises ``TransportUnavailable`` (and
        ``PermissionDenied``) like :meth:`latest`.
        """
        client = self._redis()
        unique = list(dict.fromkeys(validate_run_id(run) for run in runs))
        action = f"read the newest revisions of {len(unique)} runs"
        found: dict[str, StoredEntry | None] = {}
        for start in range(0, len(unique), BATCH):
            chunk = unique[start : start + BATCH]
            if self.settings.mode == "cluster":
                pipe = client.pipeline(transaction=False)
                for run in chunk:
                    pipe.xrevrange(self.keys.revisions(run), count=1)
                replies: list[list[Entry]] = await self._call(action, pipe.execute())
                for run, entries in zip(chunk, replies, strict=True):
                    if not entries:
                        found[run] = None
                        continue
                    [(number, entry)] = await self._numbered(client, run, entries[:1])
                    found[run] = self._decode_entry(run, number, entry[1])
            else:
                newest: list[bytes] = await self._call(
                    action, self._newest_script(keys=[self.keys.revisions(run) for run in chunk], client=client)
                )
                with decoding_many():
                    for run, reply in zip(chunk, newest, strict=True):
                        if not reply:
                            found[run] = None
                            continue
                        shown, _, data = reply.partition(b" ")
                        found[run] = self._decode_entry(run, int(shown), {b"data": data})
            await anyio.lowlevel.checkpoint()
        return {run: found[run] for run in runs}

    async def runs(self) -> list[str]:
        client = self._redis()
        members: set[bytes] = await self._call("list runs", client.smembers(self.keys.runs()))
        found = []
        for member in members:
            name = member.decode("utf-8", "replace")
            try:
                found.append(validate_run_id(name))
            except ValueError:
                log.warning("redis transport %s: ignoring invalid run id %r in %s", self.url, name, self.keys.runs())
        return sorted(found)

    # -- status and outcomes -----------------------------------------------------------------------------
    async def publish_status(self, status: Status) -> None:
        await self.replace_status(status, None)

    async def replace_status(self, status: Status, expected: int | None) -> int | None:
        """Store ``status`` while the newest entry of the run's status stream is ``expected``: the version is that
        entry's id (``MS-SEQ``, as ``MS << 64 | SEQ``). Every status write appends to the stream, a removal deletes
        it, so another writer's status (an older weavelet's too) or a removal changes it. One round trip on one
        server or a Sentinel's master: the script also lists the run in the run index, with every status, so a
        run the index lost (a failover that kept the status but not the ``SADD``, a removal racing the write) is
        listed again at the next status; on a Redis Cluster the index is another slot, written in a second call."""
        client = self._redis()
        run = status.run
        data = encode(status)
        keys = [self.keys.run(run), self.keys.status_stream(run)]
        args: list[str | int | bytes] = [
            data,
            self.settings.status_history,
            "" if expected is None else _status_entry_id(expected),
        ]
        cluster = self.settings.mode == "cluster"
        if not cluster:
            keys.append(self.keys.runs())
            args.append(run)
        stored = await self._call(
            f"publish the status of run {run!r}", self._status_script(keys=keys, args=args, client=client)
        )
        if not stored:
            return None
        if cluster:
            await self._index(client, run)
        return _status_version(stored)

    async def status(self, run: str) -> Status | None:
        validate_run_id(run)
        client = self._redis()
        data: bytes | None = await self._call(
            f"read the status of run {run!r}", client.hget(self.keys.run(run), "status")
        )
        return self._decode(data, Status, run)

    async def publish_schema(self, run: str, data: bytes) -> None:
        """Store the run's schema in the ``schema`` field of the run's hash, beside its ``status`` field (so a
        trainer's ACL needs nothing more than its status does)."""
        validate_run_id(run)
        client = self._redis()
        await self._call(f"publish the schema of run {run!r}", client.hset(self.keys.run(run), "schema", bytes(data)))

    async def read_schema(self, run: str) -> bytes | None:
        validate_run_id(run)
        client = self._redis()
        data: bytes | None = await self._call(
            f"read the schema of run {run!r}", client.hget(self.keys.run(run), "schema")
        )
        return data

    async def statuses(self, runs: Sequence[str]) -> dict[str, Status | None]:
        """The latest status of each of ``runs`` (``None`` for one without, or one that cannot be read: it is
        logged), keyed and ordered like ``runs``.

        :data:`BATCH` runs a request: on one server (or a Sentinel's master), one script call reading each run's
        ``status`` field; on a Redis Cluster a pipeline of ``HGET`` that redis-py splits by node. Raises
        ``TransportUnavailable`` (and ``PermissionDenied``) like :meth:`status`."""
        client = self._redis()
        unique = list(dict.fromkeys(validate_run_id(run) for run in runs))
        action = f"read the statuses of {len(unique)} runs"
        found: dict[str, Status | None] = {}
        for start in range(0, len(unique), BATCH):
            chunk = unique[start : start + BATCH]
            keys = [self.keys.run(run) for run in chunk]
            replies: list[bytes | None]
            if self.settings.mode == "cluster":
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.hget(key, "status")
                replies = await self._call(action, pipe.execute())
            else:
                replies = await self._call(action, self._statuses_script(keys=keys, client=client))
            with decoding_many():
                for run, data in zip(chunk, replies, strict=True):
                    found[run] = self._decode(data, Status, run)
            await anyio.lowlevel.checkpoint()
        return {run: found[run] for run in runs}

    async def delete(self, run: str) -> None:
        """Remove the run's id from the run index (a key of its own, in another slot), then every key of the run
        (one ``DEL``: they share the run's hash tag, so one Redis Cluster slot). A live trainer that publishes its
        status afterwards lists the run again: its next conditional status write (:meth:`replace_status`) is
        refused once the keys are gone, and the unconditional one after it adds the run to the index. In the other
        order, a status written between the two would be listed and then unlisted for good. Raises
        ``TransportUnavailable`` or ``PermissionDenied``."""
        validate_run_id(run)
        client = self._redis()
        keys = self.keys
        await self._call(f"delete run {run!r} from {keys.runs()}", client.srem(keys.runs(), run))
        await self._call(
            f"delete run {run!r}",
            client.delete(
                keys.run(run),
                keys.revisions(run),
                keys.status_stream(run),
                keys.outcomes(run),
                keys.outcome_index(run),
                keys.outcome_stream(run),
            ),
        )

    async def publish_outcome(self, outcome: Outcome) -> None:
        """Store the outcome (one script: see :data:`~weavelet_redis.scripts.PUBLISH_OUTCOME`) and append a notice to
        the run's outcome stream. A user whose ACL does not grant that stream (written before it existed) still
        stores its outcomes, without the notice (said once in the log): waiting weavers then see them within
        ``block`` seconds instead of at once."""
        client = self._redis()
        run = outcome.run
        data = encode(outcome)
        keys = [self.keys.outcomes(run), self.keys.outcome_index(run), self.keys.outcome_stream(run)]
        args: list[str | int | bytes] = [
            str(outcome.revision),
            outcome.incarnation,
            data,
            repr(float(outcome.at)),
            self.settings.history,
            OUTCOME_INCARNATIONS,
            OUTCOME_STREAM_LENGTH,
        ]
        action = f"publish an outcome of run {run!r}"
        if not self._outcome_stream_denied:
            try:
                await self._call(action, self._outcome_script(keys=keys, args=args, client=client))
                return
            except PermissionDenied:
                # Without the stream: if that is refused too, the ACL lacks more than the stream, and it is said.
                await self._call(action, self._outcome_script(keys=keys[:2], args=args, client=client))
                self._outcome_stream_denied = True
                log.warning(
                    "redis transport %s: this user may not write %s, so weavers waiting for outcomes see them only "
                    "every %gs; grant it: ACL SETUSER <user> ~%s (docs/deploy.md)",
                    self.url,
                    keys[2],
                    self.settings.block,
                    keys[2],
                )
                return
        await self._call(action, self._outcome_script(keys=keys[:2], args=args, client=client))

    async def outcome(self, run: str, revision: int) -> Outcome | None:
        validate_run_id(run)
        client = self._redis()
        data: bytes | None = await self._call(
            f"read an outcome of run {run!r}", client.hget(self.keys.outcomes(run), str(int(revision)))
        )
        return self._decode(data, Outcome, run)

    async def watch_outcome(self, run: str, revision: int) -> AsyncIterator[Outcome]:
        """The revision's newest outcome, then each newer one: ``XREAD BLOCK`` on the run's outcome stream.

        Armed before it reads: one pipeline reads the stream's newest id, then the stored outcome, so an outcome
        stored after that id is read from the stream and one stored before it is in the hash. The blocking read
        runs on a connection of the transport's pool for blocking reads (a connection is made only when none is
        free), which :meth:`aclose` disconnects, ending the read at once. A read that
        found nothing for ``block`` seconds, and an outage (after a reconnect with backoff), read both again: an
        outcome stored by a trainer that may not write the stream is seen that way. Ends when the transport is
        closed.
        """
        validate_run_id(run)
        if self._closed:
            raise TransportUnavailable(f"redis transport {self.url} is closed")
        stream, field = self.keys.outcome_stream(run), str(int(revision)).encode()
        block_ms = max(1, round(self.settings.block * 1000))
        action = f"watch the outcome of revision {revision} of run {run!r}"
        last: Outcome | None = None
        cursor: bytes | None = None
        failures = 0
        while not self._closed:
            try:
                client = self._blocking_redis()
                found: list[bytes | None] = []
                if cursor is None:
                    pipe = client.pipeline(transaction=False)
                    pipe.xrevrange(stream, count=1)
                    pipe.hget(self.keys.outcomes(run), field)
                    newest, stored = await self._call(action, pipe.execute())
                    cursor = newest[0][0] if newest else _STREAM_START
                    found.append(stored)
                else:
                    reply = await self._blocking_call(
                        action, client.xread({stream: cursor}, count=WATCH_BATCH, block=block_ms)
                    )
                    if not reply:
                        cursor = None  # quiet for a while: read the stored outcome again
                    for entry_id, fields in reply[0][1] if reply else []:
                        cursor = entry_id
                        if fields.get(b"revision") == field:
                            found.append(fields.get(b"data"))
                failures = 0
            except (AuthenticationFailed, PermissionDenied):
                raise
            except TransportUnavailable as exc:
                if self._closed:
                    return
                failures += 1
                log.debug("redis transport %s: %s: %s; reconnecting", self.url, action, exc)
                cursor = None
                await anyio.sleep(RECONNECT_BACKOFF.compute(failures))
                continue
            for data in found:
                outcome = self._decode(data, Outcome, run)
                if outcome is not None and outcome.revision == revision and outcome != last:
                    last = outcome
                    yield outcome

    async def outcomes(self, run: str, *, limit: int | None = None) -> list[Outcome]:
        validate_run_id(run)
        client = self._redis()
        stored: dict[bytes, bytes] = await self._call(
            f"read the outcomes of run {run!r}", client.hgetall(self.keys.outcomes(run))
        )
        # One record per incarnation under REVISION:INCARNATION; a revision with only a bare REVISION field
        # has a single outcome written by version 1 of weavelet.
        listed = {field[:-1] for field in stored if field.endswith(b"#")}
        chosen = [data for field, data in stored.items() if b":" in field or (field.isdigit() and field not in listed)]
        found = [o for o in (self._decode(data, Outcome, run) for data in chosen) if o is not None and o.run == run]
        found.sort(key=lambda o: (o.revision, o.at))
        return found[-limit:] if limit else found

    def _decode(self, data: bytes | None, kind: type[T_Message], run: str) -> T_Message | None:
        if data is None:
            return None
        try:
            return decode(data, kind)
        except ProtocolError as exc:
            log.warning("redis transport %s: skipping an unreadable %s of run %r: %s", self.url, kind.kind, run, exc)
            return None


__all__ = ["RedisTransport"]
