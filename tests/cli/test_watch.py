"""``weavelet watch``: lines in the order things happened, one per change an operator acts on."""

from __future__ import annotations

import io
import json
import re
import time

from tests.cli.conftest import Weavelet
from weavelet_core import Outcome, Revision, Status, Weaver
from weavelet_core.cli.read import _Events

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


def test_one_look_prints_causes_before_effects_even_with_skewed_clocks() -> None:
    """The weaver's clock runs 2 s ahead of the trainer's: its revision carries a later time than the outcome that
    answers it, and the status that reflects both is older still. Printed: revision, outcome, status."""
    now = time.time()
    first = Revision(run="r", revision=1, config={"lr": 0.1}, created_at=now - 60)
    events = _Events("r", first, set(), as_json=False)
    second = Revision(run="r", revision=2, config={"lr": 0.2}, author="ana", created_at=now + 2.0)
    third = Revision(run="r", revision=3, config={"lr": 0.3}, author="ana", created_at=now + 2.5)
    answers = [
        Outcome(run="r", revision=3, result="applied", step=11, at=now + 0.6, incarnation="i"),
        Outcome(run="r", revision=2, result="applied", step=10, at=now + 0.1, incarnation="i"),
    ]
    events.revisions([first, second, third])
    events.outcomes(answers)
    events.status(Status(run="r", state="stopping", step=11, applied_revision=3, heartbeat=now + 0.05))
    out = io.StringIO()
    events.flush(out)
    lines = out.getvalue().splitlines()
    assert [re.sub(rf"^{ISO}  ", "", line) for line in lines] == [
        "r: revision 2 written by ana: lr: 0.1->0.2",
        "r: revision 2 applied at step 10 (incarnation i)",
        "r: revision 3 written by ana: lr: 0.2->0.3",
        "r: revision 3 applied at step 11 (incarnation i)",
        "r: stopping step 11 epoch 0 applied r3",
    ]
    # Nothing is printed twice: the same look again adds nothing.
    events.revisions([first, second, third])
    events.outcomes(answers)
    again = io.StringIO()
    events.flush(again)
    assert again.getvalue() == ""


def test_a_run_gone_stale_is_one_line_and_json_says_so(weavelet: Weavelet, store: str) -> None:
    heartbeat = time.time() - 120
    with Weaver(store) as weaver:
        weaver._portal.call(
            weaver._async.transport.publish_status,
            Status(run="s", state="running", step=40, heartbeat=heartbeat, keepalive=1.0, incarnation="i"),
        )
    done = weavelet("watch", "s", "--timeout", "1")
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert re.fullmatch(
        rf"{ISO}  s: running step 40 epoch 0 applied r0 \(incarnation i\)  STALE: no heartbeat for 2m0\ds", line
    )
    as_json = weavelet("watch", "s", "--timeout", "1", "--json")
    [event] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert event["event"] == "status"
    assert event["stale"] is True
    assert event["heartbeat_age"] >= 120
    assert event["status"]["step"] == 40
