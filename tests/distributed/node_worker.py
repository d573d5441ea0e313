"""One rank of a multi-node DDP loop with ``attach()``, started by ``torchrun`` on each node; not a test module.

``torchrun ... node_worker.py OUT``; the run and transport come from ``WEAVELET_RUN`` and ``WEAVELET_URL``. The
loop trains until a ``stop`` command (or ``DEADLINE`` seconds), ~20 ms a step, writes ``OUT/progress<rank>.json``
every few steps (step, optimizer, lr, time) and at the end ``OUT/rank<rank>.json``: every step's optimizer and lr,
its verdicts, where it stopped, its weights.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DEADLINE = 150.0


def write(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def main(out: str) -> None:
    from weavelet_torch import attach

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)
    steps: list[list[Any]] = []
    verdicts: list[list[Any]] = []
    started = time.monotonic()
    record: dict[str, Any] = {"rank": rank, "node": os.environ.get("GROUP_RANK"), "host": socket.gethostname()}
    with attach(optimizer, report_interval=0.2) as live:
        record["has_weavelet"] = live.process is not None
        step = 0
        while time.monotonic() - started < DEADLINE:
            step += 1
            x = torch.randn(16, 8, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
            loss.backward()
            live.optimizer.step()
            live.optimizer.zero_grad()
            steps.append([step, type(live.optimizer).__name__, live.optimizer.param_groups[0]["lr"]])
            time.sleep(0.02)
            verdict = live.poll(step, loss=loss.detach())
            if verdict is not None:
                verdicts.append(
                    [verdict.revision, verdict.result, verdict.step, verdict.detail.get("ranks_agree", True)]
                )
            if step % 5 == 0 or verdict is not None:
                progress = {"step": step, "optimizer": steps[-1][1], "lr": live.optimizer.param_groups[0]["lr"]}
                write(Path(out, f"progress{rank}.json"), {**progress, "time": time.time(), "verdicts": verdicts})
            if live.should_stop:
                record["stopped_at"] = step
                break
    record["steps"] = steps
    record["verdicts"] = verdicts
    record["weights"] = [p.detach().flatten().tolist() for p in model.parameters()]
    write(Path(out, f"rank{rank}.json"), record)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
