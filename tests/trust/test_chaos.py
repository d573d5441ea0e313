"""Chaos: a live trainer on file, NATS and Redis through faults, concurrent weavers and a hostile writer; then
the history checker judges what was recorded.

Per transport, within about a minute: two incarnations of a plain-loop trainer (the first is stopped by a
command, the second starts fresh), its sidecar SIGKILLed in each, the broker SIGSTOPped and SIGKILLed and
restarted (NATS, Redis), four weavers writing concurrently (one also sending checkpoints), and a hostile writer
injecting undecodable entries, a future protocol version and revision-number jumps. The counts are printed.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from weavelet_core import CorruptEntry, Revision, RunEnded, TransportUnavailable, WaitTimeout, Weaver
from weavelet_core.errors import RevisionConflict
from weavelet_core.protocol import encode
from weavelet_core.testing.history import check_history, records_from_jsonl
from weavelet_core.testing.process import sidecars_of, wait_until

from .stores import Store, file_store, nats_store, redis_store

TRAINER = Path(__file__).with_name("chaos_trainer.py")
PHASE = 3.0  # seconds between two faults


@pytest.fixture(params=["file", "nats", "redis"])
def chaos_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return file_store((tmp_path / "store").as_uri())
    if request.param == "nats":
        return nats_store(request.getfixturevalue("weavelet_nats_server_factory")())
    return redis_store(request.getfixturevalue("weavelet_redis_server_factory")(persistent=True))


class Chaos:
    """The moving parts of one chaos run and the counts of what each did."""

    def __init__(self, store: Store, run: str, tmp_path: Path) -> None:
        self.store = store
        self.run = run
        self.tmp_path = tmp_path
        self.record = tmp_path / "record.jsonl"
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.done = threading.Event()
        self._cond = threading.Condition()
        self._inflight = 0
        self._hostile = False
        self._threads: list[threading.Thread] = []
        self.trainers: list[subprocess.Popen[str]] = []
        self.stderr: list[str] = []

    # -- the trainer -------------------------------------------------------------------------------------
    def start_trainer(self) -> subprocess.Popen[str]:
        trainer = subprocess.Popen(
            [sys.executable, str(TRAINER), self.store.url, self.run, str(self.record), str(self.tmp_path), "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.trainers.append(trainer)
        assert trainer.stdout is not None
        line = trainer.stdout.readline().split()
        assert line[:1] == ["ready"], trainer.stderr.read() if trainer.stderr else ""
        self.counts["incarnations"] += 1
        return trainer

    def kill_sidecar(self, trainer: subprocess.Popen[str]) -> None:
        found = sidecars_of(trainer.pid)
        assert found, "the trainer has no sidecar to kill"
        for sidecar in found:
            sidecar.kill()
        self.counts["sidecar SIGKILL"] += 1

    # -- writers -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._hostile, timeout=30)
            self._inflight += 1
        try:
            yield
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The hostile writer's turn: no weaver write in flight (raw writes bypass compare-and-set)."""
        with self._cond:
            self._hostile = True
            self._cond.wait_for(lambda: self._inflight == 0, timeout=30)
        try:
            yield
        finally:
            with self._cond:
                self._hostile = False
                self._cond.notify_all()

    def weaver(self, index: int) -> None:
        rng = random.Random(index)
        with Weaver(self.store.url, write_timeout=5) as weaver:
            while not self.done.wait(rng.uniform(0.05, 0.25)):
                change = {"lr": rng.choice([0.01, 0.02, 0.05, 0.1]), "weight_decay": rng.choice([0.0, 1e-4])}
                try:
                    with self.writing():
                        if index == 0 and rng.random() < 0.1:
                            weaver.command(self.run, "checkpoint")
                            self.counts["checkpoints sent"] += 1
                            continue
                        try:
                            weaver.set(self.run, change)
                        except CorruptEntry:
                            weaver.set(self.run, change, replace=True)
                            self.counts["writes on top of an unreadable entry"] += 1
                    self.counts["writes"] += 1
                except (TransportUnavailable, RevisionConflict, RunEnded) as exc:
                    self.counts[f"write refused: {type(exc).__name__}"] += 1
                except Exception as exc:  # anything else is a defect: remember it, fail the test
                    self.errors.append(f"weaver {index}: {type(exc).__name__}: {exc}")

    def hostile(self) -> None:
        rng = random.Random(99)
        kinds = ["garbage", "future version", "jump"]
        with Weaver(self.store.url, write_timeout=5) as weaver:
            turn = 0
            while not self.done.wait(rng.uniform(1.0, 2.0)):
                kind = kinds[turn % len(kinds)]
                turn += 1
                try:
                    with self.exclusive():
                        try:
                            current = weaver.get(self.run)
                            number = current.revision if current else 0
                        except CorruptEntry as exc:
                            number = exc.revision
                        if kind == "garbage":
                            self.store.write_raw(self.run, number + 1, b"\x00\xffnot json at all")
                        elif kind == "future version":
                            data = encode(Revision(run=self.run, revision=number + 1, config={"lr": 0.5}))
                            self.store.write_raw(self.run, number + 1, data.replace(b'"v":2', b'"v":3', 1))
                        else:
                            jump = number + 50
                            data = encode(Revision(run=self.run, revision=jump, config={"lr": 0.03}))
                            self.store.write_raw(self.run, jump, data)
                    self.counts[f"hostile {kind}"] += 1
                except Exception as exc:  # a broker paused or restarting: try again next turn
                    self.counts[f"hostile write failed: {type(exc).__name__}"] += 1

    def start_writers(self) -> None:
        for index in range(4):
            self._threads.append(threading.Thread(target=self.weaver, args=(index,), daemon=True))
        self._threads.append(threading.Thread(target=self.hostile, daemon=True))
        for thread in self._threads:
            thread.start()

    def stop_writers(self) -> None:
        self.done.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), "a writer did not finish within 30 s"

    # -- the broker --------------------------------------------------------------------------------------
    def pause_broker(self, seconds: float) -> None:
        with self.store.paused() as paused:
            time.sleep(seconds)
        if paused:
            self.counts["broker SIGSTOP"] += 1

    def restart_broker(self) -> None:
        if self.store.restart():
            self.counts["broker SIGKILL + restart"] += 1

    def stop_trainer(self, weaver: Weaver, trainer: subprocess.Popen[str]) -> None:
        """Send ``stop`` to the live incarnation (retrying while the broker recovers); wait for the exit."""
        deadline = time.monotonic() + 45
        while True:
            try:
                weaver.command(self.run, "stop", wait=10)
                break
            except (TransportUnavailable, WaitTimeout, RevisionConflict) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"stop did not land within 45 s: {exc}") from exc
        trainer.wait(30)
        _out, err = trainer.communicate(timeout=10)
        assert trainer.returncode == 0, err
        assert "Traceback" not in err, err
        self.counts["stopped by command"] += 1


