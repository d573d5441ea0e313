"""The applier's view of a Lightning trainer: its optimizer, schedulers, checkpointing and stopping."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from weavelet_torch.host import OptimizerHost
from weavelet_torch.schedulers import walk


class LightningHost(OptimizerHost):
    """Reads and replaces ``trainer.strategy.optimizers[index]`` the way Lightning supports.

    Assigning ``strategy.optimizers`` re-creates Lightning's ``LightningOptimizer`` wrappers, so
    ``self.optimizers()`` in the module, the training loops, logging and checkpointing all use the new optimizer.
    The schedulers in ``strategy.lr_scheduler_configs`` are the same objects, rebound to it by the applier.

    :param index: which of the trainer's optimizers revisions act on (0 for the usual single optimizer).
    :param checkpoint_dir: where the ``checkpoint`` command saves; default: the ``ModelCheckpoint`` callback's
        directory, else ``<default_root_dir>/checkpoints``.
    :param indexes: several optimizers by name (``{"generator": 0, "discriminator": 1}``), instead of ``index``.
    """

    def __init__(
        self,
        index: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        *,
        indexes: Mapping[str, int] | None = None,
    ) -> None:
        self.index = index
        self.indexes = dict(indexes or {})
        self.checkpoint_dir = checkpoint_dir
        self.trainer: Any = None
        self.run = ""
        """The run id, set by the callback when the fit starts; checkpoint file names begin with it."""

    def _strategy(self) -> Any:
        if self.trainer is None:
            raise RuntimeError("the weavelet callback is not attached to a running fit yet")
        return self.trainer.strategy

    def _at(self, index: int, told: str) -> torch.optim.Optimizer:
        optimizers = self._strategy().optimizers
        if index >= len(optimizers):
            raise RuntimeError(
                f"the trainer has {len(optimizers)} optimizer(s); the weavelet callback was told to use {told}"
            )
        optimizer: torch.optim.Optimizer = optimizers[index]
        return optimizer

    def optimizer_names(self) -> Sequence[str]:
        return tuple(self.indexes)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._at(self.index, f"optimizer_index={self.index}")

    def optimizer_of(self, name: str) -> torch.optim.Optimizer:
        return self._at(self.indexes[name], f"optimizers={{{name!r}: {self.indexes[name]}, ...}}")

    def _driving(self, optimizer: torch.optim.Optimizer) -> list[Any]:
        return [
            config.scheduler
            for config in self._strategy().lr_scheduler_configs
            if any(getattr(s, "optimizer", None) is optimizer for s in walk([config.scheduler]))
        ]

    def schedulers(self) -> Sequence[Any]:
        return self._driving(self.optimizer)

    def schedulers_of(self, name: str) -> Sequence[Any]:
        return self._driving(self.optimizer_of(name))

    def swap_refusal(self) -> str | None:
        strategy = self._strategy()
        if not strategy.lightning_restore_optimizer:
            return (
                f"the {type(strategy).__name__} strategy manages its own optimizer (it restores optimizer state "
                "itself), so the optimizer cannot be replaced under it"
            )
        return None

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        self._put(self.index, optimizer)

    def install_of(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        self._put(self.indexes[name], optimizer)

    def _put(self, index: int, optimizer: torch.optim.Optimizer) -> None:
        strategy = self._strategy()
        optimizers = list(strategy.optimizers)
        optimizers[index] = optimizer
        strategy.optimizers = optimizers

    def checkpoint_directory(self) -> str | os.PathLike[str]:
        """Where the ``checkpoint`` command saves: ``checkpoint_dir``, else the ``ModelCheckpoint`` directory,
        else ``<default_root_dir>/checkpoints``."""
        directory = self.checkpoint_dir
        if directory is None:
            callback = getattr(self.trainer, "checkpoint_callback", None)
            directory = getattr(callback, "dirpath", None) or os.path.join(self.trainer.default_root_dir, "checkpoints")
        return directory

    def save_checkpoint(self, name: str) -> str:
        trainer = self.trainer
        directory = self.checkpoint_directory()
        # The run id is in the name: two runs saving into one directory never overwrite each other.
        if self.run and not name.startswith(self.run):
            name = f"{self.run}-{name}"
        path = Path(directory) / f"{name}.ckpt"
        trainer.save_checkpoint(str(path))
        return str(path)

    def request_stop(self) -> None:
        self.trainer.should_stop = True
