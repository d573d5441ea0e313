"""What ``attach()`` costs a rank other than 0 under ``torch.distributed`` when nothing changes.

``torchrun`` with 2 ranks (gloo, CPU) runs a small DDP loop in interleaved rounds, each the same number of steps:

* **baseline**: the loop without weavelet (no ``poll``; rank 0's sidecar idles beside it, as in the other rows);
* ``poll`` every step (``check_every=1``): one broadcast of one ``int64`` per step;
* ``check_every=10``: the broadcast every tenth step;
* the default, ``check_every=None``: rank 0 spaces checks about 0.1 s apart and tells the other ranks when;

and times, apart from any loop, the check itself: ``Collective.share(None)`` (the broadcast a check costs when
nothing is waiting) and ``Collective.all_same`` (the all-reduce after each applied revision). Figures are rank 1's
(rank 0 also reads the sidecar's version counter, 0.06 us). The median over rounds of each round's mean.

Run: ``python benchmarks/bench_distributed.py [--quick]`` (it starts ``torchrun`` itself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def worker(out: str, rounds: int, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from weavelet_torch import attach
    from weavelet_torch.collective import Collective

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    )
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(rank))
    y = x.sum(dim=1, keepdim=True)
    collective = Collective.current()
    assert collective is not None
    url = Path(out, "weavelet").as_uri()
    times: dict[str, list[float]] = {"baseline": [], "check_every=1": [], "check_every=10": [], "default": []}
    sgd = torch.optim.SGD
    with (
        attach(sgd(model.parameters(), lr=0.01), run="bench-dist", url=url, check_every=1) as every,
        attach(sgd(model.parameters(), lr=0.01), run="bench-dist-10", url=url, check_every=10) as tenth,
        attach(sgd(model.parameters(), lr=0.01), run="bench-dist-auto", url=url) as auto,
    ):
        optimizer = every.optimizer
        step = 0

        def loop(live: Any) -> float:
            nonlocal step
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                if live is not None:
                    live.poll(step)
            return (time.perf_counter() - start) / steps

        loop(None)  # warm-up
        for number in range(rounds):
            order = [("baseline", None), ("check_every=1", every), ("check_every=10", tenth), ("default", auto)]
            if number % 2:
                order.reverse()
            for name, live in order:
                times[name].append(loop(live))

        calls = steps * 5
        share: list[float] = []
        agree: list[float] = []
        for _ in range(rounds):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                collective.share(None)
            share.append((time.perf_counter() - start) / calls)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                collective.all_same(True)
            agree.append((time.perf_counter() - start) / calls)
    result = {name: statistics.median(values) for name, values in times.items()}
    result["share(None)"] = statistics.median(share)
    result["all_same"] = statistics.median(agree)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    rounds, steps = (3, 100) if args.quick else (15, 300)
    with tempfile.TemporaryDirectory(prefix="weavelet-bench-dist-") as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEAVELET_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*sys.path[1:], env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        done = subprocess.run(
            [*command, __file__, "--worker", out, str(rounds), str(steps)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            return 1
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    load = os.getloadavg()[0]
    print(f"2 ranks (gloo, CPU), DDP MLP 32-64-1, batch 32; {rounds} rounds x {steps} steps; load {load:.1f}")
    print("rank 1, per step (us)      mean    vs baseline")
    base = ranks[1]["baseline"]
    for name in ("baseline", "check_every=1", "check_every=10", "default"):
        value = ranks[1][name]
        print(f"  {name:<22} {value * 1e6:8.1f}   {value / base:6.3f}x  (+{(value - base) * 1e6:.1f} us)")
    print("the check alone, per call (us)   rank 0   rank 1")
    for name in ("share(None)", "all_same"):
        print(f"  {name:<30} {ranks[0][name] * 1e6:7.1f}  {ranks[1][name] * 1e6:7.1f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
