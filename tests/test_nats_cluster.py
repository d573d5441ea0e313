"""The NATS transport over a real three-node JetStream cluster on loopback (``weavelet_nats_cluster``), with buckets
of three replicas (``?replicas=3``): losing the node that leads the desired-config stream loses no acknowledged
revision, the trainer's watch goes on, and the node rejoins and catches up."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import anyio
import nats
import pytest

from weavelet_core import Revision, TransportUnavailable, WeaveletProcess, Weaver, open_transport
from weavelet_nats.testing import NatsCluster
from weavelet_nats.transport import NatsTransport
from weavelet_nats.url import InvalidNatsUrl, parse_url

DESIRED_STREAM = "KV_weavelet-desired"
DELIVERY_DEADLINE = 3.0
"""A revision acknowledged after the leader died reaches the trainer within this many seconds."""


def _stream_info(url: str, stream: str) -> tuple[str, int, int]:
    """``(leader's server name, replicas, last sequence)`` of ``stream``, asked of the cluster."""

    async def ask() -> tuple[str, int, int]:
        servers = [f"nats://{address}" for address in url.removeprefix("nats://").split(",")]
        nc = await nats.connect(servers=servers, connect_timeout=5, max_reconnect_attempts=5)
        try:
            info = await nc.jetstream(timeout=5).stream_info(stream)
        finally:
            await nc.close()
        assert info.cluster is not None
        assert info.cluster.leader is not None
        return info.cluster.leader, int(info.config.num_replicas or 1), int(info.state.last_seq)

    return anyio.run(ask)


def _poll(process: WeaveletProcess, timeout: float, until: int) -> Revision:
    """The first revision numbered ``until`` or later the trainer gets (older ones may be superseded before
    they are handed over: the newest is the desired state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        revision = process.poll()
        if revision is not None and revision.revision >= until:
            return revision
        time.sleep(0.005)
    raise AssertionError(f"the trainer got no revision numbered {until} or later within {timeout:g}s")


@pytest.fixture
def trainer(weavelet_nats_cluster: NatsCluster) -> Iterator[tuple[WeaveletProcess, str, str]]:
    """A weavelet sidecar watching a fresh run over the cluster: (process, run, url)."""
    run = f"cluster-{uuid.uuid4().hex[:8]}"
    # Short requests: while the cluster elects a new leader (seconds), a request to the lost one fails fast and
    # is retried instead of waiting out the default 5 s.
    url = f"{weavelet_nats_cluster.url}?replicas=3&connect_timeout=10&request_timeout=1.5"
    process = WeaveletProcess(run, url, heartbeat_interval=0.2, restart_backoff=(0.1, 1.0))
    process.start(timeout=30)
    try:
        yield process, run, url
    finally:
        process.stop(timeout=10)


@pytest.mark.slow
def test_killing_the_stream_leader_loses_no_revision_and_the_watch_goes_on(
    weavelet_nats_cluster: NatsCluster, trainer: tuple[WeaveletProcess, str, str]
) -> None:
    process, run, url = trainer
    cluster = weavelet_nats_cluster
    with Weaver(url, write_timeout=15) as weaver:
        acknowledged = [weaver.set(run, {"lr": lr}) for lr in (0.1, 0.2, 0.3)]
        assert _poll(process, 15, until=3).config == {"lr": 0.3}
        leader_name, replicas, _ = _stream_info(cluster.url, DESIRED_STREAM)
        assert replicas == 3, "the bucket was created with the replicas the URL asked for"
        leader = cluster.node(leader_name)

        leader.kill()  # SIGKILL: no goodbye to the other nodes
        killed_at = time.monotonic()
        written = weaver.set(run, {"lr": 0.4})
        acknowledged_at = time.monotonic()
        arrived = _poll(process, 15, until=4)
        arrived_at = time.monotonic()
        assert arrived.revision == written.revision == 4
        assert arrived.config == {"lr": 0.4}
        assert arrived_at - acknowledged_at < DELIVERY_DEADLINE, (
            f"revision 4 reached the trainer {arrived_at - acknowledged_at:.2f}s after it was acknowledged "
            f"({arrived_at - killed_at:.2f}s after the kill)"
        )
        history = weaver.history(run)
        assert [r.revision for r in history] == [1, 2, 3, 4], "no acknowledged revision was lost"
        assert [r.config for r in history] == [r.config for r in [*acknowledged, written]]
        new_leader, _, last_seq = _stream_info(cluster.url, DESIRED_STREAM)
        assert new_leader != leader_name

        # The killed node comes back with its store and catches up on what it missed.
        leader.start(timeout=30)
        state = cluster.wait_caught_up(leader, DESIRED_STREAM, last_seq, timeout=20)
        assert int(state["last_seq"]) >= last_seq
        fifth = weaver.set(run, {"lr": 0.5})
        assert _poll(process, 10, until=5).revision == fifth.revision
    assert process.state == "running"


@pytest.mark.slow
def test_buckets_on_a_cluster_keep_the_replicas_asked_for(weavelet_nats_cluster: NatsCluster) -> None:
    async def check() -> None:
        prefix = f"rep-{uuid.uuid4().hex[:6]}"
        transport = open_transport(f"{weavelet_nats_cluster.url}?replicas=3&prefix={prefix}")
        await transport.connect()
        try:
            assert isinstance(transport, NatsTransport)
            for role in ("desired", "status", "outcomes"):
                status = await transport._kv(role).status()
                assert status.stream_info.config.num_replicas == 3, role
        finally:
            await transport.aclose()
        # More replicas than servers: refused with the fix, not a hang.
        too_many = open_transport(f"{weavelet_nats_cluster.url}?replicas=5&prefix={prefix}x&connect_timeout=10")
        with pytest.raises(TransportUnavailable, match=r"with 5 replica\(s\)") as info:
            await too_many.connect()
        await too_many.aclose()
        assert "need a JetStream cluster of at least 5 servers" in str(info.value)

    anyio.run(check)


def test_replicas_option_is_parsed_and_checked() -> None:
    assert parse_url("nats://a").replicas == 1
    assert parse_url("nats://a,b,c?replicas=3").replicas == 3
    assert parse_url("nats://a", {"replicas": 2}).replicas == 2
    for bad in ("0", "6", "three"):
        with pytest.raises(InvalidNatsUrl, match="replicas"):
            parse_url(f"nats://a?replicas={bad}")
