"""The lifecycle transition table and :class:`Lifecycle`, without processes (fast)."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from weavelet_core.lifecycle import (
    CREATED,
    FAILED,
    FINAL_STATES,
    RUNNING,
    STARTING,
    STATES,
    STOPPED,
    STOPPING,
    TRANSITIONS,
    IllegalTransition,
    Lifecycle,
    can_move,
)
from weavelet_core.protocol import LIFECYCLE_STATES


def test_states_match_the_wire_protocol() -> None:
    assert set(STATES) == set(LIFECYCLE_STATES)
    assert set(TRANSITIONS) == set(STATES)


def test_final_states_have_no_way_out() -> None:
    assert {STOPPED, FAILED} == FINAL_STATES
    for state in FINAL_STATES:
        assert TRANSITIONS[state] == frozenset()


def test_every_state_is_reachable_from_created_and_reaches_a_final_state() -> None:
    reachable = {CREATED}
    frontier = [CREATED]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(STATES)
    for state in STATES:
        seen, frontier = {state}, [state]
        while frontier:
            for target in TRANSITIONS[frontier.pop()]:
                if target not in seen:
                    seen.add(target)
                    frontier.append(target)
        assert seen & FINAL_STATES, f"{state} cannot reach a final state"


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (CREATED, STARTING),
        (CREATED, STOPPED),
        (STARTING, RUNNING),
        (STARTING, STARTING),
        (RUNNING, STARTING),
        (STARTING, STOPPING),
        (RUNNING, STOPPING),
        (STOPPING, STOPPED),
        (STARTING, FAILED),
        (RUNNING, FAILED),
    ],
)
def test_the_documented_moves_are_allowed(source: str, target: str) -> None:
    assert can_move(source, target)
    lifecycle = Lifecycle(source)
    assert lifecycle.move(target) == source
    assert lifecycle.state == target


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (CREATED, RUNNING),
        (CREATED, FAILED),
        (STOPPED, STARTING),
        (FAILED, RUNNING),
        (STOPPING, RUNNING),
        (RUNNING, STOPPED),
        (RUNNING, CREATED),
    ],
)
def test_illegal_moves_raise_and_name_what_is_allowed(source: str, target: str) -> None:
    lifecycle = Lifecycle(source)
    with pytest.raises(IllegalTransition, match=f"cannot go from '{source}' to '{target}'") as info:
        lifecycle.move(target)
    assert "allowed from" in str(info.value)
    assert lifecycle.state == source


def test_unknown_initial_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown lifecycle state"):
        Lifecycle("paused")


def test_move_if_only_moves_from_the_given_states() -> None:
    lifecycle = Lifecycle(RUNNING)
    assert not lifecycle.move_if((STARTING,), RUNNING)
    assert lifecycle.move_if((RUNNING,), STOPPING)
    assert not lifecycle.move_if((STOPPING,), RUNNING)  # listed, but not in the table
    assert lifecycle.state == STOPPING
    assert lifecycle.history == [RUNNING, STOPPING]


def test_wait_for_is_bounded_and_wakes_on_a_move() -> None:
    lifecycle = Lifecycle(STARTING)
    started = time.monotonic()
    assert not lifecycle.wait_for((RUNNING,), 0.05)
    assert time.monotonic() - started < 2.0
    timer = threading.Timer(0.05, lifecycle.move, args=(RUNNING,))
    timer.start()
    try:
        assert lifecycle.wait_for((RUNNING,), 10.0)
    finally:
        timer.join()
    assert lifecycle.wait_for((RUNNING,), 0.0)


@given(st.lists(st.tuples(st.sampled_from(STATES), st.sampled_from(STATES)), max_size=30))
@settings(max_examples=200, deadline=None)
def test_random_moves_follow_the_table_exactly(moves: list[tuple[str, str]]) -> None:
    lifecycle = Lifecycle()
    for _source, target in moves:
        before = lifecycle.state
        if can_move(before, target):
            lifecycle.move(target)
            assert lifecycle.state == target
        else:
            with pytest.raises(IllegalTransition):
                lifecycle.move(target)
            assert lifecycle.state == before
    assert all(can_move(a, b) for a, b in itertools.pairwise(lifecycle.history))


class LifecycleMachine(RuleBasedStateMachine):
    """The trainer's lifecycle operations, driven against a hand-written model of the state."""

    def __init__(self) -> None:
        super().__init__()
        self.lifecycle = Lifecycle()
        self.model = CREATED

    @rule()
    def start(self) -> None:
        if self.model == CREATED:
            self.lifecycle.move(STARTING)
            self.model = STARTING
        else:
            assert not self.lifecycle.move_if((CREATED,), STARTING)

    @rule()
    def connected(self) -> None:
        moved = self.lifecycle.move_if((STARTING,), RUNNING)
        assert moved == (self.model == STARTING)
        if moved:
            self.model = RUNNING

    @rule()
    def sidecar_died(self) -> None:
        moved = self.lifecycle.move_if((RUNNING, STARTING), STARTING)
        assert moved == (self.model in (RUNNING, STARTING))
        if moved:
            self.model = STARTING

    @rule()
    def fatal(self) -> None:
        moved = self.lifecycle.move_if((RUNNING, STARTING), FAILED)
        assert moved == (self.model in (RUNNING, STARTING))
        if moved:
            self.model = FAILED

    @rule()
    def stop(self) -> None:
        if self.model == CREATED:
            self.lifecycle.move(STOPPED)
            self.model = STOPPED
        elif self.model in (STARTING, RUNNING):
            self.lifecycle.move(STOPPING)
            self.lifecycle.move(STOPPED)
            self.model = STOPPED
        else:
            assert self.lifecycle.state in FINAL_STATES

    @invariant()
    def state_matches_the_model(self) -> None:
        assert self.lifecycle.state == self.model
        assert self.lifecycle.state in STATES


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(max_examples=100, stateful_step_count=20, deadline=None)
