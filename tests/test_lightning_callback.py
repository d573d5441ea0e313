"""WeaveletCallback in real Lightning fits on CPU, with a real sidecar over a file:// transport."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import SingleDeviceStrategy

from weavelet_core import InvalidRunId, Outcome, ProtocolError, UnknownTransport, Weaver
from weavelet_lightning import WeaveletCallback
from weavelet_lightning.demo_model import DemoModel, make_data, make_loader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

PACE_TIMEOUT = 30.0


class Driver(pl.Callback):
    """Writes revisions at given global steps and slows training until each has a verdict in the trainer."""

    def __init__(
        self,
        weaver: Weaver,
        run: str,
        plan: Mapping[int, Mapping[str, Any]],
        wc: WeaveletCallback,
        *,
        replace: bool = False,
    ) -> None:
        self.weaver, self.run, self.plan, self.wc, self.replace = weaver, run, dict(plan), wc, replace
        self.sent: list[int] = []
        self.applied_at_batch: dict[int, int] = {}
        self._since = 0.0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        decided = {v.revision for v in self.wc.verdicts}
        for number in self.sent:
            if number in decided and number not in self.applied_at_batch:
                self.applied_at_batch[number] = batch_idx
        step = trainer.global_step
        # The next planned revision goes out at its step, or later if the previous one is still undecided:
        # in plan order, one at a time, so none supersedes another.
        waiting = bool(self.sent) and self.sent[-1] not in decided
        if not waiting and self.plan and min(self.plan) <= step:
            changes = self.plan.pop(min(self.plan))
            self.sent.append(self.weaver.set(self.run, changes, replace=self.replace).revision)
            self._since = time.monotonic()
        if self.sent and self.sent[-1] not in decided:
            if time.monotonic() - self._since > PACE_TIMEOUT:
                raise AssertionError(f"revision {self.sent[-1]} got no verdict in {PACE_TIMEOUT}s")
            time.sleep(0.01)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "weavelet").as_uri()


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as w:
        yield w


def trainer(callbacks: list[Any], tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_steps": 60,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def outcomes(weaver: Weaver, run: str) -> dict[int, Outcome]:
    return {o.revision: o for o in weaver.outcomes(run)}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------- the must-show fit


def test_switch_to_adam_mid_fit(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "swap-mid-fit"
    wc = WeaveletCallback(run, url)
    driver = Driver(weaver, run, {20: {"optimizer": "adam", "lr": 0.001}}, wc)
    model = DemoModel(lr=0.02)
    fit = trainer([wc, driver], tmp_path, max_steps=120)
    fit.fit(model, make_loader(make_data(1024)))

    outcome = outcomes(weaver, run)[1]
    assert outcome.result == "applied", outcome.message
    swap_step = outcome.step
    assert swap_step is not None
    assert 20 < swap_step < 120
    assert [v.step for v in wc.verdicts] == [swap_step]

    # Every optimizer step from the reported step on used Adam, every one before it SGD.
    stepped = dict(model.stepped)
    assert len(stepped) == 120
    assert {name for step, name in stepped.items() if step < swap_step} == {"SGD"}
    assert {name for step, name in stepped.items() if step >= swap_step} == {"Adam"}
    optimizer = fit.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 0.001
    for param in model.parameters():
        state = optimizer.state[param]
        assert int(state["step"]) == 120 - swap_step
        assert float(state["exp_avg_sq"].sum()) > 0
    assert fit.strategy._lightning_optimizers[0]._optimizer is optimizer

    # The loss keeps going down after the swap.
    losses = [loss for step, loss in model.losses if step >= swap_step]
    assert mean(losses[-20:]) < mean(losses[:20])

    status = weaver.status(run)
    assert status is not None
    assert status.state == "stopped"
    assert status.step == 120
    assert status.applied_revision == 1
    assert status.optimizer is not None
    assert status.optimizer["name"] == "adam"
    assert "loss" in status.metrics
    assert status.metrics["loss"] > 0


def test_applies_only_at_the_end_of_an_accumulation_window(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "accumulate"
    wc = WeaveletCallback(run, url)
    driver = Driver(weaver, run, {5: {"optimizer": "adam"}}, wc)
    model = DemoModel()
    fit = trainer([wc, driver], tmp_path, max_steps=20, accumulate_grad_batches=4)
    fit.fit(model, make_loader(make_data(1024)))

    verdict = wc.verdicts[0]
    assert verdict.result == "applied"
    assert (driver.applied_at_batch[1] + 1) % 4 == 0, "applied in the middle of gradient accumulation"
    assert verdict.step is not None
    assert int(fit.optimizers[0].state[next(model.parameters())]["step"]) == 20 - verdict.step


class ReplaceStepCounter(pl.Callback):
    """At ``at``, gives Lightning's optimizer-step counter a new object (as a loop's reset or a restore could):
    the one the step hook read at the fit's start stops advancing."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            step = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
            fresh = type(step.total)()
            fresh.load_state_dict(step.total.state_dict())
            step.total = fresh


