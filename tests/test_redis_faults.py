"""Faults against real, private redis-server processes: SIGKILL and restart, writes and watches while the
server is down, concurrent writers, wrong credentials."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from weavelet_core import AsyncWeaver, Revision, Weaver, open_transport
from weavelet_core.errors import AuthenticationFailed, TransportUnavailable
from weavelet_core.testing.redis import RedisServer
from weavelet_core.transport import Transport

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RedisServerFactory = Callable[..., RedisServer]
DELIVERY_DEADLINE = 3.0
"""A revision written after the server is back must reach a live watcher within this many seconds."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _run() -> str:
    return f"fault-{uuid.uuid4().hex[:10]}"


class Collector:
    """Consumes a watch in the background and records what arrived, and when."""

    def __init__(self, transport: Transport, run: str) -> None:
        self.transport = transport
        self.run = run
        self.revisions: list[Revision] = []
        self.arrived: list[float] = []
        self._changed = anyio.Event()

    async def consume(self) -> None:
        watcher: AsyncIterator[Revision] = self.transport.watch(self.run)
        async for revision in watcher:
            self.revisions.append(revision)
            self.arrived.append(time.monotonic())
            self._changed.set()
            self._changed = anyio.Event()

    @property
    def numbers(self) -> list[int]:
        return [r.revision for r in self.revisions]

    async def until(self, number: int, timeout: float) -> float:
        """Wait until revision ``number`` has arrived; return when it did (monotonic seconds)."""
        with anyio.fail_after(timeout):
            while number not in self.numbers:
                await self._changed.wait()
        return self.arrived[self.numbers.index(number)]


async def _kill_restart_write(server: RedisServer, url: str, *, persistent: bool) -> None:
    run = _run()
    async with open_transport(url) as watching, AsyncWeaver(url) as weaver:
        collector = Collector(watching, run)
        await weaver.set(run, {"lr": 0.1})
        async with anyio.create_task_group() as tg:
            tg.start_soon(collector.consume)
            await collector.until(1, timeout=5)
            for lr in (0.2, 0.3):
                await weaver.set(run, {"lr": lr})
            await collector.until(3, timeout=5)

            server.kill()
            await anyio.sleep(0.3)  # the watcher notices and starts reconnecting
            server.start()

            before = await weaver.get(run)
            if persistent:
                # appendfsync always: every acknowledged write survived the SIGKILL.
                assert before is not None
                assert (before.revision, before.config) == (3, {"lr": 0.3})
            else:
                # No persistence: the restarted server is empty. Numbering starts again at 1, and a watcher
                # never delivers a number it already delivered: revisions 1-3 are not passed on again.
                assert before is None
                for lr in (1.1, 1.2, 1.3):
                    await weaver.set(run, {"lr": lr})
            written = await weaver.set(run, {"lr": 0.4})
            assert written.revision == 4
            written_at = time.monotonic()
            arrived_at = await collector.until(4, timeout=10)
            tg.cancel_scope.cancel()

    assert arrived_at - written_at < DELIVERY_DEADLINE
    assert collector.numbers == [1, 2, 3, 4]
    assert collector.revisions[-1].config["lr"] == 0.4
    assert len({r.id for r in collector.revisions}) == 4


async def test_sigkill_and_restart_with_persistence(redis_server_factory: RedisServerFactory) -> None:
    server = redis_server_factory(persistent=True)
    await _kill_restart_write(server, server.url, persistent=True)


