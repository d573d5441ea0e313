"""The NATS transport: the conformance suite against a real nats-server, URL parsing, and its plugin entry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import pytest

from weavelet_core import open_transport
from weavelet_core.errors import (
    AuthenticationFailed,
    CorruptEntry,
    InvalidRunId,
    RevisionConflict,
    TransportUnavailable,
)
from weavelet_core.plugins import get_registry
from weavelet_core.protocol import Outcome, Revision, Status
from weavelet_core.testing import TransportConformance
from weavelet_core.transport import Transport
from weavelet_nats.testing import NatsServer, NatsServerFactory
from weavelet_nats.transport import NatsTransport, key_run, run_key
from weavelet_nats.url import InvalidNatsUrl, parse_url


async def _put_raw(transport: Transport, run: str, data: bytes) -> None:
    """Store ``data`` as the newest value of the run's key, as a foreign or newer writer could."""
    assert isinstance(transport, NatsTransport)
    await transport._kv("desired").put(run_key(run), data)


async def _put_raw_status(transport: Transport, run: str, data: bytes) -> None:
    assert isinstance(transport, NatsTransport)
    await transport._kv("status").put(run_key(run), data)


class TestNatsTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self, weavelet_nats_url: str) -> str:
        return weavelet_nats_url

    async def write_raw_revision(self, transport: Transport, run: str, number: int, data: bytes) -> None:
        await _put_raw(transport, run, data)  # the key stores no number apart from the payload

    async def write_raw_status(self, transport: Transport, run: str, data: bytes) -> None:
        await _put_raw_status(transport, run, data)


class TestNatsTransportWithPrefix(TransportConformance):
    """Buckets under another prefix are independent of the default ones."""

    @pytest.fixture
    def transport_url(self, weavelet_nats_url: str) -> str:
        return f"{weavelet_nats_url}?prefix=other-{uuid.uuid4().hex[:6]}&history=50"

    async def write_raw_revision(self, transport: Transport, run: str, number: int, data: bytes) -> None:
        await _put_raw(transport, run, data)

    async def write_raw_status(self, transport: Transport, run: str, data: bytes) -> None:
        await _put_raw_status(transport, run, data)


# -- URL parsing -----------------------------------------------------------------------------------------
def test_plain_url_defaults() -> None:
    s = parse_url("nats://127.0.0.1")
    assert s.servers == ("nats://127.0.0.1:4222",)
    assert (s.user, s.password, s.token, s.tls) == (None, None, None, False)
    assert (s.prefix, s.history, s.connect_timeout) == ("weavelet", 64, 5.0)


def test_user_password_are_percent_decoded() -> None:
    s = parse_url("nats://alice:p%40ss%3Aword@nats.example:4333")
    assert (s.user, s.password, s.token) == ("alice", "p@ss:word", None)
    assert s.servers == ("nats://nats.example:4333",)


def test_token_is_a_user_part_without_password() -> None:
    s = parse_url("nats://s3cr3t@host:1")
    assert (s.user, s.password, s.token) == (None, None, "s3cr3t")


def test_several_servers_share_credentials_and_scheme() -> None:
    s = parse_url("nats://u:p@a:1,b,nats://c:3")
    assert s.servers == ("nats://a:1", "nats://b:4222", "nats://c:3")
    assert (s.user, s.password) == ("u", "p")
    assert s.display == "nats://a:1,b:4222,c:3"


def test_tls_scheme_and_tls_options_imply_tls() -> None:
    assert parse_url("tls://a:1,b:2").servers == ("tls://a:1", "tls://b:2")
    s = parse_url("nats://a?tls_ca=/etc/ca.pem&tls_hostname=nats.internal")
    assert s.tls
    assert s.servers == ("tls://a:4222",)
    assert (s.tls_ca, s.tls_hostname) == ("/etc/ca.pem", "nats.internal")


def test_ipv6_host() -> None:
    assert parse_url("nats://[::1]:4223").servers == ("nats://[::1]:4223",)


