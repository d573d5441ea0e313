"""pytest plugin of the Redis transport (entry point ``pytest11: weavelet_redis.testing``): real redis-servers.

Fixtures (names start with ``weavelet_`` so they never clash with a user's own):

``weavelet_redis_server``          (session) a :class:`RedisServer` on a free loopback port, no persistence; or,
                                   when ``WEAVELET_TEST_REDIS_URL`` is set, that running server (never stopped).
``weavelet_redis_url``             (function) a URL on ``weavelet_redis_server`` with a key prefix of its own, so
                                   tests sharing the server never see each other's keys.
``weavelet_redis_server_factory``  (function) ``factory(password=None, persistent=False, tls=None)`` starts a
                                   private server; all are stopped after the test. Outage tests ``kill()``,
                                   ``stop()``, ``pause()``/``resume()`` and ``start()`` them on the same port.
``weavelet_redis_sentinel``        (function) a started :class:`RedisSentinelGroup`: a master, a replica and three
                                   sentinels on loopback.
``weavelet_redis_cluster``         (function) a started :class:`RedisCluster` of three masters on loopback.

The binary comes from ``PATH``; without it the fixtures fail (never skip) with the command that installs it.
This module imports only the standard library and pytest (and redis-py inside a few helpers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from weavelet_core.testing.servers import DEFAULT_READY_TIMEOUT, ManagedServer, ServerFailed, ServerGroup, free_port

REDIS_URL_ENV = "WEAVELET_TEST_REDIS_URL"
INSTALL_HINT = (
    "redis-server was not found on PATH: install it (Debian/Ubuntu: apt-get install redis-server; Fedora: "
    "dnf install redis; macOS: brew install redis), or set WEAVELET_TEST_REDIS_URL=redis://HOST:PORT/DB to run "
    "the shared-server tests against a running server"
)


class RedisServerNotFound(RuntimeError):
    """``redis-server`` is not installed here; the message says how to install it."""


def find_redis_server() -> str:
    """The path of ``redis-server``, or raise :class:`RedisServerNotFound`."""
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerNotFound(INSTALL_HINT)
    return found


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to (or replaced in) its query string."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS server: its certificate and key, and the CA that signed it (clients trust it)."""

    cert: Path
    key: Path
    ca: Path


