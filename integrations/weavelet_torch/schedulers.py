"""Keeping learning-rate schedulers consistent when the optimizer under them changes.

A scheduler computes each learning rate from values it stored when it was built (``base_lrs``, a group's
``initial_lr``, ``max_lr``, ``eta_min``...). Writing ``param_group["lr"]`` alone is undone at its next step.
Three operations keep a schedule and a remote change in agreement:

- :func:`rescale_lrs`: a new learning rate for some groups scales every stored learning-rate value of those
  groups by the same factor, so the schedule continues *relative to the new value* (a cosine schedule keeps its
  shape). Values shared by all groups (``eta_min`` of the cosine schedulers, the ``eps`` of
  ``ReduceLROnPlateau``) are scaled when every group changed by the same factor.
- :func:`scale_schedule`: ``lr_scale``; every learning-rate value of every group and scheduler times a factor.
- :func:`rebind`: a new optimizer object takes the old one's place; the scheduler keeps its progress
  (``last_epoch``, ``_step_count``) and its stored values, and its optimizer-specific state is adapted
  (``OneCycleLR``/``CyclicLR`` cycle ``betas[0]`` or ``momentum``, whichever the new type has).
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from weavelet_torch.errors import Rejected

GROUP_LR_KEYS = ("initial_lr", "max_lr", "min_lr", "swa_lr")
"""Learning-rate values schedulers store in a param group (``OneCycleLR`` the first three, ``SWALR`` the last)."""

SCHEDULER_LR_LISTS = ("base_lrs", "max_lrs", "min_lrs")
"""Per-group learning-rate lists schedulers store on themselves (``CyclicLR``: both first; ``ReduceLROnPlateau``:
``min_lrs``)."""

SHARED_LR_SCALARS = ("eta_min",)
"""Learning-rate values one scheduler shares between all groups (``CosineAnnealingLR``/``WarmRestarts``)."""


def walk(schedulers: Iterable[Any]) -> Iterator[Any]:
    """Every scheduler in ``schedulers``, including those inside ``SequentialLR``/``ChainedScheduler``.

    Nesting deeper than 32 levels is not followed (no real schedule nests that deep).
    """

    def inner(items: Iterable[Any], depth: int) -> Iterator[Any]:
        for scheduler in items:
            yield scheduler
            if depth < 32:
                yield from inner(getattr(scheduler, "_schedulers", ()) or (), depth + 1)

    yield from inner(schedulers, 0)


def _times(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value * factor
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    return value


def _rescaled(value: Any, old: float, new: float) -> Any:
    """``value * new / old``, or ``new`` when ``old`` is 0; tensors stay tensors."""
    if old > 0:
        return _times(value, new / old)
    if isinstance(value, torch.Tensor):
        return torch.full_like(value, new)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return new
    return value


def _set_lr(group: dict[str, Any], value: float) -> None:
    current = group.get("lr")
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        group["lr"] = value


def rescale_lrs(
    schedulers: Iterable[Any], groups: Sequence[dict[str, Any]], changes: Mapping[int, tuple[float, float]]
) -> list[str]:
    """Group ``i``'s learning rate goes from ``changes[i][0]`` to ``changes[i][1]``: set it, and scale what the
    group and every scheduler stored for it by the same factor; return notes on what could not follow.

    When the old value is 0 the stored values cannot be scaled; they are set to the new value instead.
    """
    notes: list[str] = []
    ratios: list[float | None] = []
    for index, (old, new) in changes.items():
        group = groups[index]
        for key in GROUP_LR_KEYS:
            if key in group:
                group[key] = _rescaled(group[key], old, new)
        _set_lr(group, new)
        ratios.append(new / old if old > 0 else None)
    first = ratios[0] if ratios else None
    uniform = (
        len(changes) == len(groups)
        and first is not None
        and all(r is not None and math.isclose(r, first, rel_tol=1e-9) for r in ratios)
    )
    for scheduler in walk(schedulers):
        for attr in SCHEDULER_LR_LISTS:
            values = getattr(scheduler, attr, None)
            if isinstance(values, list):
                for index, (old, new) in changes.items():
                    if index < len(values):
                        values[index] = _rescaled(values[index], old, new)
        last = getattr(scheduler, "_last_lr", None)
        if isinstance(last, list):
            for index, (_, new) in changes.items():
                if index < len(last):
                    last[index] = new
        shared = [attr for attr in _shared_scalars(scheduler) if getattr(scheduler, attr)]
        if shared and uniform:
            assert first is not None
            for attr in shared:
                setattr(scheduler, attr, _times(getattr(scheduler, attr), first))
        elif shared:
            notes.append(
                f"{type(scheduler).__name__}'s {', '.join(shared)} (shared by all param groups) stays "
                f"{', '.join(f'{getattr(scheduler, a):g}' for a in shared)}: the groups' learning rates did not "
                "all change by the same factor, so its floor no longer scales with them; use lr_scale to scale "
                "the whole schedule"
            )
    return notes


def _shared_scalars(scheduler: Any) -> list[str]:
    names = [a for a in SHARED_LR_SCALARS if isinstance(getattr(scheduler, a, None), (int, float))]
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and isinstance(scheduler.eps, float):
        names.append("eps")  # its smallest lr decay worth applying, in lr units
    return names


def scale_schedule(schedulers: Iterable[Any], groups: Sequence[dict[str, Any]], factor: float) -> None:
    """Multiply every learning-rate value of ``groups`` and of every scheduler by ``factor`` (``lr_scale``)."""
    for group in groups:
        for key in GROUP_LR_KEYS:
            if key in group:
                group[key] = _times(group[key], factor)
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            lr.mul_(factor)
        elif lr is not None:
            group["lr"] = lr * factor
    for scheduler in walk(schedulers):
        for attr in (*SCHEDULER_LR_LISTS, "_last_lr"):
            values = getattr(scheduler, attr, None)
            if isinstance(values, list):
                values[:] = [_times(v, factor) for v in values]
        for attr in _shared_scalars(scheduler):
            setattr(scheduler, attr, _times(getattr(scheduler, attr), factor))


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


def momentum_key(optimizer: torch.optim.Optimizer) -> str | None:
    """Which value a momentum-cycling scheduler drives in ``optimizer``: ``"betas"`` (``betas[0]``),
    ``"momentum"``, or ``None`` when it has neither (the rule ``OneCycleLR``/``CyclicLR`` apply when built)."""
    if "betas" in optimizer.defaults:
        return "betas"
    if "momentum" in optimizer.defaults:
        return "momentum"
    return None


def check_rebind(schedulers: Iterable[Any], old: torch.optim.Optimizer, new: torch.optim.Optimizer, name: str) -> None:
    """Raise :class:`Rejected` when a scheduler driving ``old`` cannot drive ``new`` (type named ``name``)."""
    for scheduler in walk(schedulers):
        if getattr(scheduler, "optimizer", None) is not old:
            continue
        if getattr(scheduler, "cycle_momentum", False) and momentum_key(new) is None:
            raise Rejected(
                f"optimizer: {type(scheduler).__name__} cycles momentum (cycle_momentum=True) and {name} has "
                f"neither momentum nor betas to cycle; build the scheduler with cycle_momentum=False to switch to "
                f"{name}, or switch to an optimizer with momentum or betas"
            )


def rebind(schedulers: Iterable[Any], old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Point every scheduler that drives ``old`` at ``new``; return how many were rebound.

    A scheduler cycling momentum (``OneCycleLR``, ``CyclicLR`` with ``cycle_momentum=True``) is told which value
    ``new`` has (``betas[0]`` or ``momentum``), and ``new``'s groups start from the momentum the cycle reached.
    Call :func:`check_rebind` first: a cycling scheduler over an optimizer with neither keeps its old setting.
    """
    count = 0
    for scheduler in walk(schedulers):
        if getattr(scheduler, "optimizer", None) is not old:
            continue
        scheduler.optimizer = new
        count += 1
        key = momentum_key(new)
        if getattr(scheduler, "cycle_momentum", False) and key is not None:
            was_beta = bool(getattr(scheduler, "use_beta1", False))
            scheduler.use_beta1 = key == "betas"
            for before, after in zip(old.param_groups, new.param_groups, strict=False):
                reached = before.get("betas", (None,))[0] if was_beta else before.get("momentum")
                if not isinstance(reached, (int, float)) or isinstance(reached, bool):
                    continue
                if key == "betas" and isinstance(after.get("betas"), tuple):
                    after["betas"] = (reached, *after["betas"][1:])
                elif key == "momentum":
                    after["momentum"] = reached
    if count:
        _track_step_called(new)
        new._opt_called = getattr(old, "_opt_called", False)  # type: ignore[attr-defined]
    return count


