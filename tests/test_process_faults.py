"""Faults around the weavelet process, each with real processes: kills, signals, outages, bad data, stalls."""

from __future__ import annotations

import logging
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

from weavelet_core import Revision, WeaveletProcess, Weaver
from weavelet_core.protocol import encode
from weavelet_core.testing.process import TrainerProcess, leftovers, wait_until
from weavelet_file.transport import atomic_write
from weavelet_nats.testing import NatsServerFactory

WAIT = 15.0


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def url(store: Path) -> str:
    return store.as_uri()


@pytest.fixture
def run() -> str:
    return f"fault-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as weaver:
        yield weaver


@pytest.fixture
def make(url: str, run: str) -> Iterator[Callable[..., WeaveletProcess]]:
    made: list[WeaveletProcess] = []

    def factory(**kwargs: Any) -> WeaveletProcess:
        kwargs.setdefault("heartbeat_interval", 0.1)
        kwargs.setdefault("restart_backoff", (0.1, 1.0))
        process = WeaveletProcess(run, kwargs.pop("url", url), **kwargs)
        made.append(process)
        return process

    yield factory
    for process in made:
        pid = process.pid
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        process.stop(timeout=5)


def poll_until(process: WeaveletProcess, timeout: float = WAIT) -> Revision | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        revision = process.poll()
        if revision is not None:
            return revision
        time.sleep(0.005)
    return None


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


class Clock:
    """Times every training-side call; ``worst`` is the longest one."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.calls = 0

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.worst = max(self.worst, time.perf_counter() - started)
        self.calls += 1
        return result


def train_for(
    process: WeaveletProcess, seconds: float, clock: Clock, step: int = 0, handed: list[int] | None = None
) -> int:
    """A training loop: poll and report every ~millisecond for ``seconds``, applying what ``poll`` returns
    (appended to ``handed``); return the next step."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        revision = clock(process.poll)
        if revision is not None:
            if handed is not None:
                handed.append(revision.revision)
            clock(process.report_outcome, revision.revision, "applied", step=step)
        clock(process.report, step=step, metrics={"loss": 1.0 / (step + 1)})
        step += 1
        time.sleep(0.001)
    return step


# -- the sidecar dies ----------------------------------------------------------------------------------------
def test_sigkill_of_the_sidecar_mid_run(make: Callable[..., WeaveletProcess], weaver: Weaver, run: str) -> None:
    process = make()
    process.start(timeout=WAIT)
    first = weaver.set(run, {"lr": 0.1})
    got = poll_until(process)
    assert got is not None
    assert got.revision == first.revision
    process.report_outcome(got.revision, "applied", step=1)
    assert weaver.wait(run, 1, timeout=WAIT).result == "applied"

    old_pid = process.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGSTOP)
    # Reported while the sidecar cannot publish it; the sidecar then dies holding it: it must not be lost.
    weaver.set(run, {"lr": 0.2})
    os.kill(old_pid, signal.SIGKILL)
    clock = Clock()
    handed: list[int] = [got.revision]
    step = train_for(process, 0.3, clock, step=2, handed=handed)
    third = weaver.set(run, {"lr": 0.3})

    assert wait_until(lambda: process.pid not in (None, old_pid) and process.state == "running", WAIT)
    assert process.restarts == 1
    deadline = time.monotonic() + WAIT
    while handed[-1] != third.revision and time.monotonic() < deadline:
        step = train_for(process, 0.05, clock, step, handed)
    assert handed[-1] == third.revision  # the newest always arrives
    assert handed == sorted(set(handed))  # in order, each at most once: revision 1 never again
    assert clock.worst < 0.5, f"a training-side call took {clock.worst:.3f}s while the sidecar was down"
    assert weaver.wait(run, third.revision, timeout=WAIT).result == "applied"
    # Revision 2 is either applied (it reached the new sidecar before revision 3 was written) or reported
    # superseded: never silently skipped.
    assert wait_until(lambda: [o.revision for o in weaver.outcomes(run)] == [1, 2, 3], WAIT)
    second = weaver.outcome(run, 2)
    assert second is not None
    assert second.result == ("applied" if 2 in handed else "superseded")


