"""The transport conformance suite: the executable contract of :class:`weavelet_core.Transport`.

A plugin author subclasses :class:`TransportConformance` in a test module and provides a ``transport_url``
fixture; every test below then runs against that transport::

    import pytest
    from weavelet_core.testing import TransportConformance

    class TestKafkaTransport(TransportConformance):
        @pytest.fixture
        def transport_url(self, kafka_server):
            return f"kafka://{kafka_server.address}"

The built-in transports pass this suite unchanged. Tests use anyio's pytest plugin on the asyncio backend
(it ships with anyio; no extra plugin is needed). Each test uses its own run ids, so a shared server is fine.

Tests of undecodable entries need to store raw bytes as a run's newest revision (or status), which only the
transport's own test module knows how to do: override :meth:`TransportConformance.write_raw_revision` (and
:meth:`TransportConformance.write_raw_status`). Without them those tests are skipped with a reason that says so
(and only those). Tests of :meth:`~weavelet_core.Transport.delete` are skipped for a transport that does not
implement it (it raises :class:`~weavelet_core.transport.DeleteUnsupported`), and tests of a schema stored apart
from its status (:meth:`~weavelet_core.Transport.publish_schema`) for one that keeps it inline (it raises
:class:`~weavelet_core.transport.SchemaApartUnsupported`); a status with its schema inline is tested either way.
A transport that does not version statuses (:meth:`~weavelet_core.Transport.replace_status` raises
:class:`~weavelet_core.transport.StatusVersionsUnsupported`) is checked to store nothing when it refuses, and the
publisher's fallback to reading first is tested either way.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from weavelet_core.errors import CorruptEntry, InvalidRunId, RevisionConflict, TransportUnavailable
from weavelet_core.plugins import open_transport
from weavelet_core.protocol import Outcome, Revision, Status, encode_schema, schema_digest
from weavelet_core.statuses import StatusPublisher, read_status
from weavelet_core.transport import (
    DeleteUnsupported,
    Entry,
    SchemaApartUnsupported,
    StatusVersionsUnsupported,
    Transport,
)

WATCH_TIMEOUT = 10.0


def _rev(run: str, number: int, **config: Any) -> Revision:
    return Revision(run=run, revision=number, config=config or {"n": number}, author="conformance")


async def _next(iterator: AsyncIterator[Entry], timeout: float = WATCH_TIMEOUT) -> Entry:
    with anyio.fail_after(timeout):
        return await iterator.__anext__()


async def _next_outcome(iterator: AsyncIterator[Outcome], timeout: float = WATCH_TIMEOUT) -> Outcome:
    with anyio.fail_after(timeout):
        return await iterator.__anext__()


def _number(entry: Entry) -> int:
    return entry.revision


def _shown(entry: Entry | None) -> tuple[int, dict[str, Any]] | None:
    """``(number, config)`` of a revision read back (``None`` for none); anything else fails the test."""
    if entry is None:
        return None
    assert isinstance(entry, Revision), entry
    return entry.revision, entry.config


SCHEMA: dict[str, Any] = {
    "version": 1,
    "optimizers": [{"name": None, "type": "adam", "keys": {"lr": {"kind": "float", "min": 0}}}],
    "commands": ["stop", "checkpoint"],
    "note": "caf\u00e9 \u6f22\u5b57",
}
"""A trainer's schema, as :class:`~weavelet_core.statuses.StatusPublisher` stores it (see Status.schema)."""


def _undecodable(kind: str, run: str, number: int) -> bytes:
    """Bytes stored as revision ``number`` of ``run`` that no reader of this protocol version accepts."""
    if kind == "garbage":
        return b"\x80\x04\x95 not json {"
    body: dict[str, Any] = {"v": 2, "kind": "revision", "run": run, "revision": number, "config": {"n": number}}
    if kind == "future-version":
        body["v"] = 3
    elif kind == "bad-fields":
        body["config"] = "not an object"
    return json.dumps(body).encode()


UNDECODABLE = ("garbage", "future-version", "bad-fields")


async def _put_with_retry(transport: Transport, run: str, config: dict[str, Any]) -> int:
    while True:
        current = await transport.latest(run)
        number = (current.revision if current else 0) + 1
        try:
            await transport.put(Revision(run=run, revision=number, config=config, author="conformance"))
            return number
        except RevisionConflict:
            continue


