"""One applier steering several optimizers (a GAN's generator and discriminator): nested keys, all or nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from weavelet_torch import Applier, LoopHost, attach
from weavelet_torch.applier import Verdict


def gan() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    g, d = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    return g, d, torch.optim.Adam(g.parameters(), lr=1e-3), torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.5)


def step(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = module(torch.randn(4, 3)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def applied(verdict: Verdict) -> Verdict:
    assert verdict.result == "applied", verdict.message
    return verdict


def groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def test_each_optimizer_takes_its_nested_keys() -> None:
    g, d, opt_g, opt_d = gan()
    host = LoopHost({"generator": opt_g, "discriminator": opt_d})
    applier = Applier(host)
    step(g, opt_g)
    step(d, opt_d)
    moments = opt_g.state[g.weight]["exp_avg"].clone()

    verdict = applied(
        applier.apply(1, {"generator": {"lr": 1e-4}, "discriminator": {"optimizer": "adam", "lr": 0.01}}, step=3)
    )
    assert host.optimizers["generator"] is opt_g, "an edit keeps the object"
    assert opt_g.param_groups[0]["lr"] == 1e-4
    assert torch.equal(opt_g.state[g.weight]["exp_avg"], moments)
    new_d = host.optimizers["discriminator"]
    assert isinstance(new_d, torch.optim.Adam)
    assert new_d.param_groups[0]["lr"] == 0.01
    assert verdict.detail["changes"]["generator.lr"] == [1e-3, 1e-4]
    assert verdict.detail["changes"]["discriminator.optimizer"] == ["sgd", "adam"]
    assert set(verdict.detail["switch"]) == {"discriminator"}
    assert verdict.detail["optimizer"]["name"] == "generator=adam, discriminator=adam"
    assert "discriminator: carried lr" in verdict.message
    # Dotted flat keys mean the same.
    applied(applier.apply(2, {"generator.lr": 2e-4, "discriminator.param_groups.0.lr": 0.02}, step=4))
    assert opt_g.param_groups[0]["lr"] == 2e-4
    assert new_d.param_groups[0]["lr"] == 0.02


def test_one_bad_key_changes_no_optimizer() -> None:
    _, _, opt_g, opt_d = gan()
    host = LoopHost({"generator": opt_g, "discriminator": opt_d})
    applier = Applier(host)
    before = (groups(opt_g), groups(opt_d))

    verdict = applier.apply(1, {"generator": {"lr": 1e-4, "optimizer": "adamw"}, "discriminator": {"lr": -1}}, step=1)
    assert verdict.result == "rejected"
    assert verdict.message == "discriminator.lr: -1 is negative; send a value >= 0"
    assert host.optimizers["generator"] is opt_g
    assert (groups(opt_g), groups(opt_d)) == before

    # A failing checkpoint in the same revision puts every optimizer back (the swap included).
    def fail(name: str) -> str:
        raise OSError("No space left on device")

    host = LoopHost({"generator": opt_g, "discriminator": opt_d}, save_checkpoint=fail)
    applier = Applier(host)
    verdict = applier.apply(
        1, {"generator": {"optimizer": "adamw"}, "discriminator": {"lr": 0.5}, "checkpoint": 1}, step=1
    )
    assert verdict.result == "rejected"
    assert "checkpoint failed: OSError" in verdict.message
    assert host.optimizers["generator"] is opt_g
    assert (groups(opt_g), groups(opt_d)) == before


def test_top_level_keys_and_names_say_how_to_write_them() -> None:
    _, _, opt_g, opt_d = gan()
    applier = Applier(LoopHost({"generator": opt_g, "discriminator": opt_d}))
    verdict = applier.apply(1, {"lr": 0.1}, step=1)
    assert verdict.result == "rejected"
    assert verdict.message.startswith("lr: this run steers several optimizers (generator, discriminator)")
    assert "generator.lr=..." in verdict.message

    verdict = applier.apply(2, {"generatr": {"lr": 0.1}}, step=1)
    assert "unknown optimizer or key 'generatr'; did you mean 'generator'?" in verdict.message
    assert "this run's optimizers: generator, discriminator" in verdict.message

    verdict = applier.apply(3, {"generator": {"lrr": 0.1}}, step=1)
    assert verdict.message.startswith("unknown key 'generator.lrr'; did you mean 'generator.lr'?")
    assert "known keys of generator:" in verdict.message

    verdict = applier.apply(4, {"generator": {"momentum": 0.9}}, step=1)
    assert verdict.message.startswith("generator.momentum: not a hyperparameter of adam")

    verdict = applier.apply(5, {"generator": "adam"}, step=1)
    assert verdict.message.startswith("generator: expected an object of generator's keys")


def test_commands_act_once_and_handlers_stay_top_level() -> None:
    _, _, opt_g, opt_d = gan()
    saved: list[str] = []
    host = LoopHost({"generator": opt_g, "discriminator": opt_d}, save_checkpoint=lambda n: saved.append(n) or n)
    applier = Applier(host)
    seen: list[Any] = []
    applier.on("grad_clip_val", seen.append)
    with pytest.raises(ValueError, match="names one of the optimizers"):
        applier.on("generator", seen.append)

    verdict = applier.apply(1, {"checkpoint": 1, "stop": True, "grad_clip_val": 0.5, "generator": {"lr": 0.1}}, step=3)
    applied(verdict)
    assert saved == ["weavelet-r1-step3"]
    assert host.stop_requested
    assert verdict.stop
    assert seen == [0.5]
    # A rejected optimizer key does not keep the emergency brake from acting.
    verdict = applier.apply(2, {"checkpoint": 2, "generator": {"lr": -1}}, step=4)
    assert verdict.result == "rejected"
    assert saved == ["weavelet-r1-step3", "weavelet-r2-step4"]


def test_lr_scale_and_allow_per_optimizer() -> None:
    _, _, opt_g, opt_d = gan()
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: min(1.0, (s + 1) / 10))
    sched_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=2, gamma=0.5)
    host = LoopHost({"generator": opt_g, "discriminator": opt_d}, [sched_d, sched_g])
    assert host.schedulers_of("generator") == [sched_g]
    applier = Applier(host, allow=["generator.lr_scale", "lr"])
    applied(applier.apply(1, {"generator": {"lr_scale": 0.5}, "discriminator": {"lr": 0.05}}, step=1))
    assert sched_g.base_lrs == [5e-4]
    assert sched_d.base_lrs == [pytest.approx(0.05)]
    verdict = applier.apply(2, {"discriminator": {"lr_scale": 0.5}}, step=2)
    assert verdict.message.startswith("discriminator.lr_scale: not in this run's allow-list")


def test_schedulers_follow_their_optimizer_through_a_swap_and_resume() -> None:
    _g, d, opt_g, opt_d = gan()
    sched_d = torch.optim.lr_scheduler.OneCycleLR(opt_d, max_lr=0.1, total_steps=50)
    host = LoopHost({"generator": opt_g, "discriminator": opt_d}, {"discriminator": [sched_d]})
    applier = Applier(host)
    applied(applier.apply(1, {"discriminator": {"optimizer": "adam"}}, step=1))
    new_d = host.optimizers["discriminator"]
    assert sched_d.optimizer is new_d
    for _ in range(3):
        step(d, new_d)
        sched_d.step()
    state = applier.state_dict()
    assert state["optimizers"] == {"generator": "adam", "discriminator": "adam"}

    # A resumed script builds SGD again: the recorded type comes back before its state is loaded.
    _, _, opt_g2, opt_d2 = gan()
    host2 = LoopHost({"generator": opt_g2, "discriminator": opt_d2})
    resumed = Applier(host2)
    resumed.load_state_dict(state)
    assert resumed.recreate_saved() == ["discriminator"]
    assert isinstance(host2.optimizers["discriminator"], torch.optim.Adam)
    with pytest.raises(ValueError, match="steered several optimizers"):
        Applier(LoopHost(opt_g2)).load_state_dict(state)


def test_attach_checks_what_it_is_given(tmp_path: Any) -> None:
    _, _, opt_g, opt_d = gan()
    with pytest.raises(ValueError, match="drives none of the optimizers"):
        attach(
            {"generator": opt_g, "discriminator": opt_d},
            schedulers=[
                torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 1)
            ],
            url=tmp_path.as_uri(),
        )
    with pytest.raises(ValueError, match="does not drive that optimizer"):
        LoopHost(
            {"generator": opt_g, "discriminator": opt_d}, {"generator": [torch.optim.lr_scheduler.StepLR(opt_d, 1)]}
        )
    with pytest.raises(ValueError, match="key weavelet uses itself"):
        LoopHost({"stop": opt_g})
    with pytest.raises(ValueError, match="same optimizer object"):
        LoopHost({"a": opt_g, "b": opt_g})
    live = attach({"generator": opt_g, "discriminator": opt_d}, url=tmp_path.as_uri(), run="job-api")
    with pytest.raises(RuntimeError, match=r"use live.optimizers\[name\]"):
        _ = live.optimizer
    assert dict(live.optimizers) == {"generator": opt_g, "discriminator": opt_d}
