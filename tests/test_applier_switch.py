"""A switch of optimizer type takes the new type's defaults: only each group's lr, the keys the desired config sets,
the implementation flags and ``maximize`` (where the new type takes them) carry over, and the outcome says which."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from weavelet_torch import Applier, LoopHost
from weavelet_torch.applier import Verdict


def model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def step(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.linspace(-1, 1, 32).reshape(8, 4)
    loss = ((net(x) - 1) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def switch(
    optimizer: torch.optim.Optimizer, config: dict[str, Any], *before: dict[str, Any]
) -> tuple[LoopHost, Verdict]:
    host = LoopHost(optimizer)
    applier = Applier(host)
    for number, earlier in enumerate(before, start=1):
        assert applier.apply(number, earlier, step=number).result == "applied"
    verdict = applier.apply(len(before) + 1, config, step=10)
    assert verdict.result == "applied", verdict.message
    return host, verdict


def test_adadelta_to_adam_takes_adams_own_eps() -> None:
    host, verdict = switch(torch.optim.Adadelta(model().parameters(), lr=0.5), {"optimizer": "adam"})
    group = host.optimizer.param_groups[0]
    assert group["eps"] == 1e-8
    assert group["lr"] == 0.5
    assert verdict.detail["switch"]["defaulted"]["eps"] == 1e-8
    assert verdict.detail["switch"]["carried"]["lr"] == 0.5
    assert "rho" in verdict.detail["switch"]["dropped"]
    assert "eps 1e-06 -> 1e-08" in verdict.message
    assert "dropped rho" in verdict.message


def test_adamw_weight_decay_from_the_script_does_not_become_sgd_l2() -> None:
    host, verdict = switch(torch.optim.AdamW(model().parameters(), lr=1e-3, weight_decay=0.1), {"optimizer": "sgd"})
    assert host.optimizer.param_groups[0]["weight_decay"] == 0
    assert "weight_decay 0.1 -> 0" in verdict.message
    assert "notes" not in verdict.detail


def test_a_weight_decay_set_in_the_config_is_carried_and_its_change_of_meaning_is_said() -> None:
    host, verdict = switch(
        torch.optim.AdamW(model().parameters(), lr=1e-3),
        {"weight_decay": 0.1, "optimizer": "sgd"},
        {"weight_decay": 0.1},
    )
    assert host.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert verdict.detail["switch"]["carried"]["weight_decay"] == 0.1
    (note,) = verdict.detail["notes"]
    assert note.startswith(
        "weight_decay=0.1 (set in the config) was decoupled weight decay in adamw and is an L2 penalty added to "
        "the gradient in sgd"
    )
    assert note in verdict.message
    # Adam with decoupled_weight_decay=True counts as decoupled too; to AdamW the meaning is the same.
    _, same = switch(
        torch.optim.Adam(model().parameters(), decoupled_weight_decay=True),
        {"weight_decay": 0.1, "optimizer": "adamw"},
        {"weight_decay": 0.1},
    )
    assert "notes" not in same.detail


@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_implementation_flags_carry_to_a_type_that_takes_them(flag: str) -> None:
    host, verdict = switch(torch.optim.Adam(model().parameters(), lr=1e-3, **{flag: True}), {"optimizer": "adamw"})
    assert host.optimizer.param_groups[0][flag] is True
    assert host.optimizer.defaults[flag] is True, "passed to the constructor, not only written into the groups"
    assert verdict.detail["switch"]["carried"][flag] is True
    assert f"carried {flag}, lr" in verdict.message


def test_a_flag_the_new_type_lacks_is_dropped_and_said() -> None:
    host, verdict = switch(torch.optim.Adam(model().parameters(), lr=1e-3, fused=True), {"optimizer": "adadelta"})
    assert "fused" not in host.optimizer.param_groups[0]
    assert "fused" in verdict.detail["switch"]["dropped"]


def test_maximize_and_per_group_lrs_carry_and_explicit_keys_win_over_defaults() -> None:
    net = model()
    optimizer = torch.optim.Adam(
        [{"params": net[0].parameters(), "lr": 0.1}, {"params": net[2].parameters(), "lr": 0.01}], maximize=True
    )
    host, verdict = switch(optimizer, {"optimizer": "adamw", "betas": [0.5, 0.9]}, {"betas": [0.5, 0.9]})
    new = host.optimizer
    assert [g["lr"] for g in new.param_groups] == [0.1, 0.01]
    assert all(g["maximize"] is True for g in new.param_groups)
    assert all(g["betas"] == (0.5, 0.9) for g in new.param_groups)
    assert all(g["eps"] == 1e-8 and g["weight_decay"] == 0.01 for g in new.param_groups)
    assert verdict.detail["switch"]["carried"] == {
        "lr": 0.1,
        "betas": [0.5, 0.9],
        "maximize": True,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
    }
    assert "carried betas, lr, maximize;" in verdict.message
    step(net, new)


def test_a_switch_back_restores_what_the_config_says_not_what_the_old_optimizer_had() -> None:
    net = model()
    host, _ = switch(
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True),
        {"optimizer": "sgd", "lr": 0.1},
        {"optimizer": "adam"},
    )
    group = host.optimizer.param_groups[0]
    assert isinstance(host.optimizer, torch.optim.SGD)
    assert (group["momentum"], group["nesterov"]) == (0, False), "the script's momentum is not in the config"
