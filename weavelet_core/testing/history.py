"""A history checker: does what a run recorded keep weavelet's promises?

Give :func:`check_history` what a run recorded: the revisions the store holds, the outcomes it holds, and
what the trainer itself observed (the revisions it applied, in order, and each command it carried out). It
checks, and raises :class:`HistoryViolation` listing *every* broken rule at once:

1. **One final outcome per write.** Every stored, readable revision has an outcome, and every outcome of its
   number carries its id (an outcome answering an older write of the same number is a lie about this one).
   Each incarnation answered it at most once. An unreadable entry has a ``rejected`` outcome. No outcome
   answers a write the store never held (an unknown id for a stored number).
2. **The applied sequence only increases** within an incarnation, and nothing is applied twice.
3. **What the trainer applied is what the outcomes say**: each applied revision has an ``applied`` outcome of
   that incarnation, with the same id and step; no ``applied`` outcome lacks a trainer record (when the
   trainer's records are complete; a fresh start's reset, ``detail["fresh_start"]``, is the sidecar's own).
4. **Every command acted at most once, and only in its incarnation**: a token acts once in all, and a command
   addressed to an incarnation (``{"token": ..., "incarnation": ...}``) acts only there.

Revisions trimmed from a bounded history are not checked; the newest revision must have its outcome before
the check (wait for quiescence first). Used by weavelet's own chaos tests; usable by any transport's author.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from weavelet_core.errors import CorruptEntry
from weavelet_core.protocol import Outcome, Revision


class HistoryViolation(AssertionError):
    """The recorded history breaks one or more rules; ``problems`` lists each, ``report`` the counts."""

    def __init__(self, problems: Sequence[str], report: HistoryReport) -> None:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} broken rule(s) in the run's history ({report}):\n  {shown}{more}")
        self.problems = list(problems)
        self.report = report


@dataclasses.dataclass(frozen=True)
class Applied:
    """The trainer's own record of one revision it applied (from its verdicts, not from the store)."""

    incarnation: str
    revision: int
    revision_id: str
    step: int | None


@dataclasses.dataclass(frozen=True)
class CommandEffect:
    """The trainer's own record of one command it carried out."""

    incarnation: str
    name: str
    token: str
    revision: int


@dataclasses.dataclass
class HistoryReport:
    """Counts of what was checked (printed by tests, so a passing run still shows what it covered)."""

    revisions: int = 0
    unreadable: int = 0
    outcomes: int = 0
    results: dict[str, int] = dataclasses.field(default_factory=dict)
    incarnations: int = 0
    applied: int = 0
    commands: int = 0

    def __str__(self) -> str:
        results = ", ".join(f"{k} {v}" for k, v in sorted(self.results.items())) or "none"
        return (
            f"{self.revisions} revisions ({self.unreadable} unreadable), {self.outcomes} outcomes ({results}), "
            f"{self.incarnations} incarnation(s), {self.applied} applied by the trainer, "
            f"{self.commands} command(s) carried out"
        )


def command_target(value: object) -> tuple[str, str] | None:
    """``(token, incarnation)`` of a command value in the object form, else ``None``."""
    if isinstance(value, Mapping) and isinstance(value.get("token"), str):
        incarnation = value.get("incarnation")
        return str(value["token"]), incarnation if isinstance(incarnation, str) else ""
    return None


