"""``weavelet rm`` and ``weavelet prune`` through the installed script against real NATS and Redis servers (the
file:// store is covered in test_console_script.py)."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.cli.conftest import Trainer, Weavelet
from weavelet_core import Outcome, Weaver


@pytest.fixture(params=["nats", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    """A store of its own on the session's server: NATS buckets under a fresh prefix, Redis keys likewise."""
    if request.param == "nats":
        server = request.getfixturevalue("weavelet_nats_server")
        return f"{server.url}?prefix=cli-{uuid.uuid4().hex[:8]}"
    url: str = request.getfixturevalue("weavelet_redis_url")
    return url


def test_rm_refuses_live_runs_removes_the_rest_and_prune_removes_old_ones(
    weavelet: Weavelet, trainer: Trainer, store: str
) -> None:
    trainer("live")
    assert weavelet("set", "old", "lr=0.1").returncode == 0
    assert weavelet("set", "old", "lr=0.2").returncode == 0
    with Weaver(store) as weaver:
        weaver._portal.call(
            weaver._async.transport.publish_outcome, Outcome(run="old", revision=2, result="applied", step=3)
        )

    refused = weavelet("rm", "live")
    assert refused.returncode == 1
    assert "live: error: run 'live' is live" in refused.stdout
    assert "--force" in refused.stdout
    assert weavelet("rm", "old", "--dry-run").stdout == "old: would remove\n"
    assert weavelet("rm", "old").stdout == "old: removed\n"
    assert weavelet("runs", "-q").stdout == "live\n"
    missing = weavelet("history", "old")
    assert missing.returncode != 0
    # Removed means gone: the next revision is number 1 again, without the old outcomes.
    again = weavelet("set", "old", "lr=0.3")
    assert again.returncode == 0, again.stderr
    assert "old: revision 1 stored" in again.stdout
    with Weaver(store) as weaver:
        assert [r.revision for r in weaver.history("old")] == [1]
        assert weaver.outcomes("old") == []
    unknown = weavelet("rm", "nothing-here")
    assert unknown.returncode == 1
    assert "run 'nothing-here' is not stored" in unknown.stderr

    assert weavelet("rm", "live", "--force").returncode == 0
    weavelet("rm", "old")
    assert weavelet("set", "quiet", "lr=0.1").returncode == 0
    time.sleep(1.2)
    assert weavelet("prune", "--older-than", "1s", "--dry-run").stdout == "quiet: would prune\n"
    assert weavelet("prune", "--older-than", "1s").stdout == "quiet: pruned\n"
    assert weavelet("runs", "-q").stdout in ("", "live\n")  # the forced-away trainer may still report
    assert weavelet("prune", "--older-than", "1s").stdout == "nothing to prune\n"
