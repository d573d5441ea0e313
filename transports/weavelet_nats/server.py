"""``weavelet server``: a local nats-server with JetStream, in the foreground, until Ctrl-C or SIGTERM.

It listens on loopback (``127.0.0.1``) unless ``--host`` says otherwise (``--host 0.0.0.0``: every interface,
to serve other machines), and keeps its JetStream store (the desired configs, statuses and outcomes) under
``--store-dir`` (default: ``nats`` in weavelet's per-user state directory), so stopping and starting it again
loses nothing. Its port is stable across restarts: without ``--port`` it is 4222, else the port this store
used last time (remembered in ``STORE/port``), else the first free one of 4223-4231; the URL to use is printed
either way.

The ``weavelet`` command imports this module only to run this subcommand; it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from weavelet_nats.embedded import NatsServer, NatsServerFailed, port_is_free

DEFAULT_PORT = 4222
FALLBACK_PORTS = range(4223, 4232)
"""Tried in order when 4222 (and the port this store used last) are taken: the same port on every restart."""
PORT_FILE = "port"
"""The file in the store directory remembering the port the server last listened on."""


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``weavelet server``'s options to ``parser``."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface, so "
        "that trainers and weavers on other machines can connect: protect it with a firewall or NATS auth)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"TCP port (default {DEFAULT_PORT}; when it is taken, the port this store used last time, else the "
        f"first free one of {FALLBACK_PORTS.start}-{FALLBACK_PORTS.stop - 1}; 0 picks any free port)",
    )
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="directory of the JetStream store, kept across restarts (default: nats/ in weavelet's "
        "per-user state directory, $WEAVELET_STATE_DIR if set)",
    )


def default_store_dir() -> Path:
    """``nats`` under weavelet's per-user state directory."""
    from weavelet_core.paths import default_state_dir

    return default_state_dir() / "nats"


def _remembered_port(store_dir: Path) -> int | None:
    try:
        port = int((store_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port <= 65535 else None


def _choose_port(
    requested: int | None, host: str = "127.0.0.1", store_dir: Path | None = None
) -> tuple[int | None, str]:
    """The port to ask nats-server for (``None``: any free one) and a note for the user.

    Without ``requested``: 4222, else the port ``store_dir`` remembers, else the first free fallback port, so
    the URL stays the same across restarts. Raises ``NatsServerFailed`` when the requested port, or every
    candidate, is taken.
    """
    if requested is None:
        remembered = _remembered_port(store_dir) if store_dir is not None else None
        candidates = [DEFAULT_PORT, *([remembered] if remembered and remembered != DEFAULT_PORT else []),
                      *FALLBACK_PORTS]  # fmt: skip
        for port in dict.fromkeys(candidates):
            if port_is_free(port, host):
                note = "" if port == DEFAULT_PORT else f"port {DEFAULT_PORT} is in use, so port {port} was chosen"
                return port, note
        raise NatsServerFailed(
            f"ports {DEFAULT_PORT}-{FALLBACK_PORTS.stop - 1} on {host} are all in use; choose one with --port N, "
            "or --port 0 for any free one"
        )
    if requested == 0:
        return None, ""
    if not port_is_free(requested, host):
        raise NatsServerFailed(
            f"port {requested} on {host} is already in use (another nats-server?); choose another with "
            "--port N, or --port 0 for a free one"
        )
    return requested, ""


def _client_url(url: str, host: str) -> str:
    """The URL to give clients: for a server on every interface, this machine's name instead of 0.0.0.0."""
    if host in ("0.0.0.0", "::", ""):
        import socket

        return url.replace(f"//{host}:", f"//{socket.getfqdn()}:", 1).replace("//[::]:", f"//{socket.getfqdn()}:")
    return url


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT or SIGTERM; return the exit status (0 after a clean stop)."""
    store_dir: Path = (args.store_dir or default_store_dir()).expanduser().resolve()
    host: str = getattr(args, "host", None) or "127.0.0.1"
    port, note = _choose_port(args.port, host, store_dir)
    # Every JetStream write is on disk before it is acknowledged: the write rate of a control plane is tiny, and
    # with the lazy default a crash can lose acknowledged writes (Jepsen, NATS 2.12.1, 2025-12-08).
    server = NatsServer(store_dir, port=port, host=host, die_with_parent=True, sync_always=True)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        with contextlib.suppress(OSError):
            (store_dir / PORT_FILE).write_text(f"{server.port}\n")
        out = sys.stdout
        if note:
            out.write(f"weavelet server: {note}\n")
        url = _client_url(server.url, host)
        out.write(
            f"weavelet server: nats-server with JetStream listening on {url}\n"
            f"  store: {store_dir}\n"
            f"  log:   {server.log_path}\n"
            "  every JetStream write is synced to disk before it is acknowledged (sync_interval: always)\n"
            f"use it with --url {url}, or: export WEAVELET_URL={url}\n"
            "press Ctrl-C to stop\n"
        )
        out.flush()
        while not stop.wait(0.2):
            # Ctrl-C in a terminal reaches nats-server too; it may exit just before our handler runs.
            if not server.running and not stop.wait(0.5):
                assert server.process is not None
                sys.stderr.write(
                    f"weavelet server: nats-server exited unexpectedly (status {server.process.returncode}); "
                    f"end of its log ({server.log_path}):\n{server.log_tail()}\n"
                )
                return 1
        sys.stdout.write("weavelet server: stopping\n")
        sys.stdout.flush()
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["DEFAULT_PORT", "FALLBACK_PORTS", "add_arguments", "default_store_dir", "run"]
