"""The applier on plain torch optimizers and schedulers: validation, all-or-nothing, swaps, schedules, commands."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weavelet_core import OptimizerSpec, hookimpl
from weavelet_core.plugins import get_registry, reset_registry
from weavelet_torch import Applier, LoopHost, Rejected
from weavelet_torch.applier import Verdict


def make_model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def two_groups(model: torch.nn.Sequential) -> list[dict[str, Any]]:
    return [
        {"params": list(model[0].parameters()), "lr": 0.1},
        {"params": list(model[2].parameters()), "lr": 0.01},
    ]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    x = torch.randn(16, 4)
    loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def frozen(optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    """Everything observable about an optimizer: type, hyperparameters, state tensors."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = {
        id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for p, s in optimizer.state.items()
    }
    return type(optimizer), repr(groups), repr(state)


class Saver:
    def __init__(self, fail: bool = False) -> None:
        self.names: list[str] = []
        self.fail = fail

    def __call__(self, name: str) -> str:
        if self.fail:
            raise OSError("No space left on device")
        self.names.append(name)
        return f"/checkpoints/{name}.pt"


def applied(verdict: Verdict) -> Verdict:
    assert verdict.result == "applied", verdict.message
    return verdict


# ---------------------------------------------------------------------------------------- same type


def test_same_type_edit_keeps_state_and_reports_step() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    host = LoopHost(optimizer)
    applier = Applier(host)
    train_step(model, optimizer)
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]

    verdict = applied(applier.apply(1, {"lr": 0.01, "weight_decay": 1e-4, "momentum": 0.5}, step=7))

    assert verdict.step == 7
    assert host.optimizer is optimizer
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.01, 1e-4, 0.5)
    assert all(optimizer.state[p]["momentum_buffer"] is b for p, b in zip(model.parameters(), buffers, strict=True))
    assert verdict.detail["changes"]["lr"] == [0.1, 0.01]
    assert verdict.detail["optimizer"]["name"] == "sgd"
    assert "lr 0.1 -> 0.01" in verdict.message


def test_integer_lr_is_accepted_as_float() -> None:
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    applied(Applier(LoopHost(optimizer)).apply(1, {"lr": 1}, step=0))
    assert optimizer.param_groups[0]["lr"] == 1.0
    assert isinstance(optimizer.param_groups[0]["lr"], float)


def test_step_scheduler_keeps_its_schedule_relative_to_the_new_lr() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    applier = Applier(LoopHost(optimizer, [scheduler]))
    for _ in range(5):  # lr is 0.5 after the first decay
        train_step(model, optimizer)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)

    applied(applier.apply(1, {"lr": 0.1}, step=5))
    lrs = []
    for _ in range(8):
        train_step(model, optimizer)
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # Steps 6-7 keep 0.1, step 8 halves it, step 12 again: the schedule goes on from the new value.
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025])
    assert scheduler.base_lrs == pytest.approx([0.2])


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=40),
    ],
    ids=["lambda", "cosine", "onecycle"],
)
def test_closed_form_schedulers_scale_with_the_new_lr(make: Any) -> None:
    """Two identical runs, one told lr x0.1 at step 6: afterwards every lr is exactly 0.1 of the other's."""
    runs = []
    for change in (False, True):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
        scheduler = make(optimizer)
        applier = Applier(LoopHost(optimizer, [scheduler]))
        lrs = []
        for step in range(1, 16):
            train_step(model, optimizer)
            scheduler.step()
            if change and step == 6:
                current = optimizer.param_groups[0]["lr"]
                applied(applier.apply(1, {"lr": current * 0.1}, step=step))
            lrs.append(optimizer.param_groups[0]["lr"])
        runs.append(lrs)
    plain, changed = runs
    assert changed[:5] == pytest.approx(plain[:5])
    assert changed[5:] == pytest.approx([lr * 0.1 for lr in plain[5:]])


