"""The history checker of ``weavelet_core.testing.history``: it passes a true history and names each lie."""

from __future__ import annotations

import pytest

from weavelet_core import CorruptEntry, Outcome, Revision
from weavelet_core.testing.history import Applied, CommandEffect, HistoryViolation, check_history


def _history() -> tuple[list[Revision | CorruptEntry], list[Outcome], list[Applied], list[CommandEffect]]:
    r1 = Revision(run="h", revision=1, config={"lr": 0.1})
    r2 = Revision(run="h", revision=2, config={"lr": 0.1, "stop": {"token": "t1", "incarnation": "A"}})
    bad = CorruptEntry("h", 3, "not valid JSON")
    r4 = Revision(run="h", revision=4, config={"lr": 0.2})
    outcomes = [
        Outcome(run="h", revision=1, revision_id=r1.id, incarnation="A", result="applied", step=5),
        Outcome(run="h", revision=2, revision_id=r2.id, incarnation="A", result="applied", step=9),
        Outcome(run="h", revision=3, incarnation="B", result="rejected", message="cannot be read"),
        Outcome(run="h", revision=4, revision_id=r4.id, incarnation="B", result="applied", step=2),
        # A resumed incarnation applying revision 1 again is a second, true record.
        Outcome(run="h", revision=1, revision_id=r1.id, incarnation="B", result="applied", step=0),
    ]
    applied = [
        Applied("A", 1, r1.id, 5),
        Applied("A", 2, r2.id, 9),
        Applied("B", 1, r1.id, 0),
        Applied("B", 4, r4.id, 2),
    ]
    commands = [CommandEffect("A", "stop", "t1", 2)]
    return [r1, r2, bad, r4], outcomes, applied, commands


def test_a_true_history_passes_with_its_counts() -> None:
    revisions, outcomes, applied, commands = _history()
    report = check_history(revisions, outcomes, applied=applied, commands=commands)
    assert (report.revisions, report.unreadable, report.outcomes, report.incarnations) == (4, 1, 5, 2)
    assert report.results == {"applied": 4, "rejected": 1}
    assert "4 revisions (1 unreadable)" in str(report)


@pytest.mark.parametrize(
    ("lie", "expected"),
    [
        ("missing outcome", "revision 4 has no outcome"),
        ("outcome of another write", "has an outcome answering id older-write"),
        ("applied twice", "incarnation A applied revision 1 twice"),
        ("out of order", "incarnation A applied revision 1 after revision 2"),
        ("wrong step", "applied at step 9 by the trainer, the outcome says 10"),
        ("command twice", "command stop (token t1) acted 2 times"),
        ("command in a later incarnation", "written for incarnation A acted in incarnation B"),
        ("unreadable applied", "unreadable revision 3 has outcome 'applied'"),
        ("applied without record", "has no trainer record"),
    ],
)
def test_each_broken_rule_is_named(lie: str, expected: str) -> None:
    revisions, outcomes, applied, commands = _history()
    r2 = revisions[1]
    assert isinstance(r2, Revision)
    if lie == "missing outcome":
        outcomes = [o for o in outcomes if o.revision != 4]
        applied = [a for a in applied if a.revision != 4]
    elif lie == "outcome of another write":
        outcomes.append(Outcome(run="h", revision=4, revision_id="older-write", incarnation="C", result="applied"))
    elif lie == "applied twice":
        applied.insert(1, applied[0])
    elif lie == "out of order":
        applied = [applied[1], applied[0], *applied[2:]]
    elif lie == "wrong step":
        outcomes[1] = Outcome(run="h", revision=2, revision_id=r2.id, incarnation="A", result="applied", step=10)
    elif lie == "command twice":
        commands = [*commands, commands[0]]
    elif lie == "command in a later incarnation":
        commands = [CommandEffect("B", "stop", "t1", 4)]
    elif lie == "unreadable applied":
        outcomes[2] = Outcome(run="h", revision=3, incarnation="B", result="applied", step=1)
    elif lie == "applied without record":
        applied = [a for a in applied if a.revision != 2]
    with pytest.raises(HistoryViolation) as info:
        check_history(revisions, outcomes, applied=applied, commands=commands)
    assert any(expected in problem for problem in info.value.problems), info.value.problems
