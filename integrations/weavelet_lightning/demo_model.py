"""The small model and synthetic data ``weavelet demo`` trains (imports torch and Lightning).

A two-layer MLP regressing a fixed random nonlinear function of its inputs. It records, per optimizer step,
the training loss and the optimizer Lightning stepped, which the demo plots.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from weavelet_lightning import _compat

pl = _compat.trainer_module()


def make_data(samples: int = 2048, features: int = 16, seed: int = 0) -> TensorDataset:
    """Inputs and targets of a fixed nonlinear function with a little noise (deterministic for ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    w1 = torch.randn(features, 32, generator=generator) / features**0.5
    w2 = torch.randn(32, 1, generator=generator) / 32**0.5
    y = torch.tanh(x @ w1) @ w2 * 3.0 + 0.05 * torch.randn(samples, 1, generator=generator)
    return TensorDataset(x, y)


def make_loader(dataset: TensorDataset, batch_size: int = 32, seed: int = 0) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


class DemoModel(pl.LightningModule):  # type: ignore[misc,name-defined]
    """MLP regressor; ``configure_optimizers`` returns SGD (and, if asked, a StepLR scheduler).

    :param lr: SGD learning rate. :param momentum: SGD momentum.
    :param scheduler_step: if > 0, a ``StepLR`` halving the learning rate every this many steps.
    :param step_delay: seconds to sleep in every training step (to watch a short fit live).
    """

    def __init__(
        self,
        features: int = 16,
        hidden: int = 64,
        lr: float = 0.05,
        momentum: float = 0.9,
        scheduler_step: int = 0,
        step_delay: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.lr, self.momentum, self.scheduler_step, self.step_delay = lr, momentum, scheduler_step, step_delay
        self.losses: list[tuple[int, float]] = []
        self.stepped: list[tuple[int, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("loss", loss, prog_bar=True)
        self.losses.append((self.trainer.global_step, float(loss.detach())))
        if self.step_delay > 0:
            import time

            time.sleep(self.step_delay)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.stepped.append((self.trainer.global_step, type(optimizer).__name__))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.scheduler_step <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.scheduler_step, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DemoProgress(pl.Callback):  # type: ignore[misc,name-defined]
    """Prints step, loss and the active optimizer every ``every`` optimizer steps."""

    def __init__(self, every: int = 100) -> None:
        super().__init__()
        self.every = every
        self._last = -1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last or step % self.every:
            return
        self._last = step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        optimizer = trainer.optimizers[0]
        lr = optimizer.param_groups[0]["lr"]
        print(
            f"[trainer] step {step:5d}  loss {float(loss):.4f}  {type(optimizer).__name__} lr={float(lr):.4g}",
            flush=True,
        )
