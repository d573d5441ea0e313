"""The trainer of the chaos test (run as a script): a plain loop with ``attach()`` that records, as JSON lines,
every revision it applied and every command it carried out, from its own verdicts.

Usage: ``python chaos_trainer.py URL RUN RECORD_FILE CHECKPOINT_DIR MAX_SECONDS``. Prints ``ready PID INCARNATION``
once its weavelet runs; ends when a ``stop`` command acts (or after MAX_SECONDS).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from weavelet_core.testing.history import command_target
from weavelet_torch import attach


def main() -> None:
    url, run, record_path, checkpoint_dir, max_seconds = sys.argv[1:6]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"heartbeat_interval": 0.2, "restart_backoff": (0.1, 0.5), "max_restarts": None}
    with (
        attach(
            optimizer, run=run, url=url, model=model, checkpoint_dir=checkpoint_dir, process_options=options
        ) as live,
        open(record_path, "a", encoding="utf-8") as record,
    ):
        process = live.process
        print("ready", process.pid, process.incarnation, flush=True)
        deadline = time.monotonic() + float(max_seconds)
        step = 0
        while time.monotonic() < deadline and not live.should_stop:
            x = torch.randn(8, 4)
            loss = model(x).pow(2).mean()
            live.optimizer.zero_grad()
            loss.backward()
            live.optimizer.step()
            step += 1
            verdict = live.poll(step, loss=loss)
            if verdict is None:
                time.sleep(0.002)
                continue
            revision = process.handed_out_revision
            assert revision is not None
            assert revision.revision == verdict.revision
            if verdict.result == "applied":
                item = {"incarnation": process.incarnation, "revision": verdict.revision, "step": verdict.step}
                record.write(json.dumps({"applied": {**item, "revision_id": revision.id}}) + "\n")
            for name in verdict.commands:
                target = command_target(revision.config.get(name))
                token = target[0] if target else json.dumps(revision.config.get(name))
                effect = {
                    "incarnation": process.incarnation,
                    "name": name,
                    "token": token,
                    "revision": verdict.revision,
                }
                record.write(json.dumps({"command": effect}) + "\n")
            record.flush()
    print("done", step, flush=True)


if __name__ == "__main__":
    main()