def test_query_options_and_keyword_options() -> None:
    s = parse_url(
        "nats://h?creds=/k/u.creds&connect_timeout=1.5&request_timeout=2&ping_interval=3&reconnect_wait=0.1"
        "&prefix=team_a&history=10&name=trainer",
        {"history": 20},
    )
    assert s.creds == "/k/u.creds"
    assert (s.connect_timeout, s.request_timeout, s.ping_interval, s.reconnect_wait) == (1.5, 2.0, 3.0, 0.1)
    assert (s.prefix, s.history, s.name) == ("team_a", 20, "trainer")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h", "nats:// or tls://"),
        ("nats://", "has no host"),
        ("nats://h?colour=blue", "unknown NATS option(s) colour"),
        ("nats://h?history=65", "1 to 64"),
        ("nats://h?history=x", "whole number"),
        ("nats://h?connect_timeout=-1", "positive number"),
        ("nats://h?prefix=a.b", "prefix 'a.b'"),
        ("nats://h?tls_cert=/c.pem", "tls_cert and tls_key together"),
        ("nats://:pw@h", "password but no user"),
        ("nats://h/path", "no path"),
        ("nats://h,,k", "empty server"),
        ("nats://u:p@a,v:q@b", "share their credentials"),
        ("nats://h:99999", "HOST:PORT"),
    ],
)
def test_bad_urls_say_what_to_write(url: str, message: str) -> None:
    with pytest.raises(InvalidNatsUrl) as info:
        parse_url(url)
    assert message in str(info.value)


def test_transport_url_masks_the_password() -> None:
    transport = open_transport("nats://alice:hunter2@127.0.0.1:1")
    assert isinstance(transport, NatsTransport)
    assert "hunter2" not in transport.url
    assert "hunter2" not in repr(transport)
    assert "hunter2" not in open_transport("nats://hunter2@127.0.0.1:1").url


def test_run_keys_round_trip_and_avoid_subject_dots() -> None:
    for run in ("a", "resnet50-lr.sweep.3", "x_y", "z.", "9"):
        key = run_key(run)
        assert "." not in key
        assert key_run(key) == run
    with pytest.raises(InvalidRunId):
        run_key("a/b")
    assert key_run("bad key") is None


# -- the plugin ------------------------------------------------------------------------------------------
def test_plugin_registers_nats_and_tls_schemes_with_the_driver() -> None:
    loaded = get_registry().resolve("tls://h")
    assert loaded.spec.name == "nats"
    assert loaded.spec.requires == ("nats",)
    assert loaded.spec.extra == "nats"
    assert loaded.spec.driver_installed


def test_plugin_module_imports_without_nats_py() -> None:
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "import weavelet_nats, weavelet_nats.plugin, weavelet_nats.server, weavelet_nats.embedded\n"
        "spec = weavelet_nats.plugin.weavelet_transports()[0]\n"
        "assert spec.name == 'nats'\n"
        "assert [m for m in sys.modules if m.startswith('nats.')] == []\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- behaviour beyond the suite ----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_calls_after_aclose_fail_clearly(weavelet_nats_url: str) -> None:
    transport = open_transport(weavelet_nats_url)
    await transport.connect()
    await transport.aclose()
    with pytest.raises(TransportUnavailable, match="closed"):
        await transport.latest("r")


