"""attach() on an optimizer set up by Lightning Fabric (``fabric.setup``): a switch of type, then a stop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import weavelet_torch
from weavelet_core import Weaver

fabric_module = pytest.importorskip("lightning.fabric")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_switch_then_stop_under_fabric(url: str, weaver: Weaver, arrived: Callable[[Any], None]) -> None:
    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    wrapper = optimizer
    assert isinstance(wrapper, fabric_module.wrappers._FabricOptimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)  # built over Fabric's wrapper
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = x.sum(dim=1, keepdim=True).tanh()
    run = "fabric-loop"
    plan = {3: {"optimizer": "adam", "lr": 0.01}, 8: {"stop": True}}
    applied: dict[int, int] = {}
    deadline = time.monotonic() + 60
    step = 0
    with weavelet_torch.attach(optimizer, schedulers=[scheduler], run=run, url=url) as live:
        while not live.should_stop:
            assert time.monotonic() < deadline, (applied, step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            live.optimizer.step()
            live.optimizer.zero_grad()
            scheduler.step()
            step += 1
            verdict = live.poll(step, loss=loss)
            if verdict is not None:
                assert verdict.result == "applied", verdict.message
                applied[verdict.revision] = step
            if step in plan:
                weaver.set(run, plan[step])
                arrived(live)

    # Each applies at a step boundary after the one it was written at (usually the next; the sidecar's hand-over
    # never blocks the loop, so a busy machine can make it a step or two later).
    assert set(applied) == {1, 2}
    assert applied[1] > 3
    assert applied[2] > 8
    assert step == applied[2]  # the loop ended at the stop's step
    # The switch put Adam inside Fabric's wrapper, which now imitates Adam, and the scheduler follows it.
    assert live.optimizer is wrapper
    assert isinstance(wrapper.optimizer, torch.optim.Adam)
    assert isinstance(wrapper, torch.optim.Adam)
    assert not isinstance(wrapper, torch.optim.SGD)
    assert scheduler.optimizer is wrapper.optimizer
    first = next(iter(model.parameters()))
    assert set(wrapper.optimizer.state[first]) == {"step", "exp_avg", "exp_avg_sq"}
    assert int(wrapper.optimizer.state[first]["step"]) == step - applied[1]  # Adam took every step after its own
    assert wrapper.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])
    outcomes = {o.revision: o for o in weaver.outcomes(run)}
    assert outcomes[2].result == "applied"
    assert "stopping" in outcomes[2].message
    status = weaver.status(run)
    assert status is not None
    assert status.optimizer is not None
    assert status.optimizer["name"] == "adam"