def test_per_group_override_changes_only_that_group() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(two_groups(model), lr=0.1)
    applier = Applier(LoopHost(optimizer))

    applied(applier.apply(1, {"param_groups.1.lr": 0.5}, step=1))
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.5]

    applied(applier.apply(2, {"param_groups.1.lr": 0.5, "weight_decay": 0.01}, step=2))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.01]
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.5]

    # A global lr applies to every group except the one with its own value; the nested form works too.
    applied(applier.apply(3, {"lr": 0.2, "param_groups": {"1": {"lr": 0.5}}, "weight_decay": 0.01}, step=3))
    assert [g["lr"] for g in optimizer.param_groups] == [0.2, 0.5]


# ---------------------------------------------------------------------------------------- optimizer swap


def test_swap_builds_over_same_params_carries_hyperparameters_and_rebinds_scheduler() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(two_groups(model), lr=0.1, momentum=0.9, weight_decay=1e-3)
    optimizer.param_groups[1]["tag"] = "head"
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    host = LoopHost(optimizer, [scheduler])
    applier = Applier(host)
    for _ in range(2):
        train_step(model, optimizer)
        scheduler.step()

    verdict = applied(applier.apply(1, {"optimizer": "adam"}, step=2))

    new = host.optimizer
    assert isinstance(new, torch.optim.Adam)
    assert verdict.detail["changes"]["optimizer"] == ["sgd", "adam"]
    assert [g["params"] for g in new.param_groups] == [g["params"] for g in optimizer.param_groups]
    assert [g["lr"] for g in new.param_groups] == [0.1, 0.01]
    # Only lr (and the config's explicit keys) carry over: the script's weight_decay was SGD's, Adam takes its own.
    assert all(g["weight_decay"] == 0 for g in new.param_groups)
    assert verdict.detail["switch"]["defaulted"]["weight_decay"] == 0
    assert "weight_decay 0.001 -> 0" in verdict.message
    assert verdict.detail["switch"]["dropped"] == ["dampening", "momentum", "nesterov"]
    assert all("momentum" not in g and "nesterov" not in g for g in new.param_groups)
    assert new.param_groups[1]["tag"] == "head"
    assert scheduler.optimizer is new
    assert scheduler.last_epoch == 2

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, new)
        scheduler.step()  # third step: the scheduler halves the new optimizer's lr, progress kept
    assert [g["lr"] for g in new.param_groups] == pytest.approx([0.05, 0.005])
    assert all(new.state[p]["step"] == 1 for p in model.parameters())
    assert not optimizer.state or all("exp_avg" not in s for s in optimizer.state.values()), (
        "the old optimizer must not be stepped any more"
    )


def test_swap_with_object_form_and_new_lr() -> None:
    model = make_model()
    host = LoopHost(torch.optim.SGD(model.parameters(), lr=0.1))
    applier = Applier(host)
    verdict = applied(applier.apply(1, {"optimizer": {"name": "AdamW", "lr": 3e-4, "betas": [0.8, 0.99]}}, step=1))
    group = host.optimizer.param_groups[0]
    assert isinstance(host.optimizer, torch.optim.AdamW)
    assert group["lr"] == 3e-4
    assert group["betas"] == (0.8, 0.99)
    assert verdict.detail["optimizer"]["betas"] == [0.8, 0.99]


def test_swap_and_lr_change_rescales_the_schedule() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    host = LoopHost(optimizer, [scheduler])
    applied(Applier(host).apply(1, {"optimizer": "adam", "lr": 0.01}, step=0))
    assert scheduler.base_lrs == pytest.approx([0.01])
    lrs = []
    for _ in range(4):
        train_step(model, host.optimizer)
        scheduler.step()
        lrs.append(host.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01, 0.005, 0.005, 0.0025])


