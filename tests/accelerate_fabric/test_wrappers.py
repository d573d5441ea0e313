"""weavelet_torch.wrappers on accelerate's wrapper with a GradScaler (mixed precision), without a sidecar."""

from __future__ import annotations

import pytest
import torch

from weavelet_torch import wrappers

accelerate = pytest.importorskip("accelerate")


def test_rewrap_makes_the_scaler_step_the_new_optimizer() -> None:
    from accelerate.optimizer import AcceleratedOptimizer

    accelerate.Accelerator(cpu=True)  # accelerate's shared state, as after a real setup
    model = torch.nn.Linear(4, 1)
    scaler = torch.amp.GradScaler("cpu")
    wrapper = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), device_placement=False, scaler=scaler)
    assert wrappers.kind_of(wrapper) == "accelerate"
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    wrappers.rewrap(wrapper, adam)
    assert wrappers.unwrap(wrapper) is adam

    scaler.scale(model(torch.ones(2, 4)).sum()).backward()
    before = model.weight.detach().clone()
    wrapper.step()  # through the GradScaler: must step Adam, not the SGD it wrapped before
    assert set(adam.state[model.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert not torch.equal(before, model.weight)
    assert not wrapper.step_was_skipped

    model.weight.grad.fill_(float("inf"))  # an overflow: the scaler skips the step, and the wrapper says so
    wrapper.step()
    assert wrapper.step_was_skipped
    assert int(adam.state[model.weight]["step"]) == 1


def test_plain_optimizers_are_not_wrappers() -> None:
    sgd = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    assert wrappers.kind_of(sgd) is None
    assert wrappers.unwrap(sgd) is sgd
    assert not wrappers.accumulating(sgd)
    with pytest.raises(TypeError, match="not an optimizer wrapper"):
        wrappers.rewrap(sgd, sgd)
