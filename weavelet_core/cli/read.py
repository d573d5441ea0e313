"""Commands that read: ``get``, ``status``, ``history``, ``runs``, ``diff`` and ``watch``."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import time
from collections.abc import Sequence
from typing import Any, TextIO

import anyio

from weavelet_core.cli import output
from weavelet_core.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    CliError,
    add_output,
    add_stale,
    add_trusted_keys,
    add_url,
    is_stale,
    missing_run,
    positive_float,
    positive_int,
    revision_number,
    wants_json,
    weaver,
    where,
    wide,
)
from weavelet_core.cli.selectors import add_selectors, label, matches, select, single
from weavelet_core.cli.signed import author_text, signature_of, trusted_of
from weavelet_core.errors import CorruptEntry, PermissionDenied
from weavelet_core.protocol import LIFECYCLE_STATES, Outcome, Revision, Status, to_dict, validate_run_id
from weavelet_core.signing import TrustedKeys
from weavelet_core.weaver import AsyncWeaver

OUTCOME_WIDTH = 60
"""The history table's OUTCOME column is cut to this many characters (``-o wide`` shows it whole)."""
FOLLOW_INTERVAL = 0.25
"""Seconds between two looks at a followed run."""


# -- get ---------------------------------------------------------------------------------------------------


async def cmd_get(args: argparse.Namespace, out: TextIO) -> int:
    validate_run_id(args.run)
    async with weaver(args) as w:
        revision = await w.get(args.run)
    if revision is None:
        raise missing_run(args.run)
    if wants_json(args):
        output.print_json(to_dict(revision), out)
        return EXIT_OK
    out.write(
        f"run {revision.run}  revision {revision.revision}  by {author_text(revision, [], trusted_of(args))}  "
        f"at {output.format_time(revision.created_at)}\n"
    )
    out.write(json.dumps(revision.config, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    return EXIT_OK


# -- status ------------------------------------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    one = single(args)
    if one is None:
        return await _status_many(args, out)
    unreadable: CorruptEntry | None = None
    async with weaver(args) as w:
        status = await w.status(one)
        desired: Revision | None
        try:
            desired = await w.get(one)
        except CorruptEntry as exc:
            desired, unreadable = None, exc
    if status is None:
        there = "" if desired is None else f" (its desired config is at revision {desired.revision})"
        raise CliError(
            f"run {one!r} has not reported a status{there}; is its trainer running with weavelet against {where(args)}?"
        )
    now = time.time()
    age = status.age(now)
    stale = is_stale(status, args.stale_after, now)
    if wants_json(args):
        body = to_dict(status)
        body.update(
            heartbeat_age=round(age, 3),
            stale=stale,
            desired_revision=desired.revision if desired else unreadable.revision if unreadable else None,
            desired_unreadable=str(unreadable) if unreadable else None,
        )
        output.print_json(body, out)
        return EXIT_OK
    out.write("\n".join(status_lines(status, desired, unreadable, stale, now)) + "\n")
    return EXIT_OK


def status_lines(
    status: Status, desired: Revision | None, unreadable: CorruptEntry | None, stale: bool, now: float
) -> list[str]:
    """The ``weavelet status RUN`` text, a line each (also the detail pane of ``weavelet top``)."""
    age = status.age(now)
    flag = f"  STALE: no heartbeat for {output.format_age(age)}" if stale else ""
    lines = [f"run         {status.run}", f"state       {status.state}{flag}"]
    if status.incarnation:
        started = f", started {output.format_time(status.started_at)}" if status.started_at else ""
        lines.append(f"incarnation {status.incarnation}{started}")
    lines += [
        f"heartbeat   {output.format_age(age)} ago ({output.format_time(status.heartbeat)})",
        f"step        {status.step}   epoch {status.epoch}",
        f"applied     revision {status.applied_revision}",
    ]
    last = status.last_outcome or {}
    if last.get("signed_by") and last.get("revision") == status.applied_revision:
        lines[-1] += f" (signed by key {last['signed_by']}, verified by the trainer)"
    if unreadable is not None:
        lines.append(f"desired     {unreadable}")
    elif desired is not None and desired.revision > status.applied_revision:
        if last.get("revision") == desired.revision and last.get("result") == "rejected":
            reason = last.get("message") or "no reason given"
            lines.append(f"desired     revision {desired.revision} REJECTED: {reason}")
        elif last.get("revision") == desired.revision:
            lines.append(f"desired     revision {desired.revision} {last.get('result')}")
        else:
            lines.append(f"desired     revision {desired.revision}, not applied yet")
    if last and not (desired is not None and last.get("revision") == desired.revision):
        lines.append(f"last        revision {last.get('revision')} {last.get('result')}: {last.get('message') or ''}")
    if status.optimizer is not None:
        lines.append(f"optimizer   {output.value_text(status.optimizer)}")
    if status.metrics:
        lines.append("metrics     " + " ".join(f"{k}={v:g}" for k, v in sorted(status.metrics.items())))
    if status.labels:
        lines.append("labels      " + " ".join(f"{k}={v}" for k, v in sorted(status.labels.items())))
    lines.append(f"process     pid {status.pid} on {status.host}")
    if status.message:
        lines.append(f"message     {status.message}")
    return lines


async def _status_many(args: argparse.Namespace, out: TextIO) -> int:
    async with weaver(args) as w:
        runs, statuses = await select(w, args)
        rows = await overview(w, runs, args.stale_after, statuses or None)
    if args.dry_run:
        out.write("".join(f"{row['run']}\n" for row in rows))
        return EXIT_OK
    print_overview(rows, args, out)
    return EXIT_OK


# -- runs --------------------------------------------------------------------------------------------------


async def overview(
    w: AsyncWeaver,
    runs: Sequence[str],
    stale_after: float | None,
    statuses: dict[str, Status | None] | None = None,
) -> list[dict[str, Any]]:
    """One row per run, from two batched reads (newest revisions and statuses), never two requests per run.
    ``statuses``: those already read for ``runs`` (by a label selector), not read again."""
    latest = await w.latests(runs)
    if statuses is None or set(statuses) != set(runs):
        statuses = await w.statuses(runs)
    now = time.time()
    rows = []
    for run in runs:
        entry, status = latest.get(run), statuses.get(run)
        rows.append(row_of(run, entry, status, stale_after, now))
    return rows


def row_of(
    run: str, entry: Revision | CorruptEntry | None, status: Status | None, stale_after: float | None, now: float
) -> dict[str, Any]:
    """What ``runs --json`` prints for one run."""
    last = status.last_outcome if status else None
    return {
        "run": run,
        "revision": entry.revision if entry is not None else None,
        "applied_revision": status.applied_revision if status else None,
        "state": status.state if status else None,
        "heartbeat_age": round(status.age(now), 3) if status else None,
        "stale": is_stale(status, stale_after, now) if status else None,
        "step": status.step if status else None,
        "incarnation": status.incarnation if status else None,
        "started_at": status.started_at if status and status.started_at else None,
        "labels": dict(status.labels) if status else {},
        "optimizer": status.optimizer if status else None,
        "metrics": dict(status.metrics) if status else {},
        "last_outcome": last,
        "host": status.host if status else None,
        "pid": status.pid if status else None,
        "written_at": entry.created_at if isinstance(entry, Revision) else None,
    }


WIDE_COLUMNS = (
    "RUN", "REVISION", "APPLIED", "STATE", "STEP", "HEARTBEAT", "INCARNATION", "LABELS", "HOST", "OPTIMIZER",
    "LAST OUTCOME",
)  # fmt: skip


def heartbeat_text(row: dict[str, Any]) -> str:
    age = row["heartbeat_age"]
    return "-" if age is None else f"{output.format_age(age)} ago" + (" STALE" if row["stale"] else "")


def last_outcome_text(row: dict[str, Any]) -> str:
    last = row["last_outcome"]
    if not last:
        return "-"
    text = f"r{last.get('revision')} {last.get('result')}"
    if last.get("result") == "applied" and last.get("step") is not None:
        text += f" at step {last.get('step')}"
    elif last.get("message"):
        text += f": {last.get('message')}"
    return text


def print_overview(rows: list[dict[str, Any]], args: argparse.Namespace, out: TextIO) -> None:
    if wants_json(args):
        output.print_json(rows, out)
        return
    if not rows:
        out.write(f"no runs at {where(args)}\n")
        return
    if wide(args):
        table: list[tuple[str, ...]] = [WIDE_COLUMNS]
        for row in rows:
            table.append(
                (
                    row["run"],
                    _dash(row["revision"]),
                    _dash(row["applied_revision"]),
                    row["state"] or "-",
                    _dash(row["step"]),
                    heartbeat_text(row),
                    row["incarnation"] or "-",
                    ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items())) or "-",
                    f"{row['host']}:{row['pid']}" if row["host"] else "-",
                    output.value_text(row["optimizer"]) if row["optimizer"] else "-",
                    last_outcome_text(row),
                )
            )
        output.print_table(table, out, full=True)
        return
    table = [("RUN", "REVISION", "APPLIED", "STATE", "HEARTBEAT")]
    for row in rows:
        table.append(
            (
                row["run"],
                _dash(row["revision"]),
                _dash(row["applied_revision"]),
                row["state"] or "-",
                heartbeat_text(row),
            )
        )
    output.print_table(table, out)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


