"""docs/deploy.md, NATS: the documented cluster node configuration and the per-run permissions, run as written
(host names and ports replaced by loopback ones)."""

from __future__ import annotations

import logging
import re
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest

from weavelet_core import Revision, WeaveletProcess, Weaver, open_transport
from weavelet_core.errors import PermissionDenied
from weavelet_core.protocol import Status
from weavelet_core.testing.servers import ManagedServer, ServerGroup, free_port
from weavelet_nats.embedded import find_nats_server
from weavelet_nats.testing import NatsServer, NatsServerFactory

from .conftest import AnswerLater


class DocNode(ManagedServer):
    """A nats-server run from a configuration text as docs/deploy.md shows it."""

    kind = "nats-server"
    log_name = "nats-server.log"

    def __init__(self, directory: Path, config: str, monitor_port: int, port: int) -> None:
        super().__init__(directory, port=port)
        self.config = config
        self.monitor_port = monitor_port

    def prepare(self) -> None:
        (self.directory / "node.conf").write_text(f"{self.config}\nhttp: 127.0.0.1:{self.monitor_port}\n")

    def command(self) -> list[str]:
        return [find_nats_server(), "-c", str(self.directory / "node.conf")]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False


@pytest.fixture
def documented_cluster(snippet: dict[str, str]) -> Iterator[list[DocNode]]:
    template = snippet["nats-node"]
    ports = [(free_port(), free_port(), free_port()) for _ in range(3)]
    group = ServerGroup()
    with tempfile.TemporaryDirectory(prefix="weavelet-doc-nats-") as root:
        nodes = []
        for index, (port, cluster_port, monitor) in enumerate(ports, start=1):
            config = template.replace("server_name: nats-1", f"server_name: nats-{index}")
            config = config.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}")
            config = config.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{cluster_port}")
            config = config.replace("/var/lib/nats", f"{root}/node-{index}/jetstream")
            for other, (_, other_cluster, _) in enumerate(ports, start=1):
                config = config.replace(f"nats-route://nats-{other}:6222", f"nats-route://127.0.0.1:{other_cluster}")
            assert "nats-1" not in config.replace(root, "").replace(f"nats-{index}", ""), config
            nodes.append(group.add(DocNode(Path(root) / f"node-{index}", config, monitor, port)))
        try:
            for node in nodes:
                node.launch()
            for node in nodes:
                node.wait_ready(30)
            yield nodes
        finally:
            group.close()


def _local(url: str, nodes: list[DocNode]) -> str:
    for index, node in enumerate(nodes, start=1):
        url = url.replace(f"nats-{index}:4222", node.address)
    return url


@pytest.mark.slow
def test_the_documented_cluster_keeps_three_replicas(
    snippet: dict[str, str], documented_cluster: list[DocNode]
) -> None:
    assert "sync_interval: always" in snippet["nats-node"]
    url = _local(re.search(r'WEAVELET_URL="([^"]+)"', snippet["nats-url"]).group(1), documented_cluster)  # type: ignore[union-attr]
    run = f"doc-{uuid.uuid4().hex[:6]}"
    with Weaver(url, write_timeout=20) as weaver:
        written = weaver.set(run, {"lr": 0.1})
        assert weaver.get(run) == written

    async def replicas() -> int:
        nc = await nats.connect(servers=[f"nats://{n.address}" for n in documented_cluster])
        try:
            info = await nc.jetstream().stream_info("KV_weavelet-desired")
        finally:
            await nc.close()
        return int(info.config.num_replicas or 1)

    assert anyio.run(replicas) == 3


def _scoped_urls(snippet: dict[str, str], address: str) -> tuple[str, str]:
    trainer, weaver = snippet["nats-scoped-urls"].split()
    hosts = "nats-1:4222,nats-2:4222,nats-3:4222"
    return trainer.replace(hosts, address), weaver.replace(hosts, address)


@pytest.mark.slow
def test_the_documented_permissions_scope_trainers_and_weavers(
    snippet: dict[str, str],
    weavelet_nats_server_factory: NatsServerFactory,
    caplog: pytest.LogCaptureFixture,
    answer_later: AnswerLater,
) -> None:
    server: NatsServer = weavelet_nats_server_factory(config=snippet["nats-permissions"])
    admin = f"nats://admin:ADMIN-PASSWORD@{server.address}"
    trainer_url, weaver_url = _scoped_urls(snippet, server.address)

    # The administrator creates the buckets and writes runs of both kinds.
    with Weaver(admin) as weaver:
        weaver.set("other", {"lr": 9.0})
    with Weaver(f"{admin}?prefix=team-a") as weaver:
        weaver.set("team-a-warmup", {"lr": 1.0})

    # A real sidecar with the trainer's credentials: it watches its run, publishes status and outcomes.
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
            assert got.revision == written.revision
            process.report_outcome(got.revision, "applied", step=3)
            assert weaver.wait("resnet50", written.revision, timeout=15).result == "applied"
            status = weaver.status("resnet50")
            assert status is not None
            assert status.state == "running"
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
                started = time.monotonic()
                with pytest.raises(PermissionDenied) as info:
                    await call
                assert time.monotonic() - started < 3, name
                assert "permission denied" in str(info.value), name
            watch = trainer.watch("other")
            with pytest.raises(PermissionDenied):
                with anyio.fail_after(5):
                    await watch.__anext__()

    anyio.run(trainer_cannot_reach_other_runs)

    # The team's weaver writes any run of its buckets, lists and removes them, and touches nothing outside them.
    with Weaver(weaver_url) as weaver:
        written = weaver.set("exp-7", {"lr": 0.3})
        assert written.revision == 1
        assert [r.revision for r in weaver.history("team-a-warmup")] == [1]
        # It waits for an outcome by watching the outcome's key, as its consumer rules allow.
        answering = answer_later(f"{admin}?prefix=team-a", written)
        assert weaver.wait("exp-7", 1, timeout=15, revision_id=written.id).result == "applied"
        answering.join(10)
        caplog.set_level(logging.DEBUG, logger="weavelet_nats.transport")
        assert weaver.runs() == ["exp-7", "team-a-warmup"]
        assert weaver.latests(["exp-7", "team-a-warmup"])["exp-7"] is not None
        weaver.delete("exp-7")
        assert weaver.runs() == ["team-a-warmup"]
        assert "key by key" not in caplog.text, "the documented rules let the weaver read a whole bucket at once"
    outside = weaver_url.replace("prefix=team-a&", "")
    with pytest.raises(PermissionDenied), Weaver(outside, write_timeout=5) as weaver:
        weaver.set("resnet50", {"lr": 5.0})
    with Weaver(admin) as weaver:
        latest = weaver.get("resnet50")
        assert latest is not None
        assert latest.config == {"lr": 0.1}, "nobody but the admin changed the trainer's run"
