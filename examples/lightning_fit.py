"""A Lightning fit you can reconfigure while it runs.

    pip install "weavelet[lightning]"
    python examples/lightning_fit.py --run mlp-lightning

Then, in another terminal (same user, same machine; or set WEAVELET_URL on both sides):

    weavelet set mlp-lightning optimizer=adam lr=0.001   # switch SGD to Adam at the next optimizer step
    weavelet set mlp-lightning lr=0.0003                 # the StepLR schedule continues from the new value
    weavelet set mlp-lightning grad_clip_val=1.0         # a key of this script's own (handler below)
    weavelet set mlp-lightning checkpoint=1              # save a checkpoint now
    weavelet set mlp-lightning stop=true                 # end the fit cleanly
    weavelet status mlp-lightning

Resume from a checkpoint (``--resume PATH``): the callback recreates the optimizer that was active before
Lightning loads its state, then applies only revisions newer than the last one applied.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from weavelet_lightning import WeaveletCallback


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)  # logged metrics go into the run's status
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2000, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=generator)
    y = torch.tanh(x @ torch.randn(16, 1, generator=generator))
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", "--run-id", dest="run", default=None,
        help="run id (default: $WEAVELET_RUN, else generated and printed); under torchrun write --run-id, since "
        "torchrun takes --run for its own --run-path",
    )  # fmt: skip
    parser.add_argument("--url", default=None, help="transport URL (default: $WEAVELET_URL, else a per-user directory)")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from")
    args = parser.parse_args()

    weavelet = WeaveletCallback(run=args.run, url=args.url, checkpoint_dir="checkpoints")

    def check_clip(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError("send a positive number")

    @weavelet.on("grad_clip_val", validate=check_clip)
    def set_clip(value: Any) -> None:
        trainer.gradient_clip_val = float(value)  # Lightning reads it at every optimizer step

    trainer = pl.Trainer(max_steps=args.steps, accelerator="auto", devices=1, callbacks=[weavelet], logger=False)
    trainer.fit(Regressor(), make_loader(), ckpt_path=args.resume)


if __name__ == "__main__":
    main()