async def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    patterns: list[str] = args.patterns
    async with weaver(args) as w:
        names = await w.runs()
        if patterns:
            names = [run for run in names if any(fnmatch.fnmatchcase(run, p) for p in patterns)]
        try:
            rows = await overview(w, names, args.stale_after)
        except PermissionDenied as exc:
            if patterns:
                raise
            raise CliError(
                f"{exc}; this user may not read every run the store lists: list only the runs it may read with a "
                "pattern (weavelet runs 'team-a-*'), or give each team its own prefix (?prefix=team-a) so that its "
                "listing holds only its runs (docs/deploy.md)"
            ) from None
    states: list[str] = [s for group in args.state for s in group]
    if states:
        rows = [r for r in rows if (r["state"] or "none") in states or ("stale" in states and r["stale"])]
    if args.labels:
        rows = [r for r in rows if matches(_labelled(r), args.labels)]
    if args.quiet:
        out.write("".join(f"{row['run']}\n" for row in rows))
        return EXIT_OK
    print_overview(rows, args, out)
    return EXIT_OK


def _labelled(row: dict[str, Any]) -> Status | None:
    if row["state"] is None:
        return None
    return Status(run=row["run"], state=row["state"], labels=row["labels"])


def _states(text: str) -> list[str]:
    known = (*LIFECYCLE_STATES, "stale", "none")
    states = [s.strip() for s in text.split(",") if s.strip()]
    for state in states:
        if state not in known:
            raise argparse.ArgumentTypeError(f"unknown state {state!r}; choose from {', '.join(known)}")
    return states


