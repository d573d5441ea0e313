"""Public scenarios in real Lightning fits on CPU, each with a live weavelet sidecar over a file:// store."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    BackboneFinetuning,
    EarlyStopping,
    LearningRateMonitor,
    StochasticWeightAveraging,
)
from pytorch_lightning.loggers import CSVLogger

from weavelet_core import Weaver
from weavelet_lightning import WeaveletCallback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

Make = Callable[..., pl.Trainer]
DriverFn = Callable[[WeaveletCallback, Mapping[int, Mapping[str, Any]]], Any]


def test_accumulate_grad_batches_4_with_a_step_scheduler_and_lr_monitor(
    url: str, tiny: Any, loader: Any, make_trainer: Make, driver: DriverFn, tmp_path: Path
) -> None:
    def optimizers(module: pl.LightningModule) -> Any:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    wc = WeaveletCallback("accumulate-4", url)
    drive = driver(wc, {3: {"lr": 0.02}})
    monitor = LearningRateMonitor(logging_interval="step")
    logger = CSVLogger(str(tmp_path), name="lr")
    model = tiny(optimizers)
    fit = make_trainer(
        [wc, drive, monitor], max_steps=12, accumulate_grad_batches=4, logger=logger, log_every_n_steps=1
    )
    fit.fit(model, loader())

    verdict = drive.outcomes[1]
    assert verdict.result == "applied", verdict.message
    assert (drive.batch_of[1] + 1) % 4 == 0, "a change lands only at the end of an accumulation window"
    at = verdict.step
    assert at is not None
    lrs = {step: lr for step, (_, lr) in model.steps.items()}
    # Steps before the change follow StepLR from 0.1; from the change on the schedule continues from 0.02.
    assert lrs[at - 1] != pytest.approx(0.02)
    assert lrs[at] == pytest.approx(0.02), "the next optimizer step runs at the new value"
    assert all(lr <= 0.02 + 1e-12 for step, lr in lrs.items() if step >= at)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("lr-SGD")]
    monitored = {int(row["step"]): float(row["lr-SGD"]) for row in logged}
    assert monitored[at] == pytest.approx(lrs[at]), "LearningRateMonitor sees the remote change"


class Gan(pl.LightningModule):
    """Lightning's GAN template in miniature: manual optimization, a generator and a discriminator."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.generator = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        self.used: list[tuple[str, str]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        z = torch.randn(real.shape[0], 2)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        fake = self.generator(z)
        g_loss = bce(self.discriminator(fake), torch.ones(real.shape[0], 1))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        d_loss = bce(self.discriminator(real), torch.ones(real.shape[0], 1)) + bce(
            self.discriminator(fake.detach()), torch.zeros(real.shape[0], 1)
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.used.append((type(opt_g.optimizer).__name__, type(opt_d.optimizer).__name__))

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        ]


def test_manual_optimization_gan_steering_both_optimizers(url: str, driver: DriverFn, make_trainer: Make) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(128, 4)), batch_size=8)
    wc = WeaveletCallback("gan", url, optimizers={"generator": 0, "discriminator": 1})
    change = {"generator": {"lr": 1e-4}, "discriminator": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.5}}
    drive = driver(wc, {6: change})
    model = Gan()
    fit = make_trainer([wc, drive], max_steps=32)
    fit.fit(model, data)

    verdict = drive.outcomes[1]
    assert verdict.result == "applied", verdict.message
    generator, discriminator = fit.optimizers
    assert isinstance(generator, torch.optim.Adam)
    assert generator.param_groups[0]["lr"] == 1e-4
    assert generator.param_groups[0]["betas"] == (0.5, 0.999), "the generator is edited in place"
    assert isinstance(discriminator, torch.optim.SGD)
    assert discriminator.param_groups[0]["momentum"] == 0.5
    batch = drive.batch_of[1]
    assert set(model.used[: batch + 1]) == {("Adam", "Adam")}
    assert set(model.used[batch + 1 :]) == {("Adam", "SGD")}, "self.optimizers() hands out the new one"
    state = wc.state_dict()
    assert state["optimizers"] == {"generator": "adam", "discriminator": "sgd"}
    assert wc.state_key == "WeaveletCallback[optimizers=generator=0,discriminator=1]"
    # A second callback on the same optimizers is refused before any sidecar starts, pointing to this form.
    second = make_trainer(
        [WeaveletCallback("gan-b", url, optimizer_index=1), WeaveletCallback("gan-a", url, optimizers={"d": 1})],
        max_steps=2,
    )
    with pytest.raises(ValueError, match=r"both steer optimizer index 1; steer several optimizers with one callback"):
        second.fit(Gan(), data)


