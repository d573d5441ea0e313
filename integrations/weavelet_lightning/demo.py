"""``weavelet demo``: watch a Lightning fit being reconfigured while it runs.

A small MLP trains on synthetic data with SGD. A weaver in another process watches the run's status and, as
training goes on, switches the optimizer to Adam, later lowers the learning rate, and finally asks the fit to
stop. Each revision's outcome is printed once, as the trainer applies it (the line weavelet writes on a training
console, marked ``[trainer]``); at the end a plot of loss against step, with the revisions marked, is written as a
PNG (``pip install "weavelet[plot]"`` for matplotlib).

No server is needed: by default the run lives in the per-user ``file://`` directory (or ``WEAVELET_URL``), so
``weavelet status`` and ``weavelet set`` in another terminal work on it. ``--url nats://...`` or
``--url redis://...`` runs the same over NATS or Redis.

This module imports torch and Lightning only inside :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

PLOT_HINT = 'pip install "weavelet[plot]"'
SCHEDULE = (
    (1 / 3, {"optimizer": "adam", "lr": 0.003}),
    (2 / 3, {"lr": 0.0005}),
    (1.0, {"stop": True}),
)
"""When (as a fraction of the planned steps) the weaver sends what."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``weavelet demo`` options."""
    parser.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="transport URL (default: $WEAVELET_URL, else the per-user file:// directory)",
    )
    parser.add_argument("--run", default=None, help="run id (default: a new demo-... id)")
    parser.add_argument("--steps", type=_positive_int, default=1500, help="planned optimizer steps (default 1500)")
    parser.add_argument(
        "--step-delay",
        type=float,
        default=0.02,
        metavar="S",
        help="seconds each step sleeps, so that there is time to watch (default 0.02)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (150 steps) for a quick look or a test")
    parser.add_argument(
        "--plot",
        default="weavelet-demo.png",
        metavar="PNG",
        help="where to write the plot (default ./weavelet-demo.png)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write a plot")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 10:
        raise argparse.ArgumentTypeError("give at least 10 steps")
    return value


def _say(text: str) -> None:
    print(text, flush=True)


class Decided(Protocol):
    """What the plot needs of an outcome the trainer decided (a ``weavelet_torch`` ``Verdict``)."""

    @property
    def revision(self) -> int: ...

    @property
    def step(self) -> int | None: ...

    @property
    def detail(self) -> dict[str, Any]: ...

    @property
    def commands(self) -> dict[str, Any]: ...


