"""The Weaver API: merge semantics, revisions, waiting for outcomes, concurrent writers, bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weavelet_core import RunEnded, Weaver
from weavelet_core.errors import ProtocolError, RevisionConflict, WaitTimeout
from weavelet_core.plugins import open_transport
from weavelet_core.protocol import MAX_PAYLOAD_BYTES, Outcome, Revision, Status
from weavelet_core.weaver import AsyncWeaver, merge_config

keys = st.sampled_from(["a", "b", "c", "lr", "optimizer"])
leaves = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3)
configs = st.recursive(
    st.dictionaries(keys, leaves.filter(lambda v: v is not None), max_size=4),
    lambda inner: st.dictionaries(keys, inner | leaves.filter(lambda v: v is not None), max_size=4),
    max_leaves=12,
)
changes_st = st.recursive(
    st.dictionaries(keys, leaves, max_size=4),
    lambda inner: st.dictionaries(keys, inner | leaves, max_size=4),
    max_leaves=12,
)


@pytest.fixture(params=["memory", "file"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://weaver-{uuid.uuid4().hex[:8]}"
    return (tmp_path / "store").as_uri()


# -- merge semantics ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(configs, changes_st)
def test_merge_semantics(base: dict[str, Any], changes: dict[str, Any]) -> None:
    base_before = copy.deepcopy(base)
    changes_before = copy.deepcopy(changes)
    merged = merge_config(base, changes)
    assert base == base_before
    assert changes == changes_before
    for key, value in changes.items():
        if value is None:
            assert key not in merged
        elif not isinstance(value, dict):
            assert merged[key] == value
        elif isinstance(base.get(key), dict):
            assert merged[key] == merge_config(base[key], value)
    for key in base.keys() - changes.keys():
        assert merged[key] == base[key]
    assert merge_config(merged, changes) == merged  # applying the same changes twice changes nothing more
    assert merge_config(base, {}) == base


def test_merge_examples() -> None:
    base = {"lr": 0.1, "optimizer": {"name": "sgd", "momentum": 0.9}, "wd": 0.01}
    assert merge_config(base, {"optimizer": {"name": "adam", "momentum": None}, "wd": None, "bs": 64}) == {
        "lr": 0.1,
        "optimizer": {"name": "adam"},
        "bs": 64,
    }
    assert merge_config(base, {"sched": {"gamma": None}}) == base
    assert merge_config(base, {"sched": {}}) == {**base, "sched": {}}
    assert merge_config(base, {"lr": {"base": 0.1}})["lr"] == {"base": 0.1}


# -- the sync API ------------------------------------------------------------------------------------------


def test_set_builds_revisions_on_each_other(url: str) -> None:
    with Weaver(url, author="tester") as weaver:
        first = weaver.set("demo", {"lr": 0.01})
        second = weaver.set("demo", {"optimizer": {"name": "adam"}})
        third = weaver.set("demo", {"lr": None, "wd": 0.1})
        assert (first.revision, second.revision, third.revision) == (1, 2, 3)
        assert third.config == {"optimizer": {"name": "adam"}, "wd": 0.1}
        assert third.author == "tester"
        assert weaver.get("demo") == third
        assert [r.revision for r in weaver.history("demo")] == [1, 2, 3]
        assert [r.revision for r in weaver.history("demo", limit=2)] == [2, 3]
        replaced = weaver.set("demo", {"lr": 1.0}, replace=True)
        assert replaced.config == {"lr": 1.0}
        assert weaver.runs() == ["demo"]
        assert weaver.get("other") is None
        assert weaver.status("demo") is None


def test_set_with_wait_returns_the_outcome(url: str) -> None:
    with Weaver(url) as weaver:
        weaver.set("demo", {"lr": 0.1})

        def trainer() -> None:
            async def go() -> None:
                async with open_transport(url) as transport:
                    with anyio.fail_after(20):
                        while (latest := await transport.latest("demo")) is None or latest.revision == 1:
                            await anyio.sleep(0.01)
                    await transport.publish_outcome(
                        Outcome(run="demo", revision=latest.revision, revision_id=latest.id, result="applied", step=77)
                    )

            anyio.run(go, backend="asyncio")

        thread = threading.Thread(target=trainer)
        thread.start()
        try:
            outcome = weaver.set("demo", {"lr": 0.2}, wait=30)
        finally:
            thread.join()
        assert (outcome.revision, outcome.result, outcome.step) == (2, "applied", 77)
        assert weaver.outcome("demo", 2) == outcome
        assert weaver.outcomes("demo") == [outcome]


def test_wait_timeout_says_what_the_run_was_doing(url: str) -> None:
    with Weaver(url) as weaver:
        with pytest.raises(WaitTimeout, match="no trainer has reported for this run yet"):
            weaver.set("demo", {"lr": 0.1}, wait=0.1)

        async def report() -> None:
            async with open_transport(url) as transport:
                await transport.publish_status(
                    Status(run="demo", state="running", step=12, applied_revision=1, heartbeat=time.time() - 10)
                )

        anyio.run(report, backend="asyncio")
        with pytest.raises(WaitTimeout) as info:
            weaver.set("demo", {"lr": 0.2}, wait=0.1)
        message = str(info.value)
        assert "no outcome for revision 2 of run 'demo' within 0.1s" in message
        assert "in state 'running' at step 12 (applied revision 1)" in message
        assert "the revision stays desired" in message
        assert weaver.get("demo").config == {"lr": 0.2}  # type: ignore[union-attr]

        async def go_quiet() -> None:
            async with open_transport(url) as transport:
                await transport.publish_status(
                    Status(run="demo", state="running", step=12, applied_revision=1, heartbeat=time.time() - 90)
                )

        anyio.run(go_quiet, backend="asyncio")
        # No heartbeat for far longer than its keepalive allows: nothing will answer, so the wait ends at once.
        with pytest.raises(RunEnded, match="was last heard from 90s ago"):
            weaver.set("demo", {"lr": 0.3}, wait=30)


def _later(url: str, delay: float, *messages: Outcome | Status) -> threading.Thread:
    """Publish ``messages`` through ``url``, in a thread, ``delay`` seconds from now."""

    async def publish() -> None:
        await anyio.sleep(delay)
        async with open_transport(url) as transport:
            for message in messages:
                if isinstance(message, Status):
                    await transport.publish_status(message)
                else:
                    await transport.publish_outcome(message)

    thread = threading.Thread(target=anyio.run, args=(publish,), kwargs={"backend": "asyncio"})
    thread.start()
    return thread


def test_wait_takes_only_the_outcome_of_its_own_write(url: str) -> None:
    with Weaver(url) as weaver:
        written = weaver.set("demo", {"lr": 0.1})
        # An outcome of another write numbered 1 (a store whose numbering was reset) first, then the answer.
        stale = Outcome(run="demo", revision=1, revision_id="another-write", result="applied", step=1)
        thread = _later(url, 0.2, stale)
        answer = Outcome(run="demo", revision=1, revision_id=written.id, result="rejected", message="no")
        late = _later(url, 0.6, answer)
        try:
            got = weaver.wait("demo", 1, timeout=20, revision_id=written.id)
        finally:
            thread.join()
            late.join()
        assert got == answer


def test_wait_ends_when_the_incarnation_ends_while_it_waits(url: str) -> None:
    with Weaver(url) as weaver:
        live = Status(run="demo", state="running", incarnation="i1", heartbeat=time.time(), keepalive=1.0)
        _later(url, 0, live).join()
        written = weaver.set("demo", {"lr": 0.1})
        stopped = Status(run="demo", state="stopped", incarnation="i1", heartbeat=time.time(), keepalive=1.0)
        thread = _later(url, 0.3, stopped)
        started = time.monotonic()
        try:
            with pytest.raises(RunEnded, match="incarnation i1 ended stopped"):
                weaver.wait("demo", written.revision, timeout=20, revision_id=written.id)
        finally:
            thread.join()
        assert time.monotonic() - started < 5


def test_bad_changes_are_refused_and_nothing_is_written(url: str) -> None:
    with Weaver(url) as weaver:
        weaver.set("demo", {"lr": 0.1})
        with pytest.raises(ProtocolError, match=f"exceeds the {MAX_PAYLOAD_BYTES}-byte cap"):
            weaver.set("demo", {"notes": "x" * MAX_PAYLOAD_BYTES})
        with pytest.raises(ProtocolError, match=r"revision.config.lr: nan is not valid JSON"):
            weaver.set("demo", {"lr": float("nan")})
        with pytest.raises(ProtocolError, match=r"revision.config.fn: builtin_function_or_method is not a JSON value"):
            weaver.set("demo", {"fn": print})
        with pytest.raises(TypeError, match="changes must be a mapping of config keys to values, got list"):
            weaver.set("demo", [("lr", 1)])  # type: ignore[call-overload]
        with pytest.raises(ValueError, match="invalid run id 'a/b'"):
            weaver.set("a/b", {"lr": 1})
        assert [r.config for r in weaver.history("demo")] == [{"lr": 0.1}]


def test_revision_not_newer_than_current_is_refused(url: str) -> None:
    async def go() -> None:
        async with AsyncWeaver(url) as weaver:
            await weaver.set("demo", {"lr": 0.1})
            await weaver.set("demo", {"lr": 0.2})
            transport = weaver.transport
            for number in (1, 2):
                with pytest.raises(RevisionConflict) as info:
                    await transport.put(Revision(run="demo", revision=number, config={"lr": 9.0}))
                assert f"expected current revision {number - 1}, found 2" in str(info.value)
                assert "re-read the run and write again" in str(info.value)
                assert info.value.current == 2
            with pytest.raises(RevisionConflict, match="expected current revision 3, found 2"):
                await transport.put(Revision(run="demo", revision=4, config={"lr": 9.0}))
            latest = await weaver.get("demo")
            assert latest is not None
            assert (latest.revision, latest.config) == (2, {"lr": 0.2})
            assert [r.config["lr"] for r in await weaver.history("demo")] == [0.1, 0.2]

    anyio.run(go, backend="asyncio")


def test_concurrent_weavers_in_threads_lose_no_write(url: str) -> None:
    writers, writes = 4, 8

    def write(index: int) -> None:
        with Weaver(url) as weaver:
            for n in range(writes):
                weaver.set("race", {f"w{index}": n, f"w{index}_{n}": True})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    with Weaver(url) as weaver:
        latest = weaver.get("race")
        assert latest is not None
        assert latest.revision == writers * writes
        assert all(latest.config[f"w{i}"] == writes - 1 for i in range(writers))
        assert all(latest.config[f"w{i}_{n}"] is True for i in range(writers) for n in range(writes))
        assert [r.revision for r in weaver.history("race")] == list(range(1, writers * writes + 1))


def test_concurrent_weavers_in_processes_lose_no_write(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    script = textwrap.dedent(
        """
        import sys
        from weavelet_core import Weaver

        url, index, writes = sys.argv[1], sys.argv[2], int(sys.argv[3])
        with Weaver(url) as weaver:
            for n in range(writes):
                weaver.set("race", {f"p{index}_{n}": n})
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script, url, str(i), "10"], stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    with Weaver(url) as weaver:
        latest = weaver.get("race")
        assert latest is not None
        assert latest.revision == 30
        assert latest.config == {f"p{i}_{n}": n for i in range(3) for n in range(10)}
        stored = json.loads((tmp_path / "store" / "runs" / "race" / "latest.json").read_text())
        assert stored["revision"] == 30