@pytest.mark.anyio
async def test_history_keeps_the_newest_revisions_up_to_the_bucket_limit(weavelet_nats_server: NatsServer) -> None:
    prefix = f"hist-{uuid.uuid4().hex[:6]}"
    transport = open_transport(f"{weavelet_nats_server.url}?prefix={prefix}&history=5")
    await transport.connect()
    try:
        for number in range(1, 9):
            await transport.put(Revision(run="r", revision=number, config={"n": number}))
        assert [r.revision for r in await transport.history("r")] == [4, 5, 6, 7, 8]
        assert [r.revision for r in await transport.history("r", limit=2)] == [7, 8]
    finally:
        await transport.aclose()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_runs_lists_every_run_every_time(weavelet_nats_server: NatsServer) -> None:
    """nats-py's ``keys()`` can end early and return part of a bucket (nats.py #995, #842); ``runs()`` does not
    rely on it: 200 listings in a row all see every run (with revisions, with a status, with both)."""
    prefix = f"runs-{uuid.uuid4().hex[:6]}"
    transport = open_transport(f"{weavelet_nats_server.url}?prefix={prefix}")
    await transport.connect()
    try:
        await transport.put(Revision(run="a.1", revision=1, config={}))
        await transport.publish_status(Status(run="b", state="running"))
        await transport.put(Revision(run="c", revision=1, config={}))
        await transport.publish_status(Status(run="c", state="running"))
        for number in range(2, 5):
            await transport.put(Revision(run="a.1", revision=number, config={}))
        assert isinstance(transport, NatsTransport)
        started = time.monotonic()
        for attempt in range(200):
            transport._snapshots.clear()  # read the buckets again each time, not what the last listing kept
            assert await transport.runs() == ["a.1", "b", "c"], f"listing {attempt} was incomplete"
        assert time.monotonic() - started < 20
    finally:
        await transport.aclose()


@pytest.mark.anyio
async def test_runs_leaves_out_deleted_keys(weavelet_nats_server: NatsServer) -> None:
    prefix = f"runs-{uuid.uuid4().hex[:6]}"
    transport = open_transport(f"{weavelet_nats_server.url}?prefix={prefix}")
    await transport.connect()
    try:
        assert isinstance(transport, NatsTransport)
        await transport.put(Revision(run="kept", revision=1, config={}))
        await transport.put(Revision(run="gone", revision=1, config={}))
        await transport._kv("desired").delete(run_key("gone"))
        assert await transport.runs() == ["kept"]
    finally:
        await transport.aclose()


async def _many(transport: Transport, runs: list[str]) -> None:
    for index, run in enumerate(runs):
        await transport.put(Revision(run=run, revision=1, config={"i": index}))
        await transport.publish_status(Status(run=run, state="running", step=index))


@pytest.mark.anyio
async def test_a_listing_reads_each_bucket_once_and_batched_reads_reuse_it_until_a_write(
    weavelet_nats_server: NatsServer,
) -> None:
    prefix = f"scan-{uuid.uuid4().hex[:6]}"
    async with open_transport(f"{weavelet_nats_server.url}?prefix={prefix}") as transport:
        assert isinstance(transport, NatsTransport)
        runs = [f"r{index:03d}" for index in range(100)]
        await _many(transport, runs)
        await transport._kv("desired").delete(run_key(runs[0]))  # a delete marker: no revision any more
        await transport._kv("status").delete(run_key(runs[0]))
        await _put_raw(transport, runs[1], b"not json")  # unreadable, without a number: numbered from the history
        assert await transport.runs() == runs[1:]
        desired, status = transport._snapshots["desired"], transport._snapshots["status"]
        latests = await transport.latests(runs)
        statuses = await transport.statuses(runs)
        assert transport._snapshots["desired"] is desired, "nothing was written: the listing's read is reused"
        assert transport._snapshots["status"] is status
        assert latests[runs[0]] is None
        assert statuses[runs[0]] is None
        broken = latests[runs[1]]
        assert isinstance(broken, CorruptEntry)
        assert broken.revision == 2
        assert [latests[run].revision for run in runs[2:]] == [1] * 98  # type: ignore[union-attr]
        # A write since: read again, and seen.
        await transport.put(Revision(run=runs[5], revision=2, config={"new": True}))
        newer = await transport.latests(runs)
        assert transport._snapshots["desired"] is not desired
        assert newer[runs[5]] is not None
        assert newer[runs[5]].config == {"new": True}  # type: ignore[union-attr]
        # A removal (delete purges the run's subjects: no new message) also counts as a change.
        await transport.delete(runs[6])
        assert (await transport.latests(runs))[runs[6]] is None
        assert (await transport.statuses(runs))[runs[6]] is None
        assert runs[6] not in await transport.runs()


