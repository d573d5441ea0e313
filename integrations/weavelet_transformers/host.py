"""The applier's view of a Hugging Face ``Trainer``: its optimizer inside accelerate's wrapper, its scheduler, and
the ``TrainerControl`` switches that save and stop."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from weavelet_torch import wrappers
from weavelet_torch.errors import Rejected
from weavelet_torch.host import OptimizerHost

CHECKPOINT_PREFIX = "checkpoint"
"""The Trainer names its checkpoint folders ``checkpoint-<global step>`` under ``output_dir``."""


class TrainerHost(OptimizerHost):
    """Reads and replaces the optimizer of a running ``Trainer``.

    ``trainer.optimizer`` is accelerate's ``AcceleratedOptimizer`` once training started; a switch puts the new
    optimizer inside that same wrapper (see :mod:`weavelet_torch.wrappers`), so ``trainer.optimizer``, the
    callback handler's reference and accelerate's own list stay valid. Before the wrapper exists (while the
    Trainer builds its optimizer) a switch replaces ``trainer.optimizer`` itself.

    The ``checkpoint`` and ``stop`` commands set flags the callback turns into ``control.should_save`` and
    ``control.should_training_stop`` at the end of the step: the Trainer saves and stops itself.
    """

    def __init__(self) -> None:
        self.trainer: Any = None
        """The Trainer, when the callback found it (see ``WeaveletCallback``); ``None`` otherwise."""
        self.wrapped: Any = None
        """The optimizer object the Trainer steps (the wrapper, or a plain optimizer)."""
        self.scheduler: Any = None
        """The Trainer's ``lr_scheduler`` (``None`` before it exists)."""
        self.args: Any = None
        self.state: Any = None
        self.save_requested = False
        self.stop_requested = False

    def _current(self) -> Any:
        if self.wrapped is not None:
            return self.wrapped
        optimizer = getattr(self.trainer, "optimizer", None)
        if optimizer is None:
            raise RuntimeError("the weavelet callback is not attached to a running Trainer yet")
        return optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return wrappers.unwrap(self._current())

    def schedulers(self) -> Sequence[Any]:
        scheduler = self.scheduler
        if scheduler is None and self.trainer is not None:
            scheduler = getattr(self.trainer, "lr_scheduler", None)
        return [wrappers.unwrap_scheduler(scheduler)] if scheduler is not None else []

    def swap_refusal(self) -> str | None:
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "is_deepspeed_enabled", False):
            return "DeepSpeed manages the Trainer's optimizer itself, so it cannot be replaced under it"
        if type(self.optimizer).__module__.startswith("deepspeed"):
            return "DeepSpeed manages the Trainer's optimizer itself, so it cannot be replaced under it"
        current = self._current()
        if wrappers.kind_of(current) is None and current is not getattr(trainer, "optimizer", current):
            return "the Trainer's optimizer is not one weavelet can replace (neither accelerate's wrapper nor its own)"
        return None

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        current = self._current()
        if wrappers.kind_of(current) is not None:
            wrappers.rewrap(current, optimizer)
            return
        if self.trainer is None:
            raise RuntimeError("the Trainer's optimizer is not wrapped by accelerate and the Trainer is unknown")
        self.trainer.optimizer = optimizer
        handler = getattr(self.trainer, "callback_handler", None)
        if handler is not None and getattr(handler, "optimizer", None) is current:
            handler.optimizer = optimizer
        if self.wrapped is current:
            self.wrapped = optimizer

    def checkpoint_path(self) -> str:
        """Where the Trainer saves the checkpoint of the current step: ``<output_dir>/checkpoint-<global_step>``."""
        if self.args is None or self.state is None:
            raise Rejected("checkpoint: the Trainer is not training yet")
        return os.path.join(str(self.args.output_dir), f"{CHECKPOINT_PREFIX}-{self.state.global_step}")

    def save_checkpoint(self, name: str) -> str:
        # The Trainer saves at the end of this step (control.should_save), into its usual folder, so that
        # trainer.train(resume_from_checkpoint=...) and get_last_checkpoint() find it.
        path = self.checkpoint_path()
        self.save_requested = True
        return path

    def request_stop(self) -> None:
        self.stop_requested = True


__all__ = ["TrainerHost"]
