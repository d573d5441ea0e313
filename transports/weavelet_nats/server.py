"""``weavelet server``: a local nats-server with JetStream, in the foreground, until Ctrl-C or SIGTERM.

It listens on loopback only (``127.0.0.1``), port 4222 by default, and keeps its JetStream store (the desired
configs, statuses and outcomes) under ``--store-dir`` (default: ``nats`` in weavelet's per-user state
directory), so stopping and starting it again loses nothing. When port 4222 is already taken and no
``--port`` was given, it picks a free port; the URL to use is printed either way.

The ``weavelet`` command imports this module only to run this subcommand; it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from weavelet_nats.embedded import NatsServer, NatsServerFailed, port_is_free

DEFAULT_PORT = 4222


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
        "--port",
        type=_port,
        default=None,
        help=f"TCP port on 127.0.0.1 (default {DEFAULT_PORT}, or a free port when {DEFAULT_PORT} is taken; "
        "0 picks a free port)",
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


def _choose_port(requested: int | None) -> tuple[int | None, str]:
    """The port to ask nats-server for (``None``: any free one) and a note for the user."""
    if requested is None:
        if port_is_free(DEFAULT_PORT):
            return DEFAULT_PORT, ""
        return None, f"port {DEFAULT_PORT} is in use, so a free port was chosen"
    if requested == 0:
        return None, ""
    if not port_is_free(requested):
        raise NatsServerFailed(
            f"port {requested} on 127.0.0.1 is already in use (another nats-server?); choose another with "
            "--port N, or --port 0 for a free one"
        )
    return requested, ""


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT or SIGTERM; return the exit status (0 after a clean stop)."""
    store_dir: Path = (args.store_dir or default_store_dir()).expanduser().resolve()
    port, note = _choose_port(args.port)
    # Every JetStream write is on disk before it is acknowledged: the write rate of a control plane is tiny, and
    # with the lazy default a crash can lose acknowledged writes (Jepsen, NATS 2.12.1, 2025-12-08).
    server = NatsServer(store_dir, port=port, die_with_parent=True, sync_always=True)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        out = sys.stdout
        if note:
            out.write(f"weavelet server: {note}\n")
        out.write(
            f"weavelet server: nats-server with JetStream listening on {server.url}\n"
            f"  store: {store_dir}\n"
            f"  log:   {server.log_path}\n"
            "  every JetStream write is synced to disk before it is acknowledged (sync_interval: always)\n"
            f"use it with --url {server.url}, or: export WEAVELET_URL={server.url}\n"
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


__all__ = ["DEFAULT_PORT", "add_arguments", "default_store_dir", "run"]
