"""Public scenarios in plain PyTorch loops with ``attach()``: AMP, schedulers, compiled models, a GradScaler."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from weavelet_torch import Attachment, attach
from weavelet_torch.applier import Verdict

Send = Callable[[Attachment, int, Mapping[str, Any]], Verdict]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(64, 4)
    return model, x, x.sum(dim=1, keepdim=True) * 0.5


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def applied(verdict: Verdict) -> Verdict:
    assert verdict.result == "applied", verdict.message
    return verdict


def test_16_mixed_amp_with_a_grad_scaler_and_a_swap(url: str, send: Send) -> None:
    # Lightning's "16-mixed" needs CUDA; on CPU the same mechanics are float16 autocast plus torch.amp's CPU
    # GradScaler, which keeps per-optimizer state keyed by the optimizer object and clears it in update().
    model, x, y = problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with attach(torch.optim.SGD(model.parameters(), lr=0.05), run="amp16", url=url) as live:
        losses = []
        for number in range(1, 13):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x), y)
            live.optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(live.optimizer)
            scaler.update()  # the boundary is after update(): the scaler holds nothing for the old optimizer
            losses.append(float(loss.detach()))
            if number == 6:
                verdict = applied(send(live, number, {"optimizer": "adam", "lr": 0.01}))
                assert verdict.step == 6
            else:
                live.poll(number)
        assert isinstance(live.optimizer, torch.optim.Adam)
        first = next(model.parameters())
        assert int(live.optimizer.state[first]["step"]) == 6, "every step after the swap went through the scaler"
        assert all(math.isfinite(v) for v in losses)
        assert scaler.get_scale() > 0


def test_lambdalr_warmup_with_lr_scale(url: str, send: Send) -> None:
    model, x, y = problem()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    expected = [1e-2 * min(1.0, (s + 1) / 10) for s in range(20)]
    seen = []
    with attach(optimizer, run="warmup", url=url, schedulers=[warmup]) as live:
        for number in range(1, 20):
            seen.append(live.optimizer.param_groups[0]["lr"])
            step(model, live.optimizer, x, y)
            warmup.step()
            if number == 5:
                applied(send(live, number, {"lr_scale": 0.5}))
                applied(send(live, number, {"lr_scale": 0.5}))  # sent twice: the same as once
            else:
                live.poll(number)
    assert seen[:5] == pytest.approx(expected[:5])
    assert seen[5:] == pytest.approx([0.5 * v for v in expected[5:19]])
    assert max(seen) == pytest.approx(5e-3), "the warmup's peak scaled, not doubled"


def test_onecycle_lr_both_directions(url: str, send: Send) -> None:
    model, x, y = problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=100)
    momenta = []
    with attach(optimizer, run="onecycle", url=url, schedulers=[cycle]) as live:
        for number in range(1, 16):
            step(model, live.optimizer, x, y)
            cycle.step()
            if number == 4:
                verdict = applied(send(live, number, {"optimizer": "sgd", "momentum": 0.9}))
                assert "optimizer adam -> sgd" in verdict.message
            elif number == 10:
                applied(send(live, number, {"optimizer": "adam", "momentum": None}))
            else:
                live.poll(number)
            if 4 <= number < 10:
                group = live.optimizer.param_groups[0]
                assert isinstance(live.optimizer, torch.optim.SGD)
                assert "betas" not in group
                momenta.append(group["momentum"])
        group = live.optimizer.param_groups[0]
        assert len(set(momenta)) == len(momenta), "SGD's momentum follows the cycle"
        assert isinstance(live.optimizer, torch.optim.Adam)
        assert "momentum" not in group, "no stray momentum key in Adam's groups"
        before = group["betas"][0]
        step(model, live.optimizer, x, y)
        cycle.step()
        assert live.optimizer.param_groups[0]["betas"][0] != before, "betas[0] cycles again"
        assert cycle.use_beta1


def test_cyclic_lr_with_cycle_momentum(url: str, send: Send) -> None:
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cyclic = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=0.001, max_lr=0.01, step_size_up=5)
    with attach(optimizer, run="cyclic", url=url, schedulers=[cyclic]) as live:
        for number in range(1, 12):
            step(model, live.optimizer, x, y)
            cyclic.step()
            if number == 3:
                refused = send(live, number, {"optimizer": "adagrad"})
                assert refused.result == "rejected"
                assert "CyclicLR cycles momentum (cycle_momentum=True) and adagrad" in refused.message
                assert isinstance(live.optimizer, torch.optim.SGD)
            elif number == 5:
                applied(send(live, number, {"optimizer": "adam"}))
            else:
                live.poll(number)
        assert isinstance(live.optimizer, torch.optim.Adam)
        assert cyclic.use_beta1
        betas = []
        for _ in range(3):
            step(model, live.optimizer, x, y)
            cyclic.step()
            betas.append(live.optimizer.param_groups[0]["betas"][0])
        assert len(set(betas)) == 3, "betas[0] follows the momentum cycle"


def test_cosine_annealing_warm_restarts(url: str, send: Send) -> None:
    model, x, y = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=10, eta_min=0.01)
    with attach(optimizer, run="warm-restarts", url=url, schedulers=[cosine]) as live:
        for number in range(1, 5):
            step(model, live.optimizer, x, y)
            cosine.step()
            live.poll(number)
        current = live.optimizer.param_groups[0]["lr"]
        applied(send(live, 5, {"lr": current / 2}))
        assert cosine.eta_min == pytest.approx(0.005), "eta_min scales with the lr"
        lrs = [live.optimizer.param_groups[0]["lr"]]
        for _ in range(6, 26):
            step(model, live.optimizer, x, y)
            cosine.step()
            lrs.append(live.optimizer.param_groups[0]["lr"])
        assert lrs[1] < lrs[0], "no ~1% rise on the step after the edit"
        assert max(lrs) == pytest.approx(0.05), "after the restart the peak is the new, halved value"
        assert min(lrs) >= 0.005 - 1e-12


@pytest.mark.slow
def test_torch_compiled_model_with_fused_adam_swapped_to_adamw_keeping_fused(url: str, send: Send) -> None:
    model, x, y = problem()
    compiled = torch.compile(model)
    optimizer = torch.optim.Adam(compiled.parameters(), lr=1e-3, fused=True)
    with attach(optimizer, run="compiled", url=url) as live:
        for number in range(1, 7):
            step(compiled, live.optimizer, x, y)
            if number == 3:
                verdict = applied(send(live, number, {"optimizer": "adamw"}))
                assert verdict.detail["switch"]["carried"]["fused"] is True
            else:
                live.poll(number)
        assert isinstance(live.optimizer, torch.optim.AdamW)
        assert live.optimizer.defaults["fused"] is True
        assert live.optimizer.param_groups[0]["fused"] is True
        first = next(model.parameters())
        assert int(live.optimizer.state[first]["step"]) == 3


def test_plain_loop_grad_scaler_adamw_weight_decay_then_sgd(url: str, send: Send) -> None:
    model, x, y = problem()
    scaler = torch.amp.GradScaler("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    with attach(optimizer, run="scaler-adamw", url=url) as live:
        for number in range(1, 13):
            loss = torch.nn.functional.mse_loss(model(x), y)
            live.optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(live.optimizer)
            scaler.update()
            if number == 4:
                first = next(model.parameters())
                moments = live.optimizer.state[first]["exp_avg"].clone()
                verdict = applied(send(live, number, {"weight_decay": 0.1}))
                assert verdict.detail["changes"] == {"weight_decay": [0.01, 0.1]}
                assert live.optimizer is optimizer, "an edit keeps the optimizer and its moments"
                assert torch.equal(live.optimizer.state[first]["exp_avg"], moments)
            elif number == 8:
                verdict = applied(send(live, number, {"optimizer": "sgd"}))
                assert (
                    "weight_decay=0.1 (set in the config) was decoupled weight decay in adamw and is an L2 penalty "
                    "added to the gradient in sgd" in verdict.message
                )
                assert verdict.detail["switch"]["carried"]["weight_decay"] == 0.1
            else:
                live.poll(number)
        assert isinstance(live.optimizer, torch.optim.SGD)
        assert live.optimizer.param_groups[0]["weight_decay"] == 0.1
        assert live.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
