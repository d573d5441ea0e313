"""docs/deploy.md, Redis: the documented Sentinel setup and its URL (with wait_replicas), the Redis Cluster
commands, and the ACL users, run as written (host names and ports replaced by loopback ones)."""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from weavelet_core import Revision, WeaveletProcess, Weaver, open_transport
from weavelet_core.errors import PermissionDenied, TransportError
from weavelet_core.protocol import Status
from weavelet_core.testing.servers import ManagedServer, ServerGroup, free_port
from weavelet_redis.testing import RedisServer, RedisServerFactory, find_redis_server

from .conftest import AnswerLater


def _url(text: str) -> str:
    found = re.search(r'WEAVELET_URL="([^"]+)"', text)
    assert found is not None, text
    return found.group(1)


def _directives(text: str) -> list[str]:
    """``redis.conf`` lines as ``redis-server`` arguments (comments dropped)."""
    args: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, *values = line.split()
            args += [f"--{name}", *values]
    return args


class DocProcess(ManagedServer):
    """A redis-server or sentinel from a command line or configuration text as docs/deploy.md shows it."""

    kind = "redis-server"
    log_name = "redis.log"

    def __init__(self, directory: Path, port: int, command: list[str]) -> None:
        super().__init__(directory, port=port)
        self._command = command

    def command(self) -> list[str]:
        return self._command

    def ready(self) -> bool:
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), "PING"], capture_output=True, text=True, timeout=5, check=False
        )
        return done.stdout.strip() == "PONG"


def _cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _sentinel_ready(port: int) -> bool:
    fields = _cli(port, "SENTINEL", "MASTER", "mymaster").split()
    values = dict(zip(fields[::2], fields[1::2], strict=False))
    return int(values.get("num-slaves", 0)) >= 1 and int(values.get("num-other-sentinels", 0)) >= 2