def test_reduce_lr_on_plateau_epoch_interval(
    url: str, tiny: Any, loader: Any, make_trainer: Make, driver: DriverFn
) -> None:
    schedulers: list[torch.optim.lr_scheduler.ReduceLROnPlateau] = []

    def optimizers(module: pl.LightningModule) -> Any:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5, min_lr=0.01)
        schedulers.append(plateau)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss_epoch", "interval": "epoch"},
        }

    wc = WeaveletCallback("plateau", url)
    drive = driver(wc, {3: {"lr_scale": 0.5}, 10: {"optimizer": "adam"}})
    fit = make_trainer([wc, drive], max_epochs=4, max_steps=-1)
    fit.fit(tiny(optimizers), loader(64))

    assert [v.result for v in drive.outcomes.values()] == ["applied", "applied"], drive.outcomes
    plateau = schedulers[0]
    assert plateau.min_lrs == [pytest.approx(0.005)], "lr_scale scales the plateau's floor too"
    assert isinstance(fit.optimizers[0], torch.optim.Adam)
    assert plateau.optimizer is fit.optimizers[0], "the epoch-interval scheduler follows the new optimizer"
    assert fit.current_epoch == 4


def test_stochastic_weight_averaging(url: str, tiny: Any, loader: Any, make_trainer: Make, driver: DriverFn) -> None:
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1, annealing_epochs=1)
    wc = WeaveletCallback("swa", url)
    drive = driver(wc, {12: {"lr": 0.01}})  # epoch 1 (8 steps each): SWALR drives the lr by then
    fit = make_trainer([wc, drive, swa], max_epochs=3, max_steps=-1)
    fit.fit(tiny(), loader(64))

    verdict = drive.outcomes[1]
    assert verdict.result == "applied", verdict.message
    swalr = fit.lr_scheduler_configs[0].scheduler
    assert type(swalr).__name__ == "SWALR"
    assert fit.optimizers[0].param_groups[0]["swa_lr"] == pytest.approx(0.01), "SWALR continues at the new value"
    assert swa._average_model is not None
    assert fit.current_epoch == 3


def test_resume_from_a_checkpoint_written_after_a_swap(
    url: str, weaver: Weaver, tiny: Any, loader: Any, make_trainer: Make, driver: DriverFn
) -> None:
    wc = WeaveletCallback("resume-swap", url)
    drive = driver(wc, {4: {"optimizer": "adam", "lr": 0.003}, 8: {"checkpoint": "after-swap"}})
    fit = make_trainer([wc, drive], max_steps=12)
    model = tiny()
    fit.fit(model, loader())
    saved = drive.outcomes[2]
    assert saved.result == "applied", saved.message
    path = saved.detail["checkpoint"]
    swapped_at = drive.outcomes[1].step
    assert swapped_at is not None

    again = WeaveletCallback("resume-swap", url)
    resumed = tiny()
    fit2 = make_trainer([again], max_steps=16)
    fit2.fit(resumed, loader(), ckpt_path=path)
    optimizer = fit2.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adam), "the checkpoint's optimizer type is recreated before loading"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.003)
    first = next(resumed.parameters())
    assert int(optimizer.state[first]["step"]) == 16 - swapped_at, "Adam's state came back and kept counting"
    assert {name for step, (name, _) in resumed.steps.items()} == {"Adam"}
    assert list(again.verdicts) == [], "revisions already applied are not applied again"


