"""Finding Lightning: the ``lightning`` package (``lightning.pytorch``) and/or ``pytorch_lightning``.

The callback derives from the ``Callback`` class of the Lightning package in use: the one (or both) the process
has imported when the callback class is first loaded, which is when ``from weavelet_lightning import
WeaveletCallback`` runs after ``import lightning`` (or ``import pytorch_lightning``). Only when neither is
imported yet does it import, and derive from, every one that is installed, so a trainer from either accepts it.
Importing one package costs about 0.3 s and 7 MB; the other is then never loaded for nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
INSTALL_HINT = 'pip install "weavelet[lightning]"'


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def lightning_modules() -> list[Any]:
    """The installed Lightning modules (``lightning.pytorch`` first); raise ImportError saying how to install."""
    found = []
    for name in PACKAGES:
        if _installed(name.split(".")[0]) and _installed(name):
            found.append(importlib.import_module(name))
    if not found:
        raise ImportError(
            f"weavelet_lightning needs Lightning, which is not installed; install it with: {INSTALL_HINT}"
        )
    return found


def modules_in_use() -> list[Any]:
    """The Lightning modules already imported (``lightning.pytorch`` first), or, when none is, every installed one
    (:func:`lightning_modules`, which raises ImportError saying how to install)."""
    loaded = [sys.modules[name] for name in PACKAGES if name in sys.modules]
    return loaded or lightning_modules()


def callback_base() -> type:
    """A ``Callback`` base class accepted by the trainer of every Lightning package in use (:func:`modules_in_use`)."""
    bases = tuple(module.Callback for module in modules_in_use())
    if len(bases) == 1:
        return bases[0]  # type: ignore[no-any-return]
    return type("LightningCallback", bases, {})


def trainer_module() -> Any:
    """The Lightning module the demo builds its model and trainer from: ``pytorch_lightning`` (what
    ``weavelet[lightning]`` installs) when present, else ``lightning.pytorch``. A model and its trainer must
    come from the same package."""
    modules = lightning_modules()
    return modules[-1]


def step_counter(trainer: Any) -> Any | None:
    """The progress counter behind ``trainer.global_step``, whose ``completed`` the step hook reads directly.

    ``trainer.global_step`` is a chain of properties (the fit loop, the strategy's module, the module's
    ``automatic_optimization``, the loop's progress) that costs about 5,000 instructions a read in Lightning 2.6;
    reading the counter at its end costs one attribute. The path is Lightning's own: ``_TrainingEpochLoop.global_step``
    in ``loops/training_epoch_loop.py``. Returns None, and the hook reads ``trainer.global_step`` instead, where the
    structure differs (another Lightning version) or the counter does not hold the same number.
    """
    try:
        loop = trainer.fit_loop.epoch_loop
        if trainer.lightning_module.automatic_optimization:
            counter = loop.automatic_optimization.optim_progress.optimizer.step.total
        else:
            counter = loop.manual_optimization.optim_step_progress.total
        same = counter.completed == trainer.global_step
    except AttributeError:
        return None
    return counter if same and type(counter.completed) is int else None
