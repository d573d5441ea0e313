"""The NATS transport under faults, against real nats-server processes: crashes, outages, races, bad credentials.

Each outage test starts its own server (``nats_server_factory``) and kills, stops and restarts it on the same
port with the same JetStream store.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from weavelet_core import AsyncWeaver, open_transport
from weavelet_core.errors import AuthenticationFailed, TransportUnavailable
from weavelet_core.protocol import Outcome, Revision, Status
from weavelet_core.testing.nats import NatsServer, NatsServerFactory
from weavelet_core.transport import Transport

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def run() -> str:
    return f"fault-{uuid.uuid4().hex[:10]}"


async def _connected(url: str, **options: object) -> Transport:
    transport = open_transport(url, **options)
    await transport.connect()
    return transport


class Consumer:
    """Consumes a watch in the background and records every revision it yields."""

    def __init__(self) -> None:
        self.seen: list[Revision] = []
        self.times: list[float] = []
        self._arrived = anyio.Event()

    async def consume(self, iterator: AsyncIterator[Revision]) -> None:
        async for revision in iterator:
            self.seen.append(revision)
            self.times.append(time.monotonic())
            self._arrived.set()
            self._arrived = anyio.Event()

    async def wait_for(self, number: int, timeout: float) -> float:
        """Wait until revision ``number`` was yielded; return when (``time.monotonic()``)."""
        with anyio.fail_after(timeout):
            while True:
                for revision, at in zip(self.seen, self.times, strict=True):
                    if revision.revision == number:
                        return at
                await self._arrived.wait()

    @property
    def numbers(self) -> list[int]:
        return [r.revision for r in self.seen]


# -- crash and restart -------------------------------------------------------------------------------------
@pytest.mark.slow
async def test_sigkill_and_restart_with_a_live_watcher(nats_server_factory: NatsServerFactory, run: str) -> None:
    server = nats_server_factory()
    watching = await _connected(server.url)
    writer = AsyncWeaver(server.url, write_timeout=20)
    consumer = Consumer()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.consume, watching.watch(run))
            await writer.set(run, {"lr": 0.1})
            await writer.set(run, {"lr": 0.2})
            await consumer.wait_for(2, timeout=10)
            await watching.publish_status(Status(run=run, state="running", step=7, applied_revision=2))
            await watching.publish_outcome(Outcome(run=run, revision=2, result="applied", step=7))

            server.kill()
            server.start()

            # Desired config, status and outcome survived the crash (file storage), for a client that connects now.
            fresh = await _connected(server.url)
            try:
                stored = await fresh.latest(run)
                status = await fresh.status(run)
                outcome = await fresh.outcome(run, 2)
            finally:
                await fresh.aclose()
            assert stored is not None
            assert (stored.revision, stored.config) == (2, {"lr": 0.2})
            assert status is not None
            assert (status.state, status.step) == ("running", 7)
            assert outcome is not None
            assert outcome.result == "applied"

            written = await writer.set(run, {"lr": 0.3})
            written_at = time.monotonic()
            assert written.revision == 3
            arrived_at = await consumer.wait_for(3, timeout=10)
            assert arrived_at - written_at < 3.0, f"revision 3 reached the watcher {arrived_at - written_at:.2f}s late"

            await writer.set(run, {"lr": 0.4})
            await consumer.wait_for(4, timeout=10)
            await anyio.sleep(0.5)  # room for a duplicate to show up
            tg.cancel_scope.cancel()
    finally:
        await writer.aclose()
        await watching.aclose()
    assert consumer.numbers == [1, 2, 3, 4] or consumer.numbers == [2, 3, 4]
    assert [r.config["lr"] for r in consumer.seen][-3:] == [0.2, 0.3, 0.4]


# -- writes and watches while the server is down -----------------------------------------------------------
@pytest.mark.slow
async def test_write_while_down_fails_fast_and_the_weaver_retries_until_it_is_back(
    nats_server_factory: NatsServerFactory, run: str
) -> None:
    server = nats_server_factory()
    transport = await _connected(server.url)
    try:
        await transport.put(Revision(run=run, revision=1, config={"lr": 1}))
        server.kill()
        started = time.monotonic()
        with pytest.raises(TransportUnavailable) as info:
            await transport.put(Revision(run=run, revision=2, config={"lr": 2}))
        assert time.monotonic() - started < 1.0
        message = str(info.value)
        assert "unreachable" in message or "connection lost" in message
        assert server.url in message
        assert "\n" not in message
        with pytest.raises(TransportUnavailable):
            await transport.latest(run)

        weaver = AsyncWeaver(transport=transport, write_timeout=20)
        async with anyio.create_task_group() as tg:

            async def restart_later() -> None:
                await anyio.sleep(1.0)
                await anyio.to_thread.run_sync(server.start)

            tg.start_soon(restart_later)
            started = time.monotonic()
            revision = await weaver.set(run, {"lr": 2})
            elapsed = time.monotonic() - started
        assert revision.revision == 2
        assert 1.0 <= elapsed < 20
        latest = await transport.latest(run)
        assert latest == revision
    finally:
        await transport.aclose()


@pytest.mark.slow
async def test_weaver_gives_up_at_its_deadline_with_a_clear_error(
    nats_server_factory: NatsServerFactory, run: str
) -> None:
    server = nats_server_factory()
    weaver = AsyncWeaver(server.url, write_timeout=1.0)
    try:
        await weaver.set(run, {"lr": 1})
        server.stop()
        started = time.monotonic()
        with pytest.raises(TransportUnavailable) as info:
            await weaver.set(run, {"lr": 2})
        assert time.monotonic() - started < 3.0
        assert "within 1s" in str(info.value)
        assert "unreachable" in str(info.value)
    finally:
        await weaver.aclose()


@pytest.mark.slow
async def test_watch_started_while_the_server_is_down_delivers_once_it_is_up(
    nats_server_factory: NatsServerFactory, run: str
) -> None:
    server = nats_server_factory()
    watching = await _connected(server.url)
    writer = await _connected(server.url)
    consumer = Consumer()
    try:
        await writer.put(Revision(run=run, revision=1, config={"lr": 1}))
        server.stop()
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.consume, watching.watch(run))
            await anyio.sleep(0.5)
            assert consumer.seen == []
            await anyio.to_thread.run_sync(server.start)
            await consumer.wait_for(1, timeout=10)
            with anyio.fail_after(10):
                while True:
                    try:
                        await writer.put(Revision(run=run, revision=2, config={"lr": 2}))
                        break
                    except TransportUnavailable:
                        await anyio.sleep(0.05)
            await consumer.wait_for(2, timeout=10)
            tg.cancel_scope.cancel()
    finally:
        await watching.aclose()
        await writer.aclose()
    assert consumer.numbers == [1, 2]


@pytest.mark.slow
async def test_aclose_ends_a_watch_waiting_for_the_server(nats_server_factory: NatsServerFactory, run: str) -> None:
    server = nats_server_factory()
    transport = await _connected(server.url)
    server.kill()
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


# -- racing writers ----------------------------------------------------------------------------------------
@pytest.mark.slow
async def test_two_weavers_writing_100_times_each_lose_nothing(nats_server: NatsServer, run: str) -> None:
    writes = 100
    watching = await _connected(nats_server.url)
    consumer = Consumer()
    weavers = [AsyncWeaver(nats_server.url, author=name, write_timeout=60) for name in ("a", "b")]
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
        history = await watching.history(run)
    finally:
        for weaver in weavers:
            await weaver.aclose()
        await watching.aclose()

    numbers = sorted(r.revision for rs in results.values() for r in rs)
    assert numbers == list(range(1, 2 * writes + 1)), "every write is its own revision"
    for name, revisions in results.items():
        assert [r.revision for r in revisions] == sorted(r.revision for r in revisions)
        assert [r.config for r in revisions] == [{"writer": name, "i": i} for i in range(writes)]
    assert consumer.numbers == list(range(1, 2 * writes + 1)), "the watcher saw each once, in order"
    landed = {(r.config["writer"], r.config["i"]) for r in consumer.seen}
    assert landed == {(name, i) for name in ("a", "b") for i in range(writes)}, "no write lost"
    assert [r.revision for r in history] == list(range(2 * writes - 63, 2 * writes + 1))


# -- credentials and TLS -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("server_auth", "url_auth"),
    [
        ({"user": "alice", "password": "right-pw"}, "alice:wrong-pw@"),
        ({"user": "alice", "password": "right-pw"}, ""),
        ({"token": "right-token"}, "wrong-token@"),
    ],
    ids=["wrong-password", "no-credentials", "wrong-token"],
)
async def test_bad_credentials_fail_with_one_line_within_the_deadline(
    nats_server_factory: NatsServerFactory, server_auth: dict[str, str], url_auth: str
) -> None:
    server = nats_server_factory(**server_auth)
    transport = open_transport(f"nats://{url_auth}{server.address}?connect_timeout=3")
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed) as info:
        await transport.connect()
    assert time.monotonic() - started < 3.0
    message = str(info.value)
    assert "authentication failed" in message
    assert "\n" not in message
    assert "wrong-pw" not in message
    assert "wrong-token" not in message
    await transport.aclose()


@pytest.mark.parametrize("auth", [{"user": "alice", "password": "p@ss:w/rd"}, {"token": "s3cr3t-token"}])
async def test_right_credentials_connect(nats_server_factory: NatsServerFactory, auth: dict[str, str]) -> None:
    server = nats_server_factory(**auth)
    if "token" in auth:
        url = f"nats://{auth['token']}@{server.address}"
    else:
        url = f"nats://{auth['user']}:p%40ss%3Aw%2Frd@{server.address}"
    transport = await _connected(url)
    try:
        await transport.put(Revision(run="r", revision=1, config={"ok": True}))
        latest = await transport.latest("r")
        assert latest is not None
        assert latest.config == {"ok": True}
    finally:
        await transport.aclose()


async def test_refused_connection_names_the_cause_within_the_deadline(
    nats_server_factory: NatsServerFactory,
) -> None:
    server = nats_server_factory()
    server.stop()
    transport = open_transport(f"{server.url}?connect_timeout=1")
    started = time.monotonic()
    with pytest.raises(TransportUnavailable) as info:
        await transport.connect()
    assert time.monotonic() - started < 2.5
    assert "connection refused" in str(info.value)
    assert "weavelet server" in str(info.value)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key, made with openssl."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


async def test_tls_with_the_ca_connects_and_without_it_names_tls(
    nats_server_factory: NatsServerFactory, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    server = nats_server_factory(tls_cert=cert, tls_key=key)
    assert server.url.startswith("tls://")
    transport = await _connected(f"{server.url}?tls_ca={cert}")
    try:
        await transport.put(Revision(run="r", revision=1, config={"tls": True}))
        assert (await transport.latest("r")) is not None
    finally:
        await transport.aclose()

    for url in (f"{server.url}?connect_timeout=3", f"nats://{server.address}?connect_timeout=3"):
        untrusted = open_transport(url)
        started = time.monotonic()
        with pytest.raises(TransportUnavailable) as info:
            await untrusted.connect()
        assert time.monotonic() - started < 3.5
        assert "TLS" in str(info.value)
        assert "tls_ca" in str(info.value)
        await untrusted.aclose()
