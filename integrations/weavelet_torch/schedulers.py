"""Keeping learning-rate schedulers consistent when the optimizer under them changes.

A scheduler computes each learning rate from values it stored when it was built (``base_lrs``, a group's
``initial_lr``, ``max_lr``...). Writing ``param_group["lr"]`` alone is undone at its next step. Two operations
keep a schedule and a remote change in agreement:

- :func:`rescale_lr`: a new learning rate for a group scales every stored learning-rate value of that group by
  the same factor, so the schedule continues *relative to the new value* (a cosine schedule keeps its shape).
- :func:`rebind`: a new optimizer object takes the old one's place; the scheduler keeps its progress
  (``last_epoch``, ``_step_count``) and its stored values.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch

GROUP_LR_KEYS = ("initial_lr", "max_lr", "min_lr")
"""Learning-rate values schedulers store in a param group (``OneCycleLR`` uses all three)."""

SCHEDULER_LR_LISTS = ("base_lrs", "max_lrs")
"""Per-group learning-rate lists schedulers store on themselves (``CyclicLR`` has both)."""


def walk(schedulers: Iterable[Any]) -> Iterator[Any]:
    """Every scheduler in ``schedulers``, including those inside ``SequentialLR``/``ChainedScheduler``."""
    for scheduler in schedulers:
        yield scheduler
        yield from walk(getattr(scheduler, "_schedulers", ()) or ())


def _rescaled(value: Any, old: float, new: float) -> Any:
    """``value * new / old``, or ``new`` when ``old`` is 0; tensors stay tensors."""
    if isinstance(value, torch.Tensor):
        return value * (new / old) if old > 0 else torch.full_like(value, new)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * (new / old) if old > 0 else new
    return value


def rescale_lr(schedulers: Iterable[Any], group: dict[str, Any], index: int, old: float, new: float) -> None:
    """Scale group ``index``'s stored learning rates by ``new / old`` in ``group`` and every scheduler.

    When ``old`` is 0 the stored values cannot be scaled; they are set to ``new`` instead.
    """
    for key in GROUP_LR_KEYS:
        if key in group:
            group[key] = _rescaled(group[key], old, new)
    for scheduler in walk(schedulers):
        for attr in SCHEDULER_LR_LISTS:
            values = getattr(scheduler, attr, None)
            if isinstance(values, list) and index < len(values):
                values[index] = _rescaled(values[index], old, new)
        last = getattr(scheduler, "_last_lr", None)
        if isinstance(last, list) and index < len(last):
            last[index] = new


def _track_step_called(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` the way ``LRScheduler.__init__`` does, so schedulers do not warn after a rebind."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func = optimizer.step.__func__  # type: ignore[attr-defined]
    opt_ref = weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def rebind(schedulers: Iterable[Any], old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Point every scheduler that drives ``old`` at ``new``; return how many were rebound."""
    count = 0
    for scheduler in walk(schedulers):
        if getattr(scheduler, "optimizer", None) is old:
            scheduler.optimizer = new
            count += 1
    if count:
        _track_step_called(new)
        new._opt_called = getattr(old, "_opt_called", False)  # type: ignore[attr-defined]
    return count


class Snapshot:
    """What an apply may change, captured so that a failure can put it all back."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedulers: Iterable[Any]) -> None:
        self.optimizer = optimizer
        self._groups = [
            {k: (v.clone() if isinstance(v, torch.Tensor) else copy.copy(v)) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups
        ]
        self._schedulers: list[tuple[Any, dict[str, Any]]] = []
        for scheduler in walk(schedulers):
            saved: dict[str, Any] = {
                attr: list(getattr(scheduler, attr))
                for attr in (*SCHEDULER_LR_LISTS, "_last_lr")
                if isinstance(getattr(scheduler, attr, None), list)
            }
            saved["optimizer"] = getattr(scheduler, "optimizer", None)
            self._schedulers.append((scheduler, saved))

    def restore(self) -> None:
        """Put the captured param-group values and scheduler state back on the captured optimizer."""
        for group, saved in zip(self.optimizer.param_groups, self._groups, strict=False):
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update(saved)
        for scheduler, saved in self._schedulers:
            for attr, value in saved.items():
                setattr(scheduler, attr, value)
