"""Two-rank DDP on CPU (gloo): a rollback after a forced lr=100 spike restores the same checkpoint on both ranks at
the same global step; the weights are identical across ranks right after it.

The test runs this file as a script; Lightning's launcher starts rank 1 by running it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

RUN = "ddp-rollback"


def script(url: str, out: str) -> None:
    import pytorch_lightning as pl
    import torch

    from weavelet_core import Weaver
    from weavelet_lightning import WeaveletCallback
    from weavelet_lightning.demo_model import DemoModel, make_data, make_loader

    class Plan(pl.Callback):
        """Rank 0 writes checkpoint, lr=100, then rollback, each once the previous one has a verdict."""

        def __init__(self, wc: WeaveletCallback) -> None:
            self.wc = wc
            self.sent = 0
            self.since = time.monotonic()
            self.after: dict[str, Any] | None = None

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            for verdict in self.wc.verdicts:
                if "rollback" in verdict.detail and self.after is None:
                    assert verdict.step == trainer.global_step
                    self.after = {
                        "step": verdict.step,
                        "weights": [p.detach().flatten().tolist()[:50] for p in pl_module.parameters()],
                        "checkpoint": verdict.detail["rollback"]["checkpoint"],
                    }
            if not trainer.is_global_zero or trainer.global_step < 5:
                return
            if self.sent == len(self.wc.verdicts) and self.sent < 3:
                with Weaver(url) as weaver:
                    if self.sent == 0:
                        weaver.command(RUN, "checkpoint")
                    elif self.sent == 1:
                        weaver.set(RUN, {"lr": 100.0})
                    else:
                        weaver.rollback(RUN, "latest", {"lr_scale": 0.5})
                self.sent += 1
                self.since = time.monotonic()
            if self.sent > len(self.wc.verdicts):
                if time.monotonic() - self.since > 60:
                    raise AssertionError("a revision got no verdict within 60 s")
                time.sleep(0.01)

    wc = WeaveletCallback(RUN, url, checkpoint_dir=Path(out) / "ckpt")
    plan = Plan(wc)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=80,
        callbacks=[wc, plan],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    trainer.fit(DemoModel(hidden=16, lr=0.02), make_loader(make_data(1024)))
    assert plan.after is not None, "no rollback happened"
    saved = torch.load(plan.after["checkpoint"], map_location="cpu", weights_only=True)
    plan.after["equals_checkpoint"] = [v.flatten().tolist()[:50] for v in saved["state_dict"].values()] == plan.after[
        "weights"
    ]
    plan.after["verdicts"] = [[v.revision, v.result, v.step] for v in wc.verdicts]
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(plan.after))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_both_ranks_roll_back_to_identical_weights(tmp_path: Path) -> None:
    url = (tmp_path / "weavelet").as_uri()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEAVELET_", "LOCAL_RANK", "NODE_RANK"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, url, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"]
    assert ranks[0]["verdicts"] == ranks[1]["verdicts"]
    assert ranks[0]["weights"] == ranks[1]["weights"], "ranks diverged after the rollback"
    assert ranks[0]["equals_checkpoint"]
    assert ranks[1]["equals_checkpoint"]


if __name__ == "__main__":
    script(sys.argv[1], sys.argv[2])
