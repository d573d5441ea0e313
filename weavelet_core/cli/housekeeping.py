"""Removing stored runs: ``rm`` and ``prune``."""

from __future__ import annotations

import argparse
import time
from typing import Any, TextIO

from weavelet_core.cli import output
from weavelet_core.cli.common import EXIT_ERROR, EXIT_OK, CliError, add_output, add_url, duration, wants_json, weaver
from weavelet_core.cli.read import overview
from weavelet_core.cli.selectors import add_selectors, select, single
from weavelet_core.errors import WeaveletError
from weavelet_core.weaver import AsyncWeaver


def _is_live(row: dict[str, Any]) -> bool:
    """A run whose trainer reports and is not stale: removing it would pull the floor from under it."""
    return row["state"] is not None and row["state"] not in ("stopped", "failed") and not row["stale"]


def _last_activity(row: dict[str, Any], now: float) -> float:
    """When the run was last heard of: its newest heartbeat or revision (``now`` when neither is known)."""
    times = []
    if row["heartbeat_age"] is not None:
        times.append(now - row["heartbeat_age"])
    if row["written_at"] is not None:
        times.append(row["written_at"])
    return max(times) if times else now


async def _remove(w: AsyncWeaver, rows: list[dict[str, Any]], args: argparse.Namespace, out: TextIO, verb: str) -> int:
    as_json = wants_json(args)
    results = []
    failed = False
    for row in rows:
        run = row["run"]
        result: dict[str, Any] = {"run": run, "removed": False}
        if _is_live(row) and not args.force:
            failed = True
            result["error"] = (
                f"run {run!r} is live ({row['state']}, heartbeat {output.format_age(row['heartbeat_age'])} ago); "
                f"stop it first (weavelet stop {run}) or add --force"
            )
        elif args.dry_run:
            result["would_remove"] = True
        else:
            try:
                await w.delete(run)
                result["removed"] = True
                if _is_live(row):
                    result["note"] = (
                        "its live trainer trains on without remote control until it restarts: revisions are numbered "
                        "from 1 again, which it takes for old ones, so set, stop and checkpoint no longer reach it "
                        "(the CLI refuses them); end it with a signal (weavelet status shows its pid and host) or "
                        "restart it"
                    )
            except WeaveletError as exc:
                failed = True
                result["error"] = str(exc)
        results.append(result)
        if not as_json:
            if "error" in result:
                out.write(f"{run}: error: {result['error']}\n")
            elif args.dry_run:
                out.write(f"{run}: would {verb}\n")
            else:
                out.write(f"{run}: {verb}d\n")
                if "note" in result:
                    out.write(f"{run}: note: {result['note']}\n")
    if as_json:
        output.print_json(results, out)
    return EXIT_ERROR if failed else EXIT_OK


async def cmd_rm(args: argparse.Namespace, out: TextIO) -> int:
    async with weaver(args) as w:
        one = single(args)
        if one is not None:
            runs = [one]
            if one not in await w.runs():
                raise CliError(f"run {one!r} is not stored at {output.cut(w.url, 200)}; list runs with: weavelet runs")
        else:
            runs, _ = await select(w, args)
        rows = await overview(w, runs, None)
        return await _remove(w, rows, args, out, "remove")


async def cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    async with weaver(args) as w:
        rows = await overview(w, await w.runs(), None)
        now = time.time()
        old = [row for row in rows if now - _last_activity(row, now) > args.older_than]
        if not args.force:
            old = [row for row in old if not _is_live(row)]  # a live run is never old: it heartbeats
        if not old:
            if not wants_json(args):
                out.write("nothing to prune\n")
            else:
                output.print_json([], out)
            return EXIT_OK
        return await _remove(w, old, args, out, "prune")


def add_parsers(subparsers: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = subparsers.add_parser(
        "rm",
        help="remove stored runs (revisions, status, outcomes)",
        description="Remove everything stored for the chosen runs. A live run (reporting, not stale) is refused "
        "unless --force is given.",
        epilog="examples:\n  weavelet rm demo\n  weavelet rm 'sweep-1-*' --dry-run\n",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p)
    add_selectors(p)
    p.add_argument("--force", action="store_true", help="also remove live runs")
    p.set_defaults(handler=cmd_rm, is_async=True)

    p = subparsers.add_parser(
        "prune",
        help="remove runs not heard of for a while",
        description="Remove runs whose newest heartbeat and newest revision are both older than --older-than. "
        "Live runs are kept unless --force is given.",
        epilog="examples:\n  weavelet prune --older-than 7d --dry-run\n  weavelet prune --older-than 12h\n",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p)
    p.add_argument(
        "--older-than",
        type=duration,
        required=True,
        metavar="AGE",
        help="how long a run must have been quiet: 90s, 30m, 12h, 7d, 2w",
    )
    p.add_argument("--dry-run", action="store_true", help="say which runs it would remove, and remove nothing")
    p.add_argument("--force", action="store_true", help="also remove live runs that are that old (stale ones)")
    p.set_defaults(handler=cmd_prune, is_async=True)