# -- history -----------------------------------------------------------------------------------------------


async def cmd_history(args: argparse.Namespace, out: TextIO) -> int:
    validate_run_id(args.run)
    trusted = trusted_of(args)
    async with weaver(args) as w:
        # One more than shown: the change of the oldest shown revision is relative to the one before it.
        entries = await w.history(args.run, limit=args.limit + 1 if args.limit else None)
        by_revision = _by_revision(await w.outcomes(args.run))
        if not entries:
            raise missing_run(args.run)
        base: Revision | CorruptEntry | None = None
        if args.limit and len(entries) > args.limit:
            base, entries = entries[0], entries[-args.limit :]
        if wants_json(args):
            output.print_json([_history_json(e, by_revision, trusted) for e in entries], out)
            if not args.follow:
                return EXIT_OK
        else:
            previous = base.config if isinstance(base, Revision) else None
            known_base = base is not None or entries[0].revision == 1
            rows = [("REV", "WRITTEN", "AUTHOR", "INCARNATION", "OUTCOME", "CHANGES")]
            for entry in entries:
                answers = by_revision.get(entry.revision, [])
                rows += history_rows(entry, previous, answers, known_base, wide(args), trusted=trusted)
                previous = entry.config if isinstance(entry, Revision) else None
                known_base = previous is not None
            output.print_table(rows, out, full=wide(args))
        if not args.follow:
            return EXIT_OK
        seen_outcomes = {(o.revision, o.incarnation, o.at) for os_ in by_revision.values() for o in os_}
        last = entries[-1]
        await _follow(w, args.run, last, seen_outcomes, out, as_json=wants_json(args), trusted=trusted)
    return EXIT_OK