def test_an_outcome_in_flight_survives_a_sidecar_death(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    process = make()
    process.start(timeout=WAIT)
    weaver.set(run, {"lr": 0.1})
    got = poll_until(process)
    assert got is not None
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    process.report_outcome(got.revision, "applied", step=5)  # queued; the stalled sidecar cannot publish it
    time.sleep(0.2)
    assert weaver.outcome(run, got.revision) is None
    os.kill(pid, signal.SIGKILL)
    outcome = weaver.wait(run, got.revision, timeout=WAIT)
    assert (outcome.result, outcome.step) == ("applied", 5)
    assert process.restarts == 1


def test_restart_limit_ends_in_failed_and_training_goes_on(
    make: Callable[..., WeaveletProcess], caplog: pytest.LogCaptureFixture
) -> None:
    process = make(max_restarts=1)
    process.start(timeout=WAIT)
    with caplog.at_level(logging.WARNING, logger="weavelet_core.process"):
        first = process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: process.pid not in (None, first) and process.state == "running", WAIT)
        second = process.pid
        assert second is not None
        os.kill(second, signal.SIGKILL)
        assert process.lifecycle.wait_for(("failed",), WAIT)
    assert "restart limit is 1" in (process.message or "")
    assert "restarting in" in caplog.text
    assert any(r.levelno == logging.ERROR and "restart limit" in r.getMessage() for r in caplog.records)
    assert process.poll() is None
    process.report(step=3)
    process.report_outcome(1, "applied", step=3)
    process.stop(timeout=5)
    assert process.state == "failed"
    assert leftovers() == []


