"""Real ``redis-server`` processes for tests: a shared one per session, and private ones for outage tests.

Fixtures (loaded by weavelet's pytest plugin):

``redis_server``          (session) a :class:`RedisServer` on a free loopback port, no persistence; or, when
                          ``WEAVELET_TEST_REDIS_URL`` is set, that running server (which cannot be stopped).
``redis_url``             (function) a URL on ``redis_server`` with a key prefix of its own, so tests sharing
                          the server never see each other's keys.
``redis_server_factory``  (function) ``factory(password=None, persistent=False, tls=None)`` starts a private
                          server; all are stopped after the test. Outage tests ``kill()``/``stop()`` and
                          ``start()`` them again on the same port.

The binary comes from ``PATH``; without it the fixtures fail (never skip) with the command that installs it.
This module imports only the standard library and pytest: it loads without redis-py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

REDIS_URL_ENV = "WEAVELET_TEST_REDIS_URL"
INSTALL_HINT = (
    "redis-server was not found on PATH: install it (Debian/Ubuntu: apt-get install redis-server; Fedora: "
    "dnf install redis; macOS: brew install redis), or set WEAVELET_TEST_REDIS_URL=redis://HOST:PORT/DB to run "
    "the shared-server tests against a running server"
)
_RESERVED_PORTS = frozenset({6379, 6380})


class RedisServerNotFound(RuntimeError):
    """``redis-server`` is not installed here; the message says how to install it."""


def find_redis_server() -> str:
    """The path of ``redis-server``, or raise :class:`RedisServerNotFound`."""
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerNotFound(INSTALL_HINT)
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (never Redis's well-known ports, where a machine's own server runs)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _RESERVED_PORTS:
            return port


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


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1``, started and stopped by the test.

    :param directory: working directory (log file, persistence files).
    :param port: fixed port; default a free one, kept across :meth:`stop`/:meth:`start`.
    :param password: ``requirepass`` for authentication tests.
    :param persistent: append-only file fsynced on every write, so data survives ``kill()``; default no
        persistence at all (``--save "" --appendonly no``): a restarted server is empty.
    :param tls: serve TLS only (``rediss://``), with these files.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        persistent: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.host = "127.0.0.1"
        self.port = port or 0
        self.password = password
        self.persistent = persistent
        self.tls = tls
        self.log_path = self.directory / "redis-server.log"
        self._fixed_port = port is not None
        self._process: subprocess.Popen[bytes] | None = None
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

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        command = [find_redis_server(), "--bind", self.host, "--dir", str(self.directory)]
        command += ["--logfile", str(self.log_path), "--daemonize", "no", "--save", ""]
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
            command += ["--requirepass", self.password]
        return command

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (again, on the same port after a stop) and return when it answers."""
        self._require_managed("start")
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            if not self._fixed_port and (attempt or not self.port):
                self.port = free_port()
            self._process = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                self._wait_ready(timeout)
                return self
            except RuntimeError:
                self.kill()
                if self._fixed_port or "Address already in use" not in self.log_tail():
                    raise
        raise RuntimeError(f"redis-server could not find a free port; see {self.log_path}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with code {self._process.returncode} on port {self.port}:\n{self.log_tail()}"
                )
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} not ready within {timeout:g}s:\n{self.log_tail()}")

    def ping(self) -> bool:
        """Whether the server accepts connections and commands now (an authentication demand counts)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as raw:
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
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout)
        self._process = None

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash or an OOM kill. Idempotent."""
        self._require_managed("kill")
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(10.0)
        self._process = None

    def _require_managed(self, action: str) -> None:
        if self._external_url is not None:
            raise RuntimeError(
                f"cannot {action} the external redis server from {REDIS_URL_ENV}; outage tests start their own "
                "with the redis_server_factory fixture"
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.host}:{self.port} {'running' if self.running else 'stopped'}>"


def _start_or_fail(server: RedisServer) -> RedisServer:
    try:
        return server.start()
    except RedisServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


RedisServerFactory = Callable[..., RedisServer]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
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
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A URL on the shared server with a fresh key prefix; on an external server its keys are deleted after."""
    prefix = f"weavelet-test-{uuid.uuid4().hex[:12]}:"
    yield with_query(redis_server.url, prefix=prefix)
    if redis_server.is_external:
        _delete_keys(redis_server.url, prefix)


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
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerFactory]:
    """Start private redis-servers: ``factory(password=None, persistent=False, tls=None) -> RedisServer``."""
    started: list[RedisServer] = []

    def factory(*, password: str | None = None, persistent: bool = False, tls: TlsFiles | None = None) -> RedisServer:
        server = RedisServer(
            tmp_path_factory.mktemp("redis-private"), password=password, persistent=persistent, tls=tls
        )
        started.append(server)
        return _start_or_fail(server)

    yield factory
    for server in started:
        with contextlib.suppress(Exception):
            server.stop()


# Only the fixtures: weavelet's pytest plugin star-imports this module. Import the helpers by name.
__all__ = ["redis_server", "redis_server_factory", "redis_url"]