def test_plugin_optimizer_by_name() -> None:
    def make_signsgd(params: Any, lr: float = 0.01) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.0)

    class Plugin:
        @hookimpl
        def weavelet_optimizers(self) -> list[OptimizerSpec]:
            return [OptimizerSpec(name="SignSGD", factory=make_signsgd, description="test optimizer")]

    registry = get_registry()
    registry.register(Plugin(), name="test-signsgd")
    try:
        model = make_model()
        host = LoopHost(torch.optim.Adam(model.parameters(), lr=0.1))
        applier = Applier(host)
        verdict = applied(applier.apply(1, {"optimizer": "signsgd", "lr": 0.2}, step=3))
        assert type(host.optimizer) is torch.optim.SGD
        assert host.optimizer.param_groups[0]["lr"] == 0.2
        assert verdict.detail["optimizer"]["name"] == "signsgd"
        assert applier.state_dict()["optimizer"] == "signsgd"
        rejected = applier.apply(2, {"optimizer": "signsgd", "lr": 0.2, "momentum": 0.5}, step=4)
        assert rejected.result == "rejected"
        assert "momentum" in rejected.message
    finally:
        reset_registry()


# ---------------------------------------------------------------------------------------- bad input


BAD_INPUT = [
    ({"optimizer": "adamx"}, ["unknown optimizer 'adamx'", "did you mean 'adamax'", "adam, adamax, adamw"]),
    ({"lr": -1}, ["lr", "negative", ">= 0"]),
    ({"lr": math.nan}, ["lr", "not a finite number"]),
    ({"lr": "nan"}, ["lr", "expected a number", "'nan'"]),
    ({"lr": "fast"}, ["lr", "expected a number", "'fast'"]),
    ({"betas": [2, 0.9]}, ["betas", "[0, 1)", "[2, 0.9]"]),
    ({"lrr": 0.1}, ["unknown key 'lrr'", "did you mean 'lr'"]),
    ({"param_groups.9.lr": 0.1}, ["param_groups.9.lr", "2 param groups"]),
    ({"optimizer": "lbfgs"}, ["lbfgs", "closure"]),
    ({"momentum": 0.9}, ["momentum", "not a hyperparameter of adam", "momentum=null"]),
    ({"foreach": True}, ["foreach", "kernel"]),
    ({"optimizer": {"lr": 0.1}}, ['needs a "name"']),
    ({"lr": 0.1, "optimizer": {"name": "adam", "lr": 0.2}}, ["lr is given twice"]),
    ({"eps": -1e-8, "lr": -2}, ["2 problems", "eps", "lr"]),
    ({"amsgrad": 1}, ["amsgrad", "true or false"]),
    ({"checkpoint": {"when": "now"}}, ["checkpoint", "token"]),
    ({"param_groups.x.lr": 0.1}, ["param_groups.<index>.<hyperparameter>"]),
]


@pytest.mark.parametrize(("config", "expected"), BAD_INPUT, ids=[repr(c) for c, _ in BAD_INPUT])
def test_bad_input_is_rejected_with_the_reason_and_changes_nothing(config: dict[str, Any], expected: list[str]) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(two_groups(model), lr=0.1)
    host = LoopHost(optimizer)
    applier = Applier(host)
    train_step(model, optimizer)
    before = frozen(optimizer)

    verdict = applier.apply(1, config, step=3)

    assert verdict.result == "rejected"
    assert verdict.step is None
    for text in expected:
        assert text in verdict.message, verdict.message
    assert host.optimizer is optimizer
    assert frozen(optimizer) == before
    assert applier.applied_revision == 0
    train_step(model, host.optimizer)  # training goes on


def test_all_or_nothing_when_one_key_is_bad() -> None:
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9)
    applier = Applier(LoopHost(optimizer))
    verdict = applier.apply(1, {"lr": 0.01, "optimizer": "adam", "momentum": -1}, step=1)
    assert verdict.result == "rejected"
    assert isinstance(applier.host.optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_optimizers_own_checks_reject_bad_combinations() -> None:
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.0)
    verdict = Applier(LoopHost(optimizer)).apply(1, {"nesterov": True}, step=1)
    assert verdict.result == "rejected"
    assert "sgd refuses" in verdict.message
    assert "Nesterov" in verdict.message
    assert optimizer.param_groups[0]["nesterov"] is False