def test_backbone_finetuning_added_groups(
    url: str, tiny: Any, loader: Any, make_trainer: Make, driver: DriverFn
) -> None:
    class Finetune(tiny):  # type: ignore[misc,valid-type]
        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=0.01)

    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    wc = WeaveletCallback("finetune", url)
    # Epoch 0 has one group (the head); the backbone's group arrives at epoch 1 (8 steps each).
    drive = driver(wc, {2: {"param_groups.1.lr": 0.5}, 10: {"param_groups.1.lr": 0.002, "lr": 0.005}})
    fit = make_trainer([wc, drive, finetuning], max_epochs=2, max_steps=-1)
    fit.fit(Finetune(), loader(64))

    before, after = drive.outcomes[1], drive.outcomes[2]
    assert before.result == "rejected"
    assert before.message == "param_groups.1.lr: the optimizer has 1 param group (indexes 0 to 0)"
    assert after.result == "applied", after.message
    groups = fit.optimizers[0].param_groups
    assert len(groups) == 2
    assert groups[1]["lr"] == pytest.approx(0.002)
    assert groups[0]["lr"] == pytest.approx(0.005)
    assert wc.applier.schema()["optimizers"][0]["param_groups"] == 2


def test_early_stopping_with_a_remote_stop(
    url: str, weaver: Weaver, tiny: Any, loader: Any, make_trainer: Make, driver: DriverFn
) -> None:
    early = EarlyStopping(monitor="train_loss_epoch", patience=100, mode="min")
    wc = WeaveletCallback("early-stop", url)
    drive = driver(wc, {5: {"stop": "now"}})
    fit = make_trainer([wc, drive, early], max_epochs=50, max_steps=-1)
    fit.fit(tiny(), loader(64))

    verdict = drive.outcomes[1]
    assert verdict.stop
    assert verdict.commands == {"stop": "stopping at the end of this step"}
    assert verdict.step is not None
    assert fit.global_step <= verdict.step + 1, "it ended at the step the stop arrived"
    assert fit.current_epoch < 2, "the remote stop ended the fit long before EarlyStopping would"
    assert early.wait_count < 100
    status = weaver.status("early-stop")
    assert status is not None
    assert status.state == "stopped"


def test_grad_clip_val_handler(url: str, tiny: Any, loader: Any, make_trainer: Make, driver: DriverFn) -> None:
    norms: list[float] = []

    class Measure(pl.Callback):
        def on_before_zero_grad(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            # The gradients of the step just taken, as Lightning clipped them.
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                norms.append(float(torch.nn.utils.get_total_norm(grads)))

    wc = WeaveletCallback("clip", url)
    fit = make_trainer([], max_steps=12, gradient_clip_val=None)

    def positive(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError("send a positive number")

    @wc.on("grad_clip_val", validate=positive)
    def set_clip(value: Any) -> None:
        fit.gradient_clip_val = float(value)

    drive = driver(wc, {3: {"grad_clip_val": 0}, 6: {"grad_clip_val": 1e-3}})
    fit.callbacks[:0] = [wc, drive, Measure()]
    model = tiny()
    fit.fit(model, loader())

    refused, accepted = drive.outcomes[1], drive.outcomes[2]
    assert refused.result == "rejected"
    assert refused.message.startswith("grad_clip_val: send a positive number")
    assert accepted.result == "applied", accepted.message
    assert "handled grad_clip_val" in accepted.message
    assert fit.gradient_clip_val == 1e-3
    assert max(norms[:3]) > 1e-2, "unclipped before"
    assert max(norms[-3:]) <= 1e-3 * 1.001, "clipped to the remote value after"
    assert wc.applier.schema()["handlers"] == ["grad_clip_val"]
