"""WeaveletProcess over the file transport with a real sidecar process: the trainer's contract."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from weavelet_core import (
    InvalidRunId,
    MissingDriver,
    Revision,
    TransportSpec,
    UnknownTransport,
    WeaveletProcess,
    Weaver,
    get_registry,
    hookimpl,
)
from weavelet_core.channel import Channel
from weavelet_core.testing.process import TrainerProcess, leftovers, wait_until
from weavelet_file import FileTransport

WAIT = 15.0  # generous: two shared cores


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def run() -> str:
    return f"proc-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as weaver:
        yield weaver


@pytest.fixture
def make(url: str, run: str) -> Iterator[Callable[..., WeaveletProcess]]:
    made: list[WeaveletProcess] = []

    def factory(**kwargs: Any) -> WeaveletProcess:
        kwargs.setdefault("heartbeat_interval", 0.1)
        process = WeaveletProcess(kwargs.pop("run", run), kwargs.pop("url", url), **kwargs)
        made.append(process)
        return process

    yield factory
    for process in made:
        process.stop(timeout=5)


def poll_until(process: WeaveletProcess, timeout: float = WAIT) -> Revision:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        revision = process.poll()
        if revision is not None:
            return revision
        time.sleep(0.005)
    raise AssertionError(f"no revision within {timeout}s")


# -- construction errors, raised in the trainer -------------------------------------------------------------
def test_unknown_scheme_raises_at_construction_with_the_known_ones() -> None:
    with pytest.raises(UnknownTransport, match=r"known schemes: .*file"):
        WeaveletProcess("demo", "natz://127.0.0.1:4222")


def test_invalid_run_id_raises_at_construction() -> None:
    with pytest.raises(InvalidRunId, match="invalid run id"):
        WeaveletProcess("../etc", "file:///tmp/x")


def test_memory_transport_is_refused_because_it_cannot_cross_processes() -> None:
    with pytest.raises(ValueError, match=r"cannot reach the weavelet sidecar; use file://"):
        WeaveletProcess("demo", "memory://x")


def test_malformed_url_raises_at_construction() -> None:
    with pytest.raises(ValueError, match="file:///path/to/dir"):
        WeaveletProcess("demo", "file://somehost/dir")


class _KafkaTestPlugin:
    """A transport whose client library is not installed."""

    @hookimpl
    def weavelet_transports(self) -> list[TransportSpec]:
        return [
            TransportSpec(
                name="kafka-test",
                schemes=("kafkatest",),
                factory=FileTransport,
                requires=("weavelet_no_such_driver_module",),
                install_hint="pip install weavelet-kafka-test",
            )
        ]


def test_missing_driver_raises_at_construction_with_the_install_command() -> None:
    registry = get_registry()
    plugin = _KafkaTestPlugin()
    registry.register(plugin, name="kafka-test")
    try:
        with pytest.raises(MissingDriver, match="pip install weavelet-kafka-test"):
            WeaveletProcess("demo", "kafkatest://broker:9092")
    finally:
        registry.pm.unregister(plugin)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"after": -1}, "after must be an integer >= 0"),
        ({"heartbeat_interval": 0}, "heartbeat_interval must be a positive number"),
        ({"connect_timeout": math.nan}, "connect_timeout must be a positive number"),
        ({"max_restarts": -2}, "max_restarts must be an integer >= 0"),
        ({"restart_backoff": (2.0, 1.0)}, "longest delay 1.0 is shorter than the first 2.0"),
    ],
)
def test_bad_arguments_raise_at_construction(url: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WeaveletProcess("demo", url, **kwargs)


# -- the normal life -----------------------------------------------------------------------------------------
def test_lifecycle_delivery_outcomes_and_status(make: Callable[..., WeaveletProcess], weaver: Weaver, run: str) -> None:
    process = make()
    assert process.state == "created"
    assert process.poll() is None
    process.start(timeout=WAIT)
    assert process.state == "running"
    assert process.connected
    assert process.pid is not None
    assert process.poll() is None

    written = weaver.set(run, {"optimizer": "adam", "lr": 0.001})
    revision = poll_until(process)
    assert revision == written
    assert process.poll() is None  # handed out once

    process.report(step=7, epoch=1, metrics={"loss": 0.5}, optimizer={"name": "adam", "lr": 0.001})
    process.report_outcome(revision.revision, "applied", step=7)
    assert process.applied_revision == revision.revision
    outcome = weaver.wait(run, revision.revision, timeout=WAIT)
    assert (outcome.result, outcome.step) == ("applied", 7)

    assert wait_until(lambda: (s := weaver.status(run)) is not None and s.applied_revision == 1, WAIT)
    status = weaver.status(run)
    assert status is not None
    assert (status.state, status.step, status.epoch, status.pid) == ("running", 7, 1, os.getpid())
    assert status.metrics == {"loss": 0.5}
    assert status.optimizer == {"name": "adam", "lr": 0.001}

    second = weaver.set(run, {"lr": 0.01})
    got = poll_until(process)
    assert got.revision == second.revision
    process.report_outcome(got.revision, "rejected", message="lr 0.01 is above the allowed 0.005")
    rejected = weaver.wait(run, got.revision, timeout=WAIT)
    assert rejected.result == "rejected"
    assert rejected.message == "lr 0.01 is above the allowed 0.005"

    started = time.monotonic()
    process.stop(timeout=5)
    assert time.monotonic() - started < 5.5
    assert process.state == "stopped"
    final = weaver.status(run)
    assert final is not None
    assert final.state == "stopped"
    assert final.applied_revision == 1
    assert leftovers() == []


def test_older_undelivered_revisions_are_reported_superseded(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    process = make()
    process.start(timeout=WAIT)
    for lr in (0.1, 0.2, 0.3):
        weaver.set(run, {"lr": lr})
    assert wait_until(lambda: len(weaver.outcomes(run)) == 0 and weaver.get(run) is not None, 1.0)
    time.sleep(0.3)  # let all three reach the trainer's queue
    newest = poll_until(process)
    assert newest.revision == 3
    assert newest.config == {"lr": 0.3}
    assert wait_until(lambda: len(weaver.outcomes(run)) == 2, WAIT)
    assert [(o.revision, o.result) for o in weaver.outcomes(run)] == [(1, "superseded"), (2, "superseded")]
    assert "revision 3 arrived" in (weaver.outcomes(run)[0].message or "")


def test_after_skips_revisions_already_applied(make: Callable[..., WeaveletProcess], weaver: Weaver, run: str) -> None:
    for lr in (0.1, 0.2):
        weaver.set(run, {"lr": lr})
    process = make(after=2)
    assert process.applied_revision == 2
    process.start(timeout=WAIT)
    time.sleep(0.3)
    assert process.poll() is None
    third = weaver.set(run, {"lr": 0.3})
    assert poll_until(process).revision == third.revision


def test_a_late_start_that_adopts_reconciles_from_the_latest_revision(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    for lr in (0.1, 0.2, 0.3):
        weaver.set(run, {"lr": lr})
    process = make(fresh="adopt")
    process.start(timeout=WAIT)
    latest = poll_until(process)
    assert latest.revision == 3
    assert process.is_baseline(latest)  # stored before this start: its commands never act
    # The two never handed out get an outcome too (they never reached this trainer).
    assert wait_until(lambda: [o.result for o in weaver.outcomes(run)] == ["superseded"] * 2, WAIT)


def test_stop_is_idempotent_and_calls_after_stop_never_raise(make: Callable[..., WeaveletProcess]) -> None:
    process = make()
    process.start(timeout=WAIT)
    process.stop(timeout=5)
    process.stop(timeout=5)
    assert process.state == "stopped"
    assert process.poll() is None
    process.report(step=1, metrics={"loss": 1.0})
    process.report_outcome(1, "applied", step=1)
    with pytest.raises(RuntimeError, match="create a new one"):
        process.start()


def test_stop_before_start(make: Callable[..., WeaveletProcess]) -> None:
    process = make()
    process.stop()
    assert process.state == "stopped"
    assert process.poll() is None


def test_context_manager_starts_and_stops(url: str, run: str, weaver: Weaver) -> None:
    with WeaveletProcess(run, url, heartbeat_interval=0.1) as process:
        assert process.state == "running"
        pid = process.pid
        assert pid is not None
    assert process.state == "stopped"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    status = weaver.status(run)
    assert status is not None
    assert status.state == "stopped"


def test_report_is_coalesced_and_sanitised(make: Callable[..., WeaveletProcess], weaver: Weaver, run: str) -> None:
    process = make(status_interval=0.0)
    process.start(timeout=WAIT)
    for step in range(1000):
        process.report(step=step, metrics={"loss": float(step)})
    metrics: dict[str, Any] = {"loss": math.nan, "acc": 0.75, "bad": "x"}
    process.report(step=1000, metrics=metrics, optimizer={"name": "sgd"})
    assert wait_until(lambda: (s := weaver.status(run)) is not None and s.step == 1000, WAIT)
    status = weaver.status(run)
    assert status is not None
    assert status.metrics == {"acc": 0.75}  # NaN and non-numbers are left out, the heartbeat goes on
    assert status.optimizer == {"name": "sgd"}


def test_report_outcome_with_bad_arguments_logs_and_does_not_raise(
    make: Callable[..., WeaveletProcess], caplog: pytest.LogCaptureFixture
) -> None:
    process = make()
    with caplog.at_level(logging.ERROR, logger="weavelet_core.process"):
        process.report_outcome(1, "done")
    assert "cannot report outcome of revision 1" in caplog.text
    assert "applied, rejected, superseded" in caplog.text


def test_outcome_detail_that_is_not_json_is_dropped_not_the_outcome(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    process = make()
    process.start(timeout=WAIT)
    weaver.set(run, {"lr": 0.1})
    revision = poll_until(process)
    process.report_outcome(revision.revision, "rejected", message="bad lr", detail={"value": math.inf})
    outcome = weaver.wait(run, revision.revision, timeout=WAIT)
    assert outcome.result == "rejected"
    assert outcome.message is not None
    assert outcome.message.startswith("bad lr (detail dropped")


def test_the_sidecar_never_imports_torch_even_when_the_trainer_did(url: str, run: str, weaver: Weaver) -> None:
    """The trainer script imports torch at the top and has no __main__ guard; the sidecar loads neither."""
    with TrainerProcess(run, url, import_torch=True) as trainer:
        sidecar = psutil.Process(trainer.sidecar_pid)
        assert sidecar.ppid() == trainer.pid
        trainer_maps = {m.path for m in psutil.Process(trainer.pid).memory_maps()}
        assert any("torch" in path for path in trainer_maps), "the trainer should have torch loaded"
        sidecar_maps = {m.path for m in sidecar.memory_maps()}
        assert not [path for path in sidecar_maps if "torch" in path]
        # The trainer's unguarded loop did not run a second time inside the sidecar: it still works as one.
        written = weaver.set(run, {"lr": 0.5})
        outcome = weaver.wait(run, written.revision, timeout=WAIT)
        assert outcome.result == "applied"


def test_start_during_an_outage_is_bounded_and_recovers(
    tmp_path: Path, make: Callable[..., WeaveletProcess], weaver: Weaver, run: str, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the store directory should be")
    process = make(url=(blocker / "store").as_uri(), connect_timeout=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="weavelet_core.process"):
        process.start(timeout=1.0)
    assert time.monotonic() - started < 3.0
    assert process.state == "starting"
    assert "keeps retrying in the background" in caplog.text
    assert wait_until(lambda: process.message is not None, WAIT)
    assert "cannot connect" in (process.message or "")
    assert process.poll() is None  # training goes on
    process.report(step=1)
    blocker.unlink()
    assert process.lifecycle.wait_for(("running",), WAIT)
    assert process.message is None


def test_a_half_written_message_from_a_dead_sidecar_reads_as_end_of_file() -> None:
    """A sidecar killed in the middle of writing a revision must not leave ``poll`` waiting for the rest."""
    ctx = multiprocessing.get_context("spawn")
    channel = Channel(ctx)
    writer = channel.to_trainer._writer  # type: ignore[attr-defined]
    os.write(writer.fileno(), struct.pack("!i", 1000) + b'{"v": 1, "kind": "rev')  # header promises 1000 bytes
    channel.after_spawn()  # the trainer's copy of the writer is gone; the "sidecar's" copy is this one...
    writer.close()  # ...and now it died
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(channel.to_trainer.get_nowait())
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5.0)
    assert not reader.is_alive(), "get_nowait() blocked on a half-written message"
    assert isinstance(outcome[0], OSError)
    assert "end of file" in str(outcome[0])
    channel.close()


def test_a_forked_child_cannot_stop_its_parents_weavelet(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    process = make()
    process.start(timeout=WAIT)
    pid = process.pid
    child = multiprocessing.get_context("fork").Process(target=lambda: process.stop(timeout=1))
    child.start()
    child.join(WAIT)
    assert child.exitcode == 0
    assert process.state == "running"
    assert process.pid == pid
    written = weaver.set(run, {"lr": 0.3})
    assert poll_until(process).revision == written.revision


class _Unorderable:
    """A value whose comparisons fail, like a multi-element array."""

    def __ne__(self, other: object) -> bool:
        raise ValueError("the truth value of an array with more than one element is ambiguous")

    __eq__ = __ne__


def test_report_never_raises_on_odd_values(make: Callable[..., WeaveletProcess], weaver: Weaver, run: str) -> None:
    process = make(status_interval=0.0)
    process.start(timeout=WAIT)
    odd: Any = _Unorderable()
    process.report(step=odd, epoch=odd, metrics=odd, optimizer=odd)
    process.report(step=5, epoch=0, metrics={"loss": 0.5}, optimizer={"name": "sgd"})
    assert wait_until(lambda: (s := weaver.status(run)) is not None and s.step == 5, WAIT)
