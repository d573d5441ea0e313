"""An accepted revision never breaks the next step: schedulers are adapted to a new optimizer type, and every plan
is rehearsed on throwaway copies before it touches the live optimizer.

``WEAVELET_HYPOTHESIS_PROFILE=thorough`` runs many more examples of the property test.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from weavelet_torch import Applier, LoopHost
from weavelet_torch.applier import Verdict
from weavelet_torch.optimizers import known_optimizers
from weavelet_torch.schedulers import GROUP_LR_KEYS

PROFILE = os.environ.get("WEAVELET_HYPOTHESIS_PROFILE", "default")
EXAMPLES = {"default": 100, "thorough": 1000}.get(PROFILE, 100)
SCHEDULER_GROUP_KEYS = {*GROUP_LR_KEYS, "max_momentum", "base_momentum"}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Two-dimensional parameters only, so that every torch.optim type (Muon too) can drive it.
    return torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 1, bias=False))


def groups_of(model: torch.nn.Module) -> list[dict[str, Any]]:
    return [{"params": [model[0].weight]}, {"params": [model[2].weight], "lr": 0.02}]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    x = torch.linspace(-1, 1, 32).reshape(8, 4)
    loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def step_all(schedulers: list[Any], loss: float) -> None:
    for scheduler in schedulers:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(loss)
        else:
            scheduler.step()


def same(a: Any, b: Any) -> bool:
    """Structural equality of state dicts: tensors by value, NaN equal to NaN, functions by identity."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b) or torch.allclose(a, b, equal_nan=True, rtol=0, atol=0))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def snapshot(host: LoopHost, schedulers: list[Any]) -> tuple[Any, ...]:
    import copy

    return (
        type(host.optimizer),
        copy.deepcopy(host.optimizer.state_dict()),
        [copy.deepcopy(s.state_dict()) for s in schedulers],
    )


# ---------------------------------------------------------------------------------------- the reported bugs


def test_adam_with_onecycle_switched_to_sgd_keeps_stepping_and_cycles_momentum() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=1000)
    host = LoopHost(optimizer, [scheduler])
    for _ in range(5):
        train_step(model, optimizer)
        scheduler.step()
    verdict = Applier(host).apply(1, {"optimizer": "sgd", "momentum": 0.9}, step=5)
    assert verdict.result == "applied", verdict.message

    sgd = host.optimizer
    assert isinstance(sgd, torch.optim.SGD)
    assert scheduler.use_beta1 is False
    momenta = []
    for _ in range(3):
        train_step(model, sgd)
        scheduler.step()  # raised KeyError: 'betas' before
        momenta.append(sgd.param_groups[0]["momentum"])
    assert all("betas" not in g for g in sgd.param_groups)
    assert momenta[0] > momenta[1] > momenta[2], "momentum cycles down while the lr warms up"
    assert all(0.85 <= m <= 0.95 for m in momenta)


def test_sgd_with_onecycle_switched_to_adam_cycles_beta1_and_writes_no_momentum() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=1000)
    host = LoopHost(optimizer, [scheduler])
    for _ in range(5):
        train_step(model, optimizer)
        scheduler.step()
    reached = optimizer.param_groups[0]["momentum"]
    assert Applier(host).apply(1, {"optimizer": "adam"}, step=5).result == "applied"
    adam = host.optimizer
    assert scheduler.use_beta1 is True
    assert adam.param_groups[0]["betas"][0] == reached, "Adam starts from the momentum the cycle reached"
    betas = []
    for _ in range(3):
        train_step(model, adam)
        scheduler.step()
        betas.append(adam.param_groups[0]["betas"][0])
    assert all("momentum" not in g for g in adam.param_groups)
    assert betas[0] > betas[1] > betas[2]
    assert adam.param_groups[0]["betas"][1] == 0.999


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=100),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=5),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
def test_switch_to_an_optimizer_without_momentum_under_a_momentum_cycle_is_refused(make: Callable[..., Any]) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = make(optimizer)
    host = LoopHost(optimizer, [scheduler])
    train_step(model, optimizer)
    scheduler.step()
    before = snapshot(host, [scheduler])

    verdict = Applier(host).apply(1, {"optimizer": "adagrad"}, step=1)

    assert verdict.result == "rejected"
    kind = type(scheduler).__name__
    assert f"{kind} cycles momentum (cycle_momentum=True) and adagrad has neither momentum nor betas" in (
        verdict.message
    )
    assert "cycle_momentum=False" in verdict.message
    assert same(snapshot(host, [scheduler]), before)
    assert scheduler.optimizer is optimizer
    train_step(model, host.optimizer)
    scheduler.step()