@pytest.mark.anyio
async def test_few_runs_or_a_much_larger_bucket_are_read_key_by_key(
    weavelet_nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import weavelet_nats.transport as module

    prefix = f"scan-{uuid.uuid4().hex[:6]}"
    async with open_transport(f"{weavelet_nats_server.url}?prefix={prefix}") as transport:
        assert isinstance(transport, NatsTransport)
        runs = [f"r{index:03d}" for index in range(60)]
        await _many(transport, runs)
        few = runs[: module.SCAN_FROM - 1]
        assert [r.revision for r in (await transport.latests(few)).values()] == [1] * len(few)  # type: ignore[union-attr]
        assert all(s is not None for s in (await transport.statuses(few)).values())
        assert transport._snapshots == {}
        monkeypatch.setattr(module, "SCAN_RATIO", 1)  # 60 messages in a bucket is "much larger" than 40 runs
        many = runs[:40]
        assert [r.revision for r in (await transport.latests(many)).values()] == [1] * 40  # type: ignore[union-attr]
        assert transport._snapshots == {}
        monkeypatch.setattr(module, "SCAN_RATIO", 16)
        await transport.latests(many)
        assert set(transport._snapshots) == {"desired"}


@pytest.mark.anyio
async def test_a_bucket_read_ends_while_writes_keep_coming(weavelet_nats_server: NatsServer) -> None:
    """A scan stops at the messages the bucket held when it began: a steady writer cannot keep it going."""
    prefix = f"scan-{uuid.uuid4().hex[:6]}"
    url = f"{weavelet_nats_server.url}?prefix={prefix}"
    async with open_transport(url) as transport, open_transport(url) as writer:
        assert isinstance(transport, NatsTransport)
        runs = [f"r{index:03d}" for index in range(200)]
        await _many(writer, runs)
        stop = anyio.Event()
        written = 0

        async def keep_writing(offset: int) -> None:
            nonlocal written
            while not stop.is_set():
                written += 1
                run = runs[(written + offset) % 200]
                await writer.publish_status(Status(run=run, state="running", step=1000 + written))

        async with anyio.create_task_group() as tg:
            for offset in range(4):
                tg.start_soon(keep_writing, offset)
            await anyio.sleep(0.1)
            started = time.monotonic()
            for _ in range(5):
                transport._snapshots.clear()
                with anyio.fail_after(10):
                    statuses = await transport.statuses(runs)
                assert all(statuses[run] is not None for run in runs)
            took = time.monotonic() - started
            stop.set()
        assert written > 20
        assert took < 10


@pytest.mark.anyio
async def test_unreadable_newest_entry_numbers_from_the_json_it_still_shows(weavelet_nats_url: str) -> None:
    """An entry of a newer protocol version keeps the number it shows, however far ahead; writers continue there."""
    run = f"json-{uuid.uuid4().hex[:8]}"
    async with open_transport(weavelet_nats_url) as transport:
        await transport.put(Revision(run=run, revision=1, config={}))
        await _put_raw(transport, run, b'{"v": 9, "revision": 41, "whatever": true}')
        with pytest.raises(CorruptEntry) as info:
            await transport.latest(run)
        assert info.value.revision == 41
        assert "unsupported protocol version 9" in info.value.reason
        with pytest.raises(RevisionConflict) as conflict:
            await transport.put(Revision(run=run, revision=2, config={}))
        assert conflict.value.current == 41
        await transport.put(Revision(run=run, revision=42, config={"ok": True}))
        assert [e.revision for e in await transport.history(run)] == [1, 41, 42]


@pytest.mark.anyio
async def test_version_1_outcomes_still_read_and_are_kept_beside_new_ones(weavelet_nats_url: str) -> None:
    run = f"v1-{uuid.uuid4().hex[:8]}"
    async with open_transport(weavelet_nats_url) as transport:
        assert isinstance(transport, NatsTransport)
        v1 = {"v": 1, "kind": "outcome", "run": run, "revision": 1, "result": "applied", "step": 4, "at": 100.5}
        await transport._kv("outcomes").put(f"{run_key(run)}.1", json.dumps(v1).encode())
        legacy = await transport.outcome(run, 1)
        assert legacy is not None
        assert (legacy.result, legacy.incarnation, legacy.at) == ("applied", "", 100.5)
        assert await transport.outcomes(run) == [legacy]
        newer = Outcome(run=run, revision=1, result="rejected", message="x", at=200.0, incarnation="i2")
        await transport.publish_outcome(newer)
        assert await transport.outcomes(run) == [legacy, newer]
        assert await transport.outcome(run, 1) == newer


async def _connected(url: str, **options: object) -> Transport:
    transport = open_transport(url, **options)
    await transport.connect()
    return transport


# -- faults only NATS has (the shared ones: test_transport_faults.py) -------------------------------------
@pytest.mark.anyio
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
    weavelet_nats_server_factory: NatsServerFactory, server_auth: dict[str, str], url_auth: str
) -> None:
    server = weavelet_nats_server_factory(**server_auth)
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


