"""What a rollback in place costs, beside the restart route, on the same ~9.7M-parameter model in one run.

1. Restart route: a fresh process imports torch and Lightning, builds the model and its Adam optimizer, reads the
   checkpoint (``torch.load(weights_only=True)``) and loads model and optimizer state. (The checkpoint already
   exists in both routes: saving it is not counted.)
2. Rollback in place from that file: the applier acting on a ``rollback`` command (locate, read, check against the
   model and optimizer, restore model, Adam state, weavelet state).
3. Rollback in place from an in-memory snapshot, and what taking one snapshot costs.

Run: ``python benchmarks/bench_rollback.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from weavelet_torch import Applier, LoopHost
from weavelet_torch.loop_restore import LoopRestorer
from weavelet_torch.rollback import SnapshotRing

WIDTH, LAYERS = 1800, 3

RESTART = f"""
import sys, torch, pytorch_lightning
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
model = torch.nn.Sequential(*[torch.nn.Linear({WIDTH}, {WIDTH}) for _ in range({LAYERS})])
model.load_state_dict(state["model"])
optimizer = torch.optim.Adam(model.parameters())
optimizer.load_state_dict(state["optimizer"])
"""


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:9.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 4
    torch.set_num_threads(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, WIDTH)).sum().backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    print(f"rollback on a {params / 1e6:.1f}M-parameter model with Adam, restart route vs in place")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run-weavelet-r1-step100.pt"
        host = LoopHost(optimizer)
        applier = Applier(host)
        restorer = LoopRestorer(host, model=model, load=None, directory=lambda: Path(tmp))
        restorer.snapshots = SnapshotRing(every=1, keep=1)
        applier.restorer = restorer
        applier.incarnation = "bench"
        torch.save(
            {"step": 100, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedulers": []}, path
        )

        restarts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", RESTART, str(path)], check=True)
            restarts.append(time.perf_counter() - t0)

        from_file, from_snapshot, captures = [], [], []
        number = 0
        for _ in range(repeats + 1):
            number += 1
            t0 = time.perf_counter()
            verdict = applier.apply(
                number, {"rollback": {"token": str(number), "incarnation": "bench", "to": "latest"}}, step=100 + number
            )
            from_file.append(time.perf_counter() - t0)
            assert verdict.result == "applied", verdict.message
            t0 = time.perf_counter()
            restorer.snapshots.add(restorer.capture(100 + number, applier))
            captures.append(time.perf_counter() - t0)
            number += 1
            t0 = time.perf_counter()
            verdict = applier.apply(
                number,
                {"rollback": {"token": str(number), "incarnation": "bench", "to": "snapshot"}},
                step=100 + number,
            )
            from_snapshot.append(time.perf_counter() - t0)
            assert verdict.result == "applied", verdict.message
        held = restorer.snapshots.bytes
    print(f"   restart route (fresh process + imports + load)   {median_ms(restarts)} (median of {repeats})")
    print(f"   rollback in place from the file checkpoint        {median_ms(from_file[1:])} (median)")
    print(f"   rollback in place from a memory snapshot          {median_ms(from_snapshot[1:])} (median)")
    print(f"   taking one snapshot (copy to CPU memory)          {median_ms(captures[1:])} (median)")
    print(f"   memory held by one snapshot                       {held / 2**20:9.1f} MiB")
    print(
        f"   restart / in place: file {statistics.median(restarts) / statistics.median(from_file[1:]):,.0f}x, "
        f"snapshot {statistics.median(restarts) / statistics.median(from_snapshot[1:]):,.0f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
