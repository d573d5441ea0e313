"""Two-rank DDP on CPU (gloo): rank 0 runs the weavelet, both ranks apply the swap at the same global step.

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

RUN = "ddp-two-ranks"


def script(url: str, out: str) -> None:
    import pytorch_lightning as pl

    from weavelet_core import Weaver
    from weavelet_lightning import WeaveletCallback
    from weavelet_lightning.demo_model import DemoModel, make_data, make_loader

    class SendFromRankZero(pl.Callback):
        def __init__(self, wc: WeaveletCallback) -> None:
            self.wc = wc
            self.sent_at: float | None = None

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if not trainer.is_global_zero:
                return
            if trainer.global_step == 5 and self.sent_at is None:
                with Weaver(url) as weaver:
                    weaver.set(RUN, {"optimizer": "adam", "lr": 0.002})
                self.sent_at = time.monotonic()
            if self.sent_at is not None and not self.wc.verdicts:
                if time.monotonic() - self.sent_at > 60:
                    raise AssertionError("the revision got no verdict within 60 s")
                time.sleep(0.01)

    wc = WeaveletCallback(RUN, url)
    model = DemoModel()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=30,
        callbacks=[wc, SendFromRankZero(wc)],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    trainer.fit(model, make_loader(make_data(2048)))
    optimizer = trainer.optimizers[0]
    first = next(model.parameters())
    record = {
        "rank": trainer.global_rank,
        "has_weavelet": wc.process is not None,
        "verdicts": [[v.revision, v.result, v.step] for v in wc.verdicts],
        "stepped": model.stepped,
        "optimizer": type(optimizer).__name__,
        "state_step": int(optimizer.state[first]["step"]) if "step" in optimizer.state.get(first, {}) else None,
        "weights": float(sum(p.detach().sum() for p in model.parameters())),
    }
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_both_ranks_swap_at_the_same_global_step(tmp_path: Path) -> None:
    from weavelet_core import Weaver

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

    with Weaver(url) as weaver:
        outcome = weaver.outcome(RUN, 1)
    assert outcome is not None
    assert outcome.result == "applied", outcome
    step = outcome.step
    assert step is not None
    assert 5 < step < 30
    assert [r["has_weavelet"] for r in ranks] == [True, False]
    for record in ranks:
        assert record["verdicts"] == [[1, "applied", step]], record
        assert record["optimizer"] == "Adam"
        assert record["state_step"] == 30 - step
        assert {name for s, name in record["stepped"] if s < step} == {"SGD"}
        assert {name for s, name in record["stepped"] if s >= step} == {"Adam"}
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6), "ranks diverged"


if __name__ == "__main__":
    script(sys.argv[1], sys.argv[2])
