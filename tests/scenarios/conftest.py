"""Shared fixtures of the public scenarios: a file:// store, a Weaver, a tiny model and data, real Trainers, and
drivers that write planned revisions at given steps, one at a time, and record what became of each."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from weavelet_core import Weaver
from weavelet_lightning import WeaveletCallback
from weavelet_torch import Attachment
from weavelet_torch.applier import Verdict

PACE_TIMEOUT = 30.0

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as w:
        yield w


class TinyModule(pl.LightningModule):
    """A 4 -> 8 -> 1 regression. ``optimizers_fn(module)`` is ``configure_optimizers``; every optimizer step is
    recorded (``steps``: global step -> (optimizer type, group 0's lr))."""

    def __init__(self, optimizers_fn: Callable[[pl.LightningModule], Any] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 1)
        self.optimizers_fn = optimizers_fn
        self.steps: dict[int, tuple[str, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.steps[self.trainer.global_step] = (type(optimizer).__name__, float(optimizer.param_groups[0]["lr"]))

    def configure_optimizers(self) -> Any:
        if self.optimizers_fn is not None:
            return self.optimizers_fn(self)
        return torch.optim.SGD(self.parameters(), lr=0.05)


def make_data(n: int = 256, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, x.sum(dim=1, keepdim=True) * 0.5)


@pytest.fixture
def tiny() -> type[TinyModule]:
    """The tiny LightningModule class."""
    return TinyModule


@pytest.fixture
def loader() -> Callable[..., DataLoader[Any]]:
    """``loader(n=256, batch_size=8)``: a DataLoader over a fixed regression set."""

    def build(n: int = 256, batch_size: int = 8) -> DataLoader[Any]:
        return DataLoader(make_data(n), batch_size=batch_size)

    return build


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., pl.Trainer]:
    """``make_trainer(callbacks, **options)``: a quiet CPU Trainer (no progress bar, logger or checkpointing unless
    asked)."""

    def build(callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
        options: dict[str, Any] = {
            "max_steps": 24,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
        }
        options.update(kwargs)
        return pl.Trainer(callbacks=callbacks, **options)

    return build


class Driver(pl.Callback):
    """Writes planned revisions at given global steps, in order, one at a time (the next only once the previous has
    a verdict, so none supersedes another), holding training until each has reached the trainer's side.
    ``outcomes`` holds the verdicts by revision and ``batch_of`` the batch index each was decided at."""

    def __init__(self, weaver: Weaver, wc: WeaveletCallback, plan: Mapping[int, Mapping[str, Any]]) -> None:
        self.weaver, self.wc, self.plan = weaver, wc, dict(plan)
        self.sent: list[int] = []
        self.batch_of: dict[int, int] = {}
        self._since = 0.0
        self._step = 0

    @property
    def outcomes(self) -> dict[int, Verdict]:
        return {v.revision: v for v in self.wc.verdicts}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        decided = self.outcomes
        for number in self.sent:
            if number in decided and number not in self.batch_of:
                self.batch_of[number] = batch_idx
        waiting = bool(self.sent) and self.sent[-1] not in decided
        if not waiting and self.plan and min(self.plan) <= trainer.global_step:
            changes = self.plan.pop(min(self.plan))
            run = self.wc.run
            assert run is not None
            self.sent.append(self.weaver.set(run, changes).revision)
            self._since = time.monotonic()
        boundary = trainer.global_step != self._step  # an optimizer step ran in this batch
        self._step = trainer.global_step
        if self.sent and self.sent[-1] not in decided:
            # Hold training until the revision is decided, however slow the machine is. At a step boundary it is
            # decided here (the callback's own hook ran just before, at the same boundary); inside an
            # accumulation window, once it has reached the trainer's side the next boundary decides it.
            process = self.wc.process
            while process is not None and self.sent[-1] not in self.outcomes:
                if time.monotonic() - self._since > PACE_TIMEOUT:
                    raise AssertionError(f"revision {self.sent[-1]} got no verdict in {PACE_TIMEOUT}s")
                if process.waiting:
                    if not boundary:
                        break
                    self.wc._check(trainer)
                    continue
                time.sleep(0.005)
            if self.sent[-1] in self.outcomes:
                self.batch_of.setdefault(self.sent[-1], batch_idx)


@pytest.fixture
def driver(weaver: Weaver) -> Callable[[WeaveletCallback, Mapping[int, Mapping[str, Any]]], Driver]:
    """``driver(wc, {step: changes})``: a :class:`Driver` callback to put after ``wc`` in the Trainer."""

    def build(wc: WeaveletCallback, plan: Mapping[int, Mapping[str, Any]]) -> Driver:
        return Driver(weaver, wc, plan)

    return build


@pytest.fixture
def send(weaver: Weaver) -> Callable[[Attachment, int, Mapping[str, Any]], Verdict]:
    """``send(live, step, changes)``: in a plain loop at an optimizer-step boundary, write ``changes`` and poll
    until the trainer has decided them; return the verdict."""

    def write_and_apply(live: Attachment, step: int, changes: Mapping[str, Any]) -> Verdict:
        number = weaver.set(live.run, changes).revision
        deadline = time.monotonic() + PACE_TIMEOUT
        while time.monotonic() < deadline:
            verdict = live.poll(step)
            if verdict is not None and verdict.revision == number:
                return verdict
            time.sleep(0.01)
        raise AssertionError(f"revision {number} got no verdict in {PACE_TIMEOUT}s")

    return write_and_apply
