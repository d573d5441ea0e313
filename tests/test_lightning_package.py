"""The callback under the ``lightning`` package's trainer (``lightning.pytorch``), not only ``pytorch_lightning``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch

from weavelet_core import Weaver
from weavelet_lightning import WeaveletCallback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

MAX_STEPS = 400  # the revision is sent at step 10; steps slow to 50 ms until it is decided


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.stepped: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.stepped.append(type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class SendAt(L.Callback):
    """Writes one revision at a global step, then slows training (not blocks: the callback decides at the next
    step boundary) until the callback has decided it."""

    def __init__(self, weaver: Weaver, run: str, step: int, wc: WeaveletCallback) -> None:
        self.weaver, self.run, self.step, self.wc = weaver, run, step, wc
        self.sent = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.weaver.set(self.run, {"optimizer": "adam", "lr": 0.001})
            self.sent = True
        if self.sent and not self.wc.verdicts:
            time.sleep(0.05)


def test_swap_under_a_lightning_pytorch_trainer(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    run = "lightning-package"
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = Regression()
    with Weaver(url) as weaver:
        wc = WeaveletCallback(run, url)
        trainer = L.Trainer(
            callbacks=[wc, SendAt(weaver, run, 10, wc)],  # type: ignore[list-item]  # typed as pytorch_lightning
            max_steps=MAX_STEPS,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
        outcome = weaver.outcome(run, 1)

    # In a process that imported pytorch_lightning first (the whole test suite does), the callback derives from its
    # Callback only, and lightning.pytorch's trainer still runs it: Lightning calls callback hooks by name.
    assert wc in trainer.callbacks
    assert outcome is not None
    assert outcome.result == "applied", outcome.message
    assert outcome.step is not None
    swap = outcome.step
    assert 10 <= swap < MAX_STEPS
    assert model.stepped[:swap] == ["SGD"] * swap
    assert set(model.stepped[swap:]) == {"Adam"}
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.001


@pytest.mark.parametrize(
    ("imported", "loaded"),
    [
        ("lightning.pytorch", ["lightning.pytorch"]),
        ("pytorch_lightning", ["pytorch_lightning"]),
        (None, ["lightning.pytorch", "pytorch_lightning"]),
    ],
)
def test_the_callback_loads_only_the_lightning_package_in_use(
    imported: str | None, loaded: list[str], isolated_env: dict[str, str]
) -> None:
    """Imported after one Lightning package, the callback derives from that one's Callback and never imports the
    other; imported first, it derives from both, so a trainer of either accepts it."""
    script = (
        "import sys\n"
        + (f"import {imported}\n" if imported else "")
        + "from weavelet_lightning import WeaveletCallback\n"
        "import json\n"
        "packages = [m for m in ('lightning.pytorch', 'pytorch_lightning') if m in sys.modules]\n"
        "bases = [m for m in packages if issubclass(WeaveletCallback, sys.modules[m].Callback)]\n"
        "print(json.dumps([packages, bases]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=isolated_env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [loaded, loaded]
