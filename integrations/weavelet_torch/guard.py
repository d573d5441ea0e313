"""The spike guard: an opt-in policy that rolls a run back by itself when its loss spikes.

::

    guard = SpikeGuard(factor=3.0, window=50, patience=3, lr_scale=0.5, max_times=3, per_steps=1000)
    trainer = Trainer(callbacks=[WeaveletCallback(run="big-1", spike_guard=guard)])

Each optimizer step the trainer hands the guard its loss. When the loss is above ``factor`` times the median of
the previous ``window`` losses for ``patience`` steps in a row, the guard writes a ``rollback`` command revision
(to ``to``, default the newest checkpoint, with ``lr_scale`` times the current scale and ``set`` on top); when it
already did so ``max_times`` times within ``per_steps`` steps it writes a ``stop`` command instead. Every revision
it writes is authored ``weavelet spike guard: ...`` with the numbers that triggered it, so ``weavelet history``
shows what happened and why, and ``weavelet revert`` undoes its config changes. It acts through the run's store
like an operator: the rollback takes effect at the step its revision arrives, on every rank at once.

Off by default. Only rank 0 judges (its own loss). A non-finite loss counts as a spike. Reading the loss
(``float(loss)``) waits for the step's computation on a GPU: a guard costs that synchronisation per step.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Mapping
from typing import Any

from weavelet_core.schema import check_rollback_fields


@dataclasses.dataclass(frozen=True)
class Action:
    """What the guard asks for: ``changes`` to merge onto the desired config, and the ``author`` line saying why.

    :param kind: ``"rollback"`` or ``"stop"``.
    """

    kind: str
    changes: dict[str, Any]
    author: str


class SpikeGuard:
    """Loss above ``factor`` x its running median over ``window`` steps for ``patience`` steps -> roll back.

    :param factor: how many times the running median a loss must exceed to count as a spike (> 1; default 3).
    :param window: how many recent losses the median is taken over (>= 3; default 50). The guard judges only once
        it has that many.
    :param patience: consecutive spiking steps before it acts (>= 1; default 3).
    :param lr_scale: multiplies the run's current ``lr_scale`` in the rollback's changes (0 < x <= 1; default
        0.5); 1 leaves the learning rate alone.
    :param set: more changes applied after the rollback (``{"grad_clip_val": 0.5}``); default none.
    :param to: the rollback target: ``"latest"`` (default), ``"snapshot"``, a step or a path.
    :param max_times: rollbacks allowed within ``per_steps`` steps (>= 1; default 3); one more spike then stops
        the fit (a ``stop`` command revision) for a person to look at.
    :param per_steps: the span ``max_times`` counts over, in optimizer steps (>= 1; default 1000).
    :param cooldown: steps after acting before it judges again (default ``window``): the losses right after a
        rollback refill the window.
    :raises ValueError: for values out of range, or a ``set``/``to`` a rollback command cannot carry.
    """

    def __init__(
        self,
        *,
        factor: float = 3.0,
        window: int = 50,
        patience: int = 3,
        lr_scale: float = 0.5,
        set: Mapping[str, Any] | None = None,
        to: str | int = "latest",
        max_times: int = 3,
        per_steps: int = 1000,
        cooldown: int | None = None,
    ) -> None:
        if not (isinstance(factor, (int, float)) and factor > 1 and math.isfinite(factor)):
            raise ValueError(f"factor must be a finite number > 1, got {factor!r}")
        if not (isinstance(lr_scale, (int, float)) and 0 < lr_scale <= 1):
            raise ValueError(f"lr_scale must be in (0, 1], got {lr_scale!r}")
        for name, value, low in (
            ("window", window, 3),
            ("patience", patience, 1),
            ("max_times", max_times, 1),
            ("per_steps", per_steps, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if cooldown is not None and (isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0):
            raise ValueError(f"cooldown must be an integer >= 0, got {cooldown!r}")
        check_rollback_fields({"to": to, "set": dict(set or {})})
        self.factor, self.window, self.patience = float(factor), window, patience
        self.lr_scale, self.set, self.to = float(lr_scale), dict(set or {}), to
        self.max_times, self.per_steps = max_times, per_steps
        self.cooldown = window if cooldown is None else cooldown
        self._losses: collections.deque[float] = collections.deque(maxlen=window)
        self._over = 0
        self._quiet_until = -1
        self._acted: collections.deque[int] = collections.deque(maxlen=max_times + 1)
        self.stopped = False
        """Whether the guard asked the fit to stop (it then stays silent)."""

    def observe(self, step: int, loss: float, current_scale: float = 1.0) -> Action | None:
        """Judge the loss of optimizer step ``step``; return the :class:`Action` to take, or ``None``.

        :param current_scale: the run's ``lr_scale`` now (the rollback asks for it times :attr:`lr_scale`).
        """
        if self.stopped or step < self._quiet_until:
            return None
        finite = math.isfinite(loss)
        if len(self._losses) < self.window:
            if finite:
                self._losses.append(loss)
            return None
        median = statistics.median(self._losses)
        spiking = not finite or loss > self.factor * median
        if not spiking:
            self._over = 0
            self._losses.append(loss)
            return None
        self._over += 1  # spiking losses stay out of the window: the median keeps the pre-spike level
        if self._over < self.patience:
            return None
        why = (
            f"loss {loss:.4g} > {self.factor:g} x median {median:.4g} over {self.window} steps for {self._over} steps "
            f"(step {step})"
        )
        self._over = 0
        self._losses.clear()
        self._quiet_until = step + self.cooldown
        recent = [s for s in self._acted if s > step - self.per_steps]
        if len(recent) >= self.max_times:
            self.stopped = True
            return Action(
                "stop",
                {"stop": {}},
                f"weavelet spike guard: {why}; already rolled back {len(recent)} times within {self.per_steps} "
                "steps: stopping the fit for a person to look",
            )
        self._acted.append(step)
        changes = {**self.set}
        if self.lr_scale != 1:
            changes["lr_scale"] = current_scale * self.lr_scale
        command: dict[str, Any] = {"to": self.to}
        if changes:
            command["set"] = changes
        scale = f", lr_scale {current_scale * self.lr_scale:g}" if self.lr_scale != 1 else ""
        return Action(
            "rollback", {"rollback": command}, f"weavelet spike guard: {why}; rolling back to {self.to}{scale}"
        )


def loss_value(loss: Any) -> float | None:
    """``loss`` as a float (a number or a one-element tensor), or ``None``."""
    if loss is None:
        return None
    if isinstance(loss, Mapping):
        loss = loss.get("loss")
    try:
        return float(loss)
    except (TypeError, ValueError, RuntimeError):
        return None


__all__ = ["Action", "SpikeGuard", "loss_value"]
