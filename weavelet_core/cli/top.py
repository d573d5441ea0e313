"""``weavelet top``: every run at a glance, live (Textual), or once as a plain table (``--once``)."""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Sequence
from typing import Any, TextIO

from weavelet_core.cli import output
from weavelet_core.cli.common import (
    EXIT_OK,
    CliError,
    add_output,
    add_stale,
    add_url,
    positive_float,
    url_of,
    wants_json,
)
from weavelet_core.cli.read import heartbeat_text, last_outcome_text, overview
from weavelet_core.specs import missing_modules
from weavelet_core.weaver import AsyncWeaver

TUI_INSTALL = 'pip install "weavelet[tui]"'
COLUMNS = ("RUN", "STATE", "AGE", "STEP", "LOSS", "TREND", "LR", "OPTIMIZER", "HEARTBEAT", "LAST OUTCOME")
"""The dashboard's columns: AGE is the incarnation's (time since its trainer started), TREND a loss sparkline."""
TREND_POINTS = 24


class LossTrend:
    """The recent losses of each run, one point per new step seen, for the TREND sparkline."""

    def __init__(self, points: int = TREND_POINTS) -> None:
        self.points = points
        self._values: dict[str, collections.deque[float]] = {}
        self._steps: dict[str, tuple[str, int]] = {}

    def add(self, row: dict[str, Any]) -> None:
        loss = row["metrics"].get("loss")
        if loss is None or row["step"] is None:
            return
        key = (row["incarnation"] or "", row["step"])
        if self._steps.get(row["run"]) == key:
            return
        self._steps[row["run"]] = key
        self._values.setdefault(row["run"], collections.deque(maxlen=self.points)).append(float(loss))

    def spark(self, run: str) -> str:
        return output.sparkline(self._values.get(run, ()), self.points)


def lr_of(optimizer: dict[str, Any] | None) -> str:
    if not optimizer:
        return "-"
    lr = optimizer.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return f"{lr:.3g}"
    return "-" if lr is None else str(lr)


def cells(row: dict[str, Any], trend: LossTrend, now: float) -> tuple[str, ...]:
    """One dashboard row as text cells, in :data:`COLUMNS` order."""
    optimizer = row["optimizer"] or {}
    loss = row["metrics"].get("loss")
    started = row["started_at"]
    return (
        row["run"],
        row["state"] or "-",
        output.format_age(now - started) if started and row["state"] not in ("stopped", "failed") else "-",
        "-" if row["step"] is None else str(row["step"]),
        "-" if loss is None else f"{loss:.4g}",
        trend.spark(row["run"]) or "-",
        lr_of(optimizer),
        str(optimizer.get("name", "-")),
        heartbeat_text(row),
        last_outcome_text(row),
    )


async def snapshot(w: AsyncWeaver, stale_after: float | None) -> list[dict[str, Any]]:
    """Every run's row, from one listing and two batched reads."""
    return await overview(w, await w.runs(), stale_after)


def print_once(rows: Sequence[dict[str, Any]], out: TextIO, url: str) -> None:
    if not rows:
        out.write(f"no runs at {url}\n")
        return
    trend = LossTrend()
    now = time.time()
    for row in rows:
        trend.add(row)
    output.print_table([COLUMNS, *(cells(row, trend, now) for row in rows)], out)


async def cmd_top(args: argparse.Namespace, out: TextIO) -> int:
    if args.once:
        async with AsyncWeaver(getattr(args, "url", None)) as w:
            rows = await snapshot(w, args.stale_after)
        if wants_json(args):
            output.print_json(rows, out)
        else:
            print_once(rows, out, output.cut(url_of(args), 200))
        return EXIT_OK
    if missing_modules(["textual"]):
        raise CliError(
            f"'weavelet top' needs Textual, which is not installed; install it with: {TUI_INSTALL} "
            "(or print the table once with: weavelet top --once)"
        )
    from weavelet_core.tui.app import TopApp

    app = TopApp(url_of(args), interval=args.interval, stale_after=args.stale_after)
    await app.run_async()
    return EXIT_OK


def add_parsers(subparsers: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = subparsers.add_parser(
        "top",
        help="a live dashboard of every run (keys to set, stop, checkpoint, revert)",
        description="A live terminal dashboard of every run: state, incarnation age, step, loss with its trend, "
        "lr, optimizer, heartbeat age (stale runs marked) and last outcome. Enter shows a run's status and "
        "history; s sets values, x stops, c checkpoints, r reverts (each asks for confirmation); q quits. "
        f"Needs Textual ({TUI_INSTALL}); --once prints the table once without it.",
        epilog="examples:\n  weavelet top\n  weavelet top --once\n  weavelet top --once --json\n",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p)
    add_stale(p)
    p.add_argument("--once", action="store_true", help="print the table once and exit (for scripts and logs)")
    p.add_argument(
        "--interval", type=positive_float, default=1.0, metavar="S", help="seconds between refreshes (default 1)"
    )
    p.set_defaults(handler=cmd_top, is_async=True)