@pytest.mark.anyio
@pytest.mark.parametrize("auth", [{"user": "alice", "password": "p@ss:w/rd"}, {"token": "s3cr3t-token"}])
async def test_right_credentials_connect(weavelet_nats_server_factory: NatsServerFactory, auth: dict[str, str]) -> None:
    server = weavelet_nats_server_factory(**auth)
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


@pytest.mark.anyio
async def test_refused_connection_names_the_cause_within_the_deadline(
    weavelet_nats_server_factory: NatsServerFactory,
) -> None:
    server = weavelet_nats_server_factory()
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


@pytest.mark.anyio
async def test_tls_with_the_ca_connects_and_without_it_names_tls(
    weavelet_nats_server_factory: NatsServerFactory, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    server = weavelet_nats_server_factory(tls_cert=cert, tls_key=key)
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


# -- status versions (replace_status) ------------------------------------------------------------------------


async def _read_when_connected(transport: Transport, run: str) -> Status | None:
    """The run's status, once the transport has reconnected (it raises ``TransportUnavailable`` until then)."""
    with anyio.fail_after(20):
        while True:
            try:
                return await transport.status(run)
            except TransportUnavailable:
                await anyio.sleep(0.1)


@pytest.mark.anyio
async def test_a_status_version_from_before_a_reconnect_is_refused_once(
    weavelet_nats_server_factory: NatsServerFactory,
) -> None:
    server = weavelet_nats_server_factory()
    transport = open_transport(server.url)
    await transport.connect()
    try:
        version = await transport.replace_status(Status(run="r", state="running", step=1), None)
        server.stop()
        server.start()
        await _read_when_connected(transport, "r")  # the transport has seen the disconnect and reconnected
        # Refused, storing nothing: the server may have come back without its store (see the next test).
        assert await transport.replace_status(Status(run="r", state="running", step=2), version) is None
        stored = await transport.status("r")
        assert stored is not None
        assert stored.step == 1
        version = await transport.replace_status(Status(run="r", state="running", step=3), None)
        assert await transport.replace_status(Status(run="r", state="running", step=4), version) is not None
    finally:
        await transport.aclose()


@pytest.mark.anyio
async def test_a_server_back_without_its_store_never_lets_an_old_version_overwrite_a_takeover(
    weavelet_nats_server_factory: NatsServerFactory,
) -> None:
    # The store is lost (a volume, unsynced writes): sequences start over, and a newer incarnation's status gets
    # the very sequence the old writer remembers. Its conditional write must still be refused.
    server = weavelet_nats_server_factory()
    old = open_transport(server.url)
    await old.connect()
    try:
        held = await old.replace_status(Status(run="r", state="running", step=1, incarnation="old"), None)
        assert held is not None
        server.kill()
        shutil.rmtree(server.store_dir / "jetstream")
        server.start()
        new = open_transport(server.url)
        await new.connect()
        try:
            taken = await new.replace_status(Status(run="r", state="running", step=0, incarnation="new"), None)
            assert taken is not None
            assert taken & ((1 << 64) - 1) == held & ((1 << 64) - 1), "the same sequence again: the case at stake"
            await _read_when_connected(old, "r")
            refused = Status(run="r", state="running", step=2, incarnation="old")
            assert await old.replace_status(refused, held) is None
            stored = await new.status("r")
            assert stored is not None
            assert stored.incarnation == "new"
        finally:
            await new.aclose()
    finally:
        await old.aclose()
