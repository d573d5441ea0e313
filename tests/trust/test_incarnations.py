"""Incarnations: a run id used again never replays the past, and one trainer owns a run at a time."""

from __future__ import annotations

import os
import signal
import time

import pytest

from weavelet_core import RunOwned, WeaveletProcess, Weaver
from weavelet_core.testing.process import wait_until

from .conftest import WAIT, Make, PollUntil


def _finish_first_incarnation(make: Make, weaver: Weaver, run: str, poll_until: PollUntil) -> WeaveletProcess:
    """An incarnation that applied lr=0.01 and optimizer=adam, then received a stop, and stopped."""
    first = make()
    first.start(timeout=WAIT)
    revision = weaver.set(run, {"lr": 0.01, "optimizer": "adam"})
    assert poll_until(first).revision == revision.revision
    first.report_outcome(revision.revision, "applied", step=10)
    stop = weaver.command(run, "stop")
    assert poll_until(first).revision == stop.revision
    first.report_outcome(stop.revision, "applied", step=991, message="stopping at the end of this step")
    first.stop(timeout=5)
    return first


def test_a_fresh_start_clears_an_earlier_incarnations_config_and_says_so(
    make: Make, weaver: Weaver, run: str, poll_until: PollUntil, capfd: pytest.CaptureFixture[str]
) -> None:
    first = _finish_first_incarnation(make, weaver, run, poll_until)
    stored = weaver.get(run)
    assert stored is not None
    assert "stop" in stored.config

    second = make()
    second.start(timeout=WAIT)
    assert second.incarnation != first.incarnation

    # The store now says what runs: an empty config written on top, nothing handed to the trainer.
    latest = weaver.get(run)
    assert latest is not None
    assert latest.revision == stored.revision + 1
    assert latest.config == {}
    assert "fresh start of incarnation " + second.incarnation in latest.author
    time.sleep(0.3)
    assert second.poll() is None
    line = [text for text in capfd.readouterr().err.splitlines() if second.incarnation in text]
    assert len(line) == 1, line
    assert f"the store held revision {stored.revision}" in line[0]
    assert "lr=0.01" in line[0]
    assert "cleared it with revision" in line[0]
    assert "fresh='adopt'" in line[0]

    # The earlier incarnation's records are kept, never overwritten.
    assert wait_until(lambda: weaver.outcome(run, latest.revision) is not None, WAIT)
    stop_outcome = weaver.outcome(run, stored.revision)
    assert stop_outcome is not None
    assert stop_outcome.step == 991
    assert stop_outcome.incarnation == first.incarnation
    reset = weaver.outcome(run, latest.revision)
    assert reset is not None
    assert reset.result == "applied"
    assert reset.incarnation == second.incarnation
    assert reset.revision_id == latest.id
    status = weaver.status(run)
    assert status is not None
    assert status.incarnation == second.incarnation
    assert status.started_at > 0


def test_a_fresh_start_that_adopts_hands_over_the_old_config_as_its_baseline(
    make: Make, weaver: Weaver, run: str, poll_until: PollUntil, capfd: pytest.CaptureFixture[str]
) -> None:
    _finish_first_incarnation(make, weaver, run, poll_until)
    stored = weaver.get(run)
    assert stored is not None
    second = make(fresh="adopt")
    second.start(timeout=WAIT)
    handed = poll_until(second)
    assert handed.revision == stored.revision
    assert handed.config == stored.config
    assert second.is_baseline(handed)  # the integration records its stop token as not this incarnation's
    assert "adopting revision" in capfd.readouterr().err
    # A revision written now is not the baseline.
    newer = weaver.set(run, {"lr": 0.02})
    handed = poll_until(second)
    assert handed.revision == newer.revision
    assert not second.is_baseline(handed)


def test_a_resume_reconciles_newer_revisions_and_marks_the_baseline(
    make: Make, weaver: Weaver, run: str, poll_until: PollUntil, capfd: pytest.CaptureFixture[str]
) -> None:
    first = make()
    first.start(timeout=WAIT)
    one = weaver.set(run, {"lr": 0.1})
    assert poll_until(first).revision == one.revision
    first.report_outcome(one.revision, "applied", step=5)
    first.stop(timeout=5)
    two = weaver.set(run, {"lr": 0.05})  # written while the job was down
    resumed = make(after=one.revision)
    assert resumed.resume
    resumed.start(timeout=WAIT)
    handed = poll_until(resumed)
    assert handed.revision == two.revision
    assert resumed.is_baseline(handed)
    assert f"resuming after revision {one.revision}" in capfd.readouterr().err


