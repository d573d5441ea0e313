"""Choosing runs: one id, glob patterns (``'sweep-3-*'``), labels the trainers declared (``-l sweep=3``), ``--all``."""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Sequence

from weavelet_core.cli.common import CliError, where
from weavelet_core.protocol import Status, validate_run_id
from weavelet_core.weaver import AsyncWeaver

GLOB_CHARS = frozenset("*?[")


def label(text: str) -> tuple[str, str]:
    """``-l KEY=VALUE`` (``VALUE`` may be a glob)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value:
        raise argparse.ArgumentTypeError(f"expected a label as KEY=VALUE (like sweep=3), got {text!r}")
    return key.strip(), value


def add_selectors(parser: argparse.ArgumentParser, *, positional: bool = True) -> None:
    """``RUN...`` patterns (unless ``positional`` is false), ``-l KEY=VALUE``, ``--all`` and ``--dry-run``."""
    if positional:
        parser.add_argument("runs", metavar="RUN", nargs="*", help="run ids or glob patterns ('sweep-3-*'; quote them)")
    parser.add_argument(
        "-l",
        "--label",
        dest="labels",
        action="append",
        type=label,
        default=[],
        metavar="KEY=VALUE",
        help="only runs whose trainer declared this label (repeat for several; VALUE may be a glob)",
    )
    parser.add_argument("--all", action="store_true", help="every run the transport knows")
    parser.add_argument("--dry-run", action="store_true", help="say which runs it would act on, and change nothing")


def single(args: argparse.Namespace) -> str | None:
    """The run id when the command names exactly one run by id (no pattern, label or ``--all``), else ``None``."""
    runs: list[str] = args.runs
    if len(runs) == 1 and not args.labels and not args.all and not GLOB_CHARS & set(runs[0]):
        return validate_run_id(runs[0])
    return None


def matches(status: Status | None, labels: Sequence[tuple[str, str]]) -> bool:
    if not labels:
        return True
    if status is None:
        return False
    return all(key in status.labels and fnmatch.fnmatchcase(status.labels[key], value) for key, value in labels)


async def select(weaver: AsyncWeaver, args: argparse.Namespace) -> tuple[list[str], dict[str, Status | None]]:
    """The runs the arguments choose, sorted, with the statuses read to choose them (by labels).

    Plain ids are taken as given (a run need not exist yet to be written); patterns, labels and ``--all`` choose
    among the runs the transport knows. Raises :class:`CliError` when nothing is chosen or nothing matches.
    """
    patterns: list[str] = args.runs
    labels: list[tuple[str, str]] = args.labels
    if not patterns and not labels and not args.all:
        raise CliError("name a run, or choose runs with a glob pattern ('sweep-3-*'), -l KEY=VALUE or --all")
    if args.all and patterns:
        raise CliError("--all chooses every run: give it without run ids or patterns")
    explicit = [p for p in patterns if not GLOB_CHARS & set(p)]
    for run in explicit:
        validate_run_id(run)
    globs = [p for p in patterns if GLOB_CHARS & set(p)]
    chosen: set[str] = set(explicit)
    if globs or args.all or (labels and not explicit):
        known = await weaver.runs()
        if args.all or (labels and not patterns):
            chosen.update(known)
        for pattern in globs:
            chosen.update(run for run in known if fnmatch.fnmatchcase(run, pattern))
    statuses: dict[str, Status | None] = {}
    if labels:
        statuses = await weaver.statuses(sorted(chosen))
        chosen = {run for run in chosen if matches(statuses.get(run), labels)}
    if not chosen:
        asked = " ".join([*patterns, *(f"-l {k}={v}" for k, v in labels)] + (["--all"] if args.all else []))
        raise CliError(f"no run at {where(args)} matches {asked}; list the runs with: weavelet runs -o wide")
    return sorted(chosen), statuses
