"""The fault-conformance suite: how a transport with a server behaves when the server crashes, stops or hangs.

Any transport whose server a test can kill passes it. Subclass :class:`TransportFaultConformance` in a test module
and provide a ``fault_server`` fixture: a private, started server whose acknowledged writes survive SIGKILL
(file storage, an fsynced append-only file...), with the :class:`FaultServer` methods (every
:class:`~weavelet_core.testing.servers.ManagedServer` has them)::

    import pytest
    from weavelet_core.testing import TransportFaultConformance

    class TestKafkaFaults(TransportFaultConformance):
        @pytest.fixture
        def fault_server(self, my_kafka_factory):
            return my_kafka_factory(durable=True)

Optional overrides: :meth:`TransportFaultConformance.url_of` (the URL of the server, default its ``url``) and
the ``credential_urls`` fixture (a URL with the right credentials and one with wrong ones; without it the
credentials test is skipped with a reason that says so).

Every wait in the suite is bounded; every test stops what it started on every exit path (the fixture owns the
server). Tests use anyio's pytest plugin on the asyncio backend. The suite is modelled on FastStream's
``tests/brokers/base/``: one class of behaviours, one subclass per broker.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import anyio
import pytest

from weavelet_core.errors import AuthenticationFailed, TransportUnavailable
from weavelet_core.plugins import open_transport
from weavelet_core.protocol import Outcome, Revision, Status
from weavelet_core.transport import Entry, Transport
from weavelet_core.weaver import AsyncWeaver

DELIVERY_DEADLINE = 3.0
"""A revision written after the server is back reaches a live watcher within this many seconds."""
FAST_FAILURE = 1.0
"""A call against a server that is down fails within this many seconds."""


class FaultServer(Protocol):
    """What the suite does to a server: every :class:`~weavelet_core.testing.servers.ManagedServer` has it."""

    @property
    def url(self) -> str: ...

    @property
    def address(self) -> str: ...

    def kill(self) -> None: ...

    def stop(self, timeout: float = ...) -> None: ...

    def start(self, timeout: float = ...) -> object: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Consumer:
    """Consumes a watch in the background and records every entry it yields, and when."""

    def __init__(self) -> None:
        self.seen: list[Entry] = []
        self.times: list[float] = []
        self._arrived = anyio.Event()

    async def consume(self, iterator: AsyncIterator[Entry]) -> None:
        async for entry in iterator:
            self.seen.append(entry)
            self.times.append(time.monotonic())
            self._arrived.set()
            self._arrived = anyio.Event()

    async def wait_for(self, number: int, timeout: float) -> float:
        """Wait until revision ``number`` was yielded; return when (``time.monotonic()``)."""
        with anyio.fail_after(timeout):
            while True:
                for entry, at in zip(self.seen, self.times, strict=True):
                    if entry.revision == number:
                        return at
                await self._arrived.wait()

    @property
    def numbers(self) -> list[int]:
        return [entry.revision for entry in self.seen]


async def _connected(url: str) -> Transport:
    transport = open_transport(url)
    await transport.connect()
    return transport


class TransportFaultConformance:
    """Subclass and provide a ``fault_server`` fixture to run the suite (see the module docstring)."""

    #: Writes by each of the two racing weavers.
    racing_writes = 100

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def fault_server(self) -> FaultServer:
        raise NotImplementedError("subclass TransportFaultConformance and define a fault_server fixture")

    @pytest.fixture
    def credential_urls(self) -> tuple[str, str]:
        """``(right, wrong)``: URLs of a server that requires credentials, with the right ones and with the
        password ``wrong-secret`` (the test checks that it never appears in a message)."""
        pytest.skip(
            f"{type(self).__name__} defines no credential_urls fixture (a URL with the right credentials and one "
            "with wrong ones), so the credentials test cannot run; define it to run it"
        )

    def url_of(self, server: FaultServer) -> str:
        """The URL clients use for ``server``; override to add options."""
        return server.url

    @pytest.fixture
    def run(self) -> str:
        return f"fault-{uuid.uuid4().hex[:10]}"

    # -- crash and restart ---------------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_sigkill_and_restart_keeps_acknowledged_writes_and_the_watch_goes_on(
        self, fault_server: FaultServer, run: str
    ) -> None:
        url = self.url_of(fault_server)
        watching = await _connected(url)
        writer = AsyncWeaver(url, write_timeout=20)
        consumer = Consumer()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer.consume, watching.watch(run))
                await writer.set(run, {"lr": 0.1})
                await writer.set(run, {"lr": 0.2})
                await consumer.wait_for(2, timeout=10)
                await watching.publish_status(Status(run=run, state="running", step=7, applied_revision=2))
                await watching.publish_outcome(Outcome(run=run, revision=2, result="applied", step=7))

                fault_server.kill()
                await anyio.sleep(0.3)  # the watcher notices and starts reconnecting
                await anyio.to_thread.run_sync(fault_server.start)

                fresh = await _connected(url)
                try:
                    stored = await fresh.latest(run)
                    status = await fresh.status(run)
                    outcome = await fresh.outcome(run, 2)
                finally:
                    await fresh.aclose()
                assert stored is not None, "an acknowledged revision was lost in the crash"
                assert (stored.revision, stored.config) == (2, {"lr": 0.2})
                assert status is not None
                assert (status.state, status.step) == ("running", 7)
                assert outcome is not None
                assert outcome.result == "applied"

                written = await writer.set(run, {"lr": 0.3})
                written_at = time.monotonic()
                assert written.revision == 3
                arrived_at = await consumer.wait_for(3, timeout=10)
                assert arrived_at - written_at < DELIVERY_DEADLINE, (
                    f"revision 3 arrived {arrived_at - written_at:.2f}s late"
                )
                await writer.set(run, {"lr": 0.4})
                await consumer.wait_for(4, timeout=10)
                await anyio.sleep(0.3)  # room for a duplicate to show up
                tg.cancel_scope.cancel()
        finally:
            await writer.aclose()
            await watching.aclose()
        assert consumer.numbers == [1, 2, 3, 4]
        assert [e.config["lr"] for e in consumer.seen if isinstance(e, Revision)] == [0.1, 0.2, 0.3, 0.4]

    @pytest.mark.anyio
    async def test_a_wait_for_an_outcome_rides_out_a_server_restart(self, fault_server: FaultServer, run: str) -> None:
        url = self.url_of(fault_server)
        async with AsyncWeaver(url, write_timeout=20) as weaver:
            written = await weaver.set(run, {"lr": 0.1})
            answer = Outcome(run=run, revision=written.revision, revision_id=written.id, result="applied", step=3)
            got: list[Outcome] = []
            async with anyio.create_task_group() as tg:

                async def wait() -> None:
                    got.append(await weaver.wait(run, written.revision, timeout=30, revision_id=written.id))

                tg.start_soon(wait)
                await anyio.sleep(0.3)  # the wait watches the outcome
                fault_server.kill()
                await anyio.sleep(0.3)
                await anyio.to_thread.run_sync(fault_server.start)
                answering = await _connected(url)
                try:
                    await answering.publish_outcome(answer)
                    published = time.monotonic()
                finally:
                    await answering.aclose()
                with anyio.fail_after(10):
                    while not got:
                        await anyio.sleep(0.01)
                late = time.monotonic() - published
                assert late < DELIVERY_DEADLINE, f"the outcome reached the waiting weaver {late:.2f}s late"
        assert got == [answer]

    # -- while the server is down --------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_calls_while_down_fail_fast_with_one_line_naming_the_server(
        self, fault_server: FaultServer, run: str
    ) -> None:
        transport = await _connected(self.url_of(fault_server))
        try:
            await transport.put(Revision(run=run, revision=1, config={"lr": 1}))
            fault_server.kill()
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "put": lambda: transport.put(Revision(run=run, revision=2, config={"lr": 2})),
                "latest": lambda: transport.latest(run),
                "publish_status": lambda: transport.publish_status(Status(run=run)),
            }
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(TransportUnavailable) as info:
                    await call()
                assert time.monotonic() - started < FAST_FAILURE, name
                message = str(info.value)
                assert fault_server.address in message, message
                assert "\n" not in message
        finally:
            await transport.aclose()

    @pytest.mark.anyio
    async def test_weaver_retries_until_the_server_is_back(self, fault_server: FaultServer, run: str) -> None:
        url = self.url_of(fault_server)
        async with AsyncWeaver(url, write_timeout=20) as weaver:
            await weaver.set(run, {"lr": 1})
            fault_server.kill()
            async with anyio.create_task_group() as tg:

                async def restart_later() -> None:
                    await anyio.sleep(1.0)
                    await anyio.to_thread.run_sync(fault_server.start)

                tg.start_soon(restart_later)
                started = time.monotonic()
                revision = await weaver.set(run, {"lr": 2})
                elapsed = time.monotonic() - started
            assert revision.revision == 2
            assert revision.config == {"lr": 2}
            assert 0.9 <= elapsed < 20
            assert await weaver.get(run) == revision

    @pytest.mark.anyio
    async def test_weaver_gives_up_at_its_deadline_with_a_clear_error(
        self, fault_server: FaultServer, run: str
    ) -> None:
        async with AsyncWeaver(self.url_of(fault_server), write_timeout=1.0) as weaver:
            await weaver.set(run, {"lr": 1})
            fault_server.stop()
            started = time.monotonic()
            with pytest.raises(TransportUnavailable) as info:
                await weaver.set(run, {"lr": 2})
            assert time.monotonic() - started < 3.0
            assert "within 1s" in str(info.value)

    @pytest.mark.anyio
    async def test_watch_started_while_down_delivers_once_up(self, fault_server: FaultServer, run: str) -> None:
        url = self.url_of(fault_server)
        watching = await _connected(url)
        consumer = Consumer()
        try:
            async with AsyncWeaver(url, write_timeout=20) as weaver:
                await weaver.set(run, {"lr": 1})
                fault_server.stop()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consumer.consume, watching.watch(run))
                    await anyio.sleep(0.5)
                    assert consumer.seen == []
                    await anyio.to_thread.run_sync(fault_server.start)
                    await consumer.wait_for(1, timeout=10)
                    await weaver.set(run, {"lr": 2})
                    written_at = time.monotonic()
                    arrived_at = await consumer.wait_for(2, timeout=10)
                    tg.cancel_scope.cancel()
        finally:
            await watching.aclose()
        assert consumer.numbers == [1, 2]
        assert arrived_at - written_at < DELIVERY_DEADLINE

    @pytest.mark.anyio
    async def test_aclose_ends_a_watch_waiting_for_the_server(self, fault_server: FaultServer, run: str) -> None:
        transport = await _connected(self.url_of(fault_server))
        fault_server.kill()
        ended = anyio.Event()

        async def consume() -> None:
            async for _ in transport.watch(run):
                pass
            ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.sleep(0.3)
            await transport.aclose()
            with anyio.fail_after(5):
                await ended.wait()

    # -- a hung server -------------------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_a_paused_server_bounds_calls_and_the_watch_recovers(
        self, fault_server: FaultServer, run: str
    ) -> None:
        url = self.url_of(fault_server)
        watching = await _connected(url)
        writer = await _connected(url)
        consumer = Consumer()
        try:
            await writer.put(Revision(run=run, revision=1, config={"lr": 1}))
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer.consume, watching.watch(run))
                await consumer.wait_for(1, timeout=10)
                fault_server.pause()
                try:
                    started = time.monotonic()
                    with pytest.raises(TimeoutError):
                        with anyio.fail_after(1.0):
                            await writer.latest(run)
                    assert time.monotonic() - started < 2.0, "a call to a hung server ignored its caller's deadline"
                finally:
                    fault_server.resume()
                async with AsyncWeaver(url, write_timeout=20) as weaver:
                    await weaver.set(run, {"lr": 2})
                await consumer.wait_for(2, timeout=15)
                tg.cancel_scope.cancel()
        finally:
            await watching.aclose()
            await writer.aclose()
        assert consumer.numbers == [1, 2]

    # -- racing writers ------------------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_two_racing_weavers_lose_nothing(self, fault_server: FaultServer, run: str) -> None:
        url = self.url_of(fault_server)
        writes = self.racing_writes
        watching = await _connected(url)
        consumer = Consumer()
        weavers = [AsyncWeaver(url, author=name, write_timeout=60) for name in ("a", "b")]
        results: dict[str, list[Revision]] = {"a": [], "b": []}
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer.consume, watching.watch(run))

                async def write(weaver: AsyncWeaver) -> None:
                    for i in range(writes):
                        results[weaver.author].append(await weaver.set(run, {"writer": weaver.author, "i": i}))

                async with anyio.create_task_group() as writers:
                    for weaver in weavers:
                        writers.start_soon(write, weaver)
                await consumer.wait_for(2 * writes, timeout=30)
                tg.cancel_scope.cancel()
        finally:
            for weaver in weavers:
                await weaver.aclose()
            await watching.aclose()
        numbers = sorted(r.revision for rs in results.values() for r in rs)
        assert numbers == list(range(1, 2 * writes + 1)), "every write is its own revision"
        for name, revisions in results.items():
            assert [r.config for r in revisions] == [{"writer": name, "i": i} for i in range(writes)]
        assert consumer.numbers == list(range(1, 2 * writes + 1)), "the watcher saw each once, in order"

    # -- credentials ---------------------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_wrong_credentials_are_final_and_one_line(self, credential_urls: tuple[str, str], run: str) -> None:
        right, wrong = credential_urls
        transport = open_transport(wrong, connect_timeout=3)
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed) as info:
            await transport.connect()
        await transport.aclose()
        assert time.monotonic() - started < 3.0
        message = str(info.value)
        assert "authentication failed" in message
        assert "\n" not in message
        assert "wrong-secret" not in message, "the password is never shown"
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed):
            async with AsyncWeaver(wrong, write_timeout=30) as weaver:
                await weaver.set(run, {"lr": 1})
        assert time.monotonic() - started < 5.0, "a refused password is final, not retried until the deadline"
        async with AsyncWeaver(right) as weaver:
            assert (await weaver.set(run, {"lr": 1})).revision == 1


__all__ = ["DELIVERY_DEADLINE", "Consumer", "FaultServer", "TransportFaultConformance"]