def test_allow_list() -> None:
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9)
    applier = Applier(LoopHost(optimizer), allow=["lr"])
    for config, key in (
        ({"momentum": 0.5}, "momentum"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"stop": True}, "stop"),
    ):
        verdict = applier.apply(1, config, step=1)
        assert verdict.result == "rejected"
        assert f"{key}: not in this run's allow-list" in verdict.message
        assert "lr" in verdict.message
    applied(applier.apply(1, {"lr": 0.05}, step=1))
    assert optimizer.param_groups[0] == {**optimizer.param_groups[0], "lr": 0.05, "momentum": 0.9}


class RefusingHost(LoopHost):
    def swap_refusal(self) -> str | None:
        return "the strategy manages its own optimizer"


def test_host_that_owns_its_optimizer_refuses_swaps_but_takes_hyperparameters() -> None:
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    host = RefusingHost(optimizer)
    applier = Applier(host)
    verdict = applier.apply(1, {"optimizer": "adam", "lr": 0.01}, step=1)
    assert verdict.result == "rejected"
    assert "cannot switch sgd to adam: the strategy manages its own optimizer" in verdict.message
    assert "hyperparameter edits" in verdict.message
    assert host.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == 0.1
    applied(applier.apply(2, {"lr": 0.01}, step=2))
    assert optimizer.param_groups[0]["lr"] == 0.01


# ---------------------------------------------------------------------------------------- handlers


def test_handler_gets_changed_values_only() -> None:
    applier = Applier(LoopHost(torch.optim.SGD(make_model().parameters(), lr=0.1)))
    seen: list[Any] = []

    @applier.on("grad_clip_val")
    def clip(value: Any) -> None:
        seen.append(value)

    applied(applier.apply(1, {"grad_clip_val": 1.0}, step=1))
    applied(applier.apply(2, {"grad_clip_val": 1.0, "lr": 0.05}, step=2))
    applied(applier.apply(3, {"grad_clip_val": 0.5, "lr": 0.05}, step=3))
    assert seen == [1.0, 0.5]
    assert "handled grad_clip_val" in applier.apply(4, {"grad_clip_val": 2}, step=4).message


def test_raising_handler_rejects_and_leaves_the_optimizer_alone() -> None:
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    host = LoopHost(optimizer)
    applier = Applier(host)

    def clip(value: Any) -> None:
        raise ValueError("grad_clip_val must be positive")

    applier.on("grad_clip_val", clip)
    verdict = applier.apply(1, {"grad_clip_val": -1, "optimizer": "adam", "lr": 0.01}, step=1)
    assert verdict.result == "rejected"
    assert "grad_clip_val: its handler raised ValueError: grad_clip_val must be positive" in verdict.message
    assert host.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert applier.applied_revision == 0


def test_validator_rejects_before_anything_runs() -> None:
    applier = Applier(LoopHost(torch.optim.SGD(make_model().parameters(), lr=0.1)))
    calls: list[Any] = []

    def positive(value: Any) -> None:
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError("send a positive number")

    applier.on("grad_clip_val", calls.append, validate=positive)
    verdict = applier.apply(1, {"grad_clip_val": 0, "lr": 0.5}, step=1)
    assert verdict.result == "rejected"
    assert "grad_clip_val: send a positive number" in verdict.message
    assert calls == []


def test_reserved_keys_cannot_get_handlers() -> None:
    applier = Applier(LoopHost(torch.optim.SGD(make_model().parameters(), lr=0.1)))
    for key in ("optimizer", "stop", "checkpoint", "param_groups.0.lr", ""):
        with pytest.raises(ValueError, match="cannot register a handler"):
            applier.on(key, print)


# ---------------------------------------------------------------------------------------- desired state


def test_unchanged_keys_are_not_reapplied() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
    applier = Applier(LoopHost(optimizer, [scheduler]))
    applied(applier.apply(1, {"lr": 0.8}, step=0))
    train_step(model, optimizer)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4)
    verdict = applied(applier.apply(2, {"lr": 0.8, "weight_decay": 0.1}, step=1))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4), "a decayed lr must not be reset"
    assert set(verdict.detail["changes"]) == {"weight_decay"}
    assert "nothing to change" in applied(applier.apply(3, {"lr": 0.8, "weight_decay": 0.1}, step=2)).message


