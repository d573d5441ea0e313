"""Nothing the control plane receives can take control away: bounded messages, bounded memory, bounded loops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import psutil
import pytest

from weavelet_core import Revision, Weaver
from weavelet_core.ledger import MAX_PENDING, OutcomeLedger
from weavelet_core.protocol import MAX_MESSAGE_CHARS, MAX_REVISION, Outcome, encode
from weavelet_core.testing.process import wait_until
from weavelet_file.transport import atomic_write

from .conftest import WAIT, Make, PollUntil


def test_an_outcome_too_large_for_the_wire_is_cut_and_never_blocks_the_next(
    make: Make, weaver: Weaver, run: str, poll_until: PollUntil
) -> None:
    process = make()
    process.start(timeout=WAIT)
    first = weaver.set(run, {f"unknown_{i}": i for i in range(2000)})
    assert poll_until(process).revision == first.revision
    huge = "; ".join(f"unknown key 'unknown_{i}'; known keys: lr, momentum, weight_decay" for i in range(2000))
    assert len(huge) > 100_000
    process.report_outcome(first.revision, "rejected", message=huge, detail={"problems": [huge] * 4})
    stored = weaver.wait(run, first.revision, timeout=WAIT, revision_id=first.id)
    assert stored.message is not None
    assert len(stored.message) <= MAX_MESSAGE_CHARS
    assert stored.message.endswith("more characters]")
    assert "dropped" in stored.detail
    # The control plane still works: the next revision is handed out and answered.
    second = weaver.set(run, {"lr": 0.05}, replace=True)
    assert poll_until(process).revision == second.revision
    process.report_outcome(second.revision, "applied", step=3)
    outcome = weaver.wait(run, second.revision, timeout=WAIT, revision_id=second.id)
    assert (outcome.result, outcome.step) == ("applied", 3)
    status = weaver.status(run)
    assert status is not None
    assert status.state == "running"


def test_the_outcome_ledger_is_bounded() -> None:
    ledger = OutcomeLedger(max_pending=10)
    for revision in range(1, 26):
        ledger.add(Outcome(run="r", revision=revision, result="applied", step=revision))
    assert len(ledger) == 10
    assert ledger.dropped == 15
    ledger.ack(20)
    assert len(ledger) == 5


def test_trainer_memory_stays_flat_over_10000_outcomes_with_a_stalled_sidecar(make: Make) -> None:
    process = make()
    process.start(timeout=WAIT)
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # nothing gets published: everything waits in the trainer
    try:
        for revision in range(1, MAX_PENDING + 1001):  # warm up past the bound
            process.report_outcome(revision, "applied", step=revision, message="lr 0.1 -> 0.05")
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for revision in range(MAX_PENDING + 1001, MAX_PENDING + 11001):
            process.report_outcome(revision, "applied", step=revision, message="lr 0.1 -> 0.05")
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(process._ledger) <= MAX_PENDING
    # 4096 pending outcomes of ~400 bytes each bound it; 10,000 unbounded ones would add ~4 MB.
    assert grown < 2_000_000, f"trainer memory grew by {grown} bytes over 10,000 outcomes"


@pytest.mark.parametrize("jump", [10**7, MAX_REVISION - 1])
def test_a_revision_number_jump_keeps_the_sidecar_responsive(
    jump: int, store: Path, url: str, run: str, tmp_path: Path
) -> None:
    """A latest.json whose revision jumps far ahead: the sidecar hands it over at once, keeps its heartbeat,
    and still exits within a second of the trainer's death."""
    script = tmp_path / "trainer.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from weavelet_core import WeaveletProcess
            if __name__ == "__main__":
                p = WeaveletProcess({run!r}, {url!r}, heartbeat_interval=0.1)
                p.start(timeout=10)
                print("ready", p.pid, flush=True)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    r = p.poll()
                    if r is not None:
                        print("got", r.revision, flush=True)
                    time.sleep(0.01)
            """
        )
    )
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout is not None
        ready = trainer.stdout.readline().split()
        assert ready[:1] == ["ready"], trainer.stderr.read() if trainer.stderr else ""
        sidecar = psutil.Process(int(ready[1]))
        with Weaver(url) as weaver:
            weaver.set(run, {"lr": 0.1})
            assert trainer.stdout.readline().split() == ["got", "1"]
            run_dir = store / "runs" / run
            data = encode(Revision(run=run, revision=jump, config={"lr": 0.2}))
            atomic_write(run_dir / "revisions" / f"{jump:020d}.json", data)
            atomic_write(run_dir / "latest.json", data)
            started = time.monotonic()
            assert trainer.stdout.readline().split() == ["got", str(jump)]
            assert time.monotonic() - started < 5
            # Still publishing heartbeats.
            first = weaver.status(run)
            assert first is not None
            assert wait_until(lambda: (s := weaver.status(run)) is not None and s.heartbeat > first.heartbeat, 5)
        trainer.kill()
        trainer.wait(10)
        killed = time.monotonic()
        assert wait_until(lambda: not sidecar.is_running() or sidecar.status() == psutil.STATUS_ZOMBIE, 5)
        assert time.monotonic() - killed < 2.5  # within a second, plus reaping on a loaded machine
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(10)


def test_outcomes_held_back_from_a_stalled_sidecar_are_all_published_once_it_resumes(
    make: Make, weaver: Weaver, run: str
) -> None:
    process = make()
    process.start(timeout=WAIT)
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        for revision in range(1, 301):
            process.report_outcome(revision, "applied", step=revision)
    finally:
        os.kill(pid, signal.SIGCONT)

    def all_stored() -> bool:
        process.report(step=300)  # the trainer's regular reports hand over what was held back
        return len(weaver.outcomes(run)) == 300

    assert wait_until(all_stored, 60, interval=0.2)
    assert [o.revision for o in weaver.outcomes(run)] == list(range(1, 301))


def test_the_send_window_counts_outcomes_in_flight_and_restarts_with_a_new_channel() -> None:
    ledger = OutcomeLedger(window=3)
    for revision in range(1, 11):
        ledger.add(Outcome(run="r", revision=revision, result="applied", step=revision))
    assert len(ledger.take_unsent()) == 3
    assert ledger.take_unsent() == []  # three in flight, none acknowledged
    ledger.ack(2)
    assert len(ledger.take_unsent()) == 2
    # A restarted sidecar has a fresh channel whose acknowledgements start at 0: everything pending goes again.
    ledger.restart_sending()
    assert len(ledger.take_unsent()) == 3
    assert len(ledger.take_unsent(everything=True)) == 5


def test_an_outcome_the_store_keeps_refusing_is_dropped_and_never_blocks_those_behind_it(
    make: Make, weaver: Weaver, run: str, store: Path, poll_until: PollUntil
) -> None:
    process = make()
    process.start(timeout=WAIT)
    first = weaver.set(run, {"lr": 0.1})
    assert poll_until(process).revision == first.revision
    # A directory where the outcome file must go: every attempt to store it fails (EISDIR), outage or not.
    (store / "runs" / run / "outcomes" / f"{first.revision:020d}.{process.incarnation}.json").mkdir(parents=True)
    process.report_outcome(first.revision, "applied", step=1)
    second = weaver.set(run, {"lr": 0.2})
    assert poll_until(process).revision == second.revision
    process.report_outcome(second.revision, "applied", step=2)
    outcome = weaver.wait(run, second.revision, timeout=WAIT, revision_id=second.id)
    assert outcome.step == 2
    status = weaver.status(run)
    assert status is not None
    assert status.state == "running"
    assert not status.stale()


def test_a_revision_number_beyond_the_protocol_limit_is_not_believed(
    make: Make, weaver: Weaver, run: str, store: Path, poll_until: PollUntil
) -> None:
    process = make()
    process.start(timeout=WAIT)
    first = weaver.set(run, {"lr": 0.1})
    assert poll_until(process).revision == first.revision
    process.report_outcome(first.revision, "applied", step=1)
    hostile = encode(Revision(run=run, revision=1, config={"lr": 9.0})).replace(
        b'"revision":1', b'"revision":1' + b"0" * 250
    )
    atomic_write(store / "runs" / run / "latest.json", hostile)
    time.sleep(0.5)
    assert process.poll() is None
    # Writers go on numbering from what the store can vouch for; the trainer gets their revisions.
    second = weaver.set(run, {"lr": 0.2})
    assert second.revision == 2
    assert poll_until(process).revision == 2
    status = weaver.status(run)
    assert status is not None
    assert not status.stale()