def _by_revision(outcomes: list[Outcome]) -> dict[int, list[Outcome]]:
    found: dict[int, list[Outcome]] = {}
    for outcome in outcomes:
        found.setdefault(outcome.revision, []).append(outcome)
    return found


def _history_json(
    entry: Revision | CorruptEntry, by_revision: dict[int, list[Outcome]], trusted: TrustedKeys | None = None
) -> dict[str, Any]:
    answers = by_revision.get(entry.revision, [])
    return {
        "revision": to_dict(entry) if isinstance(entry, Revision) else None,
        "signature": signature_of(entry, answers, trusted) if isinstance(entry, Revision) else None,
        "unreadable": None if isinstance(entry, Revision) else {"revision": entry.revision, "reason": entry.reason},
        "outcome": to_dict(answers[-1]) if answers else None,
        "outcomes": [to_dict(o) for o in answers],
        "reverts": (entry.reverts or None) if isinstance(entry, Revision) else None,
    }


def history_rows(
    entry: Revision | CorruptEntry,
    previous: dict[str, Any] | None,
    answers: list[Outcome],
    known_base: bool,
    full: bool,
    *,
    trusted: TrustedKeys | None = None,
) -> list[tuple[str, str, str, str, str, str]]:
    """The table rows of one revision: one per outcome (a revision answered by two incarnations has two). The
    author says who signed it, when it is signed (see :func:`weavelet_core.cli.signed.author_text`)."""
    if isinstance(entry, Revision):
        written, author = output.format_time(entry.created_at), author_text(entry, answers, trusted)
        changes = (
            output.describe_changes(previous or {}, entry.config)
            if known_base
            else "(unknown: the revision before is unreadable) " + output.value_text(entry.config)
        )
        if entry.reverts:
            changes = f"revert of r{entry.reverts}: {changes}"
    else:
        written, author, changes = "?", "?", f"UNREADABLE: {entry.reason}"
    rows = []
    for index, answer in enumerate(answers or [None]):
        text = output.describe_outcome(answer)
        rows.append(
            (
                str(entry.revision) if index == 0 else "",
                written if index == 0 else "",
                author if index == 0 else "",
                (answer.incarnation or "-") if answer is not None else "-",
                text if full else output.cut(text, OUTCOME_WIDTH),
                changes if index == 0 else "",
            )
        )
    return rows


async def _follow(
    w: AsyncWeaver,
    run: str,
    last: Revision | CorruptEntry,
    seen: set[tuple[int, str, float]],
    out: TextIO,
    *,
    as_json: bool,
    trusted: TrustedKeys | None = None,
) -> None:
    """Print each revision written and each outcome reported from now on, a line each, in the order they happened,
    until Ctrl-C (a signed revision's author checked against ``trusted``)."""
    events = _Events(run, last, seen, as_json=as_json, trusted=trusted)
    while True:
        events.revisions(await w.history(run, limit=FOLLOWED))
        events.outcomes(await w.outcomes(run, limit=FOLLOWED))
        events.flush(out)
        await anyio.sleep(FOLLOW_INTERVAL)


FOLLOWED = 20
"""Newest revisions and outcomes a followed run is read for at each look (more than a person writes in a quarter
second)."""