def _quiet(weaver: Weaver, run: str) -> bool:
    """Whether the newest revision has an outcome answering it (the run has caught up)."""
    try:
        latest = weaver.get(run)
    except CorruptEntry as exc:
        return weaver.outcome(run, exc.revision) is not None
    return latest is not None and (o := weaver.outcome(run, latest.revision)) is not None and o.revision_id == latest.id


def test_the_history_of_a_chaotic_run_keeps_every_promise(
    chaos_store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = f"chaos-{chaos_store.name}"
    chaos = Chaos(chaos_store, run, tmp_path)
    started = time.monotonic()
    with Weaver(chaos_store.url, write_timeout=10) as weaver:
        first = chaos.start_trainer()
        chaos.start_writers()
        try:
            time.sleep(PHASE)
            chaos.kill_sidecar(first)
            time.sleep(PHASE)
            chaos.pause_broker(2.0)
            time.sleep(PHASE)
            chaos.restart_broker()
            time.sleep(PHASE)
            chaos.stop_trainer(weaver, first)
            second = chaos.start_trainer()
            time.sleep(PHASE)
            chaos.kill_sidecar(second)
            time.sleep(PHASE)
        finally:
            chaos.stop_writers()
        if not wait_until(lambda: _quiet(weaver, run), 30, interval=0.2):
            second.kill()
            _, err = second.communicate(timeout=10)
            try:
                latest: object = weaver.get(run)
            except CorruptEntry as exc:
                latest = exc
            raise AssertionError(
                f"the run did not catch up within 30 s: latest {latest!r}, its outcome "
                f"{weaver.outcome(run, getattr(latest, 'revision', 0))!r}, status {weaver.status(run)!r}, "
                f"trainer stderr: {err[-3000:]}"
            )
        chaos.stop_trainer(weaver, second)
        entries = weaver.history(run)
        outcomes = weaver.outcomes(run)
    applied, commands = records_from_jsonl(chaos.record.read_text().splitlines())
    try:
        report = check_history(entries, outcomes, applied=applied, commands=commands)
    except AssertionError as exc:
        missing = sorted(int(p.split()[1]) for p in getattr(exc, "problems", []) if p.endswith("has no outcome"))
        near = {n for m in missing for n in range(m - 2, m + 3)}
        around = [
            (
                e.revision,
                getattr(e, "author", "?"),
                [(o.result, o.incarnation, o.message) for o in outcomes if o.revision == e.revision],
            )
            for e in entries
            if e.revision in near
        ]
        claims = [line for err in chaos.stderr for line in err.splitlines() if "incarnation" in line][:10]
        applied_near = [a for a in applied if a.revision in near]
        raise AssertionError(f"{exc}\nclaims: {claims}\naround: {around}\napplied: {applied_near}") from None
    with capsys.disabled():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(chaos.counts.items()))
        print(f"\nchaos on {chaos_store.name} ({time.monotonic() - started:.0f}s): {report}; {counts}")
    assert not chaos.errors, chaos.errors
    assert chaos.counts["writes"] > 20
    assert chaos.counts["hostile garbage"]
    assert chaos.counts["hostile jump"]
    assert report.applied > 5
    assert chaos.counts["stopped by command"] == 2
    for trainer in chaos.trainers:
        if trainer.poll() is None:
            os.kill(trainer.pid, signal.SIGKILL)