def _copy_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, dict, set)):
        return copy.copy(value)
    return value


class Snapshot:
    """What an apply may change, captured so that a failure can put it all back.

    Param-group entries (tensors cloned) and each scheduler's attributes (lists and dicts copied one level).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedulers: Iterable[Any]) -> None:
        self.optimizer = optimizer
        self._groups = [{k: _copy_value(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self._schedulers: list[tuple[Any, dict[str, Any]]] = [
            (scheduler, {k: _copy_value(v) for k, v in vars(scheduler).items()})
            for scheduler in walk(schedulers)
            if hasattr(scheduler, "__dict__")
        ]

    def restore(self) -> None:
        """Put the captured param-group values and scheduler state back on the captured optimizer."""
        for group, saved in zip(self.optimizer.param_groups, self._groups, strict=False):
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update(saved)
        for scheduler, saved in self._schedulers:
            attrs = vars(scheduler)
            for key in [k for k in attrs if k not in saved]:
                del attrs[key]
            attrs.update(saved)


def copy_schedulers(
    schedulers: Sequence[Any], live: torch.optim.Optimizer, twin: torch.optim.Optimizer
) -> tuple[list[Any], list[str]]:
    """Deep copies of the top-level ``schedulers`` that drive ``live``, bound to ``twin`` instead.

    The live optimizer (and through it the model's parameters and state) is never copied. Returns the copies
    and, for each scheduler that could not be copied, why.
    """
    copies: list[Any] = []
    skipped: list[str] = []
    for scheduler in schedulers:
        if not any(getattr(s, "optimizer", None) is live for s in walk([scheduler])):
            continue
        memo: dict[int, Any] = {id(live): twin}
        try:
            clone = copy.deepcopy(scheduler, memo)
        except Exception as exc:
            skipped.append(f"{type(scheduler).__name__} (cannot be copied: {type(exc).__name__}: {exc})")
            continue
        for inner in walk([clone]):
            init_scale = getattr(inner, "_init_scale_fn", None)  # CyclicLR keeps a weak method to itself
            if callable(init_scale):
                init_scale()
        copies.append(clone)
    if copies:
        _track_step_called(twin)
    return copies, skipped
