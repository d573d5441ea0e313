"""The NATS transport: the conformance suite against a real nats-server, URL parsing, and its plugin entry."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from weavelet_core import open_transport
from weavelet_core.errors import InvalidRunId, TransportUnavailable
from weavelet_core.plugins import get_registry
from weavelet_core.protocol import Revision
from weavelet_core.testing import TransportConformance
from weavelet_core.testing.nats import NatsServer
from weavelet_nats.transport import NatsTransport, key_run, run_key
from weavelet_nats.url import InvalidNatsUrl, parse_url


class TestNatsTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self, nats_url: str) -> str:
        return nats_url


class TestNatsTransportWithPrefix(TransportConformance):
    """Buckets under another prefix are independent of the default ones."""

    @pytest.fixture
    def transport_url(self, nats_url: str) -> str:
        return f"{nats_url}?prefix=other-{uuid.uuid4().hex[:6]}&history=50"


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
async def test_calls_after_aclose_fail_clearly(nats_url: str) -> None:
    transport = open_transport(nats_url)
    await transport.connect()
    await transport.aclose()
    with pytest.raises(TransportUnavailable, match="closed"):
        await transport.latest("r")


@pytest.mark.anyio
async def test_history_keeps_the_newest_revisions_up_to_the_bucket_limit(nats_server: NatsServer) -> None:
    prefix = f"hist-{uuid.uuid4().hex[:6]}"
    transport = open_transport(f"{nats_server.url}?prefix={prefix}&history=5")
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
