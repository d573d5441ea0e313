"""Fixtures for the Hugging Face Trainer tests: a tiny GPT-2 built from a config (no download), random tokens, a
Trainer factory, and a driver that writes revisions at given steps and paces training until each is decided."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from weavelet_core import Weaver

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PACE_TIMEOUT = 30.0
"""The longest a revision may stay undecided while training is paced for it (seconds)."""


class TokenData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences of length 16 over a vocabulary of 64, labels = inputs (causal LM)."""

    def __init__(self, size: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (size, 16), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_model(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def training_args(output_dir: Path, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "max_steps": 30,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    return transformers.TrainingArguments(**options)


class Driver(transformers.TrainerCallback):  # type: ignore[misc]
    """Writes revisions at given global steps (in plan order, one at a time) and slows training, bounded, until the
    weavelet callback decided each; records the optimizer and learning rate the Trainer has after every step."""

    def __init__(self, weaver: Weaver, run: str, plan: Mapping[int, Mapping[str, Any]], wc: Any) -> None:
        self.weaver, self.run, self.plan, self.wc = weaver, run, dict(plan), wc
        self.sent: list[int] = []
        self.types: dict[int, str] = {}
        self.lrs: dict[int, float] = {}
        self._since = 0.0

    def _record(self, step: int, optimizer: Any) -> None:
        self.types[step] = type(optimizer.optimizer).__name__
        self.lrs[step] = float(optimizer.param_groups[0]["lr"])

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # After the weavelet callback reconciled (a revision newer than a checkpoint may apply before step 1).
        self._record(state.global_step, kwargs["optimizer"])
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._record(state.global_step, kwargs["optimizer"])
        decided = {v.revision for v in self.wc.verdicts}
        waiting = bool(self.sent) and self.sent[-1] not in decided
        if not waiting and self.plan and min(self.plan) <= state.global_step:
            self.sent.append(self.weaver.set(self.run, self.plan.pop(min(self.plan))).revision)
            self._since = time.monotonic()
            while not self.wc.process.waiting:  # it reached the trainer: the next step end looks at it
                if time.monotonic() - self._since > PACE_TIMEOUT:
                    raise AssertionError(f"revision {self.sent[-1]} did not reach the trainer in {PACE_TIMEOUT}s")
                time.sleep(0.005)
        if self.sent and self.sent[-1] not in decided:
            if time.monotonic() - self._since > PACE_TIMEOUT:
                raise AssertionError(f"revision {self.sent[-1]} got no verdict in {PACE_TIMEOUT}s")
            time.sleep(0.01)
        return control


TrainerFactory = Callable[..., Any]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "weavelet").as_uri()


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as w:
        yield w


@pytest.fixture
def make_trainer(tmp_path: Path) -> TrainerFactory:
    """``make_trainer(callbacks, **training_args)``: a Trainer over the tiny model and 64 random sequences, writing
    into ``tmp_path / "out"``."""

    def make(callbacks: list[Any], *, seed: int = 0, **overrides: Any) -> Any:
        return transformers.Trainer(
            model=tiny_model(seed),
            args=training_args(tmp_path / "out", **overrides),
            train_dataset=TokenData(),
            callbacks=callbacks,
        )

    return make


@pytest.fixture
def driver_class() -> type[Driver]:
    return Driver
