"""A training loop that raised ends its run ``failed``, with the exception, in every integration."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from weavelet_core import Weaver
from weavelet_lightning import WeaveletCallback
from weavelet_torch import attach


class Exploding(pl.LightningModule):
    """Raises in its third training step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if batch_idx == 2:
            raise FloatingPointError("loss is nan at step 2")
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader[torch.Tensor]:
        return torch.utils.data.DataLoader(torch.randn(32, 2), batch_size=4)  # type: ignore[arg-type]


def test_a_lightning_fit_that_raises_ends_failed_with_the_exception(url: str, run: str, weaver: Weaver) -> None:
    callback = WeaveletCallback(run, url, process_options={"heartbeat_interval": 0.1})
    trainer = pl.Trainer(
        max_steps=10,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(FloatingPointError):
        trainer.fit(Exploding())
    status = weaver.status(run)
    assert status is not None
    assert status.state == "failed"
    assert status.message == "the training loop raised FloatingPointError: loss is nan at step 2"
    assert callback.process is not None
    assert callback.process.state == "failed"


def test_leaving_attach_by_an_exception_ends_failed_with_the_exception(url: str, run: str, weaver: Weaver) -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    live = attach(optimizer, run=run, url=url)

    def train() -> None:
        with live:
            live.poll(1, loss=0.5)
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError):
        train()
    status = weaver.status(run)
    assert status is not None
    assert status.state == "failed"
    assert status.message == "the training loop raised RuntimeError: CUDA out of memory"


def test_a_loop_that_ends_normally_is_stopped(url: str, run: str, weaver: Weaver) -> None:
    model = torch.nn.Linear(2, 1)
    with attach(torch.optim.SGD(model.parameters(), lr=0.1), run=run, url=url) as live:
        live.poll(1, loss=0.5)
    status = weaver.status(run)
    assert status is not None
    assert (status.state, status.message) == ("stopped", None)