def test_a_second_trainer_on_a_live_run_is_refused_naming_the_owner(make: Make, run: str) -> None:
    owner = make()
    owner.start(timeout=WAIT)
    second = make()
    started = time.monotonic()
    with pytest.raises(RunOwned) as info:
        second.start(timeout=WAIT)
    assert time.monotonic() - started < WAIT
    message = str(info.value)
    assert f"run {run!r} is owned by a live trainer" in message
    assert "pid " in message
    assert "on host " in message
    assert "heartbeat" in message
    assert "takeover=True" in message
    assert second.state == "failed"
    assert owner.state == "running"
    assert owner.connected


@pytest.mark.parametrize("url", ["file", "nats"], indirect=True)
def test_takeover_moves_control_and_the_old_owner_steps_down(make: Make, weaver: Weaver, run: str) -> None:
    owner = make()
    owner.start(timeout=WAIT)
    successor = make(takeover=True)
    successor.start(timeout=WAIT)
    assert successor.state == "running"
    assert wait_until(lambda: owner.state == "failed", WAIT), owner.state
    assert owner.message is not None
    assert f"taken over by incarnation {successor.incarnation}" in owner.message
    # The status is the successor's, and stays so (the old owner never overwrites it).
    time.sleep(0.5)
    status = weaver.status(run)
    assert status is not None
    assert status.incarnation == successor.incarnation
    assert status.state == "running"


@pytest.mark.parametrize("url", ["file", "nats"], indirect=True)
def test_a_stale_owner_is_taken_over_with_a_warning(
    make: Make, weaver: Weaver, run: str, caplog: pytest.LogCaptureFixture
) -> None:
    owner = make(heartbeat_interval=0.1)
    owner.start(timeout=WAIT)
    pid = owner.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the owner's heartbeat stops, as when its host hangs
    try:
        time.sleep(1.2)
        successor = make(stale_after=1.0)
        successor.start(timeout=WAIT)
        assert successor.state == "running"
        status = weaver.status(run)
        assert status is not None
        assert status.incarnation == successor.incarnation
    finally:
        os.kill(pid, signal.SIGCONT)


def test_status_and_outcomes_carry_the_incarnation(make: Make, weaver: Weaver, run: str, poll_until: PollUntil) -> None:
    process = make()
    process.start(timeout=WAIT)
    revision = weaver.set(run, {"lr": 0.3})
    assert poll_until(process).revision == revision.revision
    process.report_outcome(revision.revision, "rejected", message="lr: too high")
    outcome = weaver.wait(run, revision.revision, timeout=WAIT, revision_id=revision.id)
    assert outcome.incarnation == process.incarnation
    assert outcome.revision_id == revision.id
    assert wait_until(lambda: (s := weaver.status(run)) is not None and s.last_outcome is not None, WAIT)
    status = weaver.status(run)
    assert status is not None
    assert status.last_outcome is not None
    assert status.last_outcome["result"] == "rejected"
    assert status.last_outcome["message"] == "lr: too high"
    assert status.keepalive == pytest.approx(0.1)


def test_labels_and_schema_reach_the_published_status(make: Make, weaver: Weaver, run: str) -> None:
    with pytest.raises(ValueError, match="labels: keys and values must be non-empty strings"):
        make(labels={"sweep": ""})
    process = make(labels={"sweep": "3", "team": "vision"})
    process.start(timeout=WAIT)
    process.report(step=4, schema={"optimizers": {"": {"keys": {"lr": {"kind": "number", "min": 0}}}}})
    assert wait_until(lambda: (s := weaver.status(run)) is not None and s.schema is not None, WAIT)
    status = weaver.status(run)
    assert status is not None
    assert status.labels == {"sweep": "3", "team": "vision"}
    assert status.schema == {"optimizers": {"": {"keys": {"lr": {"kind": "number", "min": 0}}}}}


def test_a_config_written_ahead_of_the_first_start_is_applied(
    make: Make, weaver: Weaver, run: str, poll_until: PollUntil, capfd: pytest.CaptureFixture[str]
) -> None:
    ahead = weaver.set(run, {"lr": 0.02, "stop": True})  # no trainer has ever reported for this run
    process = make()
    process.start(timeout=WAIT)
    handed = poll_until(process)
    assert handed.revision == ahead.revision
    assert process.is_baseline(handed)  # its hyperparameters apply; its stop never acts
    assert "first start of this run; applying revision 1" in capfd.readouterr().err