@contextmanager
def trainer_lines(run_id: str) -> Iterator[None]:
    """Print what weavelet logs in the training process (an applied change, a rejection) as ``[trainer]`` lines on
    standard output, in order with the demo's other lines, instead of weavelet's own line on standard error."""
    logger = logging.getLogger("weavelet_torch")
    prefix = f"weavelet: run {run_id!r} "

    class TrainerLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _say(f"[trainer] {record.getMessage().removeprefix(prefix)}")

    handler = TrainerLine(logging.INFO)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def weaver_main(url: str, run: str, steps: int, timeout: float) -> int:
    """The weaver process: send each revision of :data:`SCHEDULE` when the run reaches its step, and wait for its
    outcome. The trainer prints an applied outcome; the weaver speaks only when one is not applied (and ends)."""
    from weavelet_core import WeaveletError, Weaver

    deadline = time.monotonic() + timeout
    try:
        with Weaver(url) as weaver:
            for fraction, changes in SCHEDULE:
                at = int(steps * fraction)
                while True:
                    status = weaver.status(run)
                    seen = status.step if status is not None else -1
                    if status is not None and status.state == "stopped":
                        _say(f"[weaver]  the run stopped before step {at}; nothing more to send")
                        return 1
                    if seen >= at:
                        break
                    if time.monotonic() > deadline:
                        _say(f"[weaver]  gave up waiting for run {run!r} to reach step {at}")
                        return 1
                    time.sleep(0.05)
                shown = " ".join(
                    f"{k}={json.dumps(v)}" if not isinstance(v, str) else f"{k}={v}" for k, v in changes.items()
                )
                _say(f"[weaver]  at step ~{seen}: weavelet set {run} {shown}")
                outcome = weaver.set(run, changes, wait=max(1.0, deadline - time.monotonic()))
                if outcome.result != "applied":
                    _say(f"[weaver]  revision {outcome.revision} {outcome.result}: {outcome.message}; stopping here")
                    return 1
    except (WeaveletError, OSError) as exc:
        _say(f"[weaver]  error: {exc}")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every revision was applied and the fit ended on the weaver's ``stop``."""
    from weavelet_core import default_url

    url = getattr(args, "url", None) or default_url()
    run_id = args.run or "demo-" + secrets.token_hex(3)
    steps, delay = (150, 0.03) if args.quick else (args.steps, args.step_delay)

    import warnings

    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning")
    from weavelet_lightning.callback import WeaveletCallback
    from weavelet_lightning.demo_model import DemoModel, DemoProgress, make_data, make_loader, pl

    _say(f"weavelet demo: run {run_id!r} at {_masked(url)}")
    _say(f"  training a small MLP with SGD for ~{steps} steps; in another terminal you can try:")
    _say(f"    weavelet status {run_id}      weavelet set {run_id} lr=0.001")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    callback = WeaveletCallback(run_id, url, report_interval=0.2, process_options={"heartbeat_interval": 0.2})
    model = DemoModel(step_delay=delay)
    trainer = pl.Trainer(
        max_steps=3 * steps,
        accelerator="cpu",
        devices=1,
        callbacks=[callback, DemoProgress(every=max(1, steps // 10))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    context = multiprocessing.get_context("spawn")
    weaver = context.Process(
        target=weaver_main, args=(url, run_id, steps, 60.0 + 3 * steps * (delay + 0.01)), name="weavelet-demo-weaver"
    )
    weaver.start()
    try:
        with trainer_lines(run_id):
            trainer.fit(model, make_loader(make_data()))
    finally:
        weaver.join(10.0)
        if weaver.is_alive():
            weaver.terminate()
            weaver.join(5.0)

    applied = [v for v in callback.verdicts if v.result == "applied"]
    _say(f"fit ended at step {trainer.global_step} with {type(trainer.optimizers[0]).__name__}")
    ok = weaver.exitcode == 0 and len(applied) == len(SCHEDULE)
    if not args.no_plot:
        _plot(model.losses, marks(applied), Path(args.plot), run_id)
    return 0 if ok else 1


def _masked(url: str) -> str:
    from weavelet_core import plugins

    return plugins.mask_password(url)


def marks(applied: Sequence[Decided]) -> list[tuple[int, str]]:
    """``(step, label)`` of each applied revision, for the plot: ``r1: optimizer sgd→adam, lr 0.05→0.003``,
    ``r3: stop``."""
    return [(v.step or 0, f"r{v.revision}: {_label(v)}") for v in applied]


def _label(decided: Decided) -> str:
    """What a revision did: each changed key (``lr 0.05→0.003``), then each command that acted (``stop``)."""
    changes = decided.detail.get("changes")
    changes = changes if isinstance(changes, dict) else {}
    parts = [
        f"{key} {change[0]}\u2192{change[1]}" if isinstance(change, (list, tuple)) and len(change) == 2 else str(key)
        for key, change in changes.items()
    ]
    commands = decided.commands or decided.detail.get("commands") or {}
    parts += [str(name) for name in commands if name not in changes]
    return ", ".join(parts) or "no change"


def _plot(losses: list[tuple[int, float]], marked: list[tuple[int, str]], path: Path, run_id: str) -> None:
    """Loss against step with a dashed line and its label (see :func:`marks`) at each applied revision."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say(f"no plot: matplotlib is not installed; install it with: {PLOT_HINT}")
        return
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    window = max(1, len(values) // 60)
    smooth = [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    axes.plot(steps, values, color="0.8", linewidth=0.8, label="loss")
    axes.plot(steps, smooth, color="C0", linewidth=1.6, label=f"loss (mean of {window})")
    axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(f"weavelet demo: run {run_id}, reconfigured live")
    last = max(steps, default=1) or 1
    for number, (step, label) in enumerate(marked, start=1):
        axes.axvline(step, color=f"C{number}", linestyle="--", linewidth=1.2)
        right = step > 0.75 * last
        axes.annotate(
            label,
            xy=(step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-3 if right else 3, -12 * number),
            textcoords="offset points",
            ha="right" if right else "left",
            fontsize=8,
            color=f"C{number}",
        )
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    _say(f"plot of loss against step, revisions marked: {path}")


def main(argv: list[str] | None = None) -> int:
    """``python -m weavelet_lightning.demo``: the same as ``weavelet demo``."""
    parser = argparse.ArgumentParser(prog="weavelet demo", description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
