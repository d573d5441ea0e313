"""Optimizers and schedulers that frameworks wrap: accelerate's ``AcceleratedOptimizer`` and
``AcceleratedScheduler``, Lightning Fabric's ``_FabricOptimizer``.

The applier works on the plain ``torch.optim`` optimizer inside a wrapper (its type, param groups and state), and
on schedulers bound to that plain optimizer. A switch of optimizer type keeps the wrapper object and puts the new
optimizer inside it, so every reference the training loop and the framework hold (``trainer.optimizer``,
``accelerator._optimizers``, an ``AcceleratedScheduler``'s optimizers, the variable the loop steps) stays valid and
wraps the new optimizer the same way (accelerate's gradient-accumulation and mixed-precision step, Fabric's
strategy step).

Nothing here imports accelerate or Lightning: a wrapper is recognised through the modules already loaded, since an
object of their classes cannot exist without them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch

from weavelet_torch.schedulers import rebind, walk

_ACCELERATE_OPTIMIZER = ("accelerate.optimizer", "AcceleratedOptimizer")
_ACCELERATE_SCHEDULER = ("accelerate.scheduler", "AcceleratedScheduler")
_FABRIC_OPTIMIZER = (
    ("lightning.fabric.wrappers", "_FabricOptimizer"),
    ("lightning_fabric.wrappers", "_FabricOptimizer"),
)


def _loaded(module: str, name: str) -> type | None:
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def _accelerated_optimizer_class() -> type | None:
    return _loaded(*_ACCELERATE_OPTIMIZER)


def _fabric_optimizer_classes() -> list[type]:
    return [cls for cls in (_loaded(*where) for where in _FABRIC_OPTIMIZER) if cls is not None]


def kind_of(optimizer: object) -> str | None:
    """``"accelerate"`` or ``"fabric"`` for a wrapper those frameworks put around an optimizer, else ``None``."""
    accelerated = _accelerated_optimizer_class()
    if accelerated is not None and isinstance(optimizer, accelerated):
        return "accelerate"
    if any(isinstance(optimizer, cls) for cls in _fabric_optimizer_classes()):
        return "fabric"
    return None


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The plain optimizer inside ``optimizer`` (itself when it is not a known wrapper)."""
    kind = kind_of(optimizer)
    if kind == "accelerate":
        inner: torch.optim.Optimizer = optimizer.optimizer
        return inner
    if kind == "fabric":
        inner = optimizer._optimizer
        return inner
    return optimizer  # type: ignore[no-any-return]


def rewrap(wrapper: Any, new: torch.optim.Optimizer) -> None:
    """Put ``new`` inside ``wrapper`` in place of the optimizer it wraps, as the framework would have wrapped it.

    accelerate: the mixed-precision step hooks (``GradScaler``) are made for ``new``. Fabric: the wrapper's class,
    which imitates the wrapped optimizer's class for ``isinstance`` checks, imitates ``new``'s.

    :raises TypeError: when ``wrapper`` is not a known wrapper.
    """
    kind = kind_of(wrapper)
    if kind == "accelerate":
        wrapper.optimizer = new
        if getattr(wrapper, "scaler", None) is not None:
            from accelerate.optimizer import patch_optimizer_step

            wrapper._optimizer_original_step_method = new.step
            wrapper._optimizer_patched_step_method = patch_optimizer_step(wrapper, new.step)
        return
    if kind == "fabric":
        base = next(cls for cls in _fabric_optimizer_classes() if isinstance(wrapper, cls))
        wrapper._optimizer = new
        wrapper.__class__ = type("Fabric" + type(new).__name__, (base, type(new)), {})
        return
    raise TypeError(f"{type(wrapper).__name__} is not an optimizer wrapper weavelet knows (accelerate, Fabric)")


def unwrap_scheduler(scheduler: Any) -> Any:
    """The scheduler inside accelerate's ``AcceleratedScheduler`` (itself otherwise)."""
    accelerated = _loaded(*_ACCELERATE_SCHEDULER)
    if accelerated is not None and isinstance(scheduler, accelerated):
        inner: Any = getattr(scheduler, "scheduler")  # noqa: B009
        return inner
    return scheduler


def bind_to_inner(schedulers: Iterable[Any], wrapper: Any) -> int:
    """Point every scheduler built over ``wrapper`` at the plain optimizer inside it; return how many.

    A scheduler driving the wrapper drives the same param groups through it; bound to the plain optimizer it is one
    the applier rescales, rehearses and rebinds like any other. Stepping is unchanged (the loop still steps the
    wrapper, and the scheduler writes the same param groups).
    """
    inner = unwrap(wrapper)
    if inner is wrapper:
        return 0
    bound = [s for s in walk(schedulers) if getattr(s, "optimizer", None) is wrapper]
    return rebind(bound, wrapper, inner) if bound else 0


def accumulating(optimizer: Any) -> bool:
    """Whether ``optimizer`` is an accelerate wrapper inside a gradient-accumulation window (its
    ``gradient_state.sync_gradients`` is false): the last ``step()`` did not step, so this is no step boundary."""
    if kind_of(optimizer) != "accelerate":
        return False
    state = getattr(optimizer, "gradient_state", None)
    return state is not None and not bool(state.sync_gradients)


__all__ = ["accumulating", "bind_to_inner", "kind_of", "rewrap", "unwrap", "unwrap_scheduler"]