@dataclasses.dataclass(order=True)
class _Event:
    at: float
    rank: int
    """Revisions before outcomes before status changes at the same time."""
    text: str = dataclasses.field(compare=False)


class _Events:
    """What ``watch`` and ``history --follow`` print: the events of one look at a run, sorted by when they happened
    and never before what caused them (an outcome after its revision, a status after the outcomes it reflects),
    even when the writer's and the trainer's clocks disagree a little."""

    def __init__(
        self,
        run: str,
        last: Revision | CorruptEntry | None,
        seen: set[tuple[int, str, float]],
        *,
        as_json: bool,
        trusted: TrustedKeys | None = None,
    ) -> None:
        self.run = run
        self.trusted = trusted
        self.newest = last.revision if last is not None else 0
        self.previous: dict[str, Any] | None = last.config if isinstance(last, Revision) else None
        self.seen = seen
        self.answered = {revision for revision, _, _ in seen}
        self.as_json = as_json
        self.pending: list[_Event] = []
        self.written: dict[int, float] = {}

    def revisions(self, entries: list[Revision | CorruptEntry]) -> None:
        for entry in entries:
            if entry.revision <= self.newest:
                continue
            self.newest = entry.revision
            at = entry.created_at if isinstance(entry, Revision) else time.time()
            self.written[entry.revision] = at
            if self.as_json:
                text = json.dumps({"event": "revision", **_history_json(entry, {}, self.trusted)})
            elif isinstance(entry, Revision):
                change = output.describe_changes(self.previous, entry.config)
                text = (
                    f"{output.format_time(at)}  {self.run}: revision {entry.revision} written by "
                    f"{author_text(entry, [], self.trusted)}: {change}"
                )
            else:
                text = f"{output.format_time(at)}  {self.run}: revision {entry.revision} UNREADABLE: {entry.reason}"
            self.previous = entry.config if isinstance(entry, Revision) else None
            self.pending.append(_Event(at, 0, text))

    def outcomes(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            key = (outcome.revision, outcome.incarnation, outcome.at)
            if key in self.seen:
                continue
            self.seen.add(key)
            self.answered.add(outcome.revision)
            at = max(outcome.at, self.written.get(outcome.revision, outcome.at))
            self.pending.append(_Event(at, 1, outcome_event(outcome, as_json=self.as_json)))

    def status(self, status: Status, *, stale_for: float | None = None) -> None:
        """A status line, after every event of this look (which it reflects: they were stored before it was read).
        ``stale_for``: seconds without a heartbeat, for a run found stale (its line is dated now)."""
        at = status.heartbeat if stale_for is None else time.time()
        text = status_event(status, as_json=self.as_json, stale_for=stale_for, at=at)
        self.pending.append(_Event(max([at, *(e.at for e in self.pending)]), 2, text))

    def flush(self, out: TextIO) -> None:
        for event in sorted(self.pending):
            out.write(event.text + "\n")
        self.pending.clear()
        self.written.clear()
        out.flush()


def outcome_event(outcome: Outcome, *, as_json: bool) -> str:
    if as_json:
        return json.dumps({"event": "outcome", "outcome": to_dict(outcome)})
    who = f" (incarnation {outcome.incarnation})" if outcome.incarnation else ""
    return (
        f"{output.format_time(outcome.at)}  {outcome.run}: revision {outcome.revision} "
        f"{output.describe_outcome(outcome, full=True)}{who}"
    )


# -- diff --------------------------------------------------------------------------------------------------


async def cmd_diff(args: argparse.Namespace, out: TextIO) -> int:
    validate_run_id(args.run)
    async with weaver(args) as w:
        b: int | None = args.b
        if b is None:
            newest = await w.get(args.run)
            if newest is None:
                raise missing_run(args.run)
            b = newest.revision
        changes = await w.diff(args.run, args.a, b)
    if wants_json(args):
        output.print_json(
            {"run": args.run, "a": args.a, "b": b, "changes": {k: list(v) for k, v in changes.items()}}, out
        )
        return EXIT_OK
    if not changes:
        out.write(f"{args.run}: revisions {args.a} and {b} have the same config\n")
        return EXIT_OK
    out.write(f"--- {args.run} revision {args.a}\n+++ {args.run} revision {b}\n")
    for key, (old, new) in changes.items():
        if old is None:
            out.write(f"+ {key}={output.value_text(new)}\n")
        elif new is None:
            out.write(f"- {key}={output.value_text(old)}\n")
        else:
            out.write(f"~ {key}: {output.value_text(old)} -> {output.value_text(new)}\n")
    return EXIT_OK


# -- watch -------------------------------------------------------------------------------------------------

WATCHED = ("state", "incarnation", "message")
"""Status fields whose change ``weavelet watch`` prints a line for (with whether the run is stale, and an applied
revision no outcome line told of). Steps, metrics and heartbeats alone print nothing: ``weavelet top`` shows them."""


async def cmd_watch(args: argparse.Namespace, out: TextIO) -> int:
    """Stream a run's state changes, revisions and outcomes, a line each in the order they happened; end when its
    incarnation ends (or at ``--timeout``)."""
    validate_run_id(args.run)
    as_json = wants_json(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    async with weaver(args) as w:
        seen = {(o.revision, o.incarnation, o.at) for o in await w.outcomes(args.run)}
        last: Revision | CorruptEntry | None
        try:
            last = await w.get(args.run)
        except CorruptEntry as exc:
            last = exc
        events = _Events(args.run, last, seen, as_json=as_json)
        shown: tuple[Any, ...] | None = None
        applied: int | None = None
        while True:
            # Status first: whatever it reflects was stored before it, so this look's reads below find it too.
            status = await w.status(args.run)
            events.revisions(await w.history(args.run, limit=FOLLOWED))
            events.outcomes(await w.outcomes(args.run, limit=FOLLOWED))
            if status is not None:
                now = time.time()
                stale = is_stale(status, args.stale_after, now)
                key = (*(getattr(status, f) for f in WATCHED), stale)
                untold = status.applied_revision != applied and status.applied_revision not in events.answered
                if key != shown or untold:
                    events.status(status, stale_for=status.age(now) if stale else None)
                shown, applied = key, status.applied_revision
            events.flush(out)
            if status is not None and not status.live:
                return EXIT_OK if status.state == "stopped" else EXIT_ERROR
            if deadline is not None and time.monotonic() >= deadline:
                return EXIT_OK
            await anyio.sleep(FOLLOW_INTERVAL)


def status_event(status: Status, *, as_json: bool, stale_for: float | None = None, at: float | None = None) -> str:
    """One ``watch`` line (or JSON object) for a status, dated ``at`` (default: its heartbeat); ``stale_for``:
    seconds without a heartbeat, when stale."""
    if as_json:
        body: dict[str, Any] = {"event": "status", "status": to_dict(status), "stale": stale_for is not None}
        if stale_for is not None:
            body["heartbeat_age"] = round(stale_for, 3)
        return json.dumps(body)
    metrics = " ".join(f"{k}={v:g}" for k, v in sorted(status.metrics.items()))
    tail = f"  {status.message}" if status.message else ""
    if stale_for is not None:
        tail += f"  STALE: no heartbeat for {output.format_age(stale_for)}"
    who = f" (incarnation {status.incarnation})" if status.incarnation else ""
    when = output.format_time(status.heartbeat if at is None else at)
    return (
        f"{when}  {status.run}: {status.state} step {status.step} epoch {status.epoch} applied "
        f"r{status.applied_revision}" + (f" {metrics}" if metrics else "") + who + tail
    )


# -- parsers -----------------------------------------------------------------------------------------------


def add_parsers(subparsers: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = subparsers.add_parser(
        "get",
        help="show a run's desired config",
        epilog="examples:\n  weavelet get demo\n  weavelet get demo --json | jq .config\n",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p)
    p.add_argument("run", metavar="RUN", help="run id")
    p.set_defaults(handler=cmd_get, is_async=True)

    p = subparsers.add_parser(
        "status",
        help="show what runs' trainers last reported",
        description="One run: everything its trainer last reported. Several (patterns, -l, --all): a line each.",
        epilog="examples:\n  weavelet status demo\n  weavelet status 'sweep-3-*'\n"
        "  weavelet status -l sweep=3 -o wide\n",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p, wide=True)
    add_stale(p)
    add_selectors(p)
    p.set_defaults(handler=cmd_status, is_async=True)

    p = subparsers.add_parser(
        "history",
        help="list a run's revisions with their outcomes",
        epilog="examples:\n  weavelet history demo --limit 5\n  weavelet history demo --follow\n"
        "  weavelet history demo -o wide        nothing cut\n",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p, wide=True)
    p.add_argument("run", metavar="RUN", help="run id")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the newest N revisions")
    p.add_argument(
        "-f", "--follow", action="store_true", help="then print each revision and outcome as it happens (Ctrl-C ends)"
    )
    add_trusted_keys(p, "to verify signed revisions with, besides the trainer's own verdict")
    p.set_defaults(handler=cmd_history, is_async=True)

    p = subparsers.add_parser(
        "runs",
        help="list the runs the transport knows",
        epilog="examples:\n  weavelet runs\n  weavelet runs --state running,stale -o wide\n"
        "  weavelet runs 'sweep-3-*'\n  weavelet runs -q -l sweep=3 | xargs -n1 weavelet stop\n",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p, wide=True)
    add_stale(p)
    p.add_argument(
        "patterns", metavar="PATTERN", nargs="*",
        help="only runs whose ids match one of these glob patterns ('sweep-3-*'; quote them); only those are read",
    )  # fmt: skip
    p.add_argument(
        "--state",
        type=_states,
        action="append",
        default=[],
        metavar="STATE[,STATE]",
        help="only runs in these states: created, starting, running, stopping, stopped, failed, stale, none "
        "(no status)",
    )
    p.add_argument(
        "-l", "--label", dest="labels", action="append", type=label, default=[], metavar="KEY=VALUE",
        help="only runs whose trainer declared this label (repeatable)",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="print run ids only, one a line")
    p.set_defaults(handler=cmd_runs, is_async=True)

    p = subparsers.add_parser(
        "diff",
        help="show what differs between two revisions of a run",
        epilog="examples:\n  weavelet diff demo 3 5\n  weavelet diff demo 3          revision 3 against the newest\n",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p)
    p.add_argument("run", metavar="RUN", help="run id")
    p.add_argument("a", metavar="A", type=revision_number, help="the older revision (3 or r3)")
    p.add_argument("b", metavar="B", type=revision_number, nargs="?", help="the newer revision (default: the newest)")
    p.set_defaults(handler=cmd_diff, is_async=True)

    p = subparsers.add_parser(
        "watch",
        help="stream a run's state changes, revisions and outcomes as they happen",
        description="Print a line for each revision written, each outcome reported and each change of the run's "
        "state (a new incarnation, running, stopping, stopped or failed, a message, gone stale or back), in the "
        "order they happened. Steps, metrics and heartbeats alone print nothing (weavelet top shows them). Ends "
        "when the run's incarnation ends (exit 0 stopped, 1 failed), at --timeout (exit 0), or on Ctrl-C.",
        epilog="examples:\n  weavelet watch demo\n  weavelet watch demo --json | jq -c .\n",
        formatter_class=formatter,
    )
    add_url(p)
    add_output(p)
    add_stale(p)
    p.add_argument("run", metavar="RUN", help="run id")
    p.add_argument("--timeout", type=positive_float, metavar="S", help="stop watching after S seconds (exit 0)")
    p.set_defaults(handler=cmd_watch, is_async=True)


__all__ = ["add_parsers", "overview", "print_overview", "row_of", "status_lines"]
