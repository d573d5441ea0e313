"""The fault-conformance suite (``weavelet_core.testing.TransportFaultConformance``) against real, private
nats-server and redis-server processes: SIGKILL and restart, writes and watches while the server is down or
hung (SIGSTOP), racing writers, wrong credentials. Faults only one transport has are tested beside it
(``test_nats_transport.py``, ``test_redis_transport.py``)."""

from __future__ import annotations

import pytest

from weavelet_core.testing import TransportFaultConformance
from weavelet_nats.testing import NatsServer, NatsServerFactory
from weavelet_redis.testing import RedisServer, RedisServerFactory

pytestmark = pytest.mark.slow


class TestNatsFaults(TransportFaultConformance):
    @pytest.fixture
    def fault_server(self, weavelet_nats_server_factory: NatsServerFactory) -> NatsServer:
        return weavelet_nats_server_factory(sync_always=True)  # file storage, synced: acknowledged is durable

    @pytest.fixture
    def credential_urls(self, weavelet_nats_server_factory: NatsServerFactory) -> tuple[str, str]:
        server = weavelet_nats_server_factory(user="alice", password="right-secret")
        return f"nats://alice:right-secret@{server.address}", f"nats://alice:wrong-secret@{server.address}"


class TestRedisFaults(TransportFaultConformance):
    @pytest.fixture
    def fault_server(self, weavelet_redis_server_factory: RedisServerFactory) -> RedisServer:
        return weavelet_redis_server_factory(persistent=True)  # appendfsync always: acknowledged is durable

    @pytest.fixture
    def credential_urls(self, weavelet_redis_server_factory: RedisServerFactory) -> tuple[str, str]:
        server = weavelet_redis_server_factory(password="right-secret")
        return server.url_with("right-secret"), server.url_with("wrong-secret")
