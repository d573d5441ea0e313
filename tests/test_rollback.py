"""Rolling a live run back after a forced loss spike (lr=100), in real Lightning fits and a plain loop, with a real
sidecar over a file:// transport: the rollback step restores the checkpoint bit for bit, the loss recovers, the
outcome names the checkpoint and both steps, and the desired config no longer holds the bad lr."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from weavelet_core import Outcome, Revision, Weaver, cli
from weavelet_lightning import WeaveletCallback
from weavelet_lightning.demo_model import DemoModel, make_data, make_loader
from weavelet_torch import SpikeGuard, attach

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

PACE_TIMEOUT = 30.0
Send = Callable[[Weaver, str], int]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "weavelet").as_uri()


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as w:
        yield w


def rev(written: Revision | Outcome) -> int:
    return written.revision


def checkpoint_now(w: Weaver, run: str) -> int:
    return rev(w.command(run, "checkpoint"))


def spike(w: Weaver, run: str) -> int:
    return rev(w.set(run, {"lr": 100.0}))


def rollback_by_cli(w: Weaver, run: str) -> int:
    assert cli.main(["--url", w.url, "rollback", run, "--to", "latest", "lr_scale=0.5"]) == 0
    latest = w.get(run)
    assert latest is not None
    return latest.revision


class Pacer(pl.Callback):
    """Sends the planned revisions at their steps, one at a time, holding training until each has a verdict;
    records the model and optimizer state right after the rollback's step (before the next update)."""

    def __init__(self, weaver: Weaver, run: str, plan: dict[int, Send], wc: WeaveletCallback) -> None:
        self.weaver, self.run, self.plan, self.wc = weaver, run, dict(plan), wc
        self.sent: list[int] = []
        self._since = 0.0
        self.after_rollback: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        decided = {v.revision: v for v in self.wc.verdicts}
        step = trainer.global_step
        waiting = bool(self.sent) and self.sent[-1] not in decided
        if not waiting and self.plan and min(self.plan) <= step:
            self.sent.append(self.plan.pop(min(self.plan))(self.weaver, self.run))
            self._since = time.monotonic()
        while self.sent and self.sent[-1] not in {v.revision for v in self.wc.verdicts}:
            if time.monotonic() - self._since > PACE_TIMEOUT:
                raise AssertionError(f"revision {self.sent[-1]} got no verdict in {PACE_TIMEOUT}s")
            time.sleep(0.01)
            self.wc._check(trainer)  # the next boundary would do the same; it keeps the plan's steps exact
        for verdict in self.wc.verdicts:
            if "rollback" in verdict.detail and self.after_rollback is None and verdict.step == trainer.global_step:
                self.after_rollback = {
                    "model": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                }


def fit(tmp_path: Path, callbacks: list[Any], steps: int) -> tuple[pl.Trainer, DemoModel]:
    torch.manual_seed(0)
    model = DemoModel(hidden=16, lr=0.02)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )
    trainer.fit(model, make_loader(make_data(512)))
    return trainer, model


def mean_loss(model: DemoModel, first: int, last: int) -> float:
    values = [loss for step, loss in model.losses if first <= step < last]
    return sum(values) / len(values)