class RedisServer(ManagedServer):
    """One ``redis-server`` process on ``127.0.0.1``, started and stopped by the test.

    :param directory: working directory (log file, persistence files, configuration).
    :param port: fixed port; default a free one, kept across :meth:`stop`/:meth:`start`.
    :param password: ``requirepass`` for authentication tests.
    :param persistent: append-only file fsynced on every write, so data survives ``kill()``; default no
        persistence at all (``--save "" --appendonly no``): a restarted server is empty.
    :param tls: serve TLS only (``rediss://``), with these files.
    :param replica_of: ``(host, port)`` of a master to replicate.
    :param cluster: run with ``--cluster-enabled yes`` (a member of a Redis Cluster).
    :param args: more ``redis-server`` arguments (``["--maxmemory", "10mb"]``).
    """

    kind = "redis-server"
    log_name = "redis-server.log"

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        persistent: bool = False,
        tls: TlsFiles | None = None,
        replica_of: tuple[str, int] | None = None,
        cluster: bool = False,
        args: list[str] | None = None,
    ) -> None:
        super().__init__(directory, port=port)
        self.password = password
        self.persistent = persistent
        self.tls = tls
        self.replica_of = replica_of
        self.cluster = cluster
        if cluster:
            self.port_below = 55536  # the cluster bus listens on the port + 10000
        self.args = list(args or [])
        self._external_url: str | None = None

    @classmethod
    def attach(cls, url: str) -> RedisServer:
        """A handle on a server this process did not start (``WEAVELET_TEST_REDIS_URL``); it cannot be stopped."""
        parts = urlsplit(url)
        server = cls(Path("."), port=parts.port or 6379, password=parts.password)
        server.host = parts.hostname or "127.0.0.1"
        server._external_url = url
        return server

    # -- addresses ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``redis://`` (or ``rediss://``) URL of database 0, with the password if there is one."""
        return self.url_with(self.password)

    def url_with(self, password: str | None, *, user: str = "") -> str:
        """The server's URL with other credentials (for authentication tests)."""
        if self._external_url is not None:
            return self._external_url
        auth = f"{user}:{password}@" if password is not None else (f"{user}@" if user else "")
        if self.tls is not None:
            return f"rediss://{auth}{self.host}:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def is_external(self) -> bool:
        """True for a server this process did not start (it cannot be stopped or killed)."""
        return self._external_url is not None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        command = [find_redis_server(), "--bind", self.host, "--dir", str(self.directory)]
        command += ["--logfile", "", "--daemonize", "no", "--save", ""]
        if self.tls is not None:
            command += ["--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            command += ["--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        else:
            command += ["--port", str(self.port)]
        if self.persistent:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        if self.password is not None:
            command += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            command += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        if self.cluster:
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            command += ["--cluster-node-timeout", "2000"]
        return command + self.args

    def ready(self) -> bool:
        return self.ping()

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (again, on the same port after a stop) and return when it answers; raise
        :class:`RedisServerNotFound` without a binary, :class:`ServerFailed` when it does not start."""
        self._require_managed("start")
        find_redis_server()
        return super().start(timeout)

    def ping(self) -> bool:
        """Whether the server accepts connections and commands now (an authentication demand counts)."""
        try:
            with socket.create_connection((self.host, self.port or 0), timeout=1.0) as raw:
                sock: socket.socket = raw
                if self.tls is not None:
                    context = ssl.create_default_context(cafile=str(self.tls.ca))
                    sock = context.wrap_socket(raw, server_hostname=self.host)
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except (OSError, ssl.SSLError):
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (SIGTERM); kill if it does not exit within ``timeout``. Idempotent."""
        self._require_managed("stop")
        super().stop(timeout)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash or an OOM kill. Idempotent."""
        self._require_managed("kill")
        super().kill()

    def _require_managed(self, action: str) -> None:
        if self._external_url is not None:
            raise RuntimeError(
                f"cannot {action} the external redis server from {REDIS_URL_ENV}; outage tests start their own "
                "with the weavelet_redis_server_factory fixture"
            )

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        """Run ``redis-cli -h HOST -p PORT ARGS`` against this server; its output (raise on failure)."""
        command = ["redis-cli", "-h", self.host, "-p", str(self.port)]
        if self.password is not None:
            command += ["--no-auth-warning", "-a", self.password]
        done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise ServerFailed(f"redis-cli {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def __repr__(self) -> str:
        state = "paused" if self.paused else ("running" if self.running else "stopped")
        return f"<RedisServer {self.host}:{self.port} {state}>"


class RedisSentinel(ManagedServer):
    """One Redis Sentinel (``redis-server sentinel.conf --sentinel``) watching ``master_name`` at ``master``.

    :param directory: its directory (the sentinel rewrites its configuration file there).
    :param master: ``(host, port)`` of the master to monitor.
    :param master_name: the service name clients ask for (``mymaster``).
    :param quorum: sentinels that must agree the master is down.
    :param down_after_ms: milliseconds without an answer before a sentinel thinks the master down.
    """

    kind = "redis-sentinel"
    log_name = "sentinel.log"

    def __init__(
        self,
        directory: Path,
        master: tuple[str, int],
        *,
        master_name: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        super().__init__(directory)
        self.master = master
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def config_path(self) -> Path:
        return self.directory / "sentinel.conf"

    def prepare(self) -> None:
        if self.config_path.exists():
            return  # a restarted sentinel keeps what it learned (the sentinel rewrites this file)
        host, port = self.master
        self.config_path.write_text(
            f"bind {self.host}\nport {self.port}\ndir {self.directory}\n"
            f"sentinel monitor {self.master_name} {host} {port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.master_name} 1\n"
        )

    def command(self) -> list[str]:
        return [find_redis_server(), str(self.config_path), "--sentinel"]

    def ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port or 0), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def master_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the master this sentinel names now, or ``None`` if it cannot say."""
        try:
            with socket.create_connection((self.host, self.port or 0), timeout=1.0) as sock:
                sock.settimeout(1.0)
                name = self.master_name.encode()
                sock.sendall(b"SENTINEL GET-MASTER-ADDR-BY-NAME " + name + b"\r\n")
                reply = sock.recv(256).split(b"\r\n")
        except OSError:
            return None
        # *2 $len host $len port
        if len(reply) >= 5 and reply[0] == b"*2":
            return reply[2].decode(), int(reply[4])
        return None


class RedisSentinelGroup(ServerGroup):
    """A master, ``replicas`` replicas and ``sentinels`` sentinels on loopback, for failover tests.

    :param directory: parent of the members' directories.
    :param master_name: the service name (``mymaster``).
    :param replicas: replicas of the master (1 by default).
    :param sentinels: sentinels (3 by default; quorum 2).
    :param persistent: append-only file fsynced on every write on every data server.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        master_name: str = "mymaster",
        replicas: int = 1,
        sentinels: int = 3,
        persistent: bool = True,
    ) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.master_name = master_name
        self.master = self.add(RedisServer(self.directory / "master", persistent=persistent))
        self.replicas: list[RedisServer] = []
        self.sentinels: list[RedisSentinel] = []
        self._replica_count = replicas
        self._sentinel_count = sentinels
        self._persistent = persistent

    @property
    def data_servers(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(s.host, s.port or 0) for s in self.sentinels]

    def url(self, *, db: int = 0, **query: str) -> str:
        """``redis+sentinel://H:P1,H:P2,H:P3/MASTER/DB`` with ``query`` appended."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinel_addresses)
        url = f"redis+sentinel://{hosts}/{self.master_name}/{db}"
        return with_query(url, **query) if query else url

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT) -> RedisSentinelGroup:
        """Start the master, its replicas (waiting until each is in sync) and the sentinels (waiting until each
        knows the replicas); raise :class:`ServerFailed` (stopping everything) otherwise."""
        try:
            self.master.start(timeout)
            master_address = (self.master.host, self.master.port or 0)
            for index in range(self._replica_count):
                replica = self.add(
                    RedisServer(
                        self.directory / f"replica-{index + 1}", persistent=self._persistent, replica_of=master_address
                    )
                )
                self.replicas.append(replica)
                replica.start(timeout)
            self._wait(
                lambda: all("master_link_status:up" in r.cli("INFO", "replication") for r in self.replicas),
                timeout,
                "the replicas did not sync with the master",
            )
            for index in range(self._sentinel_count):
                sentinel = self.add(
                    RedisSentinel(
                        self.directory / f"sentinel-{index + 1}",
                        master_address,
                        master_name=self.master_name,
                        quorum=self._sentinel_count // 2 + 1,
                    )
                )
                self.sentinels.append(sentinel)
                sentinel.start(timeout)
            self._wait(self._sentinels_know_everyone, timeout, "the sentinels did not discover each other")
        except BaseException:
            self.close()
            raise
        return self

    def _sentinels_know_everyone(self) -> bool:
        for sentinel in self.sentinels:
            try:
                info = self._sentinel_cli(sentinel, "SENTINEL", "MASTER", self.master_name)
            except ServerFailed:
                return False
            fields = info.split()
            values = dict(zip(fields[::2], fields[1::2], strict=False))
            if int(values.get("num-slaves", 0)) < len(self.replicas):
                return False
            if int(values.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
        return True

    @staticmethod
    def _sentinel_cli(sentinel: RedisSentinel, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-h", sentinel.host, "-p", str(sentinel.port), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if done.returncode != 0:
            raise ServerFailed(done.stderr.strip())
        return done.stdout

    @staticmethod
    def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise ServerFailed(f"{what} within {timeout:g}s")
            time.sleep(0.1)

    def current_master(self) -> RedisServer | None:
        """The data server the sentinels' majority names as master now, if one does."""
        named = [s.master_address() for s in self.sentinels if s.running]
        for server in self.data_servers:
            votes = sum(1 for address in named if address == (server.host, server.port))
            if votes > len(self.sentinels) // 2:
                return server
        return None

    def wait_failover(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until a majority of sentinels names a master other than ``old``, and it takes writes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            master = self.current_master()
            if master is not None and master is not old and master.running:
                with contextlib.suppress(ServerFailed):
                    if "role:master" in master.cli("INFO", "replication"):
                        return master
            time.sleep(0.1)
        raise TimeoutError(f"no failover away from {old} within {timeout:g}s")

    def __enter__(self) -> RedisSentinelGroup:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisCluster(ServerGroup):
    """A Redis Cluster of ``masters`` masters (no replicas) on loopback, created with ``redis-cli --cluster``.

    :param directory: parent of the nodes' directories.
    :param masters: number of masters (3, the least ``redis-cli --cluster create`` accepts).
    """

    def __init__(self, directory: str | Path, *, masters: int = 3) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.nodes = [
            self.add(RedisServer(self.directory / f"node-{index + 1}", cluster=True)) for index in range(masters)
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://H:P1,H:P2,H:P3/0``: every node as a startup node."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes) + "/0"

    def start(self, timeout: float = 30.0) -> RedisCluster:
        """Start the nodes, join them into one cluster covering every slot, and wait until it is ``ok``."""
        try:
            for node in self.nodes:
                node.start(timeout)
            self.nodes[0].cli(
                "--cluster", "create", *(node.address for node in self.nodes), "--cluster-yes", timeout=timeout
            )
            deadline = time.monotonic() + timeout
            while not all("cluster_state:ok" in node.cli("CLUSTER", "INFO") for node in self.nodes):
                if time.monotonic() > deadline:
                    raise ServerFailed(f"the cluster did not reach cluster_state:ok within {timeout:g}s")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _start_or_fail(server: RedisServer) -> RedisServer:
    try:
        return server.start()
    except RedisServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


RedisServerFactory = Callable[..., RedisServer]


@pytest.fixture(scope="session")
def weavelet_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the session (or the one named by ``WEAVELET_TEST_REDIS_URL``)."""
    external = os.environ.get(REDIS_URL_ENV, "").strip()
    if external:
        yield RedisServer.attach(external)
        return
    server = _start_or_fail(RedisServer(tmp_path_factory.mktemp("redis-server")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def weavelet_redis_url(weavelet_redis_server: RedisServer) -> Iterator[str]:
    """A URL on the shared server with a fresh key prefix; on an external server its keys are deleted after."""
    prefix = f"weavelet-test-{uuid.uuid4().hex[:12]}:"
    yield with_query(weavelet_redis_server.url, prefix=prefix)
    if weavelet_redis_server.is_external:
        _delete_keys(weavelet_redis_server.url, prefix)


def _delete_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def weavelet_redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerFactory]:
    """Start private redis-servers: ``factory(**kwargs) -> RedisServer`` with :class:`RedisServer`'s keyword
    arguments (``password``, ``persistent``, ``tls``, ``replica_of``, ``args``); all are stopped after the test."""
    started: list[RedisServer] = []

    def factory(**kwargs: Any) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis-private"), **kwargs)
        started.append(server)
        return _start_or_fail(server)

    yield factory
    for server in started:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture
def weavelet_redis_sentinel() -> Iterator[RedisSentinelGroup]:
    """A started master, replica and three sentinels on loopback (``mymaster``); all stopped after the test."""
    with tempfile.TemporaryDirectory(prefix="weavelet-sentinel-") as root:
        group = RedisSentinelGroup(root)
        try:
            group.start(timeout=30)
        except RedisServerNotFound as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            yield group
        finally:
            group.close()


@pytest.fixture
def weavelet_redis_cluster() -> Iterator[RedisCluster]:
    """A started three-master Redis Cluster on loopback; stopped after the test."""
    with tempfile.TemporaryDirectory(prefix="weavelet-rcluster-") as root:
        cluster = RedisCluster(root)
        try:
            cluster.start(timeout=30)
        except RedisServerNotFound as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            yield cluster
        finally:
            cluster.close()


__all__ = [
    "REDIS_URL_ENV",
    "RedisCluster",
    "RedisSentinel",
    "RedisSentinelGroup",
    "RedisServer",
    "RedisServerFactory",
    "RedisServerNotFound",
    "TlsFiles",
    "find_redis_server",
    "free_port",
    "weavelet_redis_cluster",
    "weavelet_redis_sentinel",
    "weavelet_redis_server",
    "weavelet_redis_server_factory",
    "weavelet_redis_url",
    "with_query",
]
