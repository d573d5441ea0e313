"""``weavelet server``: a real ``python -m weavelet_core server`` process, used by a Weaver and the CLI."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from weavelet_core import Weaver

CliRunner = Callable[..., subprocess.CompletedProcess[str]]  # the run_cli fixture of conftest.py

STARTUP_TIMEOUT = 30.0


class ServerProcess:
    """``weavelet server`` as a child process; :meth:`wait_url` reads the URL it prints."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "weavelet_core", "server", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output: list[str] = []

    def wait_url(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                line = self.process.stdout.readline()
                if not line:
                    break
                self.output.append(line)
                found = re.search(r"listening on (nats://\S+)", line)
                if found:
                    return found.group(1)
        self.process.kill()
        _, err = self.process.communicate(timeout=10)
        pytest.fail(f"weavelet server printed no URL; output: {''.join(self.output)!r}; stderr: {err!r}")

    def interrupt(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=20)
        out, err = self.process.stdout.read(), self.process.stderr.read()
        return self.process.returncode, "".join(self.output) + out, err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


StartServer = Callable[[list[str]], ServerProcess]


@pytest.fixture
def start_server(isolated_env: dict[str, str]) -> Iterator[StartServer]:
    """``start_server([ARGS])``: run ``weavelet server ARGS``; every one started is killed after the test."""
    started: list[ServerProcess] = []

    def start(args: list[str]) -> ServerProcess:
        server = ServerProcess(args, isolated_env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def _nats_server_children(pid: int) -> list[int]:
    """Pids of processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return children


def test_server_serves_a_weaver_and_keeps_its_store_across_restarts(start_server: StartServer, tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = start_server(["--port", "0", "--store-dir", str(store)])
    url = server.wait_url()
    assert url.startswith("nats://127.0.0.1:")
    with Weaver(url) as weaver:
        weaver.set("r1", {"lr": 0.1})
        revision = weaver.get("r1")
    assert revision is not None
    assert (revision.revision, revision.config) == (1, {"lr": 0.1})
    children = _nats_server_children(server.process.pid)
    assert children, "weavelet server runs nats-server as its child"

    status, out, err = server.interrupt(signal.SIGINT)
    assert status == 0, err
    assert "stopping" in out
    assert f"export WEAVELET_URL={url}" in out
    assert str(store) in out
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()

    again = start_server(["--port", "0", "--store-dir", str(store)])
    with Weaver(again.wait_url()) as weaver:
        kept = weaver.get("r1")
    assert kept == revision
    status, _, err = again.interrupt(signal.SIGTERM)
    assert status == 0, err


def test_cli_set_and_get_against_the_server(start_server: StartServer, run_cli: CliRunner, tmp_path: Path) -> None:
    server = start_server(["--port", "0", "--store-dir", str(tmp_path / "store")])
    url = server.wait_url()
    written = run_cli("set", "r1", "lr=0.1", "--url", url)
    assert written.returncode == 0, written.stderr
    read = run_cli("get", "r1", "--url", url, "--json")
    assert read.returncode == 0, read.stderr
    assert '"lr": 0.1' in read.stdout or '"lr":0.1' in read.stdout
    status, _, err = server.interrupt()
    assert status == 0, err


def test_a_taken_port_is_refused_with_the_fix(start_server: StartServer, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(["--port", str(port), "--store-dir", str(tmp_path / "store")])
        _, err = server.process.communicate(timeout=30)
    assert server.process.returncode == 1
    assert f"port {port}" in err
    assert "--port 0" in err
    assert len(err.strip().splitlines()) == 1


def test_a_killed_server_command_takes_its_nats_server_with_it(start_server: StartServer, tmp_path: Path) -> None:
    import psutil

    server = start_server(["--port", "0", "--store-dir", str(tmp_path / "store")])
    server.wait_url()
    children = psutil.Process(server.process.pid).children()
    assert [c.name() for c in children] == ["nats-server"]
    server.kill()  # SIGKILL: no chance to stop its child itself
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], "nats-server outlived the killed 'weavelet server'"


def test_host_option_serves_other_interfaces_with_a_reachable_url(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(["--host", "0.0.0.0", "--port", "0", "--store-dir", str(tmp_path / "store")])
    url = server.wait_url()
    assert "0.0.0.0" not in url, "clients are told the machine's name, not the wildcard address"
    port = int(url.rsplit(":", 1)[1])
    with Weaver(f"nats://127.0.0.1:{port}") as weaver:
        weaver.set("r1", {"lr": 0.1})
        assert weaver.get("r1") is not None
    status, _, err = server.interrupt()
    assert status == 0, err


def test_the_port_stays_the_same_across_restarts_when_4222_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weavelet_nats import server as server_cli

    taken = {4222, 4223}
    monkeypatch.setattr(server_cli, "port_is_free", lambda port, host="127.0.0.1": port not in taken)
    store = tmp_path / "store"
    store.mkdir()
    assert server_cli._choose_port(None, "127.0.0.1", store)[0] == 4224  # the first free fallback
    (store / server_cli.PORT_FILE).write_text("4229\n")
    port, note = server_cli._choose_port(None, "127.0.0.1", store)
    assert port == 4229
    assert "port 4222 is in use, so port 4229 was chosen" in note
    taken.discard(4222)
    assert server_cli._choose_port(None, "127.0.0.1", store)[0] == 4222


def test_the_server_syncs_every_jetstream_write_to_disk(start_server: StartServer, tmp_path: Path) -> None:
    """Jepsen's NATS 2.12.1 analysis (2025-12-08) lost acknowledged writes with the lazy default fsync."""
    store = tmp_path / "store"
    server = start_server(["--port", "0", "--store-dir", str(store)])
    url = server.wait_url()
    config = (store / "nats-server.conf").read_text()
    assert "sync_interval: always" in config
    with Weaver(url) as weaver:
        assert weaver.set("r1", {"lr": 0.1}).revision == 1
    status, out, err = server.interrupt()
    assert status == 0, err
    assert "synced to disk before it is acknowledged" in out