def test_commands_act_once_per_new_token() -> None:
    saver = Saver()
    host = LoopHost(torch.optim.SGD(make_model().parameters(), lr=0.1), save_checkpoint=saver)
    applier = Applier(host)

    first = applied(applier.apply(1, {"checkpoint": 1}, step=10))
    assert first.detail["checkpoint"] == "/checkpoints/weavelet-r1-step10.pt"
    assert "checkpoint saved to /checkpoints/weavelet-r1-step10.pt" in first.message
    applied(applier.apply(2, {"checkpoint": 1, "lr": 0.05}, step=11))
    applied(applier.apply(3, {"checkpoint": "after-warmup", "lr": 0.05}, step=12))
    assert saver.names == ["weavelet-r1-step10", "weavelet-r3-step12"]
    assert not host.stop_requested

    stop = applied(applier.apply(4, {"checkpoint": "after-warmup", "lr": 0.05, "stop": True}, step=13))
    assert stop.stop
    assert host.stop_requested
    assert saver.names == ["weavelet-r1-step10", "weavelet-r3-step12"]

    host.stop_requested = False
    applied(applier.apply(5, {"stop": False}, step=14))
    assert not host.stop_requested


def test_checkpoint_without_a_way_to_save_is_rejected() -> None:
    verdict = Applier(LoopHost(torch.optim.SGD(make_model().parameters(), lr=0.1))).apply(
        1, {"checkpoint": 1, "lr": 0.5}, step=1
    )
    assert verdict.result == "rejected"
    assert "no way to save checkpoints" in verdict.message


def test_failed_checkpoint_undoes_the_swap() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    host = LoopHost(optimizer, [scheduler], save_checkpoint=Saver(fail=True))
    applier = Applier(host)
    before = frozen(optimizer)
    verdict = applier.apply(1, {"optimizer": "adam", "lr": 0.01, "checkpoint": 1}, step=1)
    assert verdict.result == "rejected"
    assert "No space left on device" in verdict.message
    assert "nothing was changed" in verdict.message
    assert host.optimizer is optimizer
    assert scheduler.optimizer is optimizer
    assert scheduler.base_lrs == [0.1]
    assert frozen(optimizer) == before
    assert applier.state_dict()["applied_revision"] == 0


def test_old_revision_is_superseded() -> None:
    applier = Applier(LoopHost(torch.optim.SGD(make_model().parameters(), lr=0.1)))
    applied(applier.apply(3, {"lr": 0.2}, step=1))
    verdict = applier.apply(2, {"lr": 0.3}, step=2)
    assert verdict.result == "superseded"
    assert applier.host.optimizer.param_groups[0]["lr"] == 0.2


def test_state_dict_recreates_the_active_optimizer_for_resume() -> None:
    model = make_model()
    host = LoopHost(torch.optim.SGD(model.parameters(), lr=0.1))
    applier = Applier(host)
    applied(applier.apply(1, {"optimizer": "adam", "lr": 0.01}, step=1))
    for _ in range(3):
        train_step(model, host.optimizer)
    saved_state, saved_optimizer = applier.state_dict(), host.optimizer.state_dict()

    resumed_host = LoopHost(torch.optim.SGD(model.parameters(), lr=0.1))  # what the script builds again
    resumed = Applier(resumed_host)
    assert resumed.load_state_dict(saved_state) == "adam"
    assert resumed.recreate("adam") is True
    resumed_host.optimizer.load_state_dict(saved_optimizer)
    assert isinstance(resumed_host.optimizer, torch.optim.Adam)
    assert resumed_host.optimizer.param_groups[0]["lr"] == 0.01
    assert all(resumed_host.optimizer.state[p]["step"] == 3 for p in model.parameters())
    assert resumed.apply(1, {"optimizer": "adam", "lr": 0.01}, step=4).result == "superseded"
    assert resumed.recreate("adam") is False


# ---------------------------------------------------------------------------------------- property


