"""The Redis transport beyond one server, against real servers on loopback: a master with a replica and three
sentinels (failover under a live sidecar), ``WAIT``-based acknowledgement, and a three-master Redis Cluster (the
whole conformance suite)."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator

import anyio
import pytest
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient

from weavelet_core import Revision, TransportUnavailable, WeaveletProcess, Weaver, open_transport
from weavelet_core.errors import TransportError
from weavelet_core.testing import TransportConformance
from weavelet_core.transport import Transport
from weavelet_redis.config import parse_url
from weavelet_redis.testing import RedisCluster, RedisSentinelGroup, RedisServer, RedisServerFactory
from weavelet_redis.transport import RedisTransport

DELIVERY_DEADLINE = 3.0


def _poll(process: WeaveletProcess, timeout: float, until: int) -> Revision:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        revision = process.poll()
        if revision is not None and revision.revision >= until:
            return revision
        time.sleep(0.005)
    raise AssertionError(f"the trainer got no revision numbered {until} or later within {timeout:g}s")


# -- Sentinel ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sentinel_failover_under_a_live_sidecar(weavelet_redis_sentinel: RedisSentinelGroup) -> None:
    group = weavelet_redis_sentinel
    run = f"sentinel-{uuid.uuid4().hex[:8]}"
    # wait_replicas=1: a write is acknowledged once the replica has it, so the failover cannot lose it.
    acked_url = group.url(wait_replicas="1", wait_timeout="2")
    url = group.url()
    process = WeaveletProcess(run, url, heartbeat_interval=0.2, restart_backoff=(0.1, 1.0))
    process.start(timeout=30)
    try:
        with Weaver(acked_url, write_timeout=30) as weaver:
            weaver.set(run, {"lr": 0.1})
            weaver.set(run, {"lr": 0.2})
        assert _poll(process, 15, until=2).config == {"lr": 0.2}
        old = group.master
        old.kill()  # SIGKILL the master mid-watch
        new = group.wait_failover(old, timeout=30)
        assert new is group.replicas[0]
        with Weaver(url, write_timeout=30) as weaver:
            written = weaver.set(run, {"lr": 0.3})  # found through the sentinels, on the new master
            acknowledged_at = time.monotonic()
            arrived = _poll(process, 15, until=3)
            assert arrived_in(acknowledged_at) < DELIVERY_DEADLINE
            assert arrived.revision == written.revision == 3
            assert [r.config for r in weaver.history(run)] == [{"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3}]
        assert "role:master" in new.cli("INFO", "replication")
        # The old master comes back; the sentinels make it a replica of the new one, and acknowledged writes
        # (wait_replicas=1) work again.
        old.start()
        deadline = time.monotonic() + 30
        while "master_link_status:up" not in old.cli("INFO", "replication"):
            assert time.monotonic() < deadline, "the old master did not rejoin as a replica"
            time.sleep(0.1)
        with Weaver(acked_url, write_timeout=30) as weaver:
            assert weaver.set(run, {"lr": 0.4}).revision == 4
        assert _poll(process, 15, until=4).config == {"lr": 0.4}
        assert process.state == "running"
    finally:
        process.stop(timeout=10)


def arrived_in(since: float) -> float:
    return time.monotonic() - since


def test_sentinel_urls_follow_redis_py_conventions() -> None:
    s = parse_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/mymaster/2?wait_replicas=1")
    assert (s.mode, s.service, s.nodes) == ("sentinel", "mymaster", (("10.0.0.1", 26379), ("10.0.0.2", 26379)))
    assert dict(s.connection) == {"db": 2, "password": "pw"}
    assert s.wait_replicas == 1
    assert "pw" not in repr(s)
    assert "pw" not in s.display_url
    with pytest.raises(ValueError, match="names no service"):
        parse_url("redis+sentinel://10.0.0.1:26379")
    with pytest.raises(ValueError, match="wait_replicas is for a master with replicas"):
        parse_url("redis+cluster://10.0.0.1:7000?wait_replicas=1")
    with pytest.raises(ValueError, match="hash tag"):
        parse_url("redis://h/0?prefix=a{b}")


# -- WAIT ----------------------------------------------------------------------------------------------------
@pytest.fixture
def master_and_replica(weavelet_redis_server_factory: RedisServerFactory) -> tuple[RedisServer, RedisServer]:
    master = weavelet_redis_server_factory()
    replica = weavelet_redis_server_factory(replica_of=(master.host, master.port))
    deadline = time.monotonic() + 15
    while "master_link_status:up" not in replica.cli("INFO", "replication"):
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.05)
    return master, replica


@pytest.mark.slow
def test_wait_replicas_counts_a_write_only_once_a_replica_has_it(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = master_and_replica
    run = f"wait-{uuid.uuid4().hex[:8]}"
    url = f"{master.url}?wait_replicas=1&wait_timeout=0.5"

    async def direct() -> None:
        async with open_transport(url) as transport:
            await transport.put(Revision(run=run, revision=1, config={"lr": 0.1}))
            replica.pause()  # a replica that stops answering (SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(TransportError) as info:
                    await transport.put(Revision(run=run, revision=2, config={"lr": 0.2}))
                assert not isinstance(info.value, TransportUnavailable), "final: a retry would count it as written"
                assert time.monotonic() - started < 2.0
            finally:
                replica.resume()
            message = str(info.value)
            assert "revision 2 of run" in message
            assert "only 0 of the 1 replicas asked for (wait_replicas) confirmed it within 0.5s" in message
            assert "\n" not in message

    anyio.run(direct)
    # The Weaver reports the unconfirmed write at once; the revision is on the master and reaches the replica
    # once it answers again.
    replica.pause()
    try:
        with Weaver(url, write_timeout=10) as weaver, pytest.raises(TransportError, match="only 0 of the 1"):
            weaver.set(run, {"lr": 0.3})
    finally:
        replica.resume()
    key = f"weavelet:run:{{{run}}}:revisions"
    deadline = time.monotonic() + 10
    while '"lr":0.3' not in replica.cli("XREVRANGE", key, "+", "-", "COUNT", "1").replace(" ", ""):
        assert time.monotonic() < deadline, "the replica never caught up"
        time.sleep(0.05)
    with Weaver(url, write_timeout=10) as weaver:
        assert weaver.set(run, {"lr": 0.4}).revision == 4  # confirmed at once when the replica answers


# -- Redis Cluster ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    with tempfile.TemporaryDirectory(prefix="weavelet-rcluster-") as root:
        cluster = RedisCluster(root)
        cluster.start(timeout=30)
        try:
            yield cluster
        finally:
            cluster.close()


@pytest.mark.slow
class TestRedisClusterConformance(TransportConformance):
    """The whole transport contract on a three-master cluster: runs land in different slots (and nodes), and
    no script crosses slots."""

    @pytest.fixture
    def transport_url(self, redis_cluster: RedisCluster) -> str:
        return f"{redis_cluster.url}?prefix=c-{uuid.uuid4().hex[:6]}:"

    async def write_raw_revision(self, transport: Transport, run: str, number: int, data: bytes) -> None:
        assert isinstance(transport, RedisTransport)
        client = ClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in transport.settings.nodes])
        try:
            await client.xadd(transport.keys.revisions(run), {"revision": number, "data": data})
            await client.sadd(transport.keys.runs(), run)
        finally:
            await client.aclose()

    async def write_raw_status(self, transport: Transport, run: str, data: bytes) -> None:
        assert isinstance(transport, RedisTransport)
        client = ClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in transport.settings.nodes])
        try:
            await client.hset(transport.keys.run(run), "status", data)
            await client.sadd(transport.keys.runs(), run)
        finally:
            await client.aclose()


@pytest.mark.slow
def test_cluster_runs_spread_over_slots_and_nodes(redis_cluster: RedisCluster) -> None:
    from redis.crc import key_slot

    prefix = f"spread-{uuid.uuid4().hex[:6]}:"
    runs = [f"run-{index}" for index in range(12)]

    async def go() -> None:
        async with open_transport(f"{redis_cluster.url}?prefix={prefix}") as transport:
            assert isinstance(transport, RedisTransport)
            for run in runs:
                await transport.put(Revision(run=run, revision=1, config={"run": run}))
            assert await transport.runs() == sorted(runs)
            slots = {key_slot(transport.keys.revisions(run).encode()) for run in runs}
            assert len(slots) > 1, "runs live in different slots"
            for run in runs:
                keys = [
                    transport.keys.run(run),
                    transport.keys.revisions(run),
                    transport.keys.status_stream(run),
                    transport.keys.outcomes(run),
                    transport.keys.outcome_index(run),
                ]
                assert len({key_slot(k.encode()) for k in keys}) == 1, "one run's keys share one slot"

    anyio.run(go)


def test_an_unreachable_cluster_or_sentinel_is_unavailable_with_one_line() -> None:
    from weavelet_core.testing.servers import free_port

    async def go() -> None:
        for url in (
            f"redis+cluster://127.0.0.1:{free_port(below=55536)}?connect_timeout=2",
            f"redis+sentinel://127.0.0.1:{free_port()}/mymaster/0?connect_timeout=2",
        ):
            transport = open_transport(url)
            started = time.monotonic()
            with pytest.raises(TransportUnavailable) as info:
                await transport.connect()
            await transport.aclose()
            assert time.monotonic() - started < 4, url
            assert "\n" not in str(info.value)
            assert url.split("?")[0] in str(info.value)

    anyio.run(go)
