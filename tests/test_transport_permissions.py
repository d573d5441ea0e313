"""Credentials that connect but lack a permission fail at once with ``PermissionDenied`` (final), naming what is
missing, against real servers with real per-user permissions: nats-server ``authorization`` users and Redis ACLs.

Before, a NATS publish the server refused waited for its request timeout and was retried as an outage for ever,
and Redis ``NOPERM`` was reported as ``AuthenticationFailed``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
import redis.asyncio as aioredis

from weavelet_core import open_transport
from weavelet_core.errors import AuthenticationFailed, PermissionDenied
from weavelet_core.protocol import Outcome, Revision, Status
from weavelet_core.transport import Transport
from weavelet_nats.testing import NatsServer, NatsServerFactory
from weavelet_redis.testing import RedisServer

pytestmark = pytest.mark.anyio

PROMPT = 3.0
"""A refused operation fails within this many seconds (the request timeout is 5 s)."""

NATS_USERS = """
authorization {
  users = [
    {user: admin, password: admin-pw}
    {user: reader, password: reader-pw, permissions: {
      publish: {allow: ["$JS.API.>"]}
      subscribe: {allow: ["_INBOX.>"]}
    }}
    {user: lister, password: lister-pw, permissions: {
      publish: {allow: ["$JS.API.INFO", "$JS.API.STREAM.INFO.>", "$JS.API.DIRECT.GET.>"]}
      subscribe: {allow: ["_INBOX.>"]}
    }}
    {user: noreplies, password: noreplies-pw, permissions: {
      publish: {allow: ["$JS.API.>", "$KV.>"]}
      subscribe: {deny: [">"]}
    }}
  ]
}
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def nats_with_users(weavelet_nats_server_factory: NatsServerFactory) -> NatsServer:
    return weavelet_nats_server_factory(config=NATS_USERS)


@contextlib.asynccontextmanager
async def _open(url: str) -> AsyncIterator[Transport]:
    transport = open_transport(url)
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.aclose()


async def test_nats_user_without_publish_permission_is_refused_at_once(nats_with_users: NatsServer) -> None:
    run = f"Perm-{uuid.uuid4().hex[:6]}"
    address = nats_with_users.address
    async with _open(f"nats://admin:admin-pw@{address}") as admin:
        await admin.put(Revision(run=run, revision=1, config={"lr": 1}))
        async with _open(f"nats://reader:reader-pw@{address}") as reader:
            # Reading and watching need no publish permission on the buckets.
            latest = await reader.latest(run)
            assert latest is not None
            watcher = reader.watch(run)
            with anyio.fail_after(5):
                assert (await watcher.__anext__()).revision == 1
            await watcher.aclose()  # type: ignore[attr-defined]
            writes = {
                "put": (reader.put(Revision(run=run, revision=2, config={"lr": 2})), f"$KV.weavelet-desired.{run}"),
                "publish_status": (reader.publish_status(Status(run=run)), f"$KV.weavelet-status.{run}"),
                "publish_outcome": (
                    reader.publish_outcome(Outcome(run=run, revision=1, result="applied", incarnation="i1")),
                    f"$KV.weavelet-outcomes.{run}.1.i1",
                ),
            }
            for name, (call, subject) in writes.items():
                started = time.monotonic()
                with pytest.raises(PermissionDenied) as info:
                    await call
                assert time.monotonic() - started < PROMPT, name
                message = str(info.value)
                assert f"may not publish to {subject!r}" in message, message
                assert "authorization" in message
                assert "\n" not in message
        latest = await admin.latest(run)
        assert latest is not None
        assert latest.revision == 1, "nothing was written"


async def test_nats_user_who_may_not_read_whole_buckets_still_lists_runs(nats_with_users: NatsServer) -> None:
    """Without permission to create a consumer over a whole bucket, listings and batched reads go key by key."""
    address = nats_with_users.address
    runs = [f"list-{index:02d}" for index in range(40)]
    async with _open(f"nats://admin:admin-pw@{address}") as admin:
        for index, run in enumerate(runs):
            if index % 4:
                await admin.put(Revision(run=run, revision=1, config={"i": index}))
            if index % 3:
                await admin.publish_status(Status(run=run, state="running", step=index))
        listed = [run for index, run in enumerate(runs) if index % 4 or index % 3]
        async with _open(f"nats://lister:lister-pw@{address}") as lister:
            started = time.monotonic()
            assert await lister.runs() == listed
            latests = await lister.latests(runs)
            statuses = await lister.statuses(runs)
            assert time.monotonic() - started < PROMPT
            for run in runs:
                assert latests[run] == await admin.latest(run)
                assert statuses[run] == await admin.status(run)


async def test_nats_user_without_subscribe_permission_is_refused_at_connect(nats_with_users: NatsServer) -> None:
    transport = open_transport(f"nats://noreplies:noreplies-pw@{nats_with_users.address}")
    started = time.monotonic()
    with pytest.raises(PermissionDenied) as info:
        await transport.connect()
    assert time.monotonic() - started < PROMPT
    assert "may not subscribe to '_INBOX.>'" in str(info.value)
    await transport.aclose()


async def test_nats_wrong_password_is_still_an_authentication_failure(nats_with_users: NatsServer) -> None:
    transport = open_transport(f"nats://reader:wrong@{nats_with_users.address}?connect_timeout=3")
    with pytest.raises(AuthenticationFailed):
        await transport.connect()
    await transport.aclose()


