"""weavelet's own cost per optimizer step, in instructions counted by valgrind's callgrind.

Time per step is too noisy on a shared machine to show a cost of a few microseconds; instruction counts are less
so. Each figure is the difference of two runs, of ``N`` and ``2N`` calls or steps, divided by ``N``, so everything
outside them (start-up, imports, set-up, tear-down) cancels out. Counting is switched on and off at those points:
the process pauses there while ``callgrind_control`` switches instrumentation (``-i on``/``-i off``). Only the
training thread is counted (the process's other threads wake on wall-clock events, which callgrind slows about 50
times), with the cyclic garbage collector off while counting (when it runs depends on every allocation before).

Measured (a 16-64-1 MLP, batch 32, one torch thread, on the CPU, ``file://`` store, a live sidecar, nothing
waiting, status reports an hour apart so that none falls in the count):

- **the step hook**: inside a Lightning fit, at step 20, ``N`` calls of ``WeaveletCallback.on_train_batch_end``
  with the fit's real trainer (its boundary check reset before each call, so that each is a new step), beside
  ``N`` calls of an empty function with the same arguments, and, for scale, of one that only reads
  ``trainer.global_step`` (a chain of Lightning properties; the hook finds step boundaries by reading the
  progress counter at its end instead);
- **poll**: inside a plain loop under :func:`weavelet_torch.attach`, ``N`` calls of ``live.poll(step, loss=loss)``
  (a new step each), beside ``N`` calls of an empty function of the same signature;
- **whole fits** (``--fits``, slower): a Lightning fit of ``N`` steps with no callback and with an empty
  ``Callback``: what Lightning's dispatch of any callback costs per step. Whole fits vary by tens of thousands of
  instructions per step from run to run (hashing by address, allocation), so they cannot resolve a few thousand.

Targets: the step hook <= 3,000 instructions per step over the empty function (the callback's own cost over an
empty callback), ``live.poll()`` <= 1,500. Usage: ``python benchmarks/bench_steps.py [--calls N] [--fits]
[--steps N]``. Needs valgrind (``callgrind_control`` comes with it).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WARMUP = 20
"""Steps before counting starts (the first steps allocate the optimizer's state and fill caches)."""
HOOK_TARGET = 3_000
POLL_TARGET = 1_500
KINDS = ("hook-empty", "hook-global-step", "hook-weavelet", "poll-empty", "poll-weavelet")
FIT_KINDS = ("fit-none", "fit-empty")


# -- the measured process ---------------------------------------------------------------------------------------


def _pause(word: str) -> None:
    """Tell the driver we are at a boundary, and wait until it has switched instrumentation (the collector is off
    in between)."""
    if word == "off":
        gc.enable()
    sys.stdout.write(f"{word}\n")
    sys.stdout.flush()
    sys.stdin.readline()
    if word == "on":
        gc.collect()
        gc.disable()


def _empty(*args: Any, **kwargs: Any) -> None:
    return None


def _global_step(trainer: Any, *args: Any) -> None:
    """For scale: what reading Lightning's ``trainer.global_step`` costs (the hook reads the counter behind it)."""
    trainer.global_step  # noqa: B018


def child(kind: str, count: int, root: str) -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    store = (Path(root) / "store").as_uri()
    steps = count if kind.startswith("fit") else 4
    x = torch.randn(32 * (WARMUP + steps + 2), 16)  # one epoch holds every step: no epoch boundary counted
    y = x.sum(dim=1, keepdim=True)
    if kind.startswith("poll"):
        _loop(kind, count, x, y, store)
    else:
        _lightning(kind, count, steps, x, y, store, root)


def _lightning(kind: str, count: int, steps: int, x: Any, y: Any, store: str, root: str) -> None:
    import lightning.pytorch as L
    import torch

    callbacks: list[Any] = []
    if kind == "fit-empty":
        callbacks.append(L.Callback())
    elif kind.startswith("hook"):
        from weavelet_lightning import WeaveletCallback

        callbacks.append(WeaveletCallback("bench-steps", store, report_interval=3600.0))

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            a, b = batch
            return torch.nn.functional.mse_loss(self.net(a), b)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = self.trainer.global_step
            if kind.startswith("fit"):  # the module's own hook marks where counting starts and stops
                if step == WARMUP:
                    _pause("on")
                elif step == WARMUP + steps:
                    _pause("off")
            elif step == WARMUP:
                callback = callbacks[0]
                hooks = {"hook-weavelet": callback.on_train_batch_end, "hook-global-step": _global_step}
                hook = hooks.get(kind, _empty)
                trainer = self.trainer
                _pause("on")
                for _ in range(count):
                    callback._last_step = -1  # a new step for the hook each time
                    hook(trainer, self, outputs, batch, batch_idx)
                _pause("off")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = L.Trainer(
        max_steps=WARMUP + steps + 1,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    trainer.fit(Model(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32))


def _loop(kind: str, count: int, x: Any, y: Any, store: str) -> None:
    import torch

    from weavelet_torch import attach

    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    with attach(optimizer, run="bench-steps", url=store, report_interval=3600.0) as live:
        loss = None
        for step in range(1, WARMUP + 1):
            loss = torch.nn.functional.mse_loss(net(x[:32]), y[:32])
            loss.backward()
            live.optimizer.step()
            live.optimizer.zero_grad()
            live.poll(step, loss=loss)
        poll = live.poll if kind == "poll-weavelet" else _empty
        _pause("on")
        for step in range(WARMUP + 1, WARMUP + 1 + count):
            poll(step, loss=loss)
        _pause("off")


# -- the driver -------------------------------------------------------------------------------------------------


def count(kind: str, steps: int) -> int:
    """Instructions callgrind counted between the two pauses of one run of ``kind`` over ``steps`` steps."""
    with tempfile.TemporaryDirectory(prefix="bench-steps-") as directory:
        out = Path(directory) / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={out}",
            sys.executable, __file__, "--child", kind, str(steps), directory,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            for word, switch in (("on", "on"), ("off", "off")):
                while True:
                    line = process.stdout.readline()
                    if not line:
                        error = process.stderr.read() if process.stderr else ""
                        raise RuntimeError(f"{kind}: the process ended before '{word}': {error[-2000:]}")
                    if line.strip() == word:
                        break
                subprocess.run(["callgrind_control", "-i", switch, str(process.pid)], check=True, capture_output=True)
                process.stdin.write("go\n")
                process.stdin.flush()
            process.stdin.close()
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
        # The training thread's own count (thread 1): the process's other threads (torch's, the weavelet's
        # supervisor waiting on the sidecar's pipes) run on wall-clock events, which callgrind slows 50 times.
        text = out.with_name(out.name + "-01").read_text()
        match = re.search(r"^totals: (\d+)", text, re.MULTILINE)  # "summary:" counts what ran before the switch
        if match is None:
            raise RuntimeError(f"{kind}: no total in {out}")
        return int(match.group(1))


def per_step(kind: str, steps: int) -> float:
    return (count(kind, 2 * steps) - count(kind, steps)) / steps


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "COUNT", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=2000, help="N calls of the hook and of poll (default 2000)")
    parser.add_argument("--fits", action="store_true", help="also whole fits, no callback vs an empty Callback")
    parser.add_argument("--steps", type=int, default=200, help="N steps of the whole fits (default 200)")
    args = parser.parse_args(argv)
    if args.child:
        kind, count, directory = args.child
        child(kind, int(count), directory)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench_steps: valgrind is not installed (apt-get install valgrind); nothing measured")
        return 1
    figures = {kind: per_step(kind, args.calls) for kind in KINDS}
    hook = figures["hook-weavelet"] - figures["hook-empty"]
    poll = figures["poll-weavelet"] - figures["poll-empty"]
    print(f"instructions per call (callgrind, {args.calls:,} vs {2 * args.calls:,} calls, training thread)")
    print(f"{'WHAT':<52} {'PER CALL':>10}  TARGET")
    print(f"{'baseline: an empty function, Lightning hook arguments':<52} {figures['hook-empty']:>10,.0f}")
    print(f"{'WeaveletCallback.on_train_batch_end, nothing waiting':<52} {figures['hook-weavelet']:>10,.0f}")
    verdict = "met" if hook <= HOOK_TARGET else "MISSED"
    print(f"{'  the step hook over the empty function':<52} {hook:>+10,.0f}  <= {HOOK_TARGET:,}: {verdict}")
    print(f"{'for scale: a function reading trainer.global_step':<52} {figures['hook-global-step']:>10,.0f}")
    print(f"{'baseline: an empty function, poll(step, loss=loss)':<52} {figures['poll-empty']:>10,.0f}")
    print(f"{'live.poll(step, loss=loss), nothing waiting':<52} {figures['poll-weavelet']:>10,.0f}")
    verdict = "met" if poll <= POLL_TARGET else "MISSED"
    print(f"{'  live.poll() over the empty function':<52} {poll:>+10,.0f}  <= {POLL_TARGET:,}: {verdict}")
    if args.fits:
        none, empty = per_step("fit-none", args.steps), per_step("fit-empty", args.steps)
        print(f"\nwhole Lightning fits, instructions per optimizer step ({args.steps} vs {2 * args.steps} steps)")
        print(f"{'no callback (baseline)':<52} {none:>10,.0f}")
        print(f"{'an empty Callback':<52} {empty:>10,.0f}  {empty / none:.4f}x")
        print(f"{'no callback + the step hook (computed)':<52} {none + hook:>10,.0f}  {(none + hook) / none:.4f}x")
        label = "an empty Callback + the step hook (computed)"
        print(f"{label:<52} {empty + hook:>10,.0f}  {(empty + hook) / empty:.4f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
