"""``lr_scale`` scales the whole schedule, idempotently; an ``lr`` edit keeps every scheduler's floor in step and
says which groups keep their own learning rate.

Each schedule test runs two identical loops (same model, data and metrics), one receiving the revision, and
compares their learning rates step by step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from weavelet_torch import Applier, LoopHost
from weavelet_torch.applier import Verdict

sch = torch.optim.lr_scheduler
Factory = Callable[[torch.optim.Optimizer], list[Any]]


def make_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def metric(step: int) -> float:
    """A validation metric that stalls now and then, the same for both runs (drives ReduceLROnPlateau)."""
    return 1.0 / (1 + step // 4)


def run(
    make: Factory, revisions: dict[int, dict[str, Any]], steps: int = 30
) -> tuple[list[list[float]], list[Verdict]]:
    """Learning rates of both groups after every step, and the verdicts of ``revisions`` (``{step: config}``)."""
    net = make_model()
    optimizer = torch.optim.SGD(
        [{"params": net[0].parameters(), "lr": 0.1}, {"params": net[2].parameters(), "lr": 0.02}], lr=0.1, momentum=0.9
    )
    schedulers = make(optimizer)
    host = LoopHost(optimizer, schedulers)
    applier = Applier(host)
    x = torch.linspace(-1, 1, 32).reshape(8, 4)
    lrs, verdicts = [], []
    for step in range(1, steps + 1):
        loss = ((net(x) - 1) ** 2).mean()
        host.optimizer.zero_grad()
        loss.backward()
        host.optimizer.step()
        for scheduler in schedulers:
            if isinstance(scheduler, sch.ReduceLROnPlateau):
                scheduler.step(metric(step))
            else:
                scheduler.step()
        if step in revisions:
            verdict = applier.apply(len(verdicts) + 1, revisions[step], step=step)
            assert verdict.result == "applied", verdict.message
            verdicts.append(verdict)
        lrs.append([float(g["lr"]) for g in host.optimizer.param_groups])
    return lrs, verdicts


def scaled(lrs: list[list[float]], factor: float) -> list[list[float]]:
    return [[lr * factor for lr in step] for step in lrs]


def flat(lrs: list[list[float]]) -> list[float]:
    return [lr for step in lrs for lr in step]


def close(lrs: list[list[float]]) -> Any:
    return pytest.approx(flat(lrs), rel=1e-9, abs=1e-15)


def warmup(opt: torch.optim.Optimizer) -> list[Any]:
    return [sch.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))]


SCHEDULES: dict[str, Factory] = {
    "none": lambda opt: [],
    "LambdaLR-warmup": warmup,
    "StepLR": lambda opt: [sch.StepLR(opt, step_size=4, gamma=0.5)],
    "MultiStepLR": lambda opt: [sch.MultiStepLR(opt, milestones=[3, 9, 14, 22], gamma=0.3)],
    "ExponentialLR": lambda opt: [sch.ExponentialLR(opt, gamma=0.9)],
    "CosineAnnealingLR": lambda opt: [sch.CosineAnnealingLR(opt, T_max=7, eta_min=0.005)],
    "CosineAnnealingWarmRestarts": lambda opt: [sch.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=2, eta_min=0.004)],
    "OneCycleLR": lambda opt: [sch.OneCycleLR(opt, max_lr=[0.2, 0.05], total_steps=40)],
    "CyclicLR": lambda opt: [sch.CyclicLR(opt, base_lr=[0.01, 0.001], max_lr=[0.1, 0.02], step_size_up=4)],
    "ReduceLROnPlateau": lambda opt: [sch.ReduceLROnPlateau(opt, factor=0.5, patience=1, min_lr=[0.02, 0.011])],
    "SequentialLR": lambda opt: [
        sch.SequentialLR(
            opt,
            [sch.LinearLR(opt, start_factor=0.1, total_iters=6), sch.CosineAnnealingLR(opt, T_max=10, eta_min=0.003)],
            milestones=[6],
        )
    ],
    "ChainedScheduler": lambda opt: [
        sch.ChainedScheduler([sch.LinearLR(opt, start_factor=0.2, total_iters=8), sch.ExponentialLR(opt, gamma=0.95)])
    ],
    "SWALR": lambda opt: [torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=12)],
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lr_scale_scales_every_later_lr_and_is_idempotent(name: str) -> None:
    make = SCHEDULES[name]
    plain, _ = run(make, {})
    changed, verdicts = run(
        make,
        {
            5: {"lr_scale": 0.5},
            9: {"lr_scale": 0.5, "weight_decay": 1e-4},  # the same factor again: no change
            16: {"lr_scale": 1, "weight_decay": 1e-4},  # back to the schedule as built
            22: {"lr_scale": 4, "weight_decay": 1e-4},
        },
    )
    assert flat(changed[:4]) == close(plain[:4])
    assert flat(changed[4:15]) == close(scaled(plain[4:15], 0.5))
    assert flat(changed[15:21]) == close(plain[15:21])
    assert flat(changed[21:]) == close(scaled(plain[21:], 4))
    assert verdicts[0].detail["changes"]["lr_scale"] == [1.0, 0.5]
    assert "lr_scale" not in verdicts[1].detail["changes"]
    assert "lr_scale 0.5 -> 1" in verdicts[2].message


def test_lr_scale_raises_the_peak_of_a_warmup_where_an_lr_edit_moves_it() -> None:
    plain, _ = run(warmup, {})
    with_lr, _ = run(warmup, {10: {"lr": 0.1}})  # at step 10 of 20: lr 0.055 -> 0.1, the peak almost doubles
    with_scale, _ = run(warmup, {10: {"lr_scale": 0.5}})
    assert plain[25][0] == pytest.approx(0.1)
    assert with_lr[25][0] == pytest.approx(0.1 * 0.1 / plain[9][0])
    assert with_scale[25][0] == pytest.approx(0.05)


@pytest.mark.parametrize("name", ["CosineAnnealingLR", "CosineAnnealingWarmRestarts", "ReduceLROnPlateau"])
def test_an_lr_edit_scales_the_schedulers_floor_too(name: str) -> None:
    """CosineAnnealingWarmRestarts kept eta_min: an lr x0.1 came out ~1% too high at the next step."""
    make = SCHEDULES[name]
    plain, _ = run(make, {})
    at = 6
    changed, verdicts = run(make, {at: {"lr": plain[at - 1][0] * 0.1, "param_groups.1.lr": plain[at - 1][1] * 0.1}})
    assert flat(changed[at:]) == close(scaled(plain[at:], 0.1))
    assert not any("shared by all param groups" in note for note in verdicts[0].detail.get("notes", ()))


def test_an_lr_edit_by_different_factors_says_the_shared_floor_stays() -> None:
    make = SCHEDULES["CosineAnnealingWarmRestarts"]
    _, verdicts = run(make, {6: {"lr": 0.05}})
    (note,) = verdicts[0].detail["notes"]
    assert note.startswith("CosineAnnealingWarmRestarts's eta_min (shared by all param groups) stays 0.004")
    assert "use lr_scale" in verdicts[0].message


def test_an_lr_edit_says_which_groups_keep_their_own_lr() -> None:
    net = make_model()
    optimizer = torch.optim.SGD(
        [{"params": net[0].parameters()}, {"params": net[2].parameters()}, {"params": []}], lr=0.1
    )
    applier = Applier(LoopHost(optimizer))
    assert applier.apply(1, {"param_groups.1.lr": 0.5}, step=1).result == "applied"
    verdict = applier.apply(2, {"param_groups.1.lr": 0.5, "lr": 0.2}, step=2)
    assert [g["lr"] for g in optimizer.param_groups] == [0.2, 0.5, 0.2]
    assert verdict.detail["notes"] == [
        "lr does not change param group 1 (0.5): it has its own param_groups.<i>.lr; remove that (=null) to follow lr"
    ]
    assert "lr does not change param group 1 (0.5)" in verdict.message
    quiet = applier.apply(3, {"param_groups.1.lr": 0.5, "lr": 0.2, "weight_decay": 0.1}, step=3)
    assert "notes" not in quiet.detail, "said once, when lr changes"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"lr_scale": 0}, "lr_scale: 0 is not a finite number > 0; send for example lr_scale=0.5 (1 = as built)"),
        ({"lr_scale": -2}, "lr_scale: -2 is not a finite number > 0"),
        ({"lr_scale": "half"}, "lr_scale: expected a number > 0 (1 = the schedule as built), got the string 'half'"),
        ({"lr_scale": True}, "lr_scale: expected a number > 0"),
        ({"param_groups.1.lr_scale": 0.5}, "param_groups.1.lr_scale: lr_scale scales every param group's schedule"),
    ],
)
def test_a_bad_lr_scale_is_refused_with_what_to_send(config: dict[str, Any], expected: str) -> None:
    net = make_model()
    optimizer = torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[2].parameters()}], lr=0.1)
    verdict = Applier(LoopHost(optimizer)).apply(1, config, step=1)
    assert verdict.result == "rejected"
    assert expected in verdict.message
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1]


def test_lr_scale_holds_across_a_switch_and_a_resume() -> None:
    net = make_model()
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    scheduler = sch.StepLR(optimizer, step_size=2, gamma=0.5)
    host = LoopHost(optimizer, [scheduler])
    applier = Applier(host)
    assert applier.apply(1, {"lr_scale": 0.5, "optimizer": "adam"}, step=0).result == "applied"
    assert isinstance(host.optimizer, torch.optim.Adam)
    assert host.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    assert scheduler.base_lrs == pytest.approx([0.5])

    resumed = Applier(LoopHost(torch.optim.SGD(net.parameters(), lr=1.0), [scheduler]))
    resumed.load_state_dict(applier.state_dict())
    verdict = resumed.apply(2, {"lr_scale": 0.5, "optimizer": "adam", "weight_decay": 0.0}, step=1)
    assert "lr_scale" not in verdict.detail["changes"], "the applied factor is part of the saved state"