@pytest.fixture
async def redis_with_users(weavelet_redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    server = weavelet_redis_server_factory()
    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pw", "~*", "+@read", "+@connection")
        await admin.execute_command("ACL", "SETUSER", "elsewhere", "on", ">elsewhere-pw", "~other:*", "+@all")
    finally:
        await admin.aclose()
    return server


@pytest.mark.parametrize(
    ("user", "allowed_reads"),
    [("reader", True), ("elsewhere", False)],
    ids=["read-only-commands", "other-keys-only"],
)
async def test_redis_noperm_is_permission_denied(redis_with_users: RedisServer, user: str, allowed_reads: bool) -> None:
    run = f"perm-{uuid.uuid4().hex[:6]}"
    async with _open(redis_with_users.url) as admin:
        await admin.put(Revision(run=run, revision=1, config={"lr": 1}))
        async with _open(redis_with_users.url_with(f"{user}-pw", user=user)) as limited:
            if allowed_reads:
                latest = await limited.latest(run)
                assert latest is not None
            calls = {
                "put": limited.put(Revision(run=run, revision=2, config={"lr": 2})),
                "publish_status": limited.publish_status(Status(run=run)),
                "publish_outcome": limited.publish_outcome(Outcome(run=run, revision=1, result="applied")),
            }
            if not allowed_reads:
                calls["latest"] = limited.latest(run)
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(PermissionDenied) as info:
                    await call
                assert time.monotonic() - started < PROMPT, name
                message = str(info.value)
                assert "permission denied" in message
                assert "ACL SETUSER" in message
                assert "~weavelet:*" in message
                assert "-pw" not in message
        latest = await admin.latest(run)
        assert latest is not None
        assert latest.revision == 1


async def test_redis_wrong_password_is_still_an_authentication_failure(redis_with_users: RedisServer) -> None:
    transport = open_transport(redis_with_users.url_with("wrong", user="reader"), connect_timeout=3)
    with pytest.raises(AuthenticationFailed):
        await transport.connect()
    await transport.aclose()


async def test_redis_trainer_whose_acl_predates_the_outcome_stream_still_stores_outcomes(
    weavelet_redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL written before the outcome stream existed: outcomes are stored all the same (the notice is left out,
    said once), and a waiting weaver still sees them, by re-reading when its blocking read finds nothing."""
    server = weavelet_redis_server_factory()
    run = f"perm-{uuid.uuid4().hex[:6]}"
    keys = [f"~weavelet:run:{{{run}}}{suffix}" for suffix in ("", ":status", ":outcomes", ":outcomes:index")]
    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "old-trainer", "on", ">old-pw", "resetkeys", "-@all", "+@connection", "+evalsha",
            "+script|load", "+hget", "+hset", "+hdel", "+zadd", "+zcard", "+zrange", "+zrem", *keys,
        )  # fmt: skip
    finally:
        await admin.aclose()
    async with _open(f"{server.url}?block=0.3") as weaver, _open(server.url_with("old-pw", user="old-trainer")) as old:
        watcher = weaver.watch_outcome(run, 1)
        try:
            async with anyio.create_task_group() as tg:

                async def publish_later() -> None:
                    await anyio.sleep(0.2)
                    with caplog.at_level(logging.WARNING, logger="weavelet_redis"):
                        for step in (1, 2):
                            await old.publish_outcome(Outcome(run=run, revision=1, result="applied", step=step))

                tg.start_soon(publish_later)
                with anyio.fail_after(PROMPT):
                    first = await watcher.__anext__()
                assert first.revision == 1
            assert (await weaver.outcome(run, 1)).step == 2  # type: ignore[union-attr]
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]
    warnings = [r.getMessage() for r in caplog.records if "outcomes:stream" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "ACL SETUSER <user> ~weavelet:run:{" in warnings[0]


async def test_nats_outcome_waits_of_a_user_who_may_not_subscribe_to_outcomes_use_a_watch(
    nats_with_users: NatsServer,
) -> None:
    """A plain subscription to the outcome's subject is refused (the server says so asynchronously): the wait goes
    on with a key-value watch and sees the outcome; a read in flight meanwhile is not taken for the refused call."""
    run = f"Perm-{uuid.uuid4().hex[:6]}"
    address = nats_with_users.address
    async with _open(f"nats://admin:admin-pw@{address}") as admin:
        await admin.put(Revision(run=run, revision=1, config={"lr": 1}))
        async with _open(f"nats://reader:reader-pw@{address}") as reader:
            for revision in (1, 2):
                answer = Outcome(run=run, revision=revision, result="applied", step=revision, incarnation="i1")
                watcher = reader.watch_outcome(run, revision)
                got: list[Outcome] = []
                try:
                    async with anyio.create_task_group() as tg:

                        async def wait(iterator: AsyncIterator[Outcome] = watcher, into: list[Outcome] = got) -> None:
                            with anyio.fail_after(10):
                                into.append(await iterator.__anext__())

                        tg.start_soon(wait)
                        await anyio.sleep(0.001)  # the wait subscribes; the refusal comes back while these reads run
                        for _ in range(5):
                            assert await reader.outcome(run, revision) is None
                        await admin.publish_outcome(answer)
                finally:
                    await watcher.aclose()  # type: ignore[attr-defined]
                assert got == [answer]
