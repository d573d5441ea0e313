"""attach() on an optimizer and scheduler prepared by accelerate, with gradient accumulation over 4 micro-batches."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import weavelet_torch
from weavelet_core import Weaver

accelerate = pytest.importorskip("accelerate")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

ACCUMULATE = 4


def setup(steps: int) -> tuple[Any, torch.nn.Module, Any, Any, Any]:
    accelerate.utils.set_seed(0)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (steps * 2))
    x = torch.randn(steps * ACCUMULATE * 4, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).tanh())
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return accelerator, model, optimizer, loader, scheduler


def test_changes_land_only_on_sync_steps(url: str, weaver: Weaver, arrived: Callable[[Any], None]) -> None:
    steps = 40  # optimizer steps the loader holds; the loop ends once both revisions are decided
    accelerator, model, optimizer, loader, scheduler = setup(steps)
    assert type(optimizer).__name__ == "AcceleratedOptimizer"
    assert type(scheduler).__name__ == "AcceleratedScheduler"
    run = "accelerate-accumulate"
    plan = {4: {"optimizer": "adam", "lr_scale": 0.5}, 12: {"lr": 0.002}}  # micro-batch -> revision
    sent: dict[int, int] = {}  # revision -> the micro-batch after which it was written
    held: list[int] = []  # micro-batches whose poll found a revision waiting and left it alone
    applied: dict[int, tuple[int, int]] = {}  # revision -> (micro-batch, optimizer step)
    moved: list[bool] = []  # whether the weights changed, per micro-batch
    step = 0
    with weavelet_torch.attach(optimizer, schedulers=[scheduler], run=run, url=url) as live:
        for micro, (x, y) in enumerate(loader):
            before = [p.detach().clone() for p in model.parameters()]
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            moved.append(any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)))
            if accelerator.sync_gradients:
                step += 1
            waiting = live.process.waiting
            verdict = live.poll(step, loss=loss)
            if verdict is not None:
                assert verdict.result == "applied", verdict.message
                assert verdict.step == step
                applied[verdict.revision] = (micro, step)
            elif waiting and not accelerator.sync_gradients:
                held.append(micro)
            if micro in plan:
                sent[weaver.set(run, plan[micro]).revision] = micro
                arrived(live)  # the revision is waiting before the next micro-batch's poll
            if len(applied) == len(plan) and micro % ACCUMULATE == ACCUMULATE - 1:
                break
            if len(sent) > len(applied):
                time.sleep(0.005)  # pace the loop (bounded by the loader) while a revision is on its way
        final_step = step

    assert set(applied) == {1, 2}, (sent, applied, held)
    for revision, (micro, at) in applied.items():
        # Applied at the last micro-batch of a window, after the window it was written in.
        assert (micro + 1) % ACCUMULATE == 0
        assert micro > sent[revision]
        assert at == (micro + 1) // ACCUMULATE
        # Inside the window it arrived in, every poll saw it waiting and left it alone.
        window_end = (sent[revision] // ACCUMULATE + 1) * ACCUMULATE - 1
        assert set(range(sent[revision] + 1, window_end)) <= set(held)
    assert all((m + 1) % ACCUMULATE != 0 for m in held)
    # accumulate still holds after the switch: the weights move only at the window's last micro-batch.
    assert moved == [(m + 1) % ACCUMULATE == 0 for m in range(len(moved))]

    # The switch put Adam inside the same wrapper accelerate and the loop hold; the scheduler follows it.
    assert live.optimizer is optimizer
    assert isinstance(optimizer.optimizer, torch.optim.Adam)
    assert accelerator._optimizers == [optimizer]
    assert scheduler.scheduler.optimizer is optimizer.optimizer
    assert scheduler.optimizers == [optimizer]
    first = next(iter(model.parameters()))
    assert set(optimizer.optimizer.state[first]) == {"step", "exp_avg", "exp_avg_sq"}
    # lr_scale 0.5 then lr 0.002: the schedule continued from 0.002 at revision 2's step, not from 0.05.
    at = applied[2][1]
    expected = 0.002 * (1.0 - final_step / (steps * 2)) / (1.0 - at / (steps * 2))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert scheduler.scheduler.base_lrs[0] == pytest.approx(0.002 / (1.0 - at / (steps * 2)))
    status = weaver.status(run)
    assert status is not None
    assert status.optimizer is not None
    assert status.optimizer["name"] == "adam"
