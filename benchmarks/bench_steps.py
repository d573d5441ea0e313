"""weavelet's own cost per optimizer step, in instructions counted by valgrind's callgrind.

Time per step is too noisy on a shared machine to show a cost of a few microseconds; instruction counts are not:
callgrind counts the same instructions for the same binary and inputs whatever else the machine does. Each figure
is the difference of two runs, of ``N`` and ``2N`` measured steps, divided by ``N``, so everything outside the
steps (start-up, imports, the fit's set-up and tear-down) cancels out. Counting starts and stops at a step
boundary: the training process pauses there while ``callgrind_control`` switches instrumentation on (``-i on``)
and off, so imports are never instrumented. Only the training thread is counted: the process's other threads (a
weavelet trainer's supervisor thread waiting on its sidecar, torch's) wake on wall-clock events, which callgrind
slows about 50 times, so they would count what the slowdown makes happen.

Measured, a 16-64-1 MLP, batch 32, one torch thread, on the CPU, in one epoch (no epoch boundary is counted), with
the cyclic garbage collector off while counting (when it runs depends on every allocation before):

- Lightning fit, ``N`` = ``--lightning-steps``: no callback; an empty ``Callback`` (what Lightning's dispatch of
  any callback costs); ``WeaveletCallback`` on ``file://`` with a live sidecar and nothing waiting; and the same
  callback with its step hook (``on_train_batch_end``) replaced by an empty function, so that the difference is
  the hook's own cost, apart from how Lightning dispatches to a callback of that class;
- plain loop, ``N`` = ``--loop-steps``: an empty function called like ``live.poll(step, loss=loss)``, and
  ``live.poll(step, loss=loss)`` of :func:`weavelet_torch.attach` with a live sidecar and nothing waiting.

The status reports (at most one per ``report_interval``) are left out: the interval is set to an hour, because
under callgrind a step is about 50 times slower, so a wall-clock interval would put 50 times as many reports in
the count. What one report costs is the sidecar's business, measured by ``bench_training.py``'s time per step.

Targets: the callback <= 3,000 instructions per step over the empty callback; ``live.poll()`` <= 1,500 over the
empty function. Usage: ``python benchmarks/bench_steps.py [--lightning-steps N] [--loop-steps N]``. Needs
valgrind (``callgrind_control`` comes with it).
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

WARMUP = 20
"""Steps before counting starts (the first steps allocate the optimizer's state and fill caches)."""
LIGHTNING_TARGET = 3_000
POLL_TARGET = 1_500
KINDS = ("lightning-none", "lightning-empty", "lightning-hookless", "lightning-weavelet", "loop-empty", "loop-poll")


# -- the measured process ---------------------------------------------------------------------------------------


def _pause(word: str) -> None:
    """Tell the driver we are at a boundary, and wait until it has switched instrumentation. While counting, the
    cyclic garbage collector is off: when it runs depends on every allocation before, so one run of N steps may
    count a full collection that the other does not."""
    if word == "off":
        gc.enable()
    sys.stdout.write(f"{word}\n")
    sys.stdout.flush()
    sys.stdin.readline()
    if word == "on":
        gc.collect()
        gc.disable()


def child(kind: str, steps: int, store: str) -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(32 * (WARMUP + 2 * steps + 2), 16)  # one epoch holds every step: no epoch boundary counted
    y = x.sum(dim=1, keepdim=True)
    total = WARMUP + steps
    if kind.startswith("lightning"):
        _lightning(kind, steps, total, x, y, store)
    else:
        _loop(kind, total, x, y, store)


def _lightning(kind: str, steps: int, total: int, x: object, y: object, store: str) -> None:
    import lightning.pytorch as L
    import torch

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            a, b = batch  # type: ignore[misc]
            return torch.nn.functional.mse_loss(self.net(a), b)

        def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
            # The module's own hook runs in every kind alike: it marks where counting starts and stops.
            step = self.trainer.global_step
            if step == WARMUP:
                _pause("on")
            elif step == WARMUP + steps:
                _pause("off")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callbacks: list[object] = []
    if kind == "lightning-empty":
        callbacks.append(L.Callback())
    elif kind in ("lightning-weavelet", "lightning-hookless"):
        from weavelet_lightning import WeaveletCallback

        callback = WeaveletCallback("bench-steps", store, report_interval=3600.0)
        if kind == "lightning-hookless":  # the same callback without its step hook: what Lightning's dispatch costs
            callback.on_train_batch_end = lambda *args, **kwargs: None  # type: ignore[method-assign]
        callbacks.append(callback)
    data = torch.utils.data.TensorDataset(x, y)  # type: ignore[arg-type]
    trainer = L.Trainer(
        max_steps=total + 1,
        callbacks=callbacks,  # type: ignore[arg-type]
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="bench-steps-"),
    )
    trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=32))