class MomentumWarmup(torch.optim.lr_scheduler.LRScheduler):
    """A user's scheduler that also ramps SGD's momentum: it reads ``momentum`` from each group."""

    def get_lr(self) -> list[float]:  # type: ignore[override]
        for group in self.optimizer.param_groups:
            group["momentum"] = min(0.9, group["momentum"] + 0.1)
        return [float(base) for base in self.base_lrs]


def test_a_plan_that_would_break_the_next_scheduler_step_is_refused_by_the_dry_run() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    scheduler = MomentumWarmup(optimizer)
    host = LoopHost(optimizer, [scheduler])
    train_step(model, optimizer)
    scheduler.step()
    before = snapshot(host, [scheduler])

    verdict = Applier(host).apply(1, {"optimizer": "adam", "lr": 1e-3}, step=1)

    assert verdict.result == "rejected"
    assert verdict.message == (
        "MomentumWarmup would fail at its next step after this change (KeyError: 'momentum'); keep the current "
        "optimizer, or rebuild MomentumWarmup for adam in the training script; nothing was changed"
    )
    assert same(snapshot(host, [scheduler]), before)
    assert scheduler.optimizer is optimizer


def test_turning_on_an_option_whose_state_torch_never_built_is_refused() -> None:
    """RMSprop creates momentum buffers at its first step only if momentum was on: turning it on later raised
    KeyError at the next step (found by the property test below)."""
    model = make_model()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01)
    host = LoopHost(optimizer)
    train_step(model, optimizer)
    before = snapshot(host, [])
    verdict = Applier(host).apply(1, {"momentum": 0.5}, step=1)
    assert verdict.result == "rejected"
    assert "rmsprop would fail its next step with these settings: its per-parameter state has no " in verdict.message
    assert "'momentum_buffer'" in verdict.message
    assert same(snapshot(host, []), before)
    assert host.optimizer is optimizer
    train_step(model, optimizer)


def test_the_rehearsal_does_not_touch_live_tensors_or_the_random_stream() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    host = LoopHost(optimizer, [scheduler])
    train_step(model, optimizer)
    scheduler.step()
    lr_tensor = optimizer.param_groups[0]["lr"]
    weights = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    verdict = Applier(host).apply(1, {"optimizer": "nadam"}, step=1)

    assert verdict.result == "applied", verdict.message
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert lr_tensor.item() == pytest.approx(0.009)


# ---------------------------------------------------------------------------------------- the property

NAMES = sorted(known_optimizers())


def momentum_capable(optimizer: torch.optim.Optimizer) -> bool:
    return "betas" in optimizer.defaults or "momentum" in optimizer.defaults


def build_scheduler(kind: str, optimizer: torch.optim.Optimizer, data: st.DataObject) -> Any:
    sch = torch.optim.lr_scheduler
    cycle = momentum_capable(optimizer) and data.draw(st.booleans(), label="cycle_momentum")
    small = st.integers(1, 6)
    gamma = st.floats(0.5, 0.99)
    if kind == "LambdaLR":
        return sch.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    if kind == "MultiplicativeLR":
        return sch.MultiplicativeLR(optimizer, lambda step: 0.97)
    if kind == "StepLR":
        return sch.StepLR(optimizer, step_size=data.draw(small), gamma=data.draw(gamma))
    if kind == "MultiStepLR":
        return sch.MultiStepLR(optimizer, milestones=[2, 4, 7], gamma=data.draw(gamma))
    if kind == "ConstantLR":
        return sch.ConstantLR(optimizer, factor=data.draw(st.floats(0.1, 1.0)), total_iters=data.draw(small))
    if kind == "LinearLR":
        return sch.LinearLR(optimizer, start_factor=data.draw(st.floats(0.1, 1.0)), total_iters=data.draw(small))
    if kind == "ExponentialLR":
        return sch.ExponentialLR(optimizer, gamma=data.draw(gamma))
    if kind == "PolynomialLR":
        return sch.PolynomialLR(
            optimizer, total_iters=data.draw(st.integers(5, 20)), power=data.draw(st.floats(0.5, 2))
        )
    if kind == "CosineAnnealingLR":
        return sch.CosineAnnealingLR(optimizer, T_max=data.draw(small), eta_min=data.draw(st.sampled_from([0.0, 1e-4])))
    if kind == "CosineAnnealingWarmRestarts":
        return sch.CosineAnnealingWarmRestarts(optimizer, T_0=data.draw(small), T_mult=data.draw(st.integers(1, 2)))
    if kind == "ReduceLROnPlateau":
        return sch.ReduceLROnPlateau(optimizer, patience=data.draw(st.integers(0, 2)), factor=data.draw(gamma))
    if kind == "CyclicLR":
        return sch.CyclicLR(optimizer, base_lr=1e-4, max_lr=1e-2, step_size_up=data.draw(small), cycle_momentum=cycle)
    if kind == "OneCycleLR":
        return sch.OneCycleLR(optimizer, max_lr=[0.05, 0.01], total_steps=200, cycle_momentum=cycle)
    if kind == "SWALR":
        return torch.optim.swa_utils.SWALR(optimizer, swa_lr=0.005, anneal_epochs=data.draw(small))
    if kind == "SequentialLR":
        warmup = sch.LinearLR(optimizer, start_factor=0.2, total_iters=3)
        then = build_scheduler(data.draw(st.sampled_from(CHAINABLE), label="then"), optimizer, data)
        return sch.SequentialLR(optimizer, [warmup, then], milestones=[data.draw(small)])
    if kind == "ChainedScheduler":
        first = build_scheduler(data.draw(st.sampled_from(CHAINABLE), label="first"), optimizer, data)
        return sch.ChainedScheduler([first, sch.ExponentialLR(optimizer, gamma=0.95)])
    raise AssertionError(kind)


