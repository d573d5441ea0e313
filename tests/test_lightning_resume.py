"""Resuming a Lightning fit from a checkpoint written after an optimizer swap."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from test_lightning_callback import Driver, outcomes, trainer  # type: ignore[import-not-found]

from weavelet_core import Weaver
from weavelet_lightning import WeaveletCallback
from weavelet_lightning.demo_model import DemoModel, make_data, make_loader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Observe(pl.Callback):
    """Records the optimizer Lightning holds when training (re)starts, after its state was restored."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps: dict[int, int] = {}
        self.exp_avg: list[torch.Tensor] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.optimizer = trainer.optimizers[0]
        for index, param in enumerate(pl_module.parameters()):
            state = self.optimizer.state.get(param, {})
            self.steps[index] = int(state["step"]) if "step" in state else 0
            if "exp_avg" in state:
                self.exp_avg.append(state["exp_avg"].clone())


class WaitForVerdict(pl.Callback):
    """Slows training (bounded) until the weavelet callback has decided on a revision."""

    def __init__(self, wc: WeaveletCallback, timeout: float = 30.0) -> None:
        self.wc, self.deadline = wc, time.monotonic() + timeout

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.wc.verdicts:
            assert time.monotonic() < self.deadline, "no revision arrived after resuming"
            time.sleep(0.01)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "weavelet").as_uri()


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as w:
        yield w


def test_resume_recreates_adam_with_its_state(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "resume"
    data = make_data(1024)
    wc = WeaveletCallback(run, url, checkpoint_dir=tmp_path / "ckpts")
    driver = Driver(weaver, run, {6: {"optimizer": "adam", "lr": 0.002}, 15: {"checkpoint": 1}}, wc)
    first = trainer([wc, driver], tmp_path, max_steps=25)
    model = DemoModel()
    first.fit(model, make_loader(data))
    swap, saved = outcomes(weaver, run)[1], outcomes(weaver, run)[2]
    assert swap.result == "applied"
    assert saved.result == "applied"
    assert swap.step is not None
    assert saved.step is not None
    checkpoint_path = str(saved.detail["checkpoint"])
    saved_state = torch.load(checkpoint_path, weights_only=False)["optimizer_states"][0]["state"]

    # While the run is down, someone lowers the lr: the resumed fit must pick that up too.
    weaver.set(run, {"lr": 0.0005})

    wc2 = WeaveletCallback(run, url)
    observe = Observe()
    resumed_model = DemoModel()  # configure_optimizers builds SGD again
    second = trainer([wc2, observe, WaitForVerdict(wc2)], tmp_path, max_steps=40)
    second.fit(resumed_model, make_loader(data), ckpt_path=checkpoint_path)

    assert isinstance(observe.optimizer, torch.optim.Adam)
    expected_steps = saved.step - swap.step
    assert set(observe.steps.values()) == {expected_steps}
    for restored, (_, original) in zip(observe.exp_avg, sorted(saved_state.items()), strict=True):
        assert torch.equal(restored, original["exp_avg"])
    assert {name for _, name in resumed_model.stepped} == {"Adam"}
    optimizer = second.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert int(optimizer.state[next(resumed_model.parameters())]["step"]) == expected_steps + 40 - saved.step

    # Revisions 1 and 2 are not applied again; revision 3 is applied at the first step boundary after the
    # sidecar delivers it (on_train_start when it is already there, else one of the first steps).
    assert [v.revision for v in wc2.verdicts] == [3]
    final = outcomes(weaver, run)
    assert final[3].result == "applied"
    assert final[3].step is not None
    assert saved.step <= final[3].step <= saved.step + 10
    assert optimizer.param_groups[0]["lr"] == 0.0005
    assert len(final) == 3
