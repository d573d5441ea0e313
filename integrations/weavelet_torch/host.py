"""What the applier needs from the training loop it changes (a Lightning trainer, or a plain loop)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch

from weavelet_torch.errors import Rejected


class OptimizerHost(abc.ABC):
    """The training loop's side of an optimizer change.

    The applier only ever calls these at an optimizer-step boundary, from the training thread.

    A host of one optimizer implements :attr:`optimizer` and :meth:`install` (and :meth:`schedulers`). A host
    of several (a GAN's generator and discriminator) returns their names from :meth:`optimizer_names` and
    implements :meth:`optimizer_of`, :meth:`schedulers_of` and :meth:`install_of`; a revision then nests each
    optimizer's keys under its name.
    """

    def optimizer_names(self) -> Sequence[str]:
        """The names of the optimizers this loop steers, when it steers several; empty (the default) for one."""
        return ()

    def optimizer_of(self, name: str) -> torch.optim.Optimizer:
        """The optimizer called ``name`` (see :meth:`optimizer_names`); default: :attr:`optimizer`."""
        return self.optimizer

    def schedulers_of(self, name: str) -> Sequence[Any]:
        """The schedulers driving the optimizer called ``name``; default: :meth:`schedulers`."""
        return self.schedulers()

    def install_of(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` the one called ``name`` from now on; default: :meth:`install`."""
        self.install(optimizer)

    @property
    @abc.abstractmethod
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer the loop steps now."""

    def schedulers(self) -> Sequence[Any]:
        """Learning-rate schedulers driving :attr:`optimizer` (rescaled and rebound on changes)."""
        return ()

    def swap_refusal(self) -> str | None:
        """Why this loop cannot switch to another optimizer type, or ``None`` when it can."""
        return None

    @abc.abstractmethod
    def install(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` the one the loop steps from now on (schedulers are already rebound)."""

    def save_checkpoint(self, name: str) -> str:
        """Save a checkpoint now, named after ``name``; return where it went. Raise to fail the revision."""
        raise Rejected(
            "checkpoint: this training loop has no way to save checkpoints; give attach() a model or a "
            "checkpoint function"
        )

    @abc.abstractmethod
    def request_stop(self) -> None:
        """Ask the loop to end gracefully at its next chance."""