def test_async_weaver_accepts_a_built_transport_and_leaves_it_open() -> None:
    async def go() -> None:
        transport = open_transport(f"memory://given-{uuid.uuid4().hex[:6]}")
        await transport.connect()
        async with AsyncWeaver(transport=transport) as weaver:
            await weaver.set("demo", {"lr": 0.1})
        assert (await transport.latest("demo")) is not None  # still open
        await transport.aclose()

    anyio.run(go, backend="asyncio")


def test_close_is_idempotent(url: str) -> None:
    weaver = Weaver(url)
    weaver.set("demo", {"lr": 0.1})
    weaver.close()
    weaver.close()
    with Weaver(url) as again:
        latest = again.get("demo")
        assert latest is not None
        assert latest.config == {"lr": 0.1}


def test_ctrl_c_during_a_wait_returns_at_once(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys, threading, time
        from weavelet_core import Weaver

        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            with Weaver(sys.argv[1]) as weaver:
                weaver.set("demo", {"lr": 0.1}, wait=60)
        except KeyboardInterrupt:
            print(f"interrupted after {time.monotonic() - start:.1f}s")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, (tmp_path / "store").as_uri()],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("interrupted after ")
    assert float(done.stdout.split()[-1].rstrip("s")) < 30  # not the 60 s of the abandoned wait


class _ReplyLostOnce:
    """A real memory transport whose first successful put reports an outage, as when a reply is lost."""

    def __init__(self, url: str) -> None:
        self.inner = open_transport(url)
        self.lost = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(self, revision: Revision) -> None:
        await self.inner.put(revision)
        if not self.lost:
            self.lost = True
            from weavelet_core.errors import TransportUnavailable

            raise TransportUnavailable("connection reset before the reply arrived")


def test_a_write_whose_reply_was_lost_is_not_stored_twice(url: str) -> None:
    async def main() -> list[Revision]:
        flaky = _ReplyLostOnce(url)
        weaver = AsyncWeaver(transport=flaky)  # type: ignore[arg-type]
        written = await weaver.set("lost-reply", {"lr": 0.5})
        assert written.revision == 1
        return await weaver.history("lost-reply")

    history = anyio.run(main)
    assert [(r.revision, r.config) for r in history] == [(1, {"lr": 0.5})]
