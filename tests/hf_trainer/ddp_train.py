"""Run by test_torchrun.py under ``torchrun --nproc_per_node 2``: a Trainer on CPU (gloo) with WeaveletCallback on
every rank. Rank 0 writes the planned revisions (one at a time, pacing training until each is decided); every rank
writes what it saw to ``<out>/rank<r>.json``: the optimizer type and lr after each step, and its verdicts."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from weavelet_core import Weaver
from weavelet_transformers import WeaveletCallback

PLAN: dict[int, dict[str, Any]] = {
    3: {"optimizer": "adam", "lr_scale": 0.5},
    6: {"betas": [0.9, 1.5]},
    8: {"betas": [0.9, 0.99], "lr": 2e-4},
}
"""Revision 2 is rejected (a beta above 1); revisions 1 and 3 apply."""


class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Record(transformers.TrainerCallback):  # type: ignore[misc]
    def __init__(self, wc: WeaveletCallback, weaver: Weaver | None, run: str) -> None:
        self.wc, self.weaver, self.run = wc, weaver, run
        self.plan = dict(PLAN)
        self.sent: list[int] = []
        self.types: dict[int, str] = {}
        self.lrs: dict[int, float] = {}
        self.since = 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        optimizer = kwargs["optimizer"]
        self.types[state.global_step] = type(optimizer.optimizer).__name__
        self.lrs[state.global_step] = float(optimizer.param_groups[0]["lr"])
        if self.weaver is None:
            return control
        decided = {v.revision for v in self.wc.verdicts}
        if self.sent and self.sent[-1] not in decided:  # pace training (bounded) until rank 0 decided it
            if time.monotonic() - self.since > 30:
                raise AssertionError(f"revision {self.sent[-1]} got no verdict in 30 s")
            time.sleep(0.01)
        elif self.plan and min(self.plan) <= state.global_step:
            self.sent.append(self.weaver.set(self.run, self.plan.pop(min(self.plan))).revision)
            self.since = time.monotonic()
            assert self.wc.process is not None
            while not self.wc.process.waiting:  # it reached rank 0's trainer: the next step end shares it
                if time.monotonic() - self.since > 30:
                    raise AssertionError(f"revision {self.sent[-1]} did not reach the trainer in 30 s")
                time.sleep(0.005)
        return control


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weavelet-url", required=True)
    parser.add_argument("--weavelet-run", required=True)
    parser.add_argument("--record-dir", required=True)
    options = parser.parse_args()
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(Path(options.record_dir) / "trainer"),
        per_device_train_batch_size=2,
        max_steps=16,
        learning_rate=1e-3,
        warmup_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
        ddp_backend="gloo",
    )
    wc = WeaveletCallback(options.weavelet_run, options.weavelet_url)
    weaver = Weaver(options.weavelet_url) if rank == 0 else None
    record = Record(wc, weaver, options.weavelet_run)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[wc, record])
    trainer.train()
    if weaver is not None:
        weaver.close()
    verdicts = [[v.revision, v.result, v.step] for v in wc.verdicts]
    result = {
        "rank": rank,
        "world_size": args.world_size,
        "types": record.types,
        "lrs": record.lrs,
        "verdicts": verdicts,
        "sidecar": wc.process is not None,
    }
    Path(options.record_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