CHAINABLE = ["LambdaLR", "StepLR", "ExponentialLR", "CosineAnnealingLR", "OneCycleLR", "CyclicLR", "LinearLR"]
KINDS = [
    "none",
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "ReduceLROnPlateau",
    "CyclicLR",
    "OneCycleLR",
    "SWALR",
    "SequentialLR",
    "ChainedScheduler",
]
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "lr": st.sampled_from([1e-4, 3e-3, 0.05]),
    "weight_decay": st.sampled_from([0, 1e-4, 0.1]),
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "betas": st.sampled_from([[0.9, 0.999], [0.5, 0.9]]),
    "eps": st.sampled_from([1e-8, 1e-6]),
    "nesterov": st.booleans(),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
}


@st.composite
def revision_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid edits for the optimizer the revision names (so that most are accepted), sometimes a key
    that optimizer does not take."""
    config: dict[str, Any] = {}
    name = draw(st.none() | st.sampled_from(NAMES))
    if name is not None:
        config["optimizer"] = name
    accepted = known_optimizers()[name].hyperparameters or frozenset() if name else frozenset(VALUES)
    keys = [k for k in VALUES if k in accepted or draw(st.integers(0, 9)) == 0]
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)) if keys else ():
        config[key] = draw(VALUES[key])
    if draw(st.booleans()):
        config["lr_scale"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    if draw(st.integers(0, 3)) == 0:
        config["param_groups.1.lr"] = draw(st.sampled_from([1e-3, 0.1]))
    return config


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.data(),
    start=st.sampled_from(NAMES),
    # The momentum-cycling schedulers are where switches broke: drawn more often.
    kind=st.sampled_from([*KINDS, "OneCycleLR", "CyclicLR", "OneCycleLR", "CyclicLR"]),
    warm=st.integers(0, 3),
)
def test_accepted_revisions_never_break_the_next_steps_and_rejected_ones_change_nothing(
    data: st.DataObject, start: str, kind: str, warm: int
) -> None:
    model = make_model()
    optimizer = known_optimizers()[start].factory(groups_of(model), lr=0.01)
    schedulers = [] if kind == "none" else [build_scheduler(kind, optimizer, data)]
    host = LoopHost(optimizer, schedulers)
    applier = Applier(host)
    loss = 1.0
    for _ in range(warm):
        loss = train_step(model, host.optimizer)
        step_all(schedulers, loss)

    revisions = data.draw(st.lists(revision_configs(), min_size=1, max_size=3), label="revisions")
    for number, config in enumerate(revisions, start=1):
        before = snapshot(host, schedulers)
        verdict: Verdict = applier.apply(number, config, step=number)
        event(f"{verdict.result}{' switch' if 'switch' in verdict.detail else ''}")
        if verdict.result == "rejected":
            assert same(snapshot(host, schedulers), before), verdict.message
            continue
        assert verdict.result == "applied"
        live = host.optimizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                loss = train_step(model, live)
                step_all(schedulers, loss)
        accepted = set(live.defaults) | SCHEDULER_GROUP_KEYS | {"params"}
        for group in live.param_groups:
            assert set(group) <= accepted, f"stray keys in {type(live).__name__}: {set(group) - accepted}"
        assert all(math.isfinite(float(g["lr"])) for g in live.param_groups)