class TransportConformance:
    """Subclass and provide a ``transport_url`` fixture (a URL string) to run the suite."""

    #: Concurrent writers in the no-lost-writes test, and writes each.
    concurrent_writers = 4
    writes_per_writer = 10
    #: Runs in the tests of the batched reads (``statuses``, ``latests``): enough for a transport to switch from
    #: reading run by run to reading in bulk.
    batch_runs = 300

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def transport_url(self) -> str:
        raise NotImplementedError("subclass TransportConformance and define a transport_url fixture")

    async def write_raw_revision(self, transport: Transport, run: str, number: int, data: bytes) -> None:
        """Store ``data`` as the newest revision of ``run``, numbered ``number`` where the store records a number
        apart from the payload, bypassing every check (no compare-and-set, no decoding).

        Override it in the subclass to run the tests of undecodable entries; ``number`` is always one more
        than the run's current revision. The default skips those tests.
        """
        pytest.skip(
            f"{type(self).__name__} does not override write_raw_revision(transport, run, number, data), so the "
            "tests of undecodable revisions cannot store raw bytes; implement it to run them"
        )

    async def write_raw_status(self, transport: Transport, run: str, data: bytes) -> None:
        """Store ``data`` as the latest status of ``run``, bypassing every check (the run is listed by ``runs()``).

        Override it in the subclass to run the test of an undecodable status among many; the default skips it.
        """
        pytest.skip(
            f"{type(self).__name__} does not override write_raw_status(transport, run, data), so the test of an "
            "undecodable status cannot store raw bytes; implement it to run it"
        )

    @pytest.fixture
    def run(self) -> str:
        return f"conf-{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    async def transport(self, transport_url: str) -> AsyncIterator[Transport]:
        transport = open_transport(transport_url)
        await transport.connect()
        try:
            yield transport
        finally:
            await transport.aclose()

    @pytest.fixture
    async def other(self, transport_url: str) -> AsyncIterator[Transport]:
        """A second, independent connection to the same store."""
        transport = open_transport(transport_url)
        await transport.connect()
        try:
            yield transport
        finally:
            await transport.aclose()

    # -- revisions ---------------------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_empty_run_has_nothing(self, transport: Transport, run: str) -> None:
        assert await transport.latest(run) is None
        assert await transport.history(run) == []
        assert await transport.status(run) is None
        assert await transport.outcome(run, 1) is None
        assert await transport.outcomes(run) == []
        assert run not in await transport.runs()

    @pytest.mark.anyio
    async def test_put_then_latest_round_trips_every_field(self, transport: Transport, run: str) -> None:
        revision = Revision(
            run=run,
            revision=1,
            config={"lr": 0.001, "optimizer": {"name": "adam", "betas": [0.9, 0.999]}, "note": "ünïcode"},
            author="alice@host",
            reverts=0,
            key_id="SHA256:" + "k" * 43,  # a signed revision's fields must come back as written, or it cannot verify
            signature="s" * 86 + "==",
        )
        await transport.put(revision)
        assert await transport.latest(run) == revision
        assert (await transport.history(run))[-1] == revision

    @pytest.mark.anyio
    async def test_put_is_compare_and_set(self, transport: Transport, run: str) -> None:
        with pytest.raises(RevisionConflict) as info:
            await transport.put(_rev(run, 2))
        assert info.value.current == 0
        await transport.put(_rev(run, 1))
        with pytest.raises(RevisionConflict) as info:
            await transport.put(_rev(run, 1, lr=5))
        assert info.value.current == 1
        await transport.put(_rev(run, 2))
        latest = await transport.latest(run)
        assert latest is not None
        assert latest.revision == 2
        assert latest.config == {"n": 2}

    @pytest.mark.anyio
    async def test_losing_writer_does_not_change_the_stored_revision(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        await transport.put(_rev(run, 1, owner="first"))
        with pytest.raises(RevisionConflict):
            await other.put(_rev(run, 1, owner="second"))
        latest = await other.latest(run)
        assert latest is not None
        assert latest.config == {"owner": "first"}

    @pytest.mark.anyio
    async def test_concurrent_writers_lose_nothing(self, transport_url: str, run: str) -> None:
        transports = [open_transport(transport_url) for _ in range(self.concurrent_writers)]
        for t in transports:
            await t.connect()
        try:

            async def writer(index: int, t: Transport) -> None:
                for j in range(self.writes_per_writer):
                    await _put_with_retry(t, run, {"writer": index, "write": j})

            async with anyio.create_task_group() as tg:
                for index, t in enumerate(transports):
                    tg.start_soon(writer, index, t)
            history = await transports[0].history(run)
        finally:
            for t in transports:
                await t.aclose()
        total = self.concurrent_writers * self.writes_per_writer
        assert [r.revision for r in history][-total:] == list(range(1, total + 1))
        written = {(r.config["writer"], r.config["write"]) for r in history if isinstance(r, Revision)}
        assert len(written) == total

    @pytest.mark.anyio
    async def test_history_is_oldest_first_and_limited(self, transport: Transport, run: str) -> None:
        for number in range(1, 6):
            await transport.put(_rev(run, number))
        assert [r.revision for r in await transport.history(run)] == [1, 2, 3, 4, 5]
        assert [r.revision for r in await transport.history(run, limit=2)] == [4, 5]

    @pytest.mark.anyio
    async def test_runs_lists_runs_with_revisions_or_status(self, transport: Transport, run: str) -> None:
        await transport.put(_rev(f"{run}-a", 1))
        await transport.publish_status(Status(run=f"{run}-b", state="running"))
        runs = await transport.runs()
        assert f"{run}-a" in runs
        assert f"{run}-b" in runs
        assert runs == sorted(runs)

    @pytest.mark.anyio
    async def test_invalid_run_ids_are_refused(self, transport: Transport) -> None:
        for bad in ("a/b", "..", "has space", "", "../etc"):
            with pytest.raises(InvalidRunId):
                await transport.latest(bad)

    # -- watch -------------------------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_watch_starts_with_the_latest_then_follows(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        for number in range(1, 4):
            await transport.put(_rev(run, number))
        watcher = other.watch(run)
        try:
            assert (await _next(watcher)).revision == 3
            for number in range(4, 7):
                await transport.put(_rev(run, number))
            assert [(await _next(watcher)).revision for _ in range(3)] == [4, 5, 6]
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]

    @pytest.mark.anyio
    async def test_watch_of_an_empty_run_waits_for_the_first_revision(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        watcher = other.watch(run)
        try:
            async with anyio.create_task_group() as tg:

                async def write_later() -> None:
                    await anyio.sleep(0.2)
                    await transport.put(_rev(run, 1))

                tg.start_soon(write_later)
                first = await _next(watcher)
            assert first.revision == 1
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]

    @pytest.mark.anyio
    async def test_watch_after_skips_what_the_consumer_has(self, transport: Transport, run: str) -> None:
        for number in range(1, 4):
            await transport.put(_rev(run, number))
        watcher = transport.watch(run, after=3)
        try:
            await transport.put(_rev(run, 4))
            assert (await _next(watcher)).revision == 4
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]

    @pytest.mark.anyio
    async def test_watch_delivers_a_burst_in_order_without_duplicates(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        await transport.put(_rev(run, 1))
        watcher = other.watch(run)
        try:
            assert (await _next(watcher)).revision == 1
            for number in range(2, 22):
                await transport.put(_rev(run, number))
            seen = [(await _next(watcher)).revision for _ in range(20)]
            assert seen == list(range(2, 22))
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]

    # -- status and outcomes -----------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_status_is_replaced_and_readable_by_a_later_client(
        self, transport: Transport, transport_url: str, run: str
    ) -> None:
        await transport.publish_status(Status(run=run, state="starting"))
        newest = Status(
            run=run,
            state="running",
            step=42,
            epoch=1,
            applied_revision=3,
            optimizer={"name": "adam", "lr": 0.001},
            metrics={"loss": 0.25},
        )
        await transport.publish_status(newest)
        async with open_transport(transport_url) as later:
            assert await later.status(run) == newest

    @pytest.mark.anyio
    async def test_outcomes_per_revision(self, transport: Transport, other: Transport, run: str) -> None:
        applied = Outcome(run=run, revision=1, result="applied", step=10)
        rejected = Outcome(run=run, revision=2, result="rejected", message="unknown optimizer 'adamx'")
        await transport.publish_outcome(rejected)
        await transport.publish_outcome(applied)
        assert await other.outcome(run, 1) == applied
        assert await other.outcome(run, 2) == rejected
        assert await other.outcome(run, 3) is None
        assert await other.outcomes(run) == [applied, rejected]
        assert await other.outcomes(run, limit=1) == [rejected]
        superseded = Outcome(run=run, revision=1, result="superseded")
        await transport.publish_outcome(superseded)
        assert await other.outcome(run, 1) == superseded

    @pytest.mark.anyio
    async def test_outcomes_are_kept_per_revision_and_incarnation(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        first = Outcome(run=run, revision=1, result="applied", step=5, at=1000.0, revision_id="a1", incarnation="i1")
        # The same incarnation deciding again replaces its earlier outcome of that revision.
        replaced = Outcome(run=run, revision=1, result="superseded", at=1001.0, revision_id="a1", incarnation="i1")
        # A resumed trainer (another incarnation) applying the same revision: both records are kept.
        resumed = Outcome(run=run, revision=1, result="applied", step=9, at=1002.0, revision_id="a1", incarnation="i2")
        second = Outcome(run=run, revision=2, result="rejected", message="no", at=1003.0, incarnation="i2")
        for outcome in (first, replaced, resumed, second):
            await transport.publish_outcome(outcome)
        assert await other.outcome(run, 1) == resumed, "the newest outcome of the revision"
        assert await other.outcomes(run) == [replaced, resumed, second]
        assert await other.outcomes(run, limit=2) == [resumed, second]
        # An older incarnation's late outcome does not hide the newest one.
        late = Outcome(run=run, revision=1, result="rejected", message="late", at=999.0, incarnation="i0")
        await transport.publish_outcome(late)
        assert await other.outcome(run, 1) == resumed
        assert await other.outcomes(run) == [late, replaced, resumed, second]

    @pytest.mark.anyio
    async def test_outcomes_without_incarnation_still_read(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        legacy = Outcome(run=run, revision=1, result="applied", step=3, at=1000.0)
        await transport.publish_outcome(legacy)
        assert await other.outcome(run, 1) == legacy
        newer = Outcome(run=run, revision=1, result="applied", step=4, at=1001.0, incarnation="i1")
        await transport.publish_outcome(newer)
        assert await other.outcome(run, 1) == newer
        assert await other.outcomes(run) == [legacy, newer]

    # -- batched reads -----------------------------------------------------------------------------------
    async def _fill(self, transport: Transport, runs: list[str]) -> None:
        """Run ``i`` of ``runs``: revisions unless ``i % 5 == 0`` (1 to 3 of them), a status unless ``i % 3 == 0``."""
        semaphore = anyio.Semaphore(32)

        async def one(index: int, run: str) -> None:
            async with semaphore:
                if index % 5:
                    for number in range(1, 2 + index % 3):
                        await transport.put(_rev(run, number, i=index))
                if index % 3:
                    await transport.publish_status(Status(run=run, state="running", step=index))

        async with anyio.create_task_group() as tg:
            for index, name in enumerate(runs):
                tg.start_soon(one, index, name)

    @pytest.mark.anyio
    async def test_batched_reads_give_what_reads_run_by_run_give(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        runs = [f"{run}-{index:03d}" for index in range(self.batch_runs)]
        await self._fill(transport, runs)
        unknown = f"{run}-unknown"
        asked = [unknown, *reversed(runs), runs[-1]]  # unsorted, a run never written, a repeat
        order = list(dict.fromkeys(asked))
        latests = await other.latests(asked)
        statuses = await other.statuses(asked)
        assert list(latests) == order
        assert list(statuses) == order
        for index, name in enumerate(runs):
            newest = latests[name]
            if index % 5:
                assert isinstance(newest, Revision), name
                assert (newest.revision, newest.config) == (1 + index % 3, {"i": index})
            else:
                assert newest is None, f"{name} has a status but no revision"
            status = statuses[name]
            if index % 3:
                assert status is not None, name
                assert (status.run, status.step) == (name, index)
            else:
                assert status is None, f"{name} has revisions but no status"
        assert latests[unknown] is None
        assert statuses[unknown] is None
        for name in runs[:: max(1, len(runs) // 25)]:
            assert latests[name] == await other.latest(name)
            assert statuses[name] == await other.status(name)
        few = [runs[1], runs[5], unknown]  # a small request may take another way: the same answers
        assert await other.latests(few) == {name: latests[name] for name in few}
        assert await other.statuses(few) == {name: statuses[name] for name in few}
        assert await other.latests([]) == {}
        assert await other.statuses([]) == {}

    @pytest.mark.anyio
    async def test_batched_reads_see_writes_made_since_the_last_listing(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        runs = [f"{run}-{index:03d}" for index in range(self.batch_runs)]
        await self._fill(transport, runs)
        assert {name for index, name in enumerate(runs) if index % 15} <= set(await other.runs())
        before = await other.latests(runs)
        await transport.put(_rev(runs[1], 3, changed=True))  # run 1 had 2 revisions
        await transport.publish_status(Status(run=runs[1], state="stopped", step=7))
        await transport.put(_rev(runs[0], 1))  # run 0 had none
        after = await other.latests(runs)
        assert _shown(after[runs[1]]) == (3, {"changed": True})
        assert _shown(after[runs[0]]) == (1, {"n": 1})
        assert {k: v for k, v in after.items() if k not in runs[:2]} == {
            k: v for k, v in before.items() if k not in runs[:2]
        }
        status = (await other.statuses(runs))[runs[1]]
        assert status is not None
        assert (status.state, status.step) == ("stopped", 7)

    @pytest.mark.anyio
    async def test_batched_reads_report_unreadable_revisions_in_their_place(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        runs = [f"{run}-{index:03d}" for index in range(self.batch_runs)]
        await self._fill(transport, runs)
        garbage, future = runs[1], runs[4]  # each with 2 revisions: the unreadable one is number 3
        await self.write_raw_revision(transport, garbage, 3, _undecodable("garbage", garbage, 3))
        await self.write_raw_revision(transport, future, 3, _undecodable("future-version", future, 3))
        latests = await other.latests(runs)
        for name in (garbage, future):
            entry = latests[name]
            assert isinstance(entry, CorruptEntry), name
            assert (entry.run, entry.revision) == (name, 3)
            with pytest.raises(CorruptEntry):
                await other.latest(name)
        readable = [name for index, name in enumerate(runs) if index % 5 and name not in (garbage, future)]
        assert all(isinstance(latests[name], Revision) for name in readable)
        statuses = await other.statuses(runs)
        assert statuses[garbage] is not None
        assert sum(status is not None for status in statuses.values()) == sum(1 for i in range(len(runs)) if i % 3)

    @pytest.mark.anyio
    async def test_batched_statuses_leave_out_an_unreadable_status(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        runs = [f"{run}-{index:03d}" for index in range(self.batch_runs)]
        await self._fill(transport, runs)
        broken = runs[4]
        await self.write_raw_status(transport, broken, b"\x80 not json {")
        statuses = await other.statuses(runs)
        assert statuses[broken] is None
        assert await other.status(broken) is None
        assert broken in await other.runs()
        assert sum(status is not None for status in statuses.values()) == sum(1 for i in range(len(runs)) if i % 3) - 1

    # -- delete ------------------------------------------------------------------------------------------
    async def _delete(self, transport: Transport, run: str) -> None:
        try:
            await transport.delete(run)
        except DeleteUnsupported as exc:
            pytest.skip(f"{type(transport).__name__} does not implement delete(): {exc}")

    @pytest.mark.anyio
    async def test_delete_removes_everything_of_the_run_and_nothing_else(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        kept = f"{run}-kept"
        for name in (run, kept):
            await transport.put(_rev(name, 1))
            await transport.put(_rev(name, 2))
            await transport.publish_status(Status(run=name, state="stopped", step=9))
            for incarnation in ("i1", "i2"):
                outcome = Outcome(run=name, revision=2, result="applied", step=9, incarnation=incarnation)
                await transport.publish_outcome(outcome)
        assert {run, kept} <= set(await other.runs())
        await self._delete(other, run)
        for reader in (transport, other):
            listed = await reader.runs()
            assert run not in listed
            assert kept in listed
            assert await reader.latest(run) is None
            assert await reader.history(run) == []
            assert await reader.status(run) is None
            assert await reader.outcome(run, 2) is None
            assert await reader.outcomes(run) == []
            latests = await reader.latests([run, kept])
            assert (_shown(latests[run]), _shown(latests[kept])) == (None, (2, {"n": 2}))
            statuses = await reader.statuses([run, kept])
            assert statuses[run] is None
            assert statuses[kept] is not None
            assert len(await reader.outcomes(kept)) == 2
        # The run starts again at revision 1, from either connection.
        with pytest.raises(RevisionConflict) as info:
            await transport.put(_rev(run, 3))
        assert info.value.current == 0
        await transport.put(_rev(run, 1, again=True))
        assert _shown(await other.latest(run)) == (1, {"again": True})
        assert [r.revision for r in await other.history(run)] == [1]

    @pytest.mark.anyio
    async def test_delete_of_a_run_with_nothing_stored_does_nothing(self, transport: Transport, run: str) -> None:
        await transport.put(_rev(f"{run}-other", 1))
        await self._delete(transport, run)
        await self._delete(transport, run)
        assert _shown(await transport.latest(f"{run}-other")) == (1, {"n": 1})
        with pytest.raises(InvalidRunId):
            await transport.delete("../etc")

    @pytest.mark.anyio
    async def test_delete_of_a_run_with_only_a_status(self, transport: Transport, other: Transport, run: str) -> None:
        await transport.publish_status(Status(run=run, state="failed", message="boom"))
        await self._delete(transport, run)
        assert run not in await other.runs()
        assert await other.status(run) is None

    # -- conditional status writes --------------------------------------------------------------------
    async def _versioned(self, transport: Transport, other: Transport, status: Status) -> int | None:
        """Store ``status`` and return its version; ``None`` for a transport that does not version statuses, once
        it is seen to refuse with ``StatusVersionsUnsupported`` and to store nothing (the sidecar then reads
        before each publish: tested by ``test_a_publisher_stores_unless_replaced_only_over_its_own_last_status``)."""
        try:
            version = await transport.replace_status(status, None)
        except StatusVersionsUnsupported:
            assert await other.status(status.run) is None, "a refused conditional write stored the status anyway"
            return None
        assert isinstance(version, int)
        return version

    @pytest.mark.anyio
    async def test_a_status_is_replaced_only_while_it_is_the_version_expected(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        first = await self._versioned(transport, other, Status(run=run, state="running", step=1))
        if first is None:
            return
        second = await transport.replace_status(Status(run=run, state="running", step=2), first)
        assert second is not None
        assert second != first
        stored = await other.status(run)
        assert stored is not None
        assert stored.step == 2
        # The version an earlier write returned is stale once another write landed: nothing is stored.
        assert await transport.replace_status(Status(run=run, state="running", step=3), first) is None
        await other.publish_status(Status(run=run, state="running", step=40, incarnation="newer"))
        assert await transport.replace_status(Status(run=run, state="running", step=4), second) is None
        kept = await other.status(run)
        assert kept is not None
        assert (kept.step, kept.incarnation) == (40, "newer")

    @pytest.mark.anyio
    async def test_a_status_version_is_one_runs_own(self, transport: Transport, other: Transport, run: str) -> None:
        version = await self._versioned(transport, other, Status(run=run, state="running", step=1))
        if version is None:
            return
        await other.publish_status(Status(run=f"{run}-other", state="running", step=9))
        await other.put(_rev(f"{run}-other", 1))
        assert await transport.replace_status(Status(run=run, state="running", step=2), version) is not None

    @pytest.mark.anyio
    async def test_a_removed_run_fails_a_conditional_status_write(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        version = await self._versioned(transport, other, Status(run=run, state="running", step=1))
        if version is None:
            return
        await self._delete(other, run)
        assert await transport.replace_status(Status(run=run, state="running", step=2), version) is None
        assert await other.status(run) is None

    @pytest.mark.anyio
    async def test_a_publisher_stores_unless_replaced_only_over_its_own_last_status(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        """What a sidecar's keepalive relies on, on every transport: a status stored without a check only where
        the transport versions statuses and nothing was written since; else False, and nothing stored."""
        publisher = StatusPublisher()
        status = Status(run=run, state="running", step=1, schema=SCHEMA)
        assert not await publisher.publish_unless_replaced(transport, status), "nothing stored yet: check first"
        await publisher.publish(transport, status)
        versioned = publisher.version is not None
        assert await publisher.publish_unless_replaced(transport, dataclasses.replace(status, step=2)) is versioned
        joined = await read_status(other, run)
        assert joined is not None
        assert (joined.step, joined.schema) == ((2 if versioned else 1), SCHEMA)
        changed = dataclasses.replace(status, step=3, schema={**SCHEMA, "commands": []})
        assert not await publisher.publish_unless_replaced(transport, changed), "a new schema waits for the check"
        await other.publish_status(Status(run=run, state="running", step=50, incarnation="newer"))
        assert not await publisher.publish_unless_replaced(transport, dataclasses.replace(status, step=4))
        kept = await other.status(run)
        assert kept is not None
        assert (kept.step, kept.incarnation) == (50, "newer")

    # -- a status's schema, stored apart ----------------------------------------------------------------
    async def _publish_schema(self, transport: Transport, run: str, data: bytes) -> None:
        try:
            await transport.publish_schema(run, data)
        except SchemaApartUnsupported as exc:
            pytest.skip(f"{type(transport).__name__} keeps a run's schema in its status: {exc}")

    @pytest.mark.anyio
    async def test_a_status_and_its_schema_read_back_joined(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        publisher = StatusPublisher()
        await publisher.publish(transport, Status(run=run, state="running", step=3, schema=SCHEMA))
        joined = await read_status(other, run)
        assert joined is not None
        assert (joined.step, joined.schema) == (3, SCHEMA)
        stored = await other.status(run)
        listed = (await other.statuses([run]))[run]
        assert stored is not None
        assert listed is not None
        if publisher.inline:  # a transport that keeps the schema in the status
            assert (stored.schema, stored.schema_digest, listed.schema) == (SCHEMA, "", SCHEMA)
        else:
            data = encode_schema(SCHEMA)
            assert (stored.schema, stored.schema_digest) == (None, schema_digest(data))
            assert (listed.schema, listed.schema_digest) == (None, schema_digest(data))
            assert await other.read_schema(run) == data
        # The schema is no run, no revision and no outcome of its own.
        assert [name for name in await other.runs() if name.startswith(run)] == [run]
        assert await other.latest(run) is None
        assert await other.outcomes(run) == []

    @pytest.mark.anyio
    async def test_a_changed_schema_replaces_the_one_stored(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        publisher = StatusPublisher()
        await publisher.publish(transport, Status(run=run, state="running", step=1, schema=SCHEMA))
        await publisher.publish(transport, Status(run=run, state="running", step=2, schema=SCHEMA))
        changed = {**SCHEMA, "commands": ["stop"]}
        await publisher.publish(transport, Status(run=run, state="running", step=3, schema=changed))
        joined = await read_status(other, run)
        assert joined is not None
        assert (joined.step, joined.schema) == (3, changed)
        await publisher.publish(transport, Status(run=run, state="stopped", step=4))
        ended = await read_status(other, run)
        assert ended is not None
        assert (ended.state, ended.schema, ended.schema_digest) == ("stopped", None, "")

    @pytest.mark.anyio
    async def test_a_schema_other_than_the_status_names_is_not_joined(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        await self._publish_schema(transport, run, encode_schema(SCHEMA))
        named = schema_digest(encode_schema({**SCHEMA, "commands": []}))
        await transport.publish_status(Status(run=run, state="running", step=5, schema_digest=named))
        found = await read_status(other, run)
        assert found is not None
        assert (found.step, found.schema, found.schema_digest) == (5, None, named)

    @pytest.mark.anyio
    async def test_an_unreadable_schema_is_left_out_of_its_status(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        for bad in (b"\x80 not json {", b"[1, 2]", b'{"lr": NaN}', b'{"a": "\\ud800"}'):
            await self._publish_schema(transport, run, bad)
            await transport.publish_status(Status(run=run, state="running", schema_digest=schema_digest(bad)))
            found = await read_status(other, run)
            assert found is not None
            assert (found.state, found.schema, found.schema_digest) == ("running", None, schema_digest(bad))

    @pytest.mark.anyio
    async def test_delete_removes_the_schema(self, transport: Transport, other: Transport, run: str) -> None:
        await self._publish_schema(transport, run, encode_schema(SCHEMA))
        await StatusPublisher().publish(transport, Status(run=run, state="stopped", schema=SCHEMA))
        await self._delete(other, run)
        assert await transport.read_schema(run) is None
        assert await read_status(transport, run) is None
        assert run not in await other.runs()

    # -- watching an outcome -----------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_watch_outcome_yields_the_stored_outcome_then_newer_ones(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        applied = Outcome(run=run, revision=1, result="applied", step=3, at=1000.0, revision_id="r1", incarnation="i1")
        await transport.publish_outcome(applied)
        watcher = other.watch_outcome(run, 1)
        try:
            assert await _next_outcome(watcher) == applied
            # Another revision's outcome is never yielded; a newer one of this revision is.
            await transport.publish_outcome(Outcome(run=run, revision=2, result="applied", step=4, at=1001.0))
            resumed = Outcome(
                run=run, revision=1, result="applied", step=9, at=1002.0, revision_id="r1", incarnation="i2"
            )
            await transport.publish_outcome(resumed)
            assert await _next_outcome(watcher) == resumed
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]

    @pytest.mark.anyio
    async def test_watch_outcome_waits_for_an_outcome_stored_later(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        await transport.put(_rev(run, 1))
        watcher = other.watch_outcome(run, 1)
        answer = Outcome(run=run, revision=1, result="rejected", message="unknown key 'lrr'", at=1000.0)
        try:
            async with anyio.create_task_group() as tg:

                async def publish_later() -> None:
                    await anyio.sleep(0.2)
                    await transport.publish_outcome(Outcome(run=run, revision=2, result="applied", at=999.0))
                    await transport.publish_outcome(answer)

                tg.start_soon(publish_later)
                assert await _next_outcome(watcher) == answer
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]

    @pytest.mark.anyio
    async def test_watch_outcome_misses_no_outcome_stored_as_it_starts(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        # Stored while the watch is being set up, at every point of it: read first or watched, never lost.
        for number in range(1, 11):
            answer = Outcome(run=run, revision=number, result="applied", step=number, at=1000.0 + number)
            watcher = other.watch_outcome(run, number)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(transport.publish_outcome, answer)
                    assert await _next_outcome(watcher) == answer
            finally:
                await watcher.aclose()  # type: ignore[attr-defined]

    @pytest.mark.anyio
    async def test_watch_outcome_returns_when_its_consumer_gives_up(self, other: Transport, run: str) -> None:
        watcher = other.watch_outcome(run, 1)
        started = time.monotonic()
        try:
            with anyio.move_on_after(0.3) as scope:
                await watcher.__anext__()
            assert scope.cancelled_caught, "nothing was stored, so nothing may be yielded"
            assert time.monotonic() - started < 1.3
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]

    @pytest.mark.anyio
    async def test_watch_outcome_ends_when_the_transport_is_closed(self, transport_url: str, run: str) -> None:
        transport = open_transport(transport_url)
        await transport.connect()
        if type(transport).watch_outcome is Transport.watch_outcome:
            await transport.aclose()
            pytest.skip("the default watch_outcome polls until its consumer stops; it cannot see the transport close")
        watcher = transport.watch_outcome(run, 1)
        try:
            async with anyio.create_task_group() as tg:

                async def close_soon() -> None:
                    await anyio.sleep(0.3)
                    await transport.aclose()

                tg.start_soon(close_soon)
                with anyio.fail_after(WATCH_TIMEOUT), pytest.raises((StopAsyncIteration, TransportUnavailable)):
                    await watcher.__anext__()
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]
            await transport.aclose()

    # -- undecodable revisions ---------------------------------------------------------------------------
    @pytest.mark.anyio
    @pytest.mark.parametrize("kind", UNDECODABLE)
    async def test_undecodable_newest_revision_is_reported_and_numbered_on(
        self, transport: Transport, other: Transport, run: str, kind: str
    ) -> None:
        await transport.put(_rev(run, 1))
        await transport.put(_rev(run, 2))
        await self.write_raw_revision(transport, run, 3, _undecodable(kind, run, 3))
        with pytest.raises(CorruptEntry) as info:
            await other.latest(run)
        assert info.value.revision == 3
        assert info.value.run == run
        assert "--replace" in str(info.value)
        history = await other.history(run)
        assert [type(e) for e in history] == [Revision, Revision, CorruptEntry]
        assert list(map(_number, history)) == [1, 2, 3]
        # Writers number on top of the unreadable entry: never restart, never overwrite it.
        with pytest.raises(RevisionConflict) as conflict:
            await other.put(_rev(run, 3))
        assert conflict.value.current == 3
        with pytest.raises(RevisionConflict):
            await other.put(_rev(run, 1))
        written = _rev(run, 4)
        await other.put(written)
        assert await transport.latest(run) == written
        history = await transport.history(run)
        assert list(map(_number, history)) == [1, 2, 3, 4]
        assert isinstance(history[2], CorruptEntry)
        assert list(map(_number, await transport.history(run, limit=2))) == [3, 4]

    @pytest.mark.anyio
    async def test_undecodable_first_revision_is_reported_as_revision_1(self, transport: Transport, run: str) -> None:
        await self.write_raw_revision(transport, run, 1, _undecodable("garbage", run, 1))
        with pytest.raises(CorruptEntry) as info:
            await transport.latest(run)
        assert info.value.revision == 1
        assert run in await transport.runs()
        with pytest.raises(RevisionConflict) as conflict:
            await transport.put(_rev(run, 1))
        assert conflict.value.current == 1
        await transport.put(_rev(run, 2))
        latest = await transport.latest(run)
        assert latest is not None
        assert latest.revision == 2

    @pytest.mark.anyio
    async def test_watch_yields_undecodable_revisions_in_their_place(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        await transport.put(_rev(run, 1))
        watcher = other.watch(run)
        try:
            assert await _next(watcher) == (await transport.latest(run))
            await self.write_raw_revision(transport, run, 2, _undecodable("garbage", run, 2))
            await transport.put(_rev(run, 3))
            await self.write_raw_revision(transport, run, 4, _undecodable("future-version", run, 4))
            seen = [await _next(watcher) for _ in range(3)]
            assert list(map(_number, seen)) == [2, 3, 4]
            assert [type(e) for e in seen] == [CorruptEntry, Revision, CorruptEntry]
            await transport.put(_rev(run, 5))
            fifth = await _next(watcher)
            assert isinstance(fifth, Revision)
            assert fifth.revision == 5
        finally:
            await watcher.aclose()  # type: ignore[attr-defined]

    @pytest.mark.anyio
    async def test_watch_starting_at_an_undecodable_newest_revision(
        self, transport: Transport, other: Transport, run: str
    ) -> None:
        await transport.put(_rev(run, 1))
        await self.write_raw_revision(transport, run, 2, _undecodable("bad-fields", run, 2))
        fresh = other.watch(run)
        holding = other.watch(run, after=2)  # a consumer that already has revision 2's stand-in
        try:
            first = await _next(fresh)
            assert isinstance(first, CorruptEntry)
            assert first.revision == 2
            await transport.put(_rev(run, 3))
            assert _number(await _next(fresh)) == 3
            assert _number(await _next(holding)) == 3
        finally:
            await fresh.aclose()  # type: ignore[attr-defined]
            await holding.aclose()  # type: ignore[attr-defined]

    @pytest.mark.anyio
    async def test_aclose_is_idempotent(self, transport_url: str) -> None:
        transport = open_transport(transport_url)
        await transport.connect()
        await transport.aclose()
        await transport.aclose()
