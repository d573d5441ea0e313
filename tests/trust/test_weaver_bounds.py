"""The Weaver's bounds: processes exit whether or not they closed what they opened; timeouts hold; waits end
at once when nothing will answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from weavelet_core import RunEnded, TransportUnavailable, Weaver
from weavelet_core.protocol import Status
from weavelet_core.testing.servers import wait_until_stopped
from weavelet_nats.testing import NatsServerFactory
from weavelet_redis.testing import RedisServerFactory

from .conftest import WAIT, Make, PollUntil

EXIT_WITHIN = 20.0  # seconds; an interpreter start plus imports on two shared cores, far below "hangs forever"

SCRIPTS = {
    "weaver": """
        from weavelet_core import Weaver
        w = Weaver(URL)
        w.status("a")
        w.set("a", {"lr": 0.1})
    """,
    "async_weaver": """
        import anyio
        from weavelet_core import AsyncWeaver
        async def main():
            w = AsyncWeaver(URL)
            await w.set("a", {"lr": 0.1})
        anyio.run(main, backend="asyncio")
    """,
    "weavelet_process": """
        from weavelet_core import WeaveletProcess
        if __name__ == "__main__":
            p = WeaveletProcess("a", URL, heartbeat_interval=0.1)
            p.start(timeout=10)
            assert p.state == "running", p.state
    """,
    "lightning_callback": """
        import torch
        import pytorch_lightning as pl
        from weavelet_lightning import WeaveletCallback
        class M(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(2, 1)
            def training_step(self, batch, batch_idx):
                return self.layer(batch).pow(2).mean()
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)
            def train_dataloader(self):
                return torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=4)
        if __name__ == "__main__":
            trainer = pl.Trainer(max_steps=3, callbacks=[WeaveletCallback("a", URL)], logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
            trainer.fit(M())
    """,
    "attach": """
        import torch
        from weavelet_torch import attach
        if __name__ == "__main__":
            model = torch.nn.Linear(2, 1)
            live = attach(torch.optim.SGD(model.parameters(), lr=0.1), run="a", url=URL).start()
            live.poll(1, loss=0.5)
    """,
}


@pytest.mark.parametrize("kind", sorted(SCRIPTS))
def test_a_process_that_never_closes_what_it_opened_exits_promptly(kind: str, url: str, tmp_path: Path) -> None:
    script = tmp_path / f"{kind}.py"
    script.write_text(f"URL = {url!r}\n" + textwrap.dedent(SCRIPTS[kind]))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=EXIT_WITHIN, check=False
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < EXIT_WITHIN
    assert "Traceback" not in result.stderr


def test_waiting_on_a_run_whose_incarnation_ended_fails_at_once(
    make: Make, weaver: Weaver, run: str, poll_until: PollUntil
) -> None:
    process = make()
    process.start(timeout=WAIT)
    process.stop(timeout=5)
    revision = weaver.set(run, {"lr": 0.05})
    started = time.monotonic()
    with pytest.raises(RunEnded) as info:
        weaver.wait(run, revision.revision, timeout=30, revision_id=revision.id)
    assert time.monotonic() - started < 3
    assert f"run {run!r} has no live incarnation (incarnation {process.incarnation} ended stopped" in str(info.value)
    with pytest.raises(RunEnded):
        weaver.command(run, "stop")


def test_a_training_loop_that_raised_ends_failed_with_the_exception(make: Make, weaver: Weaver, run: str) -> None:
    process = make()
    with pytest.raises(ZeroDivisionError), process:
        1 / 0  # noqa: B018
    assert process.state == "failed"
    status = weaver.status(run)
    assert status is not None
    assert status.state == "failed"
    assert status.message == "the training loop raised ZeroDivisionError: division by zero"


def test_ctrl_c_ends_the_run_stopped(make: Make, weaver: Weaver, run: str) -> None:
    process = make()
    with pytest.raises(KeyboardInterrupt), process:
        raise KeyboardInterrupt
    status = weaver.status(run)
    assert process.state == "stopped"
    assert status is not None
    assert status.state == "stopped"


def test_status_published_by_an_unknown_writer_does_not_count_as_live(weaver: Weaver, run: str) -> None:
    # A version-1 trainer's status has no incarnation: a command cannot be addressed to it.
    async def publish() -> None:
        await weaver._async.transport.publish_status(Status(run=run, state="running"))

    weaver._portal.call(publish)
    with pytest.raises(RunEnded):
        weaver.command(run, "checkpoint")


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """The process is stopped (SIGSTOP) inside the block: the block starts once it is (a stop takes effect a moment
    after the signal, and a write sent in that moment would be answered), and it is always resumed after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until_stopped(pid)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _check_write_timeout(url: str, pid: int, **options: Any) -> None:
    with Weaver(url, write_timeout=3, **options) as weaver:
        weaver.set("bounded", {"lr": 0.1})
        with _stopped(pid):
            started = time.monotonic()
            with pytest.raises(TransportUnavailable) as info:
                weaver.set("bounded", {"lr": 0.2})
            took = time.monotonic() - started
        assert took < 4.0, f"write_timeout=3 took {took:.1f}s"
        assert "within 3s" in str(info.value)


@pytest.mark.slow
def test_write_timeout_holds_against_a_stopped_nats_server(weavelet_nats_server_factory: NatsServerFactory) -> None:
    server = weavelet_nats_server_factory()
    assert server.process is not None
    _check_write_timeout(server.url, server.process.pid)


@pytest.mark.slow
def test_write_timeout_holds_against_a_stopped_redis_server(weavelet_redis_server_factory: RedisServerFactory) -> None:
    server = weavelet_redis_server_factory()
    assert server.pid is not None
    _check_write_timeout(server.url, server.pid)


def _read_through_an_outage(server: Any, url: str) -> None:
    """A connected weaver's read rides out a server restart within read_timeout; a lasting outage raises in
    time, naming the last failure."""
    with Weaver(url, read_timeout=8) as weaver:
        weaver.set("outage", {"lr": 0.1})
        server.stop()  # graceful: the store keeps the revision, so the read after the restart must find it
        timer = threading.Timer(1.5, server.start)
        timer.start()
        try:
            started = time.monotonic()
            history = weaver.history("outage")
            took = time.monotonic() - started
        finally:
            timer.join()
        assert [entry.config for entry in history] == [{"lr": 0.1}]
        assert 1.0 < took < 8.5, took
        server.kill()
        started = time.monotonic()
        with pytest.raises(TransportUnavailable) as info:
            weaver.history("outage")
        assert time.monotonic() - started < 8 + 1.5
        assert server.address in str(info.value), info.value  # names the server that is down


@pytest.mark.slow
def test_a_read_rides_out_a_nats_server_restart(weavelet_nats_server_factory: NatsServerFactory) -> None:
    server = weavelet_nats_server_factory()
    _read_through_an_outage(server, server.url)


@pytest.mark.slow
def test_a_read_rides_out_a_redis_server_restart(weavelet_redis_server_factory: RedisServerFactory) -> None:
    server = weavelet_redis_server_factory(persistent=True)
    _read_through_an_outage(server, server.url)


NATS_READ_ONLY_TRAINER = """
authorization {
  users = [
    {user: admin, password: admin-pw}
    {user: reader, password: reader-pw, permissions: {
      publish: {allow: ["$JS.API.>"]}
      subscribe: {allow: ["_INBOX.>"]}
    }}
  ]
}
"""


@pytest.mark.slow
def test_a_trainer_whose_nats_user_may_not_publish_fails_for_good_naming_the_subject(
    weavelet_nats_server_factory: NatsServerFactory, make: Make, run: str
) -> None:
    server = weavelet_nats_server_factory(config=NATS_READ_ONLY_TRAINER)
    with Weaver(f"nats://admin:admin-pw@{server.address}") as admin:
        admin.set(run, {"lr": 0.1})  # creates the buckets the reader may read
    process = make(url=f"nats://reader:reader-pw@{server.address}", fresh="adopt", max_restarts=3)
    started = time.monotonic()
    process.start(timeout=WAIT)
    assert process.state == "failed", (process.state, process.message)
    assert time.monotonic() - started < 10
    assert process.restarts == 0  # final: never retried as an outage
    message = process.message or ""
    assert "permission" in message.lower(), message
    assert "$KV." in message, message
