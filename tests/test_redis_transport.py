"""The Redis transport against a real redis-server: the conformance suite, URLs, key layout, TLS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from weavelet_core import AsyncWeaver, Outcome, Revision, Status, open_transport
from weavelet_core.errors import AuthenticationFailed, CorruptEntry, RevisionConflict, TransportUnavailable
from weavelet_core.plugins import get_registry
from weavelet_core.protocol import encode
from weavelet_core.testing import TransportConformance
from weavelet_core.transport import Transport
from weavelet_redis.config import KeyLayout, parse_url
from weavelet_redis.testing import RedisServer, RedisServerFactory, TlsFiles, free_port, with_query
from weavelet_redis.transport import RedisTransport

pytestmark = pytest.mark.anyio
CliRunner = Callable[..., subprocess.CompletedProcess[str]]  # the run_cli fixture of conftest.py


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class TestRedisTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self, weavelet_redis_url: str) -> str:
        return weavelet_redis_url

    async def write_raw_revision(self, transport: Transport, run: str, number: int, data: bytes) -> None:
        assert isinstance(transport, RedisTransport)
        client = aioredis.Redis.from_url(transport.settings.driver_url)
        try:
            await client.xadd(transport.keys.revisions(run), {"revision": number, "data": data})
            await client.sadd(transport.keys.runs(), run)
        finally:
            await client.aclose()

    async def write_raw_status(self, transport: Transport, run: str, data: bytes) -> None:
        assert isinstance(transport, RedisTransport)
        client = aioredis.Redis.from_url(transport.settings.driver_url)
        try:
            await client.hset(transport.keys.run(run), "status", data)
            await client.sadd(transport.keys.runs(), run)
        finally:
            await client.aclose()


@pytest.fixture
async def transport(weavelet_redis_url: str) -> AsyncIterator[RedisTransport]:
    t = open_transport(weavelet_redis_url)
    assert isinstance(t, RedisTransport)
    await t.connect()
    try:
        yield t
    finally:
        await t.aclose()


@pytest.fixture
async def raw(weavelet_redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(weavelet_redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def _run() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def _prefix(url: str, extra: str) -> str:
    """A key prefix under the test's own (so the fixture's clean-up on a shared server covers it)."""
    return parse_url(url).prefix + extra


# -- URLs and options -----------------------------------------------------------------------------------
def test_plugin_registers_both_schemes_with_its_driver() -> None:
    registry = get_registry()
    spec = registry.schemes()["redis"].spec
    assert registry.schemes()["rediss"].spec == spec
    assert spec.name == "redis"
    assert spec.requires == ("redis",)
    assert spec.extra == "redis"
    assert spec.driver_installed


def test_url_forms_reach_the_driver() -> None:
    settings = parse_url("redis://alice:s3cret@db.example:6390/3?history=50&prefix=team-a:&ssl_ca_certs=/ca.pem")
    assert settings.history == 50
    assert settings.prefix == "team-a:"
    assert settings.display_url == "redis://alice:***@db.example:6390/3?history=50&prefix=team-a:&ssl_ca_certs=/ca.pem"
    # weavelet's own parameters are removed; the driver's stay.
    assert settings.driver_url == "redis://alice:s3cret@db.example:6390/3?ssl_ca_certs=%2Fca.pem"
    client = aioredis.Redis.from_url(settings.driver_url)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("db.example", 6390, 3)
    assert (kwargs["username"], kwargs["password"]) == ("alice", "s3cret")
    tls = parse_url("rediss://:pw@h/0").driver_url
    assert aioredis.Redis.from_url(tls).connection_pool.connection_class.__name__ == "SSLConnection"


def test_keyword_options_override_the_query_and_defaults_apply() -> None:
    settings = parse_url("redis://h?history=5", history=7, block=0.5)
    assert (settings.history, settings.block) == (7, 0.5)
    defaults = parse_url("redis://h")
    assert (defaults.prefix, defaults.history, defaults.status_history) == ("weavelet:", 1000, 100)
    assert (defaults.block, defaults.socket_timeout) == (15.0, 5.0)
    assert defaults.blocking_timeout == 16.0  # XREAD BLOCK connections wait longer than the block itself
    assert parse_url("redis://h?block=0.5&socket_timeout=3").blocking_timeout == 3.0


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("redis://h/zero", {}, "must be a database number"),
        ("redis://h?histroy=5", {}, "unknown query parameter 'histroy'"),
        ("redis://h?history=0", {}, "history='0': expected a whole number >= 1"),
        ("redis://:pw@h:99999", {}, "port is not a number"),
        ("redis:///0", {}, "names no host"),
        ("http://h", {}, "is not a redis URL"),
    ],
)
def test_bad_urls_say_what_to_write(url: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_url(url, **options)
    assert message in str(info.value)
    assert "pw" not in str(info.value)


def test_unknown_keyword_option_lists_the_known_ones() -> None:
    with pytest.raises(TypeError, match="unknown redis transport option 'histroy'; known: block, connect_timeout"):
        parse_url("redis://h", histroy=3)


async def test_repr_and_messages_never_show_the_password(weavelet_redis_server: RedisServer) -> None:
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0"
    t = open_transport(url)
    assert "hunter2" not in repr(t)
    with pytest.raises(TransportUnavailable) as info:
        await t.connect()
    assert "hunter2" not in str(info.value)
    assert "user:***@" in str(info.value)
    await t.aclose()


# -- key layout and storage -----------------------------------------------------------------------------
async def test_key_layout_is_the_documented_one(weavelet_redis_url: str, raw: aioredis.Redis) -> None:
    prefix = _prefix(weavelet_redis_url, "layout:")
    run = _run()
    keys = KeyLayout(prefix)
    async with open_transport(with_query(weavelet_redis_url, prefix=prefix, status_history="3")) as t:
        await t.put(Revision(run=run, revision=1, config={"lr": 0.1}))
        for step in range(10):
            await t.publish_status(Status(run=run, state="running", step=step))
        await t.publish_outcome(Outcome(run=run, revision=1, result="applied", step=3))
    assert await raw.smembers(f"{prefix}runs") == {run.encode()}
    # Every key of a run carries the run as its hash tag: one Redis Cluster slot per run.
    assert keys.run(run) == f"{prefix}run:{{{run}}}"
    assert keys.revisions(run) == f"{prefix}run:{{{run}}}:revisions"
    assert keys.status_stream(run) == f"{prefix}run:{{{run}}}:status"
    assert keys.outcomes(run) == f"{prefix}run:{{{run}}}:outcomes"
    assert keys.outcome_index(run) == f"{prefix}run:{{{run}}}:outcomes:index"
    entries: Any = await raw.xrange(keys.revisions(run))
    assert len(entries) == 1
    assert entries[0][1][b"revision"] == b"1"
    assert json.loads(entries[0][1][b"data"])["config"] == {"lr": 0.1}
    assert await raw.hget(keys.run(run), "revision") == b"1"
    status: Any = await raw.hget(keys.run(run), "status")
    assert json.loads(status)["step"] == 9
    statuses: Any = await raw.xrange(keys.status_stream(run))
    assert json.loads(statuses[-1][1][b"data"])["step"] == 9
    assert 3 <= len(statuses) <= 10  # MAXLEN ~ trims whole nodes; never below the cap
    outcome: Any = await raw.hget(keys.outcomes(run), "1")
    assert json.loads(outcome)["result"] == "applied"


async def test_prefixes_isolate_deployments_on_one_server(weavelet_redis_url: str) -> None:
    run = _run()
    async with (
        open_transport(with_query(weavelet_redis_url, prefix=_prefix(weavelet_redis_url, "a:"))) as a,
        open_transport(with_query(weavelet_redis_url, prefix=_prefix(weavelet_redis_url, "b:"))) as b,
    ):
        await a.put(Revision(run=run, revision=1, config={"side": "a"}))
        assert await b.latest(run) is None
        assert run not in await b.runs()
        await b.put(Revision(run=run, revision=1, config={"side": "b"}))
        latest = await a.latest(run)
        assert latest is not None
        assert latest.config == {"side": "a"}


async def test_history_is_capped_and_keeps_the_newest(weavelet_redis_url: str) -> None:
    run = _run()
    async with open_transport(with_query(weavelet_redis_url, history="10")) as t:
        for number in range(1, 501):
            await t.put(Revision(run=run, revision=number, config={"n": number}))
        for number in range(1, 31):
            await t.publish_outcome(Outcome(run=run, revision=number, result="applied", step=number))
        history = await t.history(run)
        outcomes = await t.outcomes(run)
    assert history[-1].revision == 500
    assert 10 <= len(history) < 500
    assert [r.revision for r in history] == list(range(501 - len(history), 501))
    assert [o.revision for o in outcomes] == list(range(21, 31))


async def test_entries_that_do_not_decode_are_reported_in_place(
    transport: RedisTransport, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    run = _run()
    keys = transport.keys
    await transport.put(Revision(run=run, revision=1, config={"ok": True}))
    # A foreign writer appends garbage, a revision of another run, a pickle-looking blob, an entry without a
    # revision field: each keeps its place and its number, none is passed on as a revision.
    await raw.xadd(keys.revisions(run), {"revision": 2, "data": b"{not json"})
    other = encode(Revision(run="someone-else", revision=3, config={}))
    await raw.xadd(keys.revisions(run), {"revision": 3, "data": other})
    await raw.xadd(keys.revisions(run), {"revision": 4, "data": b"\x80\x04\x95cos\nsystem\n"})
    await raw.xadd(keys.revisions(run), {"data": b"no number"})
    await raw.hset(keys.run(run), "status", b"[]")
    await raw.hset(keys.outcomes(run), "1", b"null")
    history = await transport.history(run)
    assert [(type(e).__name__, e.revision) for e in history] == [
        ("Revision", 1),
        ("CorruptEntry", 2),
        ("CorruptEntry", 3),
        ("CorruptEntry", 4),
        ("CorruptEntry", 5),
    ]
    assert [e.revision for e in await transport.history(run, limit=1)] == [5]
    with pytest.raises(CorruptEntry) as info:
        await transport.latest(run)  # the newest entry is unreadable: reported, never "no revision"
    assert info.value.revision == 5
    # The batched read (a script on the server) numbers and reports it the same way.
    [batched] = (await transport.latests([run])).values()
    assert isinstance(batched, CorruptEntry)
    assert (batched.revision, batched.reason) == (5, info.value.reason)
    assert await transport.statuses([run]) == {run: None}
    assert await transport.status(run) is None
    assert await transport.outcome(run, 1) is None
    assert "unreadable" in caplog.text
    # The compare-and-set script numbers the entry without a field the same way.
    with pytest.raises(RevisionConflict) as conflict:
        await transport.put(Revision(run=run, revision=2, config={}))
    assert conflict.value.current == 5
    await transport.put(Revision(run=run, revision=6, config={"ok": 6}))
    latest = await transport.latest(run)
    assert latest is not None
    assert latest.config == {"ok": 6}


async def test_batched_reads_number_entries_without_a_number_as_the_write_script_does(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    """Entries a foreign writer added without a ``revision`` field: after a numbered one, after many unnumbered
    ones (more than the 64 looked back at), and in a stream that has only unnumbered ones."""
    after_one, after_many, only = _run(), _run(), _run()
    await transport.put(Revision(run=after_one, revision=1, config={}))
    await raw.xadd(transport.keys.revisions(after_one), {"data": b"x"})
    await raw.xadd(transport.keys.revisions(after_one), {"data": b"y"})
    await transport.put(Revision(run=after_many, revision=1, config={}))
    for _ in range(70):
        await raw.xadd(transport.keys.revisions(after_many), {"data": b"x"})
    for _ in range(3):
        await raw.xadd(transport.keys.revisions(only), {"data": b"x"})
    batched = await transport.latests([after_one, after_many, only])
    for run, expected in ((after_one, 3), (after_many, 65), (only, 3)):
        with pytest.raises(CorruptEntry) as info:
            await transport.latest(run)
        entry = batched[run]
        assert isinstance(entry, CorruptEntry)
        assert entry.revision == info.value.revision == expected, run
        with pytest.raises(RevisionConflict) as conflict:
            await transport.put(Revision(run=run, revision=1, config={}))
        assert conflict.value.current == expected


async def test_delete_removes_every_key_of_the_run_and_its_index_entry(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    run, kept = _run(), _run()
    for name in (run, kept):
        await transport.put(Revision(run=name, revision=1, config={}))
        await transport.publish_status(Status(run=name, state="stopped"))
        await transport.publish_outcome(Outcome(run=name, revision=1, result="applied", step=1, incarnation="i"))
    prefix = transport.keys.prefix
    before = {key async for key in raw.scan_iter(match=f"{prefix}*")}
    await transport.delete(run)
    after = {key async for key in raw.scan_iter(match=f"{prefix}*")}
    gone = {key.decode() for key in before - after}
    assert gone == {
        transport.keys.run(run),
        transport.keys.revisions(run),
        transport.keys.status_stream(run),
        transport.keys.outcomes(run),
        transport.keys.outcome_index(run),
        transport.keys.outcome_stream(run),
    }
    assert not [key for key in after if f"{{{run}}}".encode() in key], "a key of the deleted run is left"
    assert not await raw.sismember(transport.keys.runs(), run)
    assert await raw.sismember(transport.keys.runs(), kept)


async def test_version_1_outcomes_still_read_and_are_kept_beside_new_ones(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    run = _run()
    v1 = {"v": 1, "kind": "outcome", "run": run, "revision": 1, "result": "applied", "step": 4, "at": 100.5}
    await raw.hset(transport.keys.outcomes(run), "1", json.dumps(v1))
    legacy = await transport.outcome(run, 1)
    assert legacy is not None
    assert (legacy.result, legacy.incarnation, legacy.at) == ("applied", "", 100.5)
    assert await transport.outcomes(run) == [legacy]
    newer = Outcome(run=run, revision=1, result="rejected", message="x", at=200.0, incarnation="i2")
    await transport.publish_outcome(newer)
    assert await transport.outcomes(run) == [legacy, newer]
    assert await transport.outcome(run, 1) == newer


async def test_outcome_storage_is_bounded(weavelet_redis_url: str, raw: aioredis.Redis) -> None:
    run = _run()
    async with open_transport(weavelet_redis_url, history=3) as t:
        assert isinstance(t, RedisTransport)
        for n in range(12):
            await t.publish_outcome(Outcome(run=run, revision=1, result="applied", at=1000.0 + n, incarnation=f"i{n}"))
        assert [o.incarnation for o in await t.outcomes(run)] == [f"i{n}" for n in range(4, 12)]
        for number in range(2, 7):
            await t.publish_outcome(Outcome(run=run, revision=number, result="applied", incarnation="i"))
        assert [o.revision for o in await t.outcomes(run)] == [4, 5, 6]
        fields = await raw.hkeys(t.keys.outcomes(run))
        assert sorted(fields) == sorted(f"{n}{suffix}".encode() for n in (4, 5, 6) for suffix in ("", "#", ":i"))
        assert await raw.zcard(t.keys.outcome_index(run)) == 3


async def test_watch_ends_when_the_transport_is_closed(weavelet_redis_url: str) -> None:
    run = _run()
    t = open_transport(weavelet_redis_url, block=1.0, socket_timeout=3.0)
    await t.connect()
    await t.put(Revision(run=run, revision=1, config={}))
    watcher = t.watch(run)
    assert (await watcher.__anext__()).revision == 1
    ended = anyio.Event()

    async def consume() -> None:
        async for _ in watcher:
            pass
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.2)  # the watcher is now blocked in XREAD
        await t.aclose()
        with anyio.fail_after(2.0):
            await ended.wait()


async def test_close_ends_a_watch_and_an_outcome_wait_blocked_in_a_long_xread_within_a_second(
    weavelet_redis_url: str,
) -> None:
    run = _run()
    t = open_transport(weavelet_redis_url)  # the default block: 15 s
    assert isinstance(t, RedisTransport)
    assert t.settings.block >= 15.0
    await t.connect()
    await t.put(Revision(run=run, revision=1, config={}))
    watcher = t.watch(run)
    assert (await watcher.__anext__()).revision == 1
    ended: dict[str, float] = {}

    async def watch() -> None:
        async for _ in watcher:
            pass
        ended["watch"] = time.monotonic()

    async def wait_outcome() -> None:
        async for _ in t.watch_outcome(run, 1):
            pass
        ended["watch_outcome"] = time.monotonic()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        tg.start_soon(wait_outcome)
        await anyio.sleep(0.5)  # both are blocked in XREAD BLOCK now
        assert ended == {}
        closed = time.monotonic()
        with anyio.fail_after(5.0):
            await t.aclose()
        with anyio.fail_after(5.0):
            while len(ended) < 2:
                await anyio.sleep(0.01)
    assert {name: round(at - closed, 2) < 1.0 for name, at in ended.items()} == {
        "watch": True,
        "watch_outcome": True,
    }, {name: at - closed for name, at in ended.items()}


async def test_cancelling_a_watch_blocked_in_a_long_xread_ends_it_at_once(weavelet_redis_url: str) -> None:
    run = _run()
    async with open_transport(weavelet_redis_url) as t:
        await t.put(Revision(run=run, revision=1, config={}))
        with anyio.move_on_after(0.5):
            async for _ in t.watch(run):
                pass
        started = time.monotonic()
        with anyio.move_on_after(0.5):
            async for _ in t.watch_outcome(run, 1):
                pass
        assert time.monotonic() - started < 1.5
        assert (await t.latest(run)) is not None  # the transport still works after the cancelled reads


async def test_weaver_round_trip_over_redis(weavelet_redis_url: str) -> None:
    run = _run()
    async with AsyncWeaver(weavelet_redis_url) as weaver:
        first = await weaver.set(run, {"lr": 0.1, "optimizer": {"name": "sgd", "momentum": 0.9}})
        second = await weaver.set(run, {"optimizer": {"name": "adam"}})
        assert (first.revision, second.revision) == (1, 2)
        assert second.config == {"lr": 0.1, "optimizer": {"name": "adam", "momentum": 0.9}}
        assert await weaver.get(run) == second
        assert run in await weaver.runs()


# -- TLS ------------------------------------------------------------------------------------------------
def _make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl command."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=weavelet test CA",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.pem")  # fmt: skip
    return TlsFiles(cert=directory / "server.pem", key=directory / "server.key", ca=directory / "ca.pem")


async def test_rediss_tls_with_a_private_ca(
    weavelet_redis_server_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = weavelet_redis_server_factory(tls=_make_tls_files(tmp_path))
    assert server.url.startswith("rediss://")
    run = _run()
    async with open_transport(server.url) as t:
        await t.put(Revision(run=run, revision=1, config={"tls": True}))
        watcher = t.watch(run)
        with anyio.fail_after(5):
            assert (await watcher.__anext__()).config == {"tls": True}
        await watcher.aclose()  # type: ignore[attr-defined]
    # Without the CA the server's certificate is not trusted: a clear connection error, not a hang.
    untrusted = server.url.split("?", 1)[0]
    t = open_transport(untrusted, connect_timeout=3)
    with pytest.raises(TransportUnavailable, match="certificate"):
        await t.connect()
    await t.aclose()


# -- the command line -----------------------------------------------------------------------------------
def test_cli_set_and_get_against_redis(run_cli: CliRunner, weavelet_redis_url: str) -> None:
    run = _run()
    written = run_cli("set", run, "lr=0.1", "optimizer=adam", "--url", weavelet_redis_url)
    assert written.returncode == 0, written.stderr
    assert f"{run}: revision 1 stored" in written.stdout
    shown = run_cli("get", run, "--json", "--url", weavelet_redis_url)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["config"] == {"lr": 0.1, "optimizer": "adam"}


def test_cli_reports_an_unreachable_server_in_one_line(run_cli: CliRunner) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run_cli("get", "r1", "--url", url)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert f"redis at {url} is unreachable (connection refused" in result.stderr


def test_plugin_and_fixtures_load_without_the_driver() -> None:
    """With redis-py missing, the plugin still lists the transport and a redis URL says how to install it."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed: importing it fails
        import weavelet_redis.testing
        from weavelet_core import open_transport
        from weavelet_core.errors import MissingDriver
        from weavelet_core.plugins import get_registry
        spec = get_registry().schemes()["redis"].spec
        assert not spec.driver_installed
        try:
            open_transport("redis://127.0.0.1:1/0")
        except MissingDriver as exc:
            print(exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert 'install it with: pip install "weavelet[redis]"' in result.stdout


async def test_writing_the_same_revision_twice_is_not_a_conflict(transport: RedisTransport) -> None:
    """A write retried after its reply was lost finds its own revision stored: that is success."""
    run = _run()
    revision = Revision(run=run, revision=1, config={"lr": 0.1})
    await transport.put(revision)
    await transport.put(revision)
    with pytest.raises(RevisionConflict) as info:
        await transport.put(Revision(run=run, revision=1, config={"lr": 0.1}))
    assert info.value.current == 1
    assert [r.id for r in await transport.history(run)] == [revision.id]


# -- faults only Redis has (the shared ones: test_transport_faults.py) ------------------------------------
DELIVERY_DEADLINE = 3.0


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


@pytest.mark.slow
async def test_sigkill_and_restart_without_persistence(
    weavelet_redis_server_factory: RedisServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = weavelet_redis_server_factory()
    await _kill_restart_write(server, server.url, persistent=False)
    assert "skipping revision 1, not newer than revision 3 already delivered" in caplog.text


@pytest.mark.parametrize("credentials", ["wrong-password", None], ids=["wrong-password", "no-password"])
async def test_bad_credentials_are_a_one_line_authentication_error(
    weavelet_redis_server_factory: RedisServerFactory, credentials: str | None
) -> None:
    server = weavelet_redis_server_factory(password="right-password")
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


# -- status versions (replace_status) ------------------------------------------------------------------------


async def test_a_status_appended_by_a_writer_that_keeps_no_versions_refuses_a_conditional_write(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    # An older weavelet's status write: HSET and XADD, nothing else. Its takeover must not be overwritten.
    run = _run()
    mine = Status(run=run, state="running", step=1, incarnation="a")
    version = await transport.replace_status(mine, None)
    assert version is not None
    theirs = encode(Status(run=run, state="running", step=0, incarnation="b"))
    await raw.xadd(transport.keys.status_stream(run), {"data": theirs})
    await raw.hset(transport.keys.run(run), "status", theirs)
    assert await transport.replace_status(Status(run=run, state="running", step=2, incarnation="a"), version) is None
    stored = await transport.status(run)
    assert stored is not None
    assert stored.incarnation == "b"


async def test_a_run_the_index_lost_is_listed_again_by_its_next_status(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    # A failover that kept the status but lost the index entry, or a removal racing the write: the next status,
    # conditional or not, lists the run again.
    run = _run()
    version = await transport.replace_status(Status(run=run, state="running", step=1), None)
    await raw.srem(transport.keys.runs(), run)
    assert run not in await transport.runs()
    assert await transport.replace_status(Status(run=run, state="running", step=2), version) is not None
    assert run in await transport.runs()


async def test_a_status_version_names_its_entry_past_a_million_a_millisecond(
    transport: RedisTransport, raw: aioredis.Redis
) -> None:
    # A stream whose last id is ahead of the server's clock (a failover to a master whose clock is behind) gets
    # ids MS-(SEQ+1): the version keeps naming the entry however large the sequence grows.
    run = _run()
    ahead = int(time.time() * 1000) + 3_600_000
    await raw.xadd(transport.keys.status_stream(run), {"data": b"{}"}, id=f"{ahead}-{(1 << 20) - 2}")
    version = await transport.replace_status(Status(run=run, state="running", step=0), None)
    for step in range(1, 5):
        version = await transport.replace_status(Status(run=run, state="running", step=step), version)
        assert version is not None, f"a conditional write over the writer's own status was refused at step {step}"
    assert version & ((1 << 64) - 1) == (1 << 20) + 3