def check_history(
    revisions: Iterable[Revision | CorruptEntry],
    outcomes: Iterable[Outcome],
    *,
    applied: Sequence[Applied] = (),
    commands: Sequence[CommandEffect] = (),
    complete: bool = True,
) -> HistoryReport:
    """Check the rules in the module docstring; return the counts, or raise :class:`HistoryViolation`.

    :param revisions: the run's stored revisions (``Transport.history``), unreadable ones as ``CorruptEntry``.
    :param outcomes: every stored outcome of the run (``Transport.outcomes``), all incarnations.
    :param applied: the trainer's applied revisions, in the order it applied them.
    :param commands: the commands the trainer carried out, in order.
    :param complete: whether ``applied`` holds every apply of every incarnation (then an ``applied`` outcome
        without a trainer record is a violation too).
    """
    problems: list[str] = []
    entries = list(revisions)
    found = list(outcomes)
    report = HistoryReport(
        revisions=len(entries),
        unreadable=sum(isinstance(e, CorruptEntry) for e in entries),
        outcomes=len(found),
        results=dict(collections.Counter(o.result for o in found)),
        incarnations=len({o.incarnation for o in found} | {a.incarnation for a in applied}),
        applied=len(applied),
        commands=len(commands),
    )
    by_number: dict[int, list[Outcome]] = collections.defaultdict(list)
    for outcome in found:
        by_number[outcome.revision].append(outcome)

    stored: dict[int, Revision | CorruptEntry] = {}
    for entry in entries:
        if entry.revision in stored:
            problems.append(f"revision {entry.revision} is stored twice")
        stored[entry.revision] = entry

    # 1. one final outcome per write
    for number, entry in sorted(stored.items()):
        answers = by_number.get(number, [])
        if not answers:
            problems.append(f"revision {number} has no outcome")
            continue
        per_incarnation = collections.Counter(o.incarnation for o in answers)
        for incarnation, count in per_incarnation.items():
            if count > 1:
                problems.append(f"revision {number} has {count} outcomes from incarnation {incarnation or '?'}")
        if isinstance(entry, CorruptEntry):
            for o in answers:
                if o.result != "rejected":
                    problems.append(f"unreadable revision {number} has outcome {o.result!r}, expected 'rejected'")
            continue
        for o in answers:
            if o.revision_id != entry.id:
                problems.append(
                    f"revision {number} (id {entry.id}) has an outcome answering id {o.revision_id or '(none)'} "
                    f"({o.result} in incarnation {o.incarnation or '?'})"
                )

    # 2. the applied sequence: increasing per incarnation, nothing twice
    last: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for record in applied:
        key = (record.incarnation, record.revision)
        if key in seen:
            problems.append(f"incarnation {record.incarnation} applied revision {record.revision} twice")
        seen.add(key)
        previous = last.get(record.incarnation, 0)
        if record.revision <= previous:
            problems.append(
                f"incarnation {record.incarnation} applied revision {record.revision} after revision {previous}"
            )
        last[record.incarnation] = max(previous, record.revision)

    # 3. trainer records and outcomes agree
    applied_outcomes = {(o.incarnation, o.revision): o for o in found if o.result == "applied"}
    for record in applied:
        answer = applied_outcomes.get((record.incarnation, record.revision))
        if answer is None:
            if record.revision in stored:  # trimmed revisions may have lost their outcomes too
                problems.append(
                    f"incarnation {record.incarnation} applied revision {record.revision} but no 'applied' outcome "
                    "of that incarnation says so"
                )
            continue
        if answer.revision_id != record.revision_id:
            problems.append(
                f"revision {record.revision}: the trainer applied id {record.revision_id}, its outcome names "
                f"{answer.revision_id}"
            )
        if answer.step != record.step:
            problems.append(
                f"revision {record.revision}: applied at step {record.step} by the trainer, the outcome says "
                f"{answer.step}"
            )
    if complete:
        recorded = {(a.incarnation, a.revision) for a in applied}
        trainer_incarnations = {a.incarnation for a in applied}
        for (incarnation, number), outcome in sorted(applied_outcomes.items()):
            fresh_start = outcome.detail.get("fresh_start") is True  # written by the sidecar, not applied by a loop
            if incarnation in trainer_incarnations and (incarnation, number) not in recorded and not fresh_start:
                problems.append(
                    f"an 'applied' outcome of revision {number} in incarnation {incarnation} has no trainer record"
                )

    # 4. commands: once, in their incarnation
    addressed: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, Revision):
            for value in entry.config.values():
                target = command_target(value)
                if target is not None:
                    addressed.setdefault(target[0], target[1])
    acted: collections.Counter[tuple[str, str]] = collections.Counter()
    for effect in commands:
        acted[(effect.name, effect.token)] += 1
        wanted = addressed.get(effect.token)
        if wanted is not None and wanted != effect.incarnation:
            problems.append(
                f"command {effect.name} (token {effect.token}) written for incarnation {wanted} acted in "
                f"incarnation {effect.incarnation}"
            )
    for (name, token), count in acted.items():
        if count > 1:
            problems.append(f"command {name} (token {token}) acted {count} times")

    if problems:
        raise HistoryViolation(problems, report)
    return report


def records_from_jsonl(lines: Iterable[str]) -> tuple[list[Applied], list[CommandEffect]]:
    """Parse a trainer's JSON-lines record (``{"applied": {...}}`` / ``{"command": {...}}`` per line)."""
    import json

    applied: list[Applied] = []
    commands: list[CommandEffect] = []
    for line in lines:
        if not line.strip():
            continue
        item: dict[str, Any] = json.loads(line)
        if "applied" in item:
            applied.append(Applied(**item["applied"]))
        elif "command" in item:
            commands.append(CommandEffect(**item["command"]))
    return applied, commands


__all__ = [
    "Applied",
    "CommandEffect",
    "HistoryReport",
    "HistoryViolation",
    "check_history",
    "command_target",
    "records_from_jsonl",
]
