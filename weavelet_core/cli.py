"""The ``weavelet`` command line.

``weavelet [--url URL] COMMAND ...`` where COMMAND is one of ``plugins``, ``set``, ``get``, ``status``,
``history``, ``runs``, ``server`` and ``demo`` (the last two come from the ``nats`` and ``lightning`` extras).
The transport URL is ``--url``, else ``WEAVELET_URL``, else the per-user ``file://`` directory.

Exit status: 0 success; 1 an error (one line on stderr, ``weavelet: error: ...``), a revision rejected by
the trainer, or a run with no live incarnation to wait for; 2 a usage error; 3 ``set --wait`` ran out of time
(the revision is stored and stays desired); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Collection, Sequence
from types import ModuleType
from typing import Any, TextIO

import anyio

from weavelet_core.errors import CorruptEntry, RunEnded, WaitTimeout, WeaveletError
from weavelet_core.plugins import URL_ENV, default_url, get_registry, mask_password
from weavelet_core.protocol import Outcome, Revision, Status, to_dict, validate_run_id
from weavelet_core.weaver import AsyncWeaver

PROG = "weavelet"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_WAIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130
DEFAULT_STALE_AFTER = 30.0
"""Staleness limit for a status that does not say its keepalive (a version-1 writer)."""
STALE_KEEPALIVES = 3
"""A status is stale after this many of its keepalives without a heartbeat (plus two seconds of slack)."""
DEBUG_ENV = "WEAVELET_DEBUG"


class CliError(WeaveletError):
    """A mistake in the command line, reported as one line with exit status 1."""


# -- KEY=VALUE assignments ---------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (``1e-3``, ``true``, ``[0.9,0.99]``, ``{"a":1}``, ``"x"``),
    else the text itself as a string; the empty text and ``null`` mean ``None`` (remove the key)."""
    if text == "":
        return None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` arguments into a changes object; dotted keys (``optimizer.name=adam``) nest.

    Raises :class:`CliError` for an argument without ``=``, an empty key part, or two arguments that set the
    same key or a key and one inside it (``a=1 a.b=2``).
    """
    changes: dict[str, Any] = {}
    seen: dict[tuple[str, ...], str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CliError(f"expected KEY=VALUE, got {item!r} (write lr=0.01, or lr= to remove lr)")
        path = tuple(key.split("."))
        if any(not part.strip() for part in path):
            raise CliError(f"invalid key {key!r} in {item!r}: use names separated by single dots, like optimizer.lr")
        for other, other_item in seen.items():
            shorter = min(len(other), len(path))
            if other[:shorter] == path[:shorter]:
                raise CliError(f"{item!r} conflicts with {other_item!r}: give each key once")
        seen[path] = item
        node = changes
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = parse_value(raw)
    return changes


# -- formatting --------------------------------------------------------------------------------------------


def format_age(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_time(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def describe_changes(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    """What changed between two configs, as ``lr=0.01 momentum: 0.9->0.95 -nesterov``."""
    old = _flatten(before or {})
    new = _flatten(after)
    parts = []
    for key in sorted(old.keys() | new.keys()):
        if key not in new:
            parts.append(f"-{key}")
        elif key not in old:
            parts.append(f"{key}={_value(new[key])}")
        elif old[key] != new[key]:
            parts.append(f"{key}: {_value(old[key])}->{_value(new[key])}")
    return " ".join(parts) if parts else "(no change)"


def _describe_outcome(outcome: Outcome | None, *, full: bool = False) -> str:
    """``applied at step 12``, or ``rejected: why``; with ``full``, an applied outcome's message too."""
    if outcome is None:
        return "pending"
    if outcome.result == "applied":
        head = f"applied at step {outcome.step}" if outcome.step is not None else "applied"
        return f"{head}: {outcome.message}" if full and outcome.message else head
    if outcome.message:
        return f"{outcome.result}: {outcome.message}"
    return outcome.result


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _is_stale(status: Status, stale_after: float | None, now: float) -> bool:
    """Whether a live status has gone without a heartbeat for too long: ``stale_after`` seconds when given,
    else :data:`STALE_KEEPALIVES` of the status's own keepalive (plus 2 s), else :data:`DEFAULT_STALE_AFTER`."""
    if stale_after is None:
        stale_after = STALE_KEEPALIVES * status.keepalive + 2.0 if status.keepalive > 0 else DEFAULT_STALE_AFTER
    return status.live and status.age(now) > stale_after


# -- commands ----------------------------------------------------------------------------------------------


def _weaver(args: argparse.Namespace) -> AsyncWeaver:
    return AsyncWeaver(args.url)


def _missing_run(run: str) -> CliError:
    return CliError(f"run {run!r} has no revisions yet; write one with: weavelet set {run} KEY=VALUE")


async def cmd_set(args: argparse.Namespace, out: TextIO) -> int:
    validate_run_id(args.run)
    changes = parse_assignments(args.assignments)
    async with _weaver(args) as weaver:
        previous: Revision | None
        try:
            previous = await weaver.get(args.run)
        except CorruptEntry:
            if not args.replace:
                raise
            previous = None
        revision = await weaver.set(args.run, changes, replace=args.replace)
        return await _report_write(args, out, weaver, previous, revision)


async def _report_write(
    args: argparse.Namespace, out: TextIO, weaver: AsyncWeaver, previous: Revision | None, revision: Revision
) -> int:
    """Print what was stored, then (with ``--wait``) the outcome, with its message; return the exit status."""
    if not args.json:
        change = describe_changes(previous.config if previous else None, revision.config)
        out.write(f"{args.run}: revision {revision.revision} stored ({change})\n")
        out.flush()
    outcome: Outcome | None = None
    started = time.monotonic()
    if args.wait is not None:
        try:
            outcome = await weaver.wait(args.run, revision.revision, timeout=args.wait, revision_id=revision.id)
        except (WaitTimeout, RunEnded) as exc:
            if args.json:
                _print_json({"revision": to_dict(revision), "outcome": None, "error": str(exc)}, out)
            _error(str(exc))
            return EXIT_WAIT_TIMEOUT if isinstance(exc, WaitTimeout) else EXIT_ERROR
    successor = await _successor(weaver, args, outcome, started) if outcome is not None else None
    if args.json:
        body = {"revision": to_dict(revision), "outcome": to_dict(outcome) if outcome else None}
        if successor is not None:
            body["superseded_by"] = to_dict(successor)
        _print_json(body, out)
    elif outcome is not None:
        out.write(f"{args.run}: revision {revision.revision} {_describe_outcome(outcome, full=True)}\n")
        if successor is not None:
            # The newer revision carries this one's changes (configs are whole): its outcome is what happened.
            out.write(f"{args.run}: revision {successor.revision} {_describe_outcome(successor, full=True)}\n")
        commands = outcome.detail.get("commands")
        if isinstance(commands, dict) and outcome.result != "applied":
            for name, what in commands.items():
                out.write(f"{args.run}: {name}: {what}\n")
    if outcome is not None and outcome.result == "rejected":
        return EXIT_ERROR
    return EXIT_OK


async def _successor(weaver: AsyncWeaver, args: argparse.Namespace, outcome: Outcome, started: float) -> Outcome | None:
    """For a ``superseded`` outcome, the outcome of the revision that superseded it, within what is left of
    ``--wait`` (``None`` when there is none, or no time)."""
    newer = outcome.detail.get("superseded_by")
    if outcome.result != "superseded" or not isinstance(newer, int) or args.wait is None:
        return None
    left = args.wait - (time.monotonic() - started)
    if left <= 0:
        return None
    with contextlib.suppress(WaitTimeout, RunEnded):
        return await weaver.wait(args.run, newer, timeout=left)
    return None


async def cmd_command(args: argparse.Namespace, out: TextIO) -> int:
    """``weavelet checkpoint RUN`` / ``weavelet stop RUN``: send the command to the run's live incarnation.

    The command's key gets a fresh token naming the live incarnation (read from the run's status), so it acts
    once, and never in a later incarnation. A run with no live incarnation is refused at once.
    """
    validate_run_id(args.run)
    async with _weaver(args) as weaver:
        try:
            previous: Revision | None = await weaver.get(args.run)
        except CorruptEntry:
            previous = None
        revision = await weaver.command(args.run, args.command)
        assert isinstance(revision, Revision)
        return await _report_write(args, out, weaver, previous, revision)


async def cmd_get(args: argparse.Namespace, out: TextIO) -> int:
    validate_run_id(args.run)
    async with _weaver(args) as weaver:
        revision = await weaver.get(args.run)
    if revision is None:
        raise _missing_run(args.run)
    if args.json:
        _print_json(to_dict(revision), out)
        return EXIT_OK
    out.write(
        f"run {revision.run}  revision {revision.revision}  by {revision.author or '?'}  "
        f"at {format_time(revision.created_at)}\n"
    )
    out.write(json.dumps(revision.config, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    validate_run_id(args.run)
    unreadable: CorruptEntry | None = None
    async with _weaver(args) as weaver:
        status = await weaver.status(args.run)
        desired: Revision | None
        try:
            desired = await weaver.get(args.run)
        except CorruptEntry as exc:
            desired, unreadable = None, exc
    if status is None:
        where = "" if desired is None else f" (its desired config is at revision {desired.revision})"
        raise CliError(
            f"run {args.run!r} has not reported a status{where}; is its trainer running with weavelet "
            f"against {mask_password(args.url or default_url())}?"
        )
    now = time.time()
    age = status.age(now)
    stale = _is_stale(status, args.stale_after, now)
    if args.json:
        body = to_dict(status)
        body.update(
            heartbeat_age=round(age, 3),
            stale=stale,
            desired_revision=desired.revision if desired else unreadable.revision if unreadable else None,
            desired_unreadable=str(unreadable) if unreadable else None,
        )
        _print_json(body, out)
        return EXIT_OK
    flag = f"  STALE: no heartbeat for {format_age(age)}" if stale else ""
    lines = [
        f"run        {status.run}",
        f"state      {status.state}{flag}",
    ]
    if status.incarnation:
        started = f", started {format_time(status.started_at)}" if status.started_at else ""
        lines.append(f"incarnation {status.incarnation}{started}")
    lines += [
        f"heartbeat  {format_age(age)} ago ({format_time(status.heartbeat)})",
        f"step       {status.step}   epoch {status.epoch}",
    ]
    lines.append(f"applied    revision {status.applied_revision}")
    last = status.last_outcome or {}
    if unreadable is not None:
        lines.append(f"desired    {unreadable}")
    elif desired is not None and desired.revision > status.applied_revision:
        if last.get("revision") == desired.revision and last.get("result") == "rejected":
            lines.append(f"desired    revision {desired.revision} REJECTED: {last.get('message') or 'no reason given'}")
        elif last.get("revision") == desired.revision:
            lines.append(f"desired    revision {desired.revision} {last.get('result')}")
        else:
            lines.append(f"desired    revision {desired.revision}, not applied yet")
    if last and not (desired is not None and last.get("revision") == desired.revision):
        lines.append(f"last       revision {last.get('revision')} {last.get('result')}: {last.get('message') or ''}")
    if status.optimizer is not None:
        lines.append(f"optimizer  {_value(status.optimizer)}")
    if status.metrics:
        lines.append("metrics    " + " ".join(f"{k}={v:g}" for k, v in sorted(status.metrics.items())))
    lines.append(f"process    pid {status.pid} on {status.host}")
    if status.message:
        lines.append(f"message    {status.message}")
    out.write("\n".join(lines) + "\n")
    return EXIT_OK


async def cmd_history(args: argparse.Namespace, out: TextIO) -> int:
    validate_run_id(args.run)
    async with _weaver(args) as weaver:
        entries = await weaver.history(args.run, limit=args.limit)
        outcomes: dict[int, list[Outcome]] = {}
        for outcome in await weaver.outcomes(args.run):
            outcomes.setdefault(outcome.revision, []).append(outcome)
    if not entries:
        raise _missing_run(args.run)
    if args.json:
        rows = [
            {
                "revision": to_dict(e) if isinstance(e, Revision) else None,
                "unreadable": None if isinstance(e, Revision) else {"revision": e.revision, "reason": e.reason},
                "outcome": to_dict(outcomes[e.revision][-1]) if e.revision in outcomes else None,
                "outcomes": [to_dict(o) for o in outcomes.get(e.revision, [])],
            }
            for e in entries
        ]
        _print_json(rows, out)
        return EXIT_OK
    table = [("REV", "WRITTEN", "AUTHOR", "INCARNATION", "OUTCOME", "CHANGES")]
    previous: dict[str, Any] | None = None
    for entry in entries:
        answers: list[Outcome | None] = [*outcomes.get(entry.revision, [])] or [None]
        if isinstance(entry, Revision):
            written, author = format_time(entry.created_at), entry.author or "?"
            changes = (
                describe_changes(previous or {}, entry.config)
                if previous is not None or entry.revision == 1
                else _value(entry.config)  # older revisions were trimmed: show it whole
            )
            previous = entry.config
        else:
            written, author, changes = "?", "?", f"UNREADABLE: {entry.reason}"
            previous = None
        for index, answer in enumerate(answers):
            table.append(
                (
                    str(entry.revision) if index == 0 else "",
                    written if index == 0 else "",
                    author if index == 0 else "",
                    (answer.incarnation or "-") if answer is not None else "-",
                    _describe_outcome(answer),
                    changes if index == 0 else "",
                )
            )
    _print_table(table, out)
    return EXIT_OK


async def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    async with _weaver(args) as weaver:
        names = await weaver.runs()
        rows: list[dict[str, Any]] = []
        now = time.time()
        for name in names:
            number: int | None
            try:
                revision = await weaver.get(name)
                number = revision.revision if revision else None
            except CorruptEntry as exc:
                number = exc.revision
            status = await weaver.status(name)
            rows.append(
                {
                    "run": name,
                    "revision": number,
                    "state": status.state if status else None,
                    "applied_revision": status.applied_revision if status else None,
                    "heartbeat_age": round(status.age(now), 3) if status else None,
                    "stale": _is_stale(status, args.stale_after, now) if status else None,
                }
            )
    if args.json:
        _print_json(rows, out)
        return EXIT_OK
    if not rows:
        out.write(f"no runs at {mask_password(args.url or default_url())}\n")
        return EXIT_OK
    table = [("RUN", "REVISION", "APPLIED", "STATE", "HEARTBEAT")]
    for row in rows:
        age = row["heartbeat_age"]
        heartbeat = "-" if age is None else f"{format_age(age)} ago" + (" STALE" if row["stale"] else "")
        table.append(
            (
                row["run"],
                "-" if row["revision"] is None else str(row["revision"]),
                "-" if row["applied_revision"] is None else str(row["applied_revision"]),
                row["state"] or "-",
                heartbeat,
            )
        )
    _print_table(table, out)
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace, out: TextIO) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # broken plugins are listed below instead
        registry = get_registry()
        transports = registry.transports()
        conflicts = {
            scheme: [f"{t.spec.name} ({t.package})" for t in claimants]
            for scheme, claimants in registry.claims().items()
            if len(claimants) > 1
        }
    rows: list[dict[str, Any]] = []
    for loaded in transports:
        missing = loaded.spec.missing_modules()
        rows.append(
            {
                "name": loaded.spec.name,
                "schemes": list(loaded.spec.schemes),
                "package": loaded.package,
                "description": loaded.spec.description,
                "driver_installed": not missing,
                "missing_modules": missing,
                "install": loaded.spec.install_command() if missing else None,
            }
        )
    broken = [dataclasses.asdict(b) for b in _unique(registry.broken)]
    if args.json:
        _print_json(
            {
                "transports": rows,
                "broken": broken,
                "conflicts": conflicts,
                "optimizers": sorted(registry.optimizers()),
                "autoload": registry.autoload,
            },
            out,
        )
        return EXIT_OK
    table = [("TRANSPORT", "SCHEMES", "PACKAGE", "DRIVER")]
    for row in rows:
        driver = "installed" if row["driver_installed"] else f"missing: {row['install']}"
        table.append((row["name"], ", ".join(f"{s}://" for s in row["schemes"]), row["package"], driver))
    _print_table(table, out)
    for scheme, names in sorted(conflicts.items()):
        out.write(f"conflict: {scheme}:// is claimed by {' and '.join(names)}; uninstall one of them\n")
    for item in broken:
        out.write(f"broken: plugin {item['name']!r} from package {item['package']!r}: {item['error']}\n")
    if not registry.autoload:
        out.write("third-party plugins are not loaded (WEAVELET_DISABLE_PLUGIN_AUTOLOAD is set)\n")
    return EXIT_OK


def _unique(items: Sequence[Any]) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths[:-1], strict=True)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


# -- subcommands provided by other modules -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Delegated:
    """A subcommand implemented by ``module``, which exposes ``add_arguments(parser)`` and ``run(args)``.

    The module is imported only when its subcommand is the one being run. When it (or one of ``requires``)
    cannot be imported, the subcommand says which extra to install.
    """

    module: str
    extra: str
    help: str
    requires: tuple[str, ...] = ()

    def install_command(self) -> str:
        return f'pip install "weavelet[{self.extra}]"'

    def load(self) -> ModuleType | None:
        """The module, or ``None`` when it or what it needs is not installed."""
        for name in self.requires:
            try:
                if importlib.util.find_spec(name) is None:
                    return None
            except (ImportError, ValueError):
                return None
        try:
            return importlib.import_module(self.module)
        except ImportError:
            return None


DELEGATED: dict[str, Delegated] = {
    "server": Delegated(
        "weavelet_nats.server", "nats", "start a local NATS server with JetStream for weavelet", ("nats",)
    ),
    "demo": Delegated(
        "weavelet_lightning.demo",
        "lightning",
        "train a small model that you can reconfigure while it runs",
        ("torch", "pytorch_lightning"),
    ),
}


def _add_delegated(subparsers: Any, name: str, delegated: Delegated, load: bool) -> None:
    module = delegated.load() if load else None
    if module is not None:
        parser = subparsers.add_parser(name, help=delegated.help, description=delegated.help)
        module.add_arguments(parser)
        parser.set_defaults(handler=module.run, is_async=False, delegated=name)
        return
    parser = subparsers.add_parser(
        name,
        help=f"{delegated.help} (from the {delegated.extra} extra)",
        description=f"{delegated.help}. Needs the {delegated.extra} extra: {delegated.install_command()}",
    )

    def unavailable(args: argparse.Namespace) -> int:
        raise CliError(
            f"'weavelet {name}' needs the {delegated.extra} extra, which is not installed; "
            f"install it with: {delegated.install_command()}"
        )

    parser.set_defaults(handler=unavailable, is_async=False, delegated=name, placeholder=True)


# -- parser ------------------------------------------------------------------------------------------------


def build_parser(load: Collection[str] = ()) -> argparse.ArgumentParser:
    """The argument parser. Delegated subcommands named in ``load`` import their module to add their
    arguments; the others get a placeholder (help text only)."""
    url_help = f"transport URL (default: ${URL_ENV}, else the per-user file:// directory)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=url_help)
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON instead of text")
    stale = argparse.ArgumentParser(add_help=False)
    stale.add_argument(
        "--stale-after",
        type=_positive_float,
        default=None,
        metavar="S",
        help=f"flag a running run as stale after S seconds without a heartbeat (default: {STALE_KEEPALIVES} of "
        "the run's keepalive intervals plus 2 s)",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Reconfigure running training jobs: write desired config revisions, read status and outcomes.",
        epilog="Values parse as JSON when they can (lr=1e-3 is a number, optimizer=adam a string); "
        "dotted keys nest (optimizer.name=adam); KEY= or KEY=null removes a key.",
    )
    parser.add_argument("--url", default=None, help=url_help)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = subparsers.add_parser(
        "plugins",
        parents=[json_flag],
        help="list transports, their URL schemes and drivers, and broken plugins",
    )
    p.set_defaults(handler=cmd_plugins, is_async=False)

    p = subparsers.add_parser(
        "set",
        parents=[common, json_flag],
        help="write a new revision of a run's desired config",
        description="Merge KEY=VALUE changes onto the run's desired config and store it as a new revision.",
    )
    p.add_argument("run", metavar="RUN", help="run id")
    p.add_argument("assignments", metavar="KEY=VALUE", nargs="+", help="changes; KEY= removes KEY")
    p.add_argument(
        "--wait",
        type=_positive_float,
        metavar="S",
        help="wait up to S seconds for the trainer's outcome (applied or rejected)",
    )
    p.add_argument("--replace", action="store_true", help="replace the whole config instead of merging")
    p.set_defaults(handler=cmd_set, is_async=True)

    for command, what in (("checkpoint", "save a checkpoint now"), ("stop", "end the fit gracefully")):
        p = subparsers.add_parser(
            command,
            parents=[common, json_flag],
            help=f"ask a running trainer to {what}",
            description=f"Ask the run's trainer to {what}: sets {command}=<new token> in its desired config.",
        )
        p.add_argument("run", metavar="RUN", help="run id")
        p.add_argument(
            "--wait", type=_positive_float, metavar="S", help="wait up to S seconds for the trainer's outcome"
        )
        p.set_defaults(handler=cmd_command, is_async=True)

    p = subparsers.add_parser("get", parents=[common, json_flag], help="show a run's desired config")
    p.add_argument("run", metavar="RUN", help="run id")
    p.set_defaults(handler=cmd_get, is_async=True)

    p = subparsers.add_parser(
        "status", parents=[common, json_flag, stale], help="show what a run's trainer last reported"
    )
    p.add_argument("run", metavar="RUN", help="run id")
    p.set_defaults(handler=cmd_status, is_async=True)

    p = subparsers.add_parser("history", parents=[common, json_flag], help="list a run's revisions with their outcomes")
    p.add_argument("run", metavar="RUN", help="run id")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="only the newest N revisions")
    p.set_defaults(handler=cmd_history, is_async=True)

    p = subparsers.add_parser("runs", parents=[common, json_flag, stale], help="list the runs the transport knows")
    p.set_defaults(handler=cmd_runs, is_async=True)

    for name, delegated in DELEGATED.items():
        _add_delegated(subparsers, name, delegated, name in load)
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (skipping global options), without parsing it."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--url":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


# -- entry point -------------------------------------------------------------------------------------------


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    saved_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (``weavelet history RUN | head``): not an error.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # keep the final flush quiet
        return EXIT_OK
    except WeaveletError as exc:
        if debug:
            raise
        _error(str(exc))
        return EXIT_ERROR
    except ValueError as exc:  # a value the user gave, refused by the code that reads it
        if debug:
            raise
        _error(str(exc))
        return EXIT_ERROR
    except Exception as exc:
        if debug:
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 to see where it happened)")
        return EXIT_ERROR
    finally:
        warnings.showwarning = saved_showwarning


def _main(argv: list[str]) -> int:
    command = _chosen_command(argv)
    parser = build_parser(load=[command] if command in DELEGATED else [])
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and not getattr(args, "placeholder", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse printed usage or help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[..., Any] = args.handler
    if getattr(args, "delegated", None):
        return int(handler(args))
    if args.is_async:
        coroutine_function: Callable[[argparse.Namespace, TextIO], Awaitable[int]] = handler
        out = sys.stdout

        async def run() -> int:
            return await coroutine_function(args, out)

        return anyio.run(run, backend="asyncio")
    return int(handler(args, sys.stdout))