def test_a_replaced_step_counter_is_noticed_and_changes_still_land(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "new-counter"
    wc = WeaveletCallback(run, url)
    driver = Driver(weaver, run, {8: {"lr": 0.05}, 14: {"stop": True}}, wc)
    fit = trainer([ReplaceStepCounter(at=4), wc, driver], tmp_path, max_steps=200)
    fit.fit(DemoModel(), make_loader(make_data(4096)))

    assert [v.result for v in wc.verdicts] == ["applied", "applied"], "a change sent after the new counter was lost"
    lr, stop = wc.verdicts
    # Each landed at the step Lightning counted: one optimizer step per batch here.
    assert lr.step == driver.applied_at_batch[lr.revision] + 1
    assert stop.step == driver.applied_at_batch[stop.revision] + 1 == fit.global_step
    status = weaver.status(run)
    assert status is not None
    assert status.step == fit.global_step


def test_a_fit_resumed_from_a_checkpoint_applies_at_the_steps_lightning_counts(
    tmp_path: Path, url: str, weaver: Weaver
) -> None:
    # Lightning restores the loop's progress from the checkpoint before training starts; the hook reads it from
    # there on (with gradient accumulation, so a wrong count would also land a change inside a window).
    data = make_data(2048)
    first = trainer([], tmp_path, max_steps=9, accumulate_grad_batches=3)
    first.fit(DemoModel(), make_loader(data))
    checkpoint = tmp_path / "at-9.ckpt"
    first.save_checkpoint(checkpoint)

    run = "resumed-steps"
    wc = WeaveletCallback(run, url)
    driver = Driver(weaver, run, {12: {"optimizer": "adam"}}, wc)
    model = DemoModel()
    second = trainer([wc, driver], tmp_path, max_steps=30, accumulate_grad_batches=3)
    second.fit(model, make_loader(data), ckpt_path=str(checkpoint))

    (swap,) = wc.verdicts
    assert swap.result == "applied"
    assert swap.step is not None
    assert 12 <= swap.step < 30
    assert (driver.applied_at_batch[swap.revision] + 1) % 3 == 0, "applied in the middle of gradient accumulation"
    assert int(second.optimizers[0].state[next(model.parameters())]["step"]) == 30 - swap.step


def test_applies_at_the_steps_lightning_counts_under_manual_optimization(
    tmp_path: Path, url: str, weaver: Weaver
) -> None:
    class TwoStepsABatch(DemoModel):
        """Manual optimization, stepping the optimizer twice a batch: global_step advances by 2."""

        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            optimizer = self.optimizers()
            for _ in range(2):
                loss = super().training_step(batch, batch_idx)
                optimizer.zero_grad()  # type: ignore[union-attr]
                self.manual_backward(loss)
                optimizer.step()  # type: ignore[union-attr]
            return loss

    run = "manual-steps"
    wc = WeaveletCallback(run, url)
    driver = Driver(weaver, run, {6: {"optimizer": "adam"}}, wc)
    fit = trainer([wc, driver], tmp_path, max_steps=40)
    fit.fit(TwoStepsABatch(), make_loader(make_data(4096)))

    (swap,) = wc.verdicts
    assert swap.result == "applied"
    assert swap.step == 2 * (driver.applied_at_batch[swap.revision] + 1)
    assert fit.global_step == 40


def test_scheduler_follows_the_new_optimizer(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "with-scheduler"
    wc = WeaveletCallback(run, url)
    driver = Driver(weaver, run, {4: {"optimizer": "adamw", "lr": 0.004}}, wc)
    model = DemoModel(scheduler_step=10)
    fit = trainer([wc, driver], tmp_path, max_steps=40)
    fit.fit(model, make_loader(make_data(1024)))

    assert wc.verdicts[0].result == "applied"
    optimizer = fit.optimizers[0]
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert isinstance(optimizer, torch.optim.AdamW)
    assert scheduler.optimizer is optimizer
    assert scheduler.last_epoch == 40
    # StepLR halves every 10 steps; the remote 0.004 took the place of the scheduled value at the swap.
    swap_step = wc.verdicts[0].step
    assert swap_step is not None
    assert swap_step < 10
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.004 * 0.5**4)


def test_swap_under_a_grad_scaler(tmp_path: Path, url: str, weaver: Weaver) -> None:
    """float16 AMP with a real GradScaler (on CPU): the swap happens after scaler.update(), no step is lost."""
    run = "grad-scaler"
    wc = WeaveletCallback(run, url)
    driver = Driver(weaver, run, {10: {"optimizer": "adam", "lr": 0.001}}, wc)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=5)
    scales = ScaleRecorder(scaler)
    model = DemoModel()
    fit = trainer(
        [wc, driver, scales], tmp_path, max_steps=40, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    )
    fit.fit(model, make_loader(make_data(1024)))

    verdict = wc.verdicts[0]
    assert verdict.result == "applied"
    assert verdict.step is not None
    assert {name for step, name in model.stepped if step >= verdict.step} == {"Adam"}
    # float16 may overflow now and then: the scaler then skips that step and halves its scale (torch's rule). No
    # other step is lost around the swap: Adam took every step after it that the scaler did not skip.
    skipped = [step for step, scale in scales.by_step.items() if scale < scales.by_step.get(step - 1, scale)]
    assert all(scales.by_step[s] == scales.by_step[s - 1] / 2 for s in skipped), scales.by_step
    adam_steps = int(fit.optimizers[0].state[next(model.parameters())]["step"])
    assert adam_steps == 40 - verdict.step - sum(1 for s in skipped if s > verdict.step), (skipped, verdict.step)
    if not skipped:
        assert scaler.get_scale() == 1024.0 * 2 ** (40 // 5), "the scaler lost steps around the swap"


class ScaleRecorder(pl.Callback):
    """The GradScaler's scale after each optimizer step, by global step."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.by_step[trainer.global_step] = self.scaler.get_scale()


# ---------------------------------------------------------------------------------------- commands


def test_stop_command_ends_the_fit(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "stop-me"
    wc = WeaveletCallback(run, url)
    driver = Driver(weaver, run, {6: {"stop": True}}, wc)
    fit = trainer([wc, driver], tmp_path, max_steps=500)
    fit.fit(DemoModel(), make_loader(make_data(1024)))
    outcome = outcomes(weaver, run)[1]
    assert outcome.result == "applied"
    assert outcome.step is not None
    assert fit.global_step == outcome.step
    assert fit.global_step < 50


def test_checkpoint_command_saves_a_resumable_checkpoint(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "save-me"
    wc = WeaveletCallback(run, url, checkpoint_dir=tmp_path / "ckpts")
    driver = Driver(weaver, run, {5: {"optimizer": "adam"}, 10: {"checkpoint": 1}}, wc)
    fit = trainer([wc, driver], tmp_path, max_steps=25)
    fit.fit(DemoModel(), make_loader(make_data(1024)))
    outcome = outcomes(weaver, run)[2]
    assert outcome.result == "applied"
    path = Path(str(outcome.detail["checkpoint"]))
    assert path.parent == tmp_path / "ckpts"
    assert path.exists()
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"]["WeaveletCallback"]
    assert state["optimizer"] == "adam"
    assert state["applied_revision"] == 2
    assert checkpoint["global_step"] == outcome.step


# ---------------------------------------------------------------------------------------- bad input


class TwoGroupModel(DemoModel):
    def configure_optimizers(self) -> Any:
        first, second = self.net[0], self.net[2]
        groups: list[dict[str, Any]] = [{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.01}]
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)


BAD: list[tuple[dict[str, Any], str]] = [
    ({"optimizer": "adamx"}, "unknown optimizer 'adamx'; did you mean 'adamax'? known: "),
    ({"lr": -1}, "lr: -1 is negative"),
    ({"lr": "nan"}, "lr: expected a number, got the string 'nan'"),
    ({"lr": "fast"}, "lr: expected a number, got the string 'fast'"),
    ({"betas": [2, 0.9]}, "betas: not a hyperparameter of sgd"),
    ({"optimizer": "adam", "betas": [2, 0.9]}, "set in revision 5: each value must be in [0, 1), got [2, 0.9]"),
    ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
    ({"momentum": 0.5}, "momentum: not in this run's allow-list"),
    ({"param_groups.9.lr": 0.1}, "param_groups.9.lr: the optimizer has 2 param groups"),
    ({"grad_clip_val": -1.0}, "grad_clip_val: its handler raised ValueError: must be >= 0"),
]


def test_bad_revisions_are_rejected_and_training_goes_on(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "bad-input"
    allow = ["optimizer", "lr", "betas", "weight_decay", "stop", "checkpoint"]
    wc = WeaveletCallback(run, url, allow=allow)
    clip: list[float] = []

    @wc.on("grad_clip_val")
    def set_clip(value: Any) -> None:
        if value < 0:
            raise ValueError("must be >= 0")
        clip.append(value)

    plan: dict[int, dict[str, Any]] = {2 + 3 * i: config for i, (config, _) in enumerate(BAD)}
    plan[2 + 3 * len(BAD)] = {"lr": 0.01, "grad_clip_val": 0.5}
    driver = Driver(weaver, run, plan, wc, replace=True)
    max_steps = 3 * len(BAD) + 20
    model = TwoGroupModel()
    fit = trainer([wc, driver], tmp_path, max_steps=max_steps)
    fit.fit(model, make_loader(make_data(1024)))

    assert fit.global_step == max_steps, "a bad revision stopped training"
    found = outcomes(weaver, run)
    for number, (config, expected) in enumerate(BAD, start=1):
        outcome = found[number]
        assert outcome.result == "rejected", (config, outcome)
        assert expected in (outcome.message or ""), (config, outcome.message)
        assert outcome.step is None
    last = found[len(BAD) + 1]
    assert last.result == "applied", last.message
    assert clip == [0.5]
    assert isinstance(fit.optimizers[0], torch.optim.SGD)
    assert [g["lr"] for g in fit.optimizers[0].param_groups] == [0.01, 0.01]


def test_nan_cannot_even_be_sent(url: str, weaver: Weaver) -> None:
    with pytest.raises(ProtocolError, match="lr"):
        weaver.set("nan-run", {"lr": float("nan")})


class OwnsOptimizerStrategy(SingleDeviceStrategy):
    """Stands in for DeepSpeed: the strategy restores optimizer state itself."""

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False


def test_strategy_that_owns_its_optimizer_refuses_a_swap(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "owns-optimizer"
    wc = WeaveletCallback(run, url)
    driver = Driver(weaver, run, {3: {"optimizer": "adam", "lr": 0.001}, 8: {"lr": 0.001}}, wc, replace=True)
    fit = trainer([wc, driver], tmp_path, max_steps=20, strategy=OwnsOptimizerStrategy(torch.device("cpu")))
    fit.fit(DemoModel(), make_loader(make_data(1024)))
    found = outcomes(weaver, run)
    assert found[1].result == "rejected"
    assert "OwnsOptimizerStrategy strategy manages its own optimizer" in (found[1].message or "")
    assert found[2].result == "applied"
    assert isinstance(fit.optimizers[0], torch.optim.SGD)
    assert fit.optimizers[0].param_groups[0]["lr"] == 0.001
    assert fit.global_step == 20


# ---------------------------------------------------------------------------------------- lifecycle


class Explodes(DemoModel):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.trainer.global_step == 5:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_sidecar_stops_when_the_fit_fails(tmp_path: Path, url: str, weaver: Weaver) -> None:
    wc = WeaveletCallback("explodes", url)
    fit = trainer([wc], tmp_path, max_steps=20)
    with pytest.raises(RuntimeError, match="boom"):
        fit.fit(Explodes(), make_loader(make_data(1024)))
    process = wc.process
    assert process is not None
    assert process.state == "failed"  # the run ended by an exception: its status says which
    assert process.pid is None
    status = weaver.status("explodes")
    assert status is not None
    assert status.state == "failed"
    assert status.message is not None
    assert "RuntimeError: boom" in status.message
    assert status.step == 5


def test_run_id_from_environment(tmp_path: Path, url: str, weaver: Weaver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEAVELET_RUN", "from-env")
    wc = WeaveletCallback(url=url)
    trainer([wc], tmp_path, max_steps=3).fit(DemoModel(), make_loader(make_data(256)))
    assert wc.run == "from-env"
    assert weaver.status("from-env") is not None


def test_generated_run_id_is_printed(
    tmp_path: Path, url: str, weaver: Weaver, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WEAVELET_RUN", raising=False)
    wc = WeaveletCallback(url=url)
    trainer([wc], tmp_path, max_steps=3).fit(DemoModel(), make_loader(make_data(256)))
    run = wc.run
    assert run is not None
    assert run.startswith("run-")
    assert f"weavelet set {run} lr=" in capfd.readouterr().err
    assert weaver.runs() == [run]


def test_no_sidecar_left_behind(tmp_path: Path, url: str) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    wc = WeaveletCallback("leftovers", url)
    trainer([wc], tmp_path, max_steps=3).fit(DemoModel(), make_loader(make_data(256)))
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"}
    assert after <= before


def test_lightning_example_runs(tmp_path: Path, url: str, weaver: Weaver) -> None:
    script = Path(__file__).parent.parent / "examples" / "lightning_fit.py"
    done = subprocess.run(
        [sys.executable, str(script), "--run", "example-lightning", "--url", url, "--steps", "40"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    status = weaver.status("example-lightning")
    assert status is not None
    assert (status.state, status.step) == ("stopped", 40)
    assert "loss" in status.metrics


def test_bad_run_id_or_url_fails_when_the_callback_is_made() -> None:
    with pytest.raises(InvalidRunId, match="invalid run id"):
        WeaveletCallback("no spaces please")
    with pytest.raises(UnknownTransport, match="kafka"):
        WeaveletCallback("ok", "kafka://127.0.0.1:9092")


def test_state_of_a_callback_outside_a_fit() -> None:
    state = WeaveletCallback("idle").state_dict()
    assert state["optimizer"] is None
    assert state["applied_revision"] == 0