# -- the trainer dies ----------------------------------------------------------------------------------------
def test_sigkill_of_the_trainer_takes_the_sidecar_down_within_a_second(url: str, run: str, weaver: Weaver) -> None:
    with TrainerProcess(run, url) as trainer:
        sidecar = trainer.sidecar_pid
        assert not gone(sidecar)
        os.kill(trainer.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(lambda: gone(sidecar), 5.0)
        elapsed = time.monotonic() - killed
        assert elapsed < 1.0, f"the orphaned sidecar lived {elapsed:.2f}s"
    status = weaver.status(run)
    assert status is not None
    assert status.state == "failed"
    assert "ended without stopping its weavelet" in (status.message or "")


def test_sigterm_of_the_trainer_publishes_a_final_stopped_status(url: str, run: str, weaver: Weaver) -> None:
    with TrainerProcess(run, url) as trainer:
        written = weaver.set(run, {"lr": 0.5})
        assert weaver.wait(run, written.revision, timeout=WAIT).result == "applied"
        os.kill(trainer.pid, signal.SIGTERM)
        code = trainer.popen.wait(WAIT)
        assert code == -signal.SIGTERM  # the default disposition still ends the process, after weavelet stopped
        assert wait_until(lambda: gone(trainer.sidecar_pid), WAIT)
    status = weaver.status(run)
    assert status is not None
    assert status.state == "stopped"
    assert status.applied_revision == written.revision
    assert status.step > 0


# -- the transport fails -------------------------------------------------------------------------------------
def test_file_transport_outage_during_a_run(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str, store: Path, tmp_path: Path
) -> None:
    process = make()
    process.start(timeout=WAIT)
    clock = Clock()
    step = train_for(process, 0.3, clock)
    deadline = time.monotonic() + WAIT
    # The trainer writes a status snapshot at most every status_interval, at a report: keep training meanwhile.
    while (s := weaver.status(run)) is None or s.step == 0:
        assert time.monotonic() < deadline, f"no status with a step after {WAIT}s: {s}"
        step = train_for(process, 0.1, clock, step)

    away = tmp_path / "store-away"
    store.rename(away)
    store.write_text("not a directory: the store is unavailable")
    step = train_for(process, 1.5, clock, step)
    assert process.state == "running"  # the sidecar lives on and retries
    assert not process.connected
    assert "lost" in (process.message or "") or "cannot connect" in (process.message or "")

    store.unlink()
    away.rename(store)
    assert wait_until(lambda: process.connected, WAIT)
    written = weaver.set(run, {"lr": 0.01})
    got = poll_until(process)
    assert got is not None
    assert got.revision == written.revision
    process.report_outcome(got.revision, "applied", step=step)
    assert weaver.wait(run, got.revision, timeout=WAIT).result == "applied"
    train_for(process, 0.2, clock, step)
    assert clock.worst < 0.5, f"a training-side call took {clock.worst:.3f}s during the outage"
    assert process.restarts == 0


def test_nats_server_outage_during_a_run(
    weavelet_nats_server_factory: NatsServerFactory, make: Callable[..., WeaveletProcess], run: str
) -> None:
    server = weavelet_nats_server_factory()
    process = make(url=server.url)
    process.start(timeout=WAIT)
    with Weaver(server.url) as weaver:
        first = weaver.set(run, {"lr": 0.1})
        got = poll_until(process)
        assert got is not None
        assert got.revision == first.revision
        process.report_outcome(got.revision, "applied", step=1)
        assert weaver.wait(run, first.revision, timeout=WAIT).result == "applied"

    clock = Clock()
    server.stop()
    step = train_for(process, 1.5, clock, step=2)
    server.start()
    with Weaver(server.url) as weaver:
        second = weaver.set(run, {"lr": 0.2})
        got = poll_until(process, timeout=30)
        assert got is not None
        assert got.revision == second.revision
        process.report_outcome(got.revision, "applied", step=step)
        assert weaver.wait(run, second.revision, timeout=WAIT).result == "applied"
    assert clock.worst < 0.5, f"a training-side call took {clock.worst:.3f}s during the outage"
    assert process.restarts == 0


def test_authentication_failure_is_final_and_visible(
    weavelet_nats_server_factory: NatsServerFactory,
    make: Callable[..., WeaveletProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = weavelet_nats_server_factory(user="alice", password="right")
    wrong = server.url.replace("nats://", "nats://alice:wrong@")
    process = make(url=wrong, connect_timeout=5.0)
    with caplog.at_level(logging.ERROR, logger="weavelet_core.process"):
        process.start(timeout=WAIT)
        assert process.lifecycle.wait_for(("failed",), WAIT)
    assert process.state == "failed"
    assert "wrong" not in (process.message or "")  # the password is masked
    assert process.message
    assert any(r.levelno == logging.ERROR and process.message in r.getMessage() for r in caplog.records)
    assert process.restarts == 0
    assert process.poll() is None
    process.stop(timeout=5)
    assert process.state == "failed"
    assert leftovers() == []


# -- bad data ------------------------------------------------------------------------------------------------
def test_an_unreadable_revision_is_rejected_and_the_sidecar_keeps_running(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str, store: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    process = make()
    process.start(timeout=WAIT)
    weaver.set(run, {"lr": 0.1})
    got = poll_until(process)
    assert got is not None
    pid = process.pid

    # A torn latest.json with no readable number: the revision files stay the truth (a crash mid-write).
    run_dir = store / "runs" / run
    atomic_write(
        run_dir / "latest.json", b'{"v": 1, "kind": "revision", "run": "' + run.encode() + b'", "revision": "two"'
    )
    time.sleep(0.5)
    assert process.poll() is None
    assert process.pid == pid
    assert process.state == "running"
    second = weaver.set(run, {"lr": 0.2})
    assert second.revision == 2
    assert poll_until(process) == second

    # A revision a newer weavelet wrote: reported as what it is, with its number; writers number on top of it.
    future = encode(Revision(run=run, revision=3, config={"lr": 0.3})).replace(b'"v":2', b'"v":3', 1)
    atomic_write(run_dir / "revisions" / f"{3:020d}.json", future)
    atomic_write(run_dir / "latest.json", future)
    assert wait_until(lambda: weaver.outcome(run, 3) is not None, WAIT)
    outcome = weaver.outcome(run, 3)
    assert outcome is not None
    assert outcome.result == "rejected"
    assert outcome.message is not None
    assert "revision 3 of run" in outcome.message
    assert "unsupported protocol version 3" in outcome.message
    assert process.poll() is None  # never handed to the trainer
    fourth = weaver.set(run, {"lr": 0.4}, replace=True)
    assert fourth.revision == 4
    assert poll_until(process) == fourth
    assert process.restarts == 0
    assert "cannot be read" in capfd.readouterr().err


# -- a stalled sidecar ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ten_thousand_reports_per_second_for_ten_seconds_with_a_stalled_sidecar(
    make: Callable[..., WeaveletProcess], weaver: Weaver, run: str
) -> None:
    process = make()
    process.start(timeout=WAIT)
    pid = process.pid
    assert pid is not None
    me = psutil.Process()
    os.kill(pid, signal.SIGSTOP)
    try:
        rss_before = me.memory_info().rss
        worst = 0.0
        calls = 0
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < 10.0:
            target = int(elapsed * 10_000) + 100
            while calls < target:
                t0 = time.perf_counter()
                process.report(step=calls, epoch=calls // 10_000, metrics={"loss": 1.0 / (calls + 1)})
                worst = max(worst, time.perf_counter() - t0)
                calls += 1
            if calls % 10_000 < 100:
                process.report_outcome(1 + calls // 10_000, "rejected", message="stalled test")
            process.poll()
            time.sleep(0.005)
        rss_growth = me.memory_info().rss - rss_before
    finally:
        os.kill(pid, signal.SIGCONT)
    assert calls >= 100_000
    assert worst < 0.05, f"report() took {worst * 1000:.1f} ms with a stalled sidecar"
    assert rss_growth < 20 * 2**20, f"memory grew by {rss_growth / 2**20:.1f} MiB"
    assert process.restarts == 0
    # Once the sidecar runs again, the newest status (latest wins) and every outcome get through.
    last = calls - 1
    assert wait_until(lambda: (s := weaver.status(run)) is not None and s.step == last, WAIT)
    assert wait_until(lambda: len(weaver.outcomes(run)) >= 10, WAIT)
    stop_started = time.monotonic()
    process.stop(timeout=5)
    assert time.monotonic() - stop_started < 6.0


def test_stop_with_a_stalled_sidecar_is_bounded(make: Callable[..., WeaveletProcess]) -> None:
    process = make()
    process.start(timeout=WAIT)
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    process.report_outcome(1, "applied", step=1)
    started = time.monotonic()
    process.stop(timeout=1.0)
    assert time.monotonic() - started < 2.0
    assert process.state == "stopped"
    assert gone(pid)
    assert leftovers() == []


# -- exit paths of the trainer -------------------------------------------------------------------------------
EXIT_CODE = """
import signal, sys
from weavelet_core import WeaveletProcess
run, url, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "chained":
    def previous(signum, frame):
        print("previous handler ran", flush=True)
        sys.exit(7)
    signal.signal(signal.SIGTERM, previous)
weavelet = WeaveletProcess(run, url, heartbeat_interval=0.1)
weavelet.start(timeout=30)
weavelet.report(step=42)
print("READY", weavelet.pid, flush=True)
if mode == "chained":
    signal.raise_signal(signal.SIGTERM)
# mode "exit": the script ends without stopping its weavelet
"""


def _run_exit_script(run: str, url: str, mode: str) -> tuple[int, str, int]:
    done = subprocess.run(
        [sys.executable, "-c", EXIT_CODE, run, url, mode], capture_output=True, text=True, timeout=60, check=False
    )
    ready = [line for line in done.stdout.splitlines() if line.startswith("READY ")]
    assert ready, done.stderr
    return done.returncode, done.stdout, int(ready[0].split()[1])


def test_interpreter_exit_stops_the_weavelet(url: str, run: str, weaver: Weaver) -> None:
    code, _out, sidecar = _run_exit_script(run, url, "exit")
    assert code == 0
    assert gone(sidecar)
    status = weaver.status(run)
    assert status is not None
    assert (status.state, status.step) == ("stopped", 42)


def test_sigterm_chains_to_the_previous_handler_after_stopping(url: str, run: str, weaver: Weaver) -> None:
    code, out, sidecar = _run_exit_script(run, url, "chained")
    assert "previous handler ran" in out
    assert code == 7
    assert gone(sidecar)
    status = weaver.status(run)
    assert status is not None
    assert status.state == "stopped"
