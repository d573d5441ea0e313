"""Property test of WeaveletProcess over real processes: random sequences of start, stop, writes, polls,
reports, SIGKILLs of the sidecar and waits for its restart, on the file transport.

Example counts are small by default (two shared cores). ``WEAVELET_HYPOTHESIS_PROFILE=thorough`` runs many
more and longer sequences.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from weavelet_core import WeaveletProcess, Weaver
from weavelet_core.lifecycle import FINAL_STATES, STATES, can_move
from weavelet_core.testing.process import leftovers, wait_until

PROFILE_ENV = "WEAVELET_HYPOTHESIS_PROFILE"
PROFILES = {
    "default": settings(
        max_examples=25,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    ),
    "thorough": settings(
        max_examples=60,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    ),
}
WAIT = 20.0
STOP_TIMEOUT = 3.0
STOP_SLACK = 1.0
"""Allowed overrun of ``stop``'s own bound (scheduling on a loaded machine)."""


class WeaveletProcessMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="weavelet-sm-"))
        self.url = (self.tmp / "store").as_uri()
        self.run = f"sm-{uuid.uuid4().hex[:8]}"
        self.weaver = Weaver(self.url)
        self.process = WeaveletProcess(
            self.run, self.url, heartbeat_interval=0.1, restart_backoff=(0.05, 0.2), max_restarts=None
        )
        self.written = 0
        self.handed: list[int] = []
        self.reported: set[int] = set()
        self.was_stopped = False
        self.started = False

    # -- rules -----------------------------------------------------------------------------------------
    @initialize(start_now=st.sampled_from([True, True, True, False]))
    def begin(self, start_now: bool) -> None:
        """Most sequences start with a started process, so that the short default runs reach the faults."""
        if start_now:
            self.start()

    @rule()
    def start(self) -> None:
        state = self.process.state
        if state == "created":
            self.started = True
            self.process.start(timeout=WAIT)
            assert self.process.state in ("starting", "running")
        elif state in FINAL_STATES:
            assert self.was_stopped
            with pytest.raises(RuntimeError, match="create a new one"):
                self.process.start()
        else:
            self.process.start()  # already started: nothing happens
            assert self.process.state in ("starting", "running")

    @rule()
    def stop(self) -> None:
        started = time.monotonic()
        self.process.stop(timeout=STOP_TIMEOUT)
        elapsed = time.monotonic() - started
        assert elapsed < STOP_TIMEOUT + STOP_SLACK, f"stop took {elapsed:.2f}s"
        assert self.process.state in FINAL_STATES
        assert leftovers() == []
        self.was_stopped = True

    @rule(lr=st.floats(min_value=1e-6, max_value=1.0))
    def write(self, lr: float) -> None:
        self.written = self.weaver.set(self.run, {"lr": lr}).revision

    @rule()
    def poll(self) -> None:
        self._take(self.process.poll())

    @rule(applied=st.booleans(), step=st.integers(min_value=0, max_value=10**9))
    def report_outcome(self, applied: bool, step: int) -> None:
        unreported = [r for r in self.handed if r not in self.reported]
        if not unreported:
            return
        revision = unreported[-1]
        if applied:
            self.process.report_outcome(revision, "applied", step=step)
            assert self.process.applied_revision >= revision
        else:
            self.process.report_outcome(revision, "rejected", message="refused by the test")
        self.reported.add(revision)

    @rule(step=st.integers(min_value=0, max_value=10**9), loss=st.floats(allow_nan=True))
    def report(self, step: int, loss: float) -> None:
        self.process.report(step=step, metrics={"loss": loss}, optimizer={"name": "sgd"})

    # Preconditions read only the model, never the processes: Hypothesis replays must draw the same rules.
    @precondition(lambda self: self.live)
    @rule()
    def kill_sidecar(self) -> None:
        pid = self.process.pid
        if pid is not None:
            event(f"sidecar killed in state {self.process.state}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @precondition(lambda self: self.live)
    @rule()
    def restart_completes(self) -> None:
        # A sidecar just killed still shows "running" until the supervisor notices: wait for a live one.
        process = self.process
        assert wait_until(lambda: process.state == "running" and process.pid is not None, WAIT), self._diagnosis()

    @precondition(lambda self: self.live and self.written > 0)
    @rule()
    def latest_arrives(self) -> None:
        deadline = time.monotonic() + WAIT
        while (not self.handed or self.handed[-1] < self.written) and time.monotonic() < deadline:
            self._take(self.process.poll())
            time.sleep(0.005)
        assert self.handed, f"nothing handed out; written {self.written}"
        assert self.handed[-1] == self.written, f"handed {self.handed}, written {self.written}; {self._diagnosis()}"
        event(f"latest arrived after {self.process.restarts} restarts")

    def _diagnosis(self) -> str:
        process = self.process
        return (
            f"state {process.state}, history {process.lifecycle.history}, restarts {process.restarts}, "
            f"sidecar pid {process.pid}, message {process.message!r}"
        )

    @property
    def live(self) -> bool:
        """Started and not stopped (with no restart limit, nothing else ends the process)."""
        return self.started and not self.was_stopped

    def _take(self, revision: object) -> None:
        if revision is None:
            return
        number = getattr(revision, "revision", None)
        assert isinstance(number, int)
        assert not self.handed or number > self.handed[-1], f"revision {number} after {self.handed}"
        assert number <= self.written
        self.handed.append(number)

    # -- invariants ------------------------------------------------------------------------------------
    @invariant()
    def state_is_legal(self) -> None:
        history = list(self.process.lifecycle.history)
        assert self.process.state in STATES
        assert history[0] == "created"
        assert all(can_move(a, b) for a, b in itertools.pairwise(history)), history

    @invariant()
    def calls_after_stop_never_raise(self) -> None:
        if self.was_stopped:
            assert self.process.poll() is None
            self.process.report(step=1)
            self.process.report_outcome(1, "applied", step=1)

    def teardown(self) -> None:
        try:
            if self.live:
                # Whatever happened (kills included), the sidecar comes back and the latest revision arrives.
                self.restart_completes()
                if self.written:
                    self.latest_arrives()
        finally:
            started = time.monotonic()
            self.process.stop(timeout=STOP_TIMEOUT)
            elapsed = time.monotonic() - started
            self.weaver.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
        assert elapsed < STOP_TIMEOUT + STOP_SLACK, f"stop took {elapsed:.2f}s"
        assert leftovers() == []


TestWeaveletProcessMachine = WeaveletProcessMachine.TestCase
TestWeaveletProcessMachine.settings = PROFILES[os.environ.get(PROFILE_ENV, "default")]