def _loop(kind: str, total: int, x: object, y: object, store: str) -> None:
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    batches = list(zip(torch.split(x, 32), torch.split(y, 32), strict=True))  # type: ignore[arg-type]

    def empty(step: int, *, loss: object = None) -> None:
        return None

    def train(poll: object, live: object = None) -> None:
        for step in range(1, total + 1):
            a, b = batches[step % len(batches)]
            loss = torch.nn.functional.mse_loss(net(a), b)
            loss.backward()
            opt = live.optimizer if live is not None else optimizer  # type: ignore[attr-defined]
            opt.step()
            opt.zero_grad()
            poll(step, loss=loss)  # type: ignore[operator]
            if step == WARMUP:
                _pause("on")
            elif step == total:
                _pause("off")

    if kind == "loop-empty":
        train(empty)
        return
    from weavelet_torch import attach

    with attach(optimizer, run="bench-steps", url=store, report_interval=3600.0) as live:
        train(live.poll, live)


# -- the driver -------------------------------------------------------------------------------------------------


def count(kind: str, steps: int) -> int:
    """Instructions callgrind counted between the two pauses of one run of ``kind`` over ``steps`` steps."""
    with tempfile.TemporaryDirectory(prefix="bench-steps-") as directory:
        out = Path(directory) / "callgrind.out"
        store = (Path(directory) / "store").as_uri()
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={out}",
            sys.executable, __file__, "--child", kind, str(steps), store,
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
    parser.add_argument("--child", nargs=3, metavar=("KIND", "STEPS", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--lightning-steps", type=int, default=200, help="N for the Lightning fits (default 200)")
    parser.add_argument("--loop-steps", type=int, default=400, help="N for the plain loops (default 400)")
    args = parser.parse_args(argv)
    if args.child:
        kind, steps, store = args.child
        child(kind, int(steps), store)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench_steps: valgrind is not installed (apt-get install valgrind); nothing measured")
        return 1
    figures = {}
    for kind in KINDS:
        steps = args.lightning_steps if kind.startswith("lightning") else args.loop_steps
        figures[kind] = per_step(kind, steps)
        print(f"  {kind:<19} {figures[kind]:>12,.0f} instructions/step", flush=True)
    none, empty, ours = figures["lightning-none"], figures["lightning-empty"], figures["lightning-weavelet"]
    hookless = figures["lightning-hookless"]
    loop_empty, loop_poll = figures["loop-empty"], figures["loop-poll"]
    over_callback = ours - empty
    over_call = loop_poll - loop_empty
    print(f"\ninstructions per optimizer step (callgrind, N vs 2N steps, {args.lightning_steps}/{args.loop_steps})")
    print(f"{'WHAT':<44} {'PER STEP':>12} {'VS BASELINE':>14}  TARGET")
    print(f"{'Lightning fit, no callback':<44} {none:>12,.0f}")
    print(f"{'Lightning fit, empty Callback':<44} {empty:>12,.0f} {empty / none:>13.4f}x")
    print(f"{'Lightning fit, WeaveletCallback':<44} {ours:>12,.0f} {ours / none:>13.4f}x")
    verdict = "met" if over_callback <= LIGHTNING_TARGET else "MISSED"
    label = "  WeaveletCallback over the empty Callback"
    target = f"<= {LIGHTNING_TARGET:,}: {verdict}"
    print(f"{label:<44} {over_callback:>+12,.0f} {ours / empty:>13.4f}x  {target}")
    print(f"{'Lightning fit, WeaveletCallback, empty step hook':<44} {hookless:>12,.0f} {hookless / none:>13.4f}x")
    print(f"{'  the step hook itself':<44} {ours - hookless:>+12,.0f}")
    print(f"{'plain loop, empty function':<44} {loop_empty:>12,.0f}")
    print(f"{'plain loop, live.poll()':<44} {loop_poll:>12,.0f} {loop_poll / loop_empty:>13.4f}x")
    verdict = "met" if over_call <= POLL_TARGET else "MISSED"
    print(f"{'  live.poll() over the empty function':<44} {over_call:>+12,.0f} {'':>14}  <= {POLL_TARGET:,}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
