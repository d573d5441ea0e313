"""Commands that write revisions: ``set``, ``checkpoint``, ``stop``, ``rollback`` and ``revert``, on one run or
many."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO

import anyio

from weavelet_core.cli import output
from weavelet_core.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_WAIT_TIMEOUT,
    PROG,
    CliError,
    UsageError,
    add_output,
    add_signing,
    add_url,
    add_wait,
    is_stale,
    revision_number,
    unreachable_reason,
    wants_json,
    weaver,
)
from weavelet_core.cli.selectors import GLOB_CHARS, add_selectors, select, single
from weavelet_core.cli.values import check_merge, parse_assignments
from weavelet_core.errors import CorruptEntry, RunEnded, WaitTimeout, WeaveletError
from weavelet_core.protocol import Outcome, Revision, to_dict, validate_run_id
from weavelet_core.schema import PATH_MAX_CHARS, ROLLBACK_TARGETS, check_rollback_fields
from weavelet_core.weaver import COMMAND_KEYS, AsyncWeaver, merge_config


@dataclasses.dataclass
class Result:
    """What happened to one run."""

    run: str
    previous: Revision | None = None
    revision: Revision | None = None
    outcome: Outcome | None = None
    successor: Outcome | None = None  # the outcome of the revision that superseded this one
    written: bool = False
    planned: dict[str, Any] | None = None  # the config a dry run would write
    error: str | None = None
    timed_out: bool = False

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "run": self.run,
            "revision": to_dict(self.revision) if self.revision else None,
            "outcome": to_dict(self.outcome) if self.outcome else None,
            "written": self.written,
        }
        if self.successor is not None:
            body["superseded_by"] = to_dict(self.successor)
        if self.planned is not None:
            body["would_write"] = self.planned
        if self.error is not None:
            body["error"] = self.error
        return body

    @property
    def failed(self) -> bool:
        return (self.error is not None and not self.timed_out) or (
            self.outcome is not None and self.outcome.result == "rejected"
        )


Write = Callable[[AsyncWeaver, str, Revision | None], Awaitable[Revision | None]]
"""``write(weaver, run, previous) -> stored revision``, or ``None`` when nothing needs writing."""
Plan = Callable[[str, Revision | None], dict[str, Any] | None]
"""``plan(run, previous) -> the config that would be written`` (for ``--dry-run``), ``None``: nothing to write."""


async def _previous(weaver: AsyncWeaver, run: str, *, tolerate_corrupt: bool) -> Revision | None:
    try:
        return await weaver.get(run)
    except CorruptEntry:
        if not tolerate_corrupt:
            raise
        return None


async def run_writes(
    args: argparse.Namespace,
    out: TextIO,
    plan: Plan,
    write: Write,
    *,
    live_only: bool = False,
    tolerate_corrupt: bool = False,
) -> int:
    """Choose the runs, write each (or say what a dry run would write), wait for outcomes, print a line per
    run; return the exit status: 1 if any run failed or rejected, else 3 if any wait ran out, else 0."""
    as_json = wants_json(args)
    one = single(args)
    async with weaver(args) as w:
        if one is not None:
            runs = [one]
        else:
            runs, statuses = await select(w, args)
            if live_only:
                if not statuses:
                    statuses = await w.statuses(runs)
                skipped = [r for r in runs if (s := statuses.get(r)) is None or not s.live]
                runs = [r for r in runs if r not in skipped]
                if skipped and not as_json:
                    out.write(f"skipped {len(skipped)} run(s) with no live incarnation: {' '.join(skipped)}\n")
                if not runs:
                    raise CliError("none of the chosen runs has a live incarnation to act on")
        results: list[Result] = []
        for run in runs:
            result = Result(run)
            results.append(result)
            try:
                result.previous = await _previous(w, run, tolerate_corrupt=tolerate_corrupt or args.dry_run)
                unreachable = await unreachable_reason(w, run, result.previous)
                if unreachable is not None:
                    raise CliError(unreachable)
                if args.dry_run:
                    result.planned = plan(run, result.previous)
                else:
                    result.revision = await write(w, run, result.previous)
                    result.written = result.revision is not None
            except (WeaveletError, ValueError) as exc:
                if one is not None:
                    raise
                result.error = str(exc)
            if not as_json:
                _print_written(result, out)
        if args.wait is not None and not args.dry_run:
            # One run's wait that fails is said once, as the error on stderr (below); many runs get a line each.
            await _wait_all(w, results, args.wait, out, print_each=not as_json, print_errors=one is None)
    if as_json:
        if one is not None:
            body = results[0].as_json()
            body.pop("run")
            output.print_json(body, out)
        else:
            output.print_json([r.as_json() for r in results], out)
    if one is not None and results[0].error is not None and not as_json:
        output.error_line(results[0].error)
    if any(r.failed for r in results):
        return EXIT_ERROR
    if any(r.timed_out for r in results):
        return EXIT_WAIT_TIMEOUT
    return EXIT_OK


def _print_written(result: Result, out: TextIO) -> None:
    run = result.run
    previous = result.previous.config if result.previous else None
    if result.error is not None:
        out.write(f"{run}: error: {result.error}\n")
    elif result.planned is not None:
        number = result.previous.revision + 1 if result.previous else 1
        out.write(f"{run}: would write revision {number} ({output.describe_changes(previous, result.planned)})\n")
    elif result.revision is None and result.previous is not None and not result.written:
        out.write(f"{run}: no change: revision {result.previous.revision} already has this config; nothing written\n")
    elif result.revision is not None:
        change = output.describe_changes(previous, result.revision.config)
        reverts = result.revision.reverts
        mark = f", a revert of revision {reverts}" if reverts else ""
        out.write(f"{run}: revision {result.revision.revision} stored{mark} ({change})\n")
        removed = sorted(set(previous or {}) - set(result.revision.config) - COMMAND_KEYS)
        if removed:
            # Desired state: a key that is no longer desired is left as the trainer has it, not undone.
            out.write(
                f"{run}: note: {', '.join(removed)} no longer set; the trainer keeps its current "
                f"value{'s' if len(removed) > 1 else ''} (a removed key is not undone): set "
                f"{'them' if len(removed) > 1 else 'it'} explicitly to change {'them' if len(removed) > 1 else 'it'}\n"
            )
    out.flush()


async def _wait_all(
    w: AsyncWeaver, results: list[Result], timeout: float, out: TextIO, *, print_each: bool, print_errors: bool
) -> None:
    async def one(result: Result) -> None:
        revision = result.revision
        if revision is None:
            return
        started = time.monotonic()
        try:
            result.outcome = await w.wait(result.run, revision.revision, timeout=timeout, revision_id=revision.id)
        except (WaitTimeout, RunEnded) as exc:
            result.error = str(exc)
            result.timed_out = isinstance(exc, WaitTimeout)
            if print_each and print_errors:
                out.write(f"{result.run}: revision {revision.revision}: {exc}\n")
            return
        result.successor = await _successor(w, result.run, result.outcome, timeout - (time.monotonic() - started))
        if print_each:
            for line in outcome_lines(result.run, revision.revision, result.outcome):
                out.write(line + "\n")
            if result.successor is not None:
                # The newer revision carries this one's changes (configs are whole): its outcome is what happened.
                for line in outcome_lines(result.run, result.successor.revision, result.successor):
                    out.write(line + "\n")
            out.flush()

    async with anyio.create_task_group() as tg:
        for result in results:
            tg.start_soon(one, result)


async def _successor(w: AsyncWeaver, run: str, outcome: Outcome, left: float) -> Outcome | None:
    """For a ``superseded`` outcome, the outcome of the revision that superseded it, within ``left`` seconds
    (``None`` when there is none, or no time)."""
    newer = outcome.detail.get("superseded_by")
    if outcome.result != "superseded" or not isinstance(newer, int) or left <= 0:
        return None
    with contextlib.suppress(WaitTimeout, RunEnded):
        return await w.wait(run, newer, timeout=left)
    return None


def outcome_lines(run: str, number: int, outcome: Outcome) -> list[str]:
    """The outcome with its message, then its detail (a checkpoint's path, the optimizer now active, ...) and,
    for a rejected revision whose commands acted anyway, each command's line."""
    lines = [f"{run}: revision {number} {output.describe_outcome(outcome, full=True)}"]
    lines += [f"{run}:   {line}" for line in output.detail_lines(outcome)]
    commands = outcome.detail.get("commands")
    if isinstance(commands, dict) and outcome.result != "applied":
        lines += [f"{run}: {name}: {what}" for name, what in commands.items()]
    return lines


# -- set ---------------------------------------------------------------------------------------------------


def _split_words(args: argparse.Namespace) -> None:
    """``set``'s words are run ids or patterns (no ``=``) followed by ``KEY=VALUE`` changes."""
    words: list[str] = args.words
    args.runs = [w for w in words if "=" not in w]
    args.assignments = [w for w in words if "=" in w]
    if not args.assignments:
        raise UsageError(
            "the following arguments are required: KEY=VALUE (give at least one change, like lr=0.01)",
            "usage: weavelet set [options] RUN... KEY=VALUE...\n",
        )


async def cmd_set(args: argparse.Namespace, out: TextIO) -> int:
    _split_words(args)
    changes = parse_assignments(args.assignments)

    def planned(run: str, previous: Revision | None) -> dict[str, Any] | None:
        if not args.replace and previous is not None:
            # Only dotted keys merge into a value; a whole JSON object (optimizer='{...}') replaces it, as asked.
            check_merge(previous.config, parse_assignments([a for a in args.assignments if "." in a.split("=")[0]]))
        base = previous.config if previous is not None and not args.replace else {}
        config = merge_config(base, changes)
        if previous is not None and config == previous.config:
            return None
        return config

    async def write(w: AsyncWeaver, run: str, previous: Revision | None) -> Revision | None:
        if planned(run, previous) is None and (previous is None or w.trusts(previous)):
            return None  # nothing changes: write nothing (a signing writer re-signs what it cannot verify)
        if not args.force:
            await check_before_writing(w, run, changes, replace=args.replace, note=not wants_json(args))
        return await w.set(run, changes, replace=args.replace)

    return await run_writes(args, out, planned, write, tolerate_corrupt=args.replace)


async def check_before_writing(
    w: AsyncWeaver, run: str, changes: dict[str, Any], *, replace: bool, note: bool = True
) -> None:
    """Refuse (:class:`CliError`, nothing written) a change the run's live trainer would reject, with its own
    messages. A run whose trainer ended, went stale or publishes no schema is written unchecked, with a note on
    stderr (``note``; not with ``--json``, whose stderr stays empty); a run that never reported a status (not
    started yet) is written unchecked and silently."""
    status = await w.status(run)
    if status is None:
        return  # a run not started yet (configured ahead of its trainer): nothing to check against, nothing to say
    if not status.live or is_stale(status, None, time.time()) or not status.schema:
        why = (
            "no live trainer"
            if not status.live
            else "a stale status"
            if is_stale(status, None, time.time())
            else "a schema that is not stored or not readable"
            if status.schema_digest
            else "a trainer that publishes no schema"
        )
        if note:
            sys.stderr.write(f"{PROG}: note: run {run!r} has {why}: not checked before writing\n")
            sys.stderr.flush()
        return
    problems = await w.check(run, changes, replace=replace, status=status)
    if problems:
        listed = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        raise CliError(
            f"not written: run {run!r} would reject it: {listed} (nothing was written; --force writes it anyway)"
        )


# -- stop / checkpoint -------------------------------------------------------------------------------------


async def cmd_command(args: argparse.Namespace, out: TextIO) -> int:
    """``weavelet checkpoint`` / ``weavelet stop``: a fresh token for each chosen run's live incarnation."""
    name: str = args.command

    def planned(run: str, previous: Revision | None) -> dict[str, Any] | None:
        base = dict(previous.config) if previous else {}
        base[name] = {"token": "<fresh>", "incarnation": "<live>"}
        return base

    async def write(w: AsyncWeaver, run: str, previous: Revision | None) -> Revision | None:
        revision = await w.command(run, name)
        assert isinstance(revision, Revision)
        return revision

    return await run_writes(args, out, planned, write, live_only=True, tolerate_corrupt=True)


# -- rollback ----------------------------------------------------------------------------------------------


def rollback_target(text: str) -> str | int:
    """``--to``: ``latest``, ``snapshot``, a step (digits) or a checkpoint path on the trainer's machine."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("give latest, snapshot, a step or a checkpoint path")
    if text in ROLLBACK_TARGETS:
        return text
    if text.isdigit():
        return int(text)
    if len(text) > PATH_MAX_CHARS:
        raise argparse.ArgumentTypeError(f"a checkpoint path has at most {PATH_MAX_CHARS} characters")
    return text


async def cmd_rollback(args: argparse.Namespace, out: TextIO) -> int:
    """``weavelet rollback``: a fresh rollback token (with its target and changes) for each chosen live run."""
    words: list[str] = args.words
    args.runs = [w for w in words if "=" not in w]
    changes = parse_assignments([w for w in words if "=" in w])
    fields: dict[str, Any] = {"to": args.to}
    if changes:
        fields["set"] = changes
    try:
        check_rollback_fields(fields)
    except ValueError as exc:
        raise CliError(f"{exc} (nothing was written)") from None

    def planned(run: str, previous: Revision | None) -> dict[str, Any] | None:
        base = dict(previous.config) if previous else {}
        base["rollback"] = {**fields, "token": "<fresh>", "incarnation": "<live>"}
        return base

    async def write(w: AsyncWeaver, run: str, previous: Revision | None) -> Revision | None:
        if changes and not args.force:
            await check_before_writing(w, run, changes, replace=False, note=not wants_json(args))
        revision = await w.rollback(run, args.to, changes or None)
        assert isinstance(revision, Revision)
        return revision

    return await run_writes(args, out, planned, write, live_only=True, tolerate_corrupt=True)


# -- revert ------------------------------------------------------------------------------------------------


async def cmd_revert(args: argparse.Namespace, out: TextIO) -> int:
    number: int = args.rev

    async def target(w: AsyncWeaver, run: str) -> Revision:
        return await w.revision(run, number)

    cache: dict[str, Revision] = {}

    def planned(run: str, previous: Revision | None) -> dict[str, Any] | None:
        old = cache[run]
        config = {k: v for k, v in old.config.items() if k not in COMMAND_KEYS}
        if previous is not None:
            config.update({k: v for k, v in previous.config.items() if k in COMMAND_KEYS})
        return config

    async def write(w: AsyncWeaver, run: str, previous: Revision | None) -> Revision | None:
        revision = await w.revert(run, number)
        assert isinstance(revision, Revision)
        return revision

    if args.dry_run:
        # A dry run needs the old config before it can say what it would write.
        async with weaver(args) as w:
            runs = [single(args)] if single(args) else (await select(w, args))[0]
            for run in runs:
                assert run is not None
                try:
                    cache[run] = await target(w, run)
                except (WeaveletError, ValueError):
                    pass
    return await run_writes(args, out, _planned_or_error(planned, cache, number), write, tolerate_corrupt=True)


def _planned_or_error(planned: Plan, cache: Mapping[str, Revision], number: int) -> Plan:
    def plan(run: str, previous: Revision | None) -> dict[str, Any] | None:
        if run not in cache:
            raise CliError(f"run {run!r} has no readable revision {number}; see: weavelet history {run}")
        return planned(run, previous)

    return plan


# -- parsers -----------------------------------------------------------------------------------------------

SET_EXAMPLES = """examples:
  weavelet set demo lr=0.01                      merge lr into the desired config
  weavelet set demo optimizer=adam lr=3e-4 --wait 30
  weavelet set demo optimizer.name=adam          dotted keys nest
  weavelet set demo momentum=                    remove a key
  weavelet set 'sweep-3-*' lr=0.001              every run matching the pattern
  weavelet set -l sweep=3 lr=0.001 --dry-run     runs labelled sweep=3; change nothing
  weavelet set gan generator.lr=1e-4 discriminator.optimizer=sgd   a run steering several optimizers
  weavelet set demo lrr=0.1 --force              write a change the live trainer would reject
"""


def add_parsers(subparsers: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = subparsers.add_parser(
        "set",
        help="write a new revision of a run's desired config",
        description="Merge KEY=VALUE changes onto each chosen run's desired config and store it as a new "
        "revision. A change that leaves the config as it is writes nothing. A change the run's live trainer would "
        "reject (an unknown key, a wrong kind or range, an unknown optimizer) is refused first, with the "
        "trainer's own message, and nothing is written (--force writes it anyway).",
        epilog=SET_EXAMPLES,
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p)
    p.add_argument(
        "words",
        metavar="RUN... KEY=VALUE...",
        nargs="*",
        help="run ids or glob patterns (none with -l or --all), then changes; KEY= removes KEY",
    )
    add_selectors(p, positional=False)  # the run ids and patterns are the words without '='
    add_wait(p)
    add_signing(p)
    p.add_argument("--replace", action="store_true", help="replace the whole config instead of merging")
    p.add_argument(
        "--force",
        action="store_true",
        help="write even when the run's live trainer would reject the change (it is checked against the schema "
        "the trainer publishes; a run with no live trainer is written unchecked, with a note)",
    )
    p.set_defaults(handler=cmd_set, is_async=True, extra_words=True)

    for command, what in (("checkpoint", "save a checkpoint now"), ("stop", "end the fit gracefully")):
        p = subparsers.add_parser(
            command,
            help=f"ask running trainers to {what}",
            description=f"Ask each chosen run's live incarnation to {what}: sets {command} to a fresh token "
            "naming that incarnation, so it acts once, and never in a later start of the run.",
            epilog=f"""examples:
  weavelet {command} demo --wait 60
  weavelet {command} -l sweep=3                  every live run labelled sweep=3
  weavelet {command} --all --dry-run             which runs it would reach
""",
            formatter_class=formatter,
        )
        add_url(p)
        add_output(p)
        add_selectors(p)
        add_wait(p)
        add_signing(p)
        p.set_defaults(handler=cmd_command, is_async=True)

    p = subparsers.add_parser(
        "rollback",
        help="roll running trainers back to a checkpoint in place, then apply changes",
        description="Ask each chosen run's live incarnation to roll back at its next optimizer step: it restores "
        "the model, every optimizer and scheduler, the GradScaler and weavelet's state from the checkpoint, applies "
        "the KEY=VALUE changes on top, and rewrites the desired config to the checkpoint's plus the changes (so the "
        "value that caused a spike does not come back). The step counter and the data position keep moving "
        "forward. A checkpoint that does not match the model is rejected and nothing changes. The outcome names "
        "the checkpoint, its step and the step the rollback took effect at.",
        epilog="""examples:
  weavelet rollback demo --wait 60                       the newest checkpoint of the run
  weavelet rollback demo --to latest lr_scale=0.5        then halve the learning-rate schedule
  weavelet rollback demo --to 1200 grad_clip_val=0.5     the newest checkpoint at or before step 1200
  weavelet rollback demo --to /ckpt/demo-step1000.ckpt   a file on the trainer's machine
  weavelet rollback demo --to snapshot                   the newest in-memory snapshot (snapshot_every=N)
""",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p)
    p.add_argument(
        "words",
        metavar="RUN... [KEY=VALUE...]",
        nargs="*",
        help="run ids or glob patterns (none with -l or --all), then changes applied after restoring",
    )
    add_selectors(p, positional=False)
    p.add_argument(
        "--to",
        type=rollback_target,
        default="latest",
        metavar="latest|snapshot|STEP|PATH",
        help="the checkpoint: latest (default: the run's newest), snapshot (the newest in-memory one), STEP (the "
        "newest at or before that step) or PATH (a file on the trainer's machine)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write even when the run's live trainer would reject the changes",
    )
    add_wait(p)
    add_signing(p)
    p.set_defaults(handler=cmd_rollback, is_async=True, extra_words=True)

    p = subparsers.add_parser(
        "revert",
        help="undo: write a new revision equal to an earlier one",
        description="Write a new revision whose config equals revision REV's (commands keep their current "
        "values), recorded as a revert of REV in the new revision and shown so by 'weavelet history'.",
        epilog="""examples:
  weavelet revert demo 3 --wait 30
  weavelet revert -l sweep=3 2 --dry-run
""",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p)
    add_selectors(p)
    p.add_argument("rev", metavar="REV", type=revision_number, help="the revision to return to (3 or r3)")
    add_wait(p)
    add_signing(p)
    p.set_defaults(handler=cmd_revert, is_async=True)


__all__ = [
    "GLOB_CHARS",
    "add_parsers",
    "cmd_command",
    "cmd_revert",
    "cmd_rollback",
    "cmd_set",
    "outcome_lines",
    "validate_run_id",
]
