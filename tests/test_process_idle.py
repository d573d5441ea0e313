"""An idle sidecar sleeps: status on change plus a keepalive, parent death without a timer, the last report kept.

Performance (wake-ups per second, CPU) is measured in ``benchmarks/bench_idle.py``, not here: these tests check
behaviour only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from weavelet_core import Status, WeaveletProcess, Weaver
from weavelet_core.process import DEFAULT_KEEPALIVE, default_stale_after
from weavelet_core.protocol import STALE_KEEPALIVES
from weavelet_core.testing.process import wait_until

WAIT = 15.0


@pytest.fixture
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ``file://`` store; ``nats`` or ``redis`` through indirect parametrization: the session's server (a
    transport that versions statuses, so the sidecar's keepalive writes conditionally instead of reading first)."""
    kind = getattr(request, "param", "file")
    if kind in ("nats", "redis"):
        return str(request.getfixturevalue(f"weavelet_{kind}_url"))
    return (tmp_path / "store").as_uri()


@pytest.fixture
def run() -> str:
    return f"idle-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as weaver:
        yield weaver


@pytest.fixture
def make(url: str, run: str) -> Iterator[Callable[..., WeaveletProcess]]:
    made: list[WeaveletProcess] = []

    def factory(**kwargs: Any) -> WeaveletProcess:
        process = WeaveletProcess(run, url, **kwargs)
        made.append(process)
        return process

    yield factory
    for process in made:
        process.stop(timeout=5)


def status_with(weaver: Weaver, run: str, predicate: Callable[[Status], bool], timeout: float) -> Status | None:
    found: list[Status] = []

    def check() -> bool:
        status = weaver.status(run)
        if status is not None and predicate(status):
            found.append(status)
            return True
        return False

    wait_until(check, timeout, interval=0.05)
    return found[0] if found else None


def test_the_default_keepalive_is_five_seconds_and_published_in_the_status(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    process = make()
    assert process.heartbeat_interval == DEFAULT_KEEPALIVE == 5.0
    assert process.stale_after == default_stale_after(5.0) == 25.0
    process.start(timeout=WAIT)
    status = status_with(weaver, run, lambda s: s.state == "running", WAIT)
    assert status is not None
    assert status.keepalive == 5.0


def test_stale_marking_follows_the_published_keepalive(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    process = make()
    process.start(timeout=WAIT)
    status = status_with(weaver, run, lambda s: s.state == "running", WAIT)
    assert status is not None
    limit = STALE_KEEPALIVES * status.keepalive + 2.0  # 17 s with the default keepalive
    assert not status.stale(status.heartbeat + limit - 0.5)
    assert status.stale(status.heartbeat + limit + 0.5)
    assert not status.stale(status.heartbeat + 11.0)  # a 1 s keepalive's limit (5 s) no longer applies


def test_a_changed_status_is_published_long_before_the_keepalive(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    process = make(heartbeat_interval=60.0, status_interval=0.05)
    process.start(timeout=WAIT)
    assert status_with(weaver, run, lambda s: s.state == "running", WAIT) is not None
    for step in (5, 6, 7):
        time.sleep(0.1)  # past status_interval: each report is due and written at once
        process.report(step=step, metrics={"loss": 1.0 / step})
        started = time.monotonic()
        status = status_with(weaver, run, lambda s, step=step: s.step == step, WAIT)  # type: ignore[misc]
        assert status is not None, f"step {step} was not published"
        assert time.monotonic() - started < 30.0  # well before the 60 s keepalive
        assert status.metrics == {"loss": 1.0 / step}


def test_a_report_made_just_before_a_pause_is_published_without_another_report(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    # A keepalive of 60 s: only the pending report's own timer can publish step 2 within the wait below.
    process = make(heartbeat_interval=60.0, status_interval=0.5)
    process.start(timeout=WAIT)
    process.report(step=1)
    assert status_with(weaver, run, lambda s: s.step == 1, WAIT) is not None
    process.report(step=1, force=True)  # a snapshot now: the next status_interval runs from here
    process.report(step=2, metrics={"loss": 0.25})  # too soon after it: pending
    # ... and the loop pauses (validation, a checkpoint, a stall): no further report comes.
    status = status_with(weaver, run, lambda s: s.step == 2, 10.0)
    assert status is not None, "the last report before the pause was never published"
    assert status.metrics == {"loss": 0.25}


FORKING_TRAINER = """
import os, sys, time
from weavelet_core import WeaveletProcess
weavelet = WeaveletProcess(sys.argv[1], sys.argv[2], restart_backoff=(0.1, 1.0))
weavelet.start(timeout=30)
child = os.fork()  # a forked worker (a fork-started DataLoader worker, say) inherits the trainer's pipes
if child == 0:
    time.sleep(60)
    os._exit(0)
print("READY", weavelet.pid, child, flush=True)
while True:
    weavelet.report(step=1)
    time.sleep(0.05)
"""


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_trainer_death_ends_the_sidecar_within_a_second_even_when_a_forked_child_lives_on(url: str, run: str) -> None:
    popen = subprocess.Popen(
        [sys.executable, "-c", FORKING_TRAINER, run, url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    child = 0
    try:
        assert popen.stdout is not None
        line = popen.stdout.readline().split()
        assert line[:1] == ["READY"], line
        sidecar, child = int(line[1]), int(line[2])
        assert not _gone(sidecar)
        os.kill(popen.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(lambda: _gone(sidecar), 5.0), "the sidecar outlived its trainer"
        elapsed = time.monotonic() - killed
        assert elapsed < 1.0, f"the orphaned sidecar lived {elapsed:.2f}s"
        assert not _gone(child)  # the forked child still held the trainer's pipes all along
    finally:
        popen.kill()
        popen.wait(10)
        if popen.stdout is not None:
            popen.stdout.close()
        if child:
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("url", ["file", "nats", "redis"], indirect=True)
def test_a_removed_run_gets_its_schema_stored_again_at_the_next_keepalive(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    """The schema is stored apart from the status only when it changes; after ``weavelet rm --force`` of the live
    run the sidecar finds its status gone and stores the schema again, so ``weavelet set`` can check changes."""
    schema = {"version": 1, "commands": ["stop"], "optimizers": []}
    process = make(heartbeat_interval=0.3, status_interval=0.05)
    process.start(timeout=WAIT)
    process.report(step=3, schema=schema)
    assert status_with(weaver, run, lambda s: s.schema == schema, WAIT) is not None
    weaver.delete(run)
    status = status_with(weaver, run, lambda s: s.schema is not None, WAIT)
    assert status is not None, "the schema was not stored again after the run was removed"
    assert status.schema == schema
    assert status.schema_digest
    assert run in weaver.runs(), "the live run was not listed again after its removal"