async def test_sigkill_and_restart_without_persistence(
    redis_server_factory: RedisServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory()
    await _kill_restart_write(server, server.url, persistent=False)
    assert "skipping revision 1, not newer than revision 3 already delivered" in caplog.text


async def test_write_while_down_fails_fast_with_a_clear_error(redis_server_factory: RedisServerFactory) -> None:
    server = redis_server_factory()
    run = _run()
    async with open_transport(server.url) as t:
        await t.put(Revision(run=run, revision=1, config={}))
        server.kill()
        started = time.monotonic()
        with pytest.raises(TransportUnavailable) as info:
            await t.put(Revision(run=run, revision=2, config={}))
        assert time.monotonic() - started < 1.0
    message = str(info.value)
    assert f"cannot write run {run!r}: redis at {server.url} is unreachable" in message
    assert "connection refused" in message
    assert "check that redis-server is running" in message
    assert "\n" not in message


async def test_weaver_gives_up_after_its_deadline_while_down(redis_server_factory: RedisServerFactory) -> None:
    server = redis_server_factory()
    async with AsyncWeaver(server.url, write_timeout=1.0) as weaver:
        server.kill()
        started = time.monotonic()
        with pytest.raises(TransportUnavailable, match=r"within 1s: cannot (read|write) run .* is unreachable"):
            await weaver.set(_run(), {"lr": 0.1})
        assert 0.4 < time.monotonic() - started < 3.0  # it stops retrying when the next try would be late


def test_weaver_retries_until_the_server_is_back(redis_server_factory: RedisServerFactory) -> None:
    server = redis_server_factory()
    run = _run()
    with Weaver(server.url, write_timeout=10.0) as weaver:
        weaver.set(run, {"lr": 0.1})
        server.kill()
        restarter = threading.Timer(1.0, server.start)
        restarter.start()
        started = time.monotonic()
        written = weaver.set(run, {"lr": 0.2})
        elapsed = time.monotonic() - started
        restarter.join()
        # The data was not persisted, so this is the first revision of the restarted server.
        assert written.revision == 1
        assert weaver.get(run) == written
    assert 0.9 < elapsed < 10.0


async def test_watcher_started_while_down_delivers_once_up(redis_server_factory: RedisServerFactory) -> None:
    server = redis_server_factory()
    server.stop()
    run = _run()
    t = open_transport(server.url, connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(TransportUnavailable, match="unreachable"):
        await t.connect()
    assert time.monotonic() - started < 2.0
    try:
        collector = Collector(t, run)
        async with anyio.create_task_group() as tg:
            tg.start_soon(collector.consume)
            await anyio.sleep(0.5)
            server.start()
            async with open_transport(server.url) as writer:
                await writer.put(Revision(run=run, revision=1, config={"lr": 0.5}))
                written_at = time.monotonic()
            arrived_at = await collector.until(1, timeout=10)
            tg.cancel_scope.cancel()
    finally:
        await t.aclose()
    assert arrived_at - written_at < DELIVERY_DEADLINE
    assert collector.numbers == [1]


def test_two_weavers_write_concurrently_without_losing_a_write(redis_url: str) -> None:
    run = _run()
    writes = 100
    errors: list[BaseException] = []

    def write_all(writer: int) -> None:
        try:
            with Weaver(redis_url, write_timeout=30.0) as weaver:
                for seq in range(writes):
                    weaver.set(run, {"writer": writer, "seq": seq})
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write_all, args=(writer,)) for writer in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    with Weaver(redis_url) as weaver:
        history = weaver.history(run)
    assert [r.revision for r in history] == list(range(1, 2 * writes + 1))
    landed = {(r.config["writer"], r.config["seq"]) for r in history}
    assert landed == {(writer, seq) for writer in (0, 1) for seq in range(writes)}
    for writer in (0, 1):
        own = [r.config["seq"] for r in history if r.config["writer"] == writer]
        assert own == list(range(writes))


@pytest.mark.parametrize("credentials", ["wrong-password", None], ids=["wrong-password", "no-password"])
async def test_bad_credentials_are_a_one_line_authentication_error(
    redis_server_factory: RedisServerFactory, credentials: str | None
) -> None:
    server = redis_server_factory(password="right-password")
    url = server.url_with(credentials)
    t = open_transport(url, connect_timeout=3)
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed) as info:
        await t.connect()
    assert time.monotonic() - started < 3.0
    await t.aclose()
    message = str(info.value)
    assert message.startswith(f"redis at {server.url_with('***' if credentials else None)}: authentication failed (")
    assert "check the user name and password in the URL" in message
    assert "\n" not in message
    assert "right-password" not in message
    assert "wrong-password" not in message
    # The Weaver does not retry a refused password until its deadline: it is final.
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed):
        async with AsyncWeaver(url, write_timeout=30.0) as weaver:
            await weaver.set(_run(), {"lr": 0.1})
    assert time.monotonic() - started < 3.0
    async with AsyncWeaver(server.url) as weaver:
        assert (await weaver.set(_run(), {"lr": 0.1})).revision == 1