KEYS = st.sampled_from(
    ["lr", "momentum", "weight_decay", "betas", "optimizer", "eps", "nesterov", "param_groups.1.lr", "zz"]
)
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-3, 3),
    st.booleans(),
    st.sampled_from(["adam", "sgd", "rmsprop", "adamx", "fast"]),
    st.lists(st.floats(-1, 2), max_size=3),
    st.none(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs=st.lists(st.dictionaries(KEYS, VALUES, max_size=4), min_size=1, max_size=4))
def test_every_revision_is_applied_whole_or_not_at_all(configs: list[dict[str, Any]]) -> None:
    model = make_model()
    host = LoopHost(torch.optim.SGD(two_groups(model), lr=0.1, momentum=0.5))
    applier = Applier(host)
    for number, config in enumerate(configs, start=1):
        before_optimizer, before = host.optimizer, frozen(host.optimizer)
        verdict = applier.apply(number, config, step=number)
        if verdict.result == "rejected":
            assert host.optimizer is before_optimizer
            assert frozen(host.optimizer) == before
            assert verdict.message
            continue
        assert verdict.result == "applied"
        groups = host.optimizer.param_groups
        for key, value in config.items():
            if key in ("lr", "weight_decay", "momentum", "eps") and value is not None:
                targets = groups[:1] if "param_groups.1.lr" in config and key == "lr" else groups
                assert all(math.isclose(g[key], value) for g in targets)
        train_step(model, host.optimizer)


def test_describe_reports_every_group_count() -> None:
    host = LoopHost(torch.optim.SGD(two_groups(make_model()), lr=0.1))
    spec = Applier(host).describe()
    assert spec["name"] == "sgd"
    assert spec["lr"] == 0.1
    assert spec["param_groups"] == 2


@pytest.fixture(autouse=True)
def _no_leaked_registry() -> Iterator[None]:
    yield
    reset_registry()


def test_resume_with_an_optimizer_no_longer_available_says_so() -> None:
    applier = Applier(LoopHost(torch.optim.SGD(make_model().parameters(), lr=0.1)))
    name = applier.load_state_dict({"format": 1, "optimizer": "lion", "applied_revision": 4, "applied_config": {}})
    assert name == "lion"
    with pytest.raises(Rejected, match="cannot resume with the optimizer the checkpoint was written with: unknown"):
        applier.recreate(name)
    with pytest.raises(ValueError, match="format"):
        applier.load_state_dict({"format": 99})


# ---------------------------------------------------------------------------------------- desired state across swaps


def test_a_swap_leaves_unchanged_keys_of_the_old_optimizer_in_the_config() -> None:
    """`set momentum=0.9`, later `set optimizer=adam`: the merged config still holds momentum, which Adam lacks."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    host = LoopHost(optimizer)
    applier = Applier(host)
    applied(applier.apply(1, {"momentum": 0.9}, step=1))

    verdict = applied(applier.apply(2, {"momentum": 0.9, "optimizer": "adam", "lr": 0.001}, step=2))
    assert isinstance(host.optimizer, torch.optim.Adam)
    assert verdict.detail["not_applicable"] == ["momentum"]
    assert "momentum kept in the config but not used by adam" in (verdict.message or "")
    train_step(model, host.optimizer)

    # Swapping back makes the desired momentum real again, though it did not change in this revision.
    applied(applier.apply(3, {"momentum": 0.9, "optimizer": "sgd", "lr": 0.001}, step=3))
    assert isinstance(host.optimizer, torch.optim.SGD)
    assert host.optimizer.param_groups[0]["momentum"] == 0.9
    assert host.optimizer.param_groups[0]["lr"] == 0.001


def test_a_changed_key_the_new_optimizer_lacks_is_still_refused() -> None:
    model = make_model()
    host = LoopHost(torch.optim.SGD(model.parameters(), lr=0.1))
    applier = Applier(host)
    applied(applier.apply(1, {"momentum": 0.9}, step=1))
    before = frozen(host.optimizer)

    verdict = applier.apply(2, {"momentum": 0.5, "optimizer": "adam"}, step=2)
    assert verdict.result == "rejected"
    assert "momentum: not a hyperparameter of adam" in (verdict.message or "")
    assert frozen(host.optimizer) == before
