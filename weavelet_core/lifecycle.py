"""The lifecycle of a weavelet sidecar, as seen by the trainer: states and the transitions between them.

::

    created --start--> starting --connected--> running
       |                 ^   |                   |
       |                 |   +--(restart)--------+   (a dead sidecar is restarted: back to starting)
       |                 +-------------------------+
       |                                           |
       +--stop--> stopped   starting|running --stop--> stopping --> stopped
                                                          stopping --> failed   (the training loop raised)
                            starting|running --fatal error / restart limit--> failed

``stopped`` and ``failed`` are final. :meth:`Lifecycle.move` refuses any move not in :data:`TRANSITIONS`, so
a bug shows up as :class:`IllegalTransition` instead of a silently inconsistent state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Final

from weavelet_core.errors import WeaveletError

CREATED: Final = "created"
STARTING: Final = "starting"
RUNNING: Final = "running"
STOPPING: Final = "stopping"
STOPPED: Final = "stopped"
FAILED: Final = "failed"

STATES: tuple[str, ...] = (CREATED, STARTING, RUNNING, STOPPING, STOPPED, FAILED)
FINAL_STATES: frozenset[str] = frozenset({STOPPED, FAILED})

TRANSITIONS: dict[str, frozenset[str]] = {
    CREATED: frozenset({STARTING, STOPPED}),
    # starting -> starting: a restart attempt while a previous one has not connected yet.
    STARTING: frozenset({STARTING, RUNNING, STOPPING, FAILED}),
    RUNNING: frozenset({STARTING, STOPPING, FAILED}),
    # stopping -> failed: the trainer stops because its loop raised; the run ends failed, with the exception.
    STOPPING: frozenset({STOPPED, FAILED}),
    STOPPED: frozenset(),
    FAILED: frozenset(),
}
"""Every legal move, from state to the states it may go to."""


class IllegalTransition(WeaveletError, RuntimeError):
    """A lifecycle move that the transition table does not allow."""


def can_move(source: str, target: str) -> bool:
    """Whether the table allows ``source -> target``."""
    return target in TRANSITIONS.get(source, frozenset())


class Lifecycle:
    """A thread-safe current state, changed only along :data:`TRANSITIONS`.

    Every wait is bounded by a timeout. ``history`` keeps the states visited, in order (for diagnostics).
    """

    def __init__(self, state: str = CREATED) -> None:
        if state not in TRANSITIONS:
            raise ValueError(f"unknown lifecycle state {state!r}; known: {', '.join(STATES)}")
        self._state = state
        self._cond = threading.Condition(threading.Lock())
        self.history: list[str] = [state]

    @property
    def state(self) -> str:
        return self._state

    def move(self, target: str) -> str:
        """Move to ``target``; return the previous state. Raise :class:`IllegalTransition` if not allowed."""
        with self._cond:
            source = self._state
            if not can_move(source, target):
                allowed = ", ".join(sorted(TRANSITIONS.get(source, frozenset()))) or "none (final state)"
                raise IllegalTransition(
                    f"weavelet lifecycle cannot go from {source!r} to {target!r}; allowed from {source!r}: {allowed}"
                )
            self._state = target
            self.history.append(target)
            self._cond.notify_all()
            return source

    def move_if(self, sources: Iterable[str], target: str) -> bool:
        """Move to ``target`` only if the current state is one of ``sources``; return whether it moved."""
        with self._cond:
            if self._state not in set(sources) or not can_move(self._state, target):
                return False
            self._state = target
            self.history.append(target)
            self._cond.notify_all()
            return True

    def wait_for(self, states: Iterable[str], timeout: float) -> bool:
        """Wait at most ``timeout`` seconds until the state is one of ``states``; return whether it is."""
        wanted = frozenset(states)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._state not in wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def __repr__(self) -> str:
        return f"<Lifecycle {self._state}>"


__all__ = [
    "CREATED",
    "FAILED",
    "FINAL_STATES",
    "RUNNING",
    "STARTING",
    "STATES",
    "STOPPED",
    "STOPPING",
    "TRANSITIONS",
    "IllegalTransition",
    "Lifecycle",
    "can_move",
]