def equal_states(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_states(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_lightning_rollback_after_a_forced_spike(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "spike-lightning"
    wc = WeaveletCallback(run, url, checkpoint_dir=tmp_path / "ckpt")
    pacer = Pacer(weaver, run, {10: checkpoint_now, 20: spike, 23: rollback_by_cli}, wc)
    _, model = fit(tmp_path, [wc, pacer], 60)

    by_revision = {o.revision: o for o in weaver.outcomes(run)}
    rolled = next(o for o in by_revision.values() if "rollback" in o.detail)
    assert rolled.result == "applied", rolled.message
    info = rolled.detail["rollback"]
    saved = torch.load(info["checkpoint"], map_location="cpu", weights_only=True)
    assert info["checkpoint_step"] == saved["global_step"] == 10
    assert info["step"] == rolled.step
    assert rolled.step >= 23
    assert "rolled back to" in rolled.message
    assert str(info["checkpoint"]) in rolled.message

    # Right after the rollback step, before the next update: the checkpoint's weights and optimizer state.
    assert pacer.after_rollback is not None
    assert equal_states(pacer.after_rollback["model"], saved["state_dict"])
    assert equal_states(pacer.after_rollback["optimizer"]["state"], saved["optimizer_states"][0]["state"])
    assert pacer.after_rollback["lr"] == pytest.approx(0.01)  # the checkpoint's 0.02, then lr_scale=0.5

    # The spike was real, and training recovered below its pre-spike level.
    spiked = max(loss for step, loss in model.losses if 20 < step <= rolled.step)
    assert not spiked < 100 * mean_loss(model, 15, 20)
    assert mean_loss(model, 50, 60) < mean_loss(model, 15, 20)

    # The desired config was rewritten: the lr that caused the spike is gone, the rollback's change stays.
    latest = weaver.get(run)
    assert latest is not None
    assert latest.revision > rolled.revision
    assert "lr" not in latest.config
    assert latest.config["lr_scale"] == 0.5
    assert latest.author.startswith("weavelet rollback of revision")
    assert by_revision[latest.revision].result == "applied"  # it changes nothing in the trainer, and acts once
    assert [v.revision for v in wc.verdicts if "rollback" in v.detail] == [rolled.revision]


def test_spike_guard_rolls_back_by_itself(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "spike-guard"
    guard = SpikeGuard(factor=4.0, window=8, patience=2, lr_scale=0.5, max_times=2, per_steps=100)
    wc = WeaveletCallback(run, url, checkpoint_dir=tmp_path / "ckpt", spike_guard=guard)

    def wait_for_guard(w: Weaver, run: str) -> int:
        deadline = time.monotonic() + PACE_TIMEOUT
        while time.monotonic() < deadline:
            for entry in w.history(run):
                if isinstance(entry, Revision) and entry.author.startswith("weavelet spike guard"):
                    return entry.revision
            time.sleep(0.02)
        raise AssertionError("the spike guard wrote no revision")

    pacer = Pacer(weaver, run, {12: checkpoint_now, 20: spike, 26: wait_for_guard}, wc)
    _, model = fit(tmp_path, [wc, pacer], 60)

    guard_revisions = [e for e in weaver.history(run) if isinstance(e, Revision) and "spike guard" in e.author]
    assert len(guard_revisions) == 1
    assert "loss" in guard_revisions[0].author
    assert "median" in guard_revisions[0].author
    outcome = weaver.outcome(run, guard_revisions[0].revision)
    assert outcome is not None
    assert outcome.result == "applied", outcome.message
    assert outcome.detail["rollback"]["checkpoint_step"] == 12
    assert mean_loss(model, 50, 60) < mean_loss(model, 14, 20)


# ------------------------------------------------------------------------------------------------ plain loop


def loop_setup(seed: int = 0, hidden: int = 16) -> tuple[torch.nn.Module, torch.optim.Optimizer, Iterator[Any]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def batches() -> Iterator[Any]:
        while True:
            yield from make_loader(make_data(512))

    return model, optimizer, batches()


def poll_until_verdict(live: Any, step: int) -> Any:
    deadline = time.monotonic() + PACE_TIMEOUT
    while time.monotonic() < deadline:
        verdict = live.poll(step)
        if verdict is not None:
            return verdict
        time.sleep(0.01)
    raise AssertionError(f"no verdict at step {step} within {PACE_TIMEOUT}s")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> float:
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss)


def test_plain_loop_rollback_after_a_forced_spike(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "spike-loop"
    model, optimizer, data = loop_setup()
    losses: dict[int, float] = {}
    with attach(optimizer, run=run, url=url, model=model, checkpoint_dir=tmp_path / "ckpt") as live:
        for step in range(1, 61):
            losses[step] = train_step(model, live.optimizer, next(data))
            send: Callable[[], Any] | None = {
                10: lambda: weaver.command(run, "checkpoint"),
                20: lambda: weaver.set(run, {"lr": 100.0}),
                24: lambda: weaver.rollback(run, "latest", {"lr_scale": 0.5}),
            }.get(step)
            if send is None:
                live.poll(step)
                continue
            send()
            verdict = poll_until_verdict(live, step)
            assert verdict.result == "applied", verdict.message
            if step == 24:
                info = verdict.detail["rollback"]
                saved = torch.load(info["checkpoint"], map_location="cpu", weights_only=True)
                assert info["checkpoint_step"] == saved["step"] == 10
                assert info["step"] == 24
                assert equal_states(model.state_dict(), saved["model"])
                assert equal_states(live.optimizer.state_dict()["state"], saved["optimizer"]["state"])
                assert live.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    pre = sum(losses[s] for s in range(15, 20)) / 5
    assert max(losses[s] for s in range(21, 25)) > 100 * pre
    assert sum(losses[s] for s in range(50, 60)) / 10 < pre
    outcome = weaver.outcomes(run)
    assert any("rollback" in o.detail and o.step == 24 for o in outcome)
    deadline = time.monotonic() + 10
    while (latest := weaver.get(run)) is not None and "lr" in latest.config and time.monotonic() < deadline:
        time.sleep(0.02)  # the rewrite is stored by the sidecar before it stops
    assert latest is not None
    assert "lr" not in latest.config
    assert latest.config.get("lr_scale") == 0.5


def test_mismatched_checkpoint_is_rejected_and_training_goes_on(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "spike-mismatch"
    other, other_optimizer, _ = loop_setup(seed=1, hidden=8)  # another model: other shapes
    wrong = tmp_path / "other-step5.pt"
    torch.save({"step": 5, "model": other.state_dict(), "optimizer": other_optimizer.state_dict()}, wrong)
    model, optimizer, data = loop_setup()
    losses: list[float] = []
    with attach(optimizer, run=run, url=url, model=model, checkpoint_dir=tmp_path / "ckpt") as live:
        for step in range(1, 31):
            losses.append(train_step(model, live.optimizer, next(data)))
            if step != 10:
                live.poll(step)
                continue
            before = {k: v.clone() for k, v in model.state_dict().items()}
            weaver.rollback(run, str(wrong), {"lr_scale": 0.5})
            verdict = poll_until_verdict(live, step)
            assert verdict.result == "rejected"
            assert "does not match the model" in verdict.message
            assert "net.0.weight" not in verdict.message
            assert "0.weight" in verdict.message
            assert "nothing was changed" in verdict.message
            assert equal_states(model.state_dict(), before)
            assert live.optimizer.param_groups[0]["lr"] == 0.02
    assert sum(losses[-5:]) < sum(losses[5:10])  # trained on untouched
    outcome = next(o for o in weaver.outcomes(run) if o.result == "rejected")
    assert "rollback" in outcome.detail["commands"]