@pytest.fixture
def documented_sentinels(snippet: dict[str, str]) -> Iterator[tuple[str, RedisServer, RedisServer]]:
    data = snippet["redis-data"]
    master_lines = "\n".join(line for line in data.splitlines() if not line.startswith("replicaof"))
    group = ServerGroup()
    with tempfile.TemporaryDirectory(prefix="weavelet-doc-sentinel-") as root:
        master = group.add(RedisServer(Path(root) / "master", args=_directives(master_lines)))
        try:
            master.start()
            replica_conf = data.replace("redis-1 6379", f"127.0.0.1 {master.port}")
            replica = group.add(RedisServer(Path(root) / "replica", args=_directives(replica_conf)))
            replica.start()
            deadline = time.monotonic() + 15
            while "master_link_status:up" not in replica.cli("INFO", "replication"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            url = _url(snippet["redis-sentinel-url"])
            sentinel_ports: list[int] = []
            for index in range(1, 4):
                port = free_port()
                directory = Path(root) / f"sentinel-{index}"
                directory.mkdir()
                conf = snippet["redis-sentinel"].replace("port 26379", f"bind 127.0.0.1\nport {port}")
                conf = conf.replace("redis-1 6379", f"127.0.0.1 {master.port}")
                (directory / "sentinel.conf").write_text(conf + "\n")
                command = [find_redis_server(), str(directory / "sentinel.conf"), "--sentinel"]
                group.add(DocProcess(directory, port, command)).start()
                url = url.replace(f"sentinel-{index}:26379", f"127.0.0.1:{port}")
                sentinel_ports.append(port)
            deadline = time.monotonic() + 30
            while not all(_sentinel_ready(port) for port in sentinel_ports):
                assert time.monotonic() < deadline, "the sentinels did not find each other and the replica"
                time.sleep(0.1)
            yield url, master, replica
        finally:
            group.close()


@pytest.mark.slow
def test_the_documented_sentinel_setup_fails_over_and_wait_replicas_says_what_it_guarantees(
    documented_sentinels: tuple[str, RedisServer, RedisServer],
) -> None:
    url, master, replica = documented_sentinels
    assert "wait_replicas=1" in url
    run = f"doc-{uuid.uuid4().hex[:6]}"
    with Weaver(url, write_timeout=20) as weaver:
        weaver.set(run, {"lr": 0.1})  # acknowledged: the replica has it
    master.kill()
    deadline = time.monotonic() + 30
    sentinels = [int(port) for port in re.findall(r"127\.0\.0\.1:(\d+)", url)]
    while not all(
        str(replica.port) in _cli(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster") for port in sentinels
    ):
        assert time.monotonic() < deadline, "no failover"
        time.sleep(0.1)
    assert "role:master" in replica.cli("INFO", "replication")
    with Weaver(url, write_timeout=20) as weaver:
        kept = weaver.get(run)
        assert kept is not None
        assert kept.config == {"lr": 0.1}, "the acknowledged revision survived the failover"
        # No replica is left to confirm a write: it is on the new master but not acknowledged, as documented.
        with pytest.raises(TransportError, match=r"only 0 of the 1 replicas"):
            weaver.set(run, {"lr": 0.2})
        latest = weaver.get(run)
        assert latest is not None
        assert latest.config == {"lr": 0.2}


@pytest.mark.slow
def test_the_documented_cluster_commands_make_a_working_cluster(snippet: dict[str, str]) -> None:
    lines = [line for line in snippet["redis-cluster"].splitlines() if line.strip()]
    ports = {str(7000 + index): str(free_port(below=55536)) for index in range(3)}
    group = ServerGroup()
    with tempfile.TemporaryDirectory(prefix="weavelet-doc-rcluster-") as root:
        try:
            for line in lines:
                for documented, port in ports.items():
                    line = line.replace(documented, port).replace(f"redis-1:{port}", f"127.0.0.1:{port}")
                args = shlex.split(line)
                if args[0] == "redis-server":
                    port = int(args[args.index("--port") + 1])
                    directory = Path(root) / str(port)
                    extra = ["--bind", "127.0.0.1", "--dir", str(directory), "--logfile", "", "--save", ""]
                    group.add(DocProcess(directory, port, [find_redis_server(), *args[1:], *extra])).start()
                elif args[0] == "redis-cli":
                    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
                    assert done.returncode == 0, done.stdout + done.stderr
                else:
                    url = _url(line)
            for port in ports.values():
                deadline = time.monotonic() + 30
                while "cluster_state:ok" not in _cli(int(port), "CLUSTER", "INFO"):
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            runs = [f"doc-{index}" for index in range(6)]
            with Weaver(url, write_timeout=20) as weaver:
                for run in runs:
                    weaver.set(run, {"run": run})
                assert [r for r in weaver.runs() if r.startswith("doc-")] == runs
                assert all(
                    (weaver.get(run) or Revision(run=run, revision=0, config={})).config == {"run": run} for run in runs
                )
        finally:
            group.close()


@pytest.mark.slow
def test_the_documented_acl_users_scope_trainers_and_weavers(
    snippet: dict[str, str],
    weavelet_redis_server_factory: RedisServerFactory,
    answer_later: AnswerLater,
    run_cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    server = weavelet_redis_server_factory()
    for line in snippet["redis-acl"].splitlines():
        assert server.cli(*shlex.split(line)).strip() == "OK"
    admin = server.url
    trainer_url = server.url_with("TRAINER-PASSWORD", user="trainer-resnet50")
    weaver_url = server.url_with("WEAVER-PASSWORD", user="weaver-team-a")
    with Weaver(admin) as weaver:
        weaver.set("other", {"lr": 9.0})

    process = WeaveletProcess("resnet50", trainer_url, heartbeat_interval=0.2, restart_backoff=(0.1, 1.0))
    process.start(timeout=30)
    try:
        with Weaver(admin) as weaver:
            written = weaver.set("resnet50", {"lr": 0.1})
            deadline = time.monotonic() + 15
            got = None
            while got is None and time.monotonic() < deadline:
                got = process.poll()
                time.sleep(0.01)
            assert got is not None, process.message
            process.report_outcome(got.revision, "applied", step=3)
            assert weaver.wait("resnet50", written.revision, timeout=15).result == "applied"
            # Its schema goes apart from its status (the run's hash), with the trainer's documented ACL.
            schema = {"version": 1, "commands": ["stop"], "optimizers": []}
            process.report(step=4, schema=schema)
            deadline = time.monotonic() + 15
            while (status := weaver.status("resnet50")) is None or status.step != 4:
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            assert status.schema == schema
            assert status.schema_digest
            assert weaver.statuses(["resnet50"])["resnet50"].schema is None  # type: ignore[union-attr]
    finally:
        process.stop(timeout=10)

    async def trainer_cannot_reach_other_runs() -> None:
        async with open_transport(trainer_url) as trainer:
            own = await trainer.latest("resnet50")
            assert own is not None
            for name, call in {
                "read another run": trainer.latest("other"),
                "write its own desired config": trainer.put(
                    Revision(run="resnet50", revision=own.revision + 1, config={"lr": 5.0})
                ),
                "publish another run's status": trainer.publish_status(Status(run="other", state="running")),
            }.items():
                with pytest.raises(PermissionDenied) as info:
                    await call
                assert "permission denied" in str(info.value), name
                assert "TRAINER-PASSWORD" not in str(info.value)

    anyio.run(trainer_cannot_reach_other_runs)

    with Weaver(weaver_url) as weaver:
        written = weaver.set("team-a-exp", {"lr": 0.3})
        assert written.revision == 1
        # It waits for an outcome by reading the run's outcome stream (XREAD BLOCK), as its ACL allows.
        answering = answer_later(admin, written)
        assert weaver.wait("team-a-exp", 1, timeout=15, revision_id=written.id).result == "applied"
        answering.join(10)
        assert weaver.latests(["team-a-exp"])["team-a-exp"] is not None
        assert weaver.statuses(["team-a-exp"]) == {"team-a-exp": None}
        weaver.delete("team-a-exp")
        assert weaver.get("team-a-exp") is None
        with pytest.raises(PermissionDenied):
            weaver.set("resnet50", {"lr": 5.0})
        with pytest.raises(PermissionDenied):
            weaver.delete("resnet50")
    # The run index lists every team's runs: a team's weaver may not read the others', and says how to list its own.
    with Weaver(weaver_url) as weaver:
        weaver.set("team-a-listed", {"lr": 0.2})
    everything = run_cli("--url", weaver_url, "runs")
    assert everything.returncode == 1
    assert "permission denied" in everything.stderr
    assert "weavelet runs 'team-a-*'" in everything.stderr
    assert "WEAVER-PASSWORD" not in everything.stderr
    own = run_cli("--url", weaver_url, "runs", "-q", "team-a-*")
    assert (own.returncode, own.stdout) == (0, "team-a-listed\n"), own.stderr
    with Weaver(admin) as weaver:
        latest = weaver.get("resnet50")
        assert latest is not None
        assert latest.config == {"lr": 0.1}
