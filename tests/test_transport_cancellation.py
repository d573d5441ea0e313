"""Every transport call returns promptly when its caller's deadline passes, even against a stopped server.

A caller bounds each call with ``anyio.fail_after``; against a SIGSTOPped nats-server or redis-server (the socket
stays open, nothing answers) every method must give up within a second of that deadline instead of waiting for a
socket or request timeout of its own. The server is resumed in a ``finally`` so nothing is left stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import anyio
import pytest

from weavelet_core import open_transport
from weavelet_core.errors import RevisionConflict, TransportUnavailable
from weavelet_core.protocol import Outcome, Revision, Status
from weavelet_core.testing.servers import wait_until_stopped
from weavelet_core.transport import Transport
from weavelet_nats.testing import NatsServerFactory
from weavelet_redis.testing import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DEADLINE = 0.3
"""The caller's deadline for each call."""
GRACE = 1.0
"""How long after the deadline a call may take to return."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process is stopped (SIGSTOP) inside the block, from the moment the stop has taken effect, and always
    resumed after it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until_stopped(pid)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


Call = Callable[[Transport, str], Awaitable[object]]
CALLS: dict[str, Call] = {
    "put": lambda t, run: t.put(Revision(run=run, revision=2, config={"n": 2})),
    "latest": lambda t, run: t.latest(run),
    "history": lambda t, run: t.history(run),
    "runs": lambda t, run: t.runs(),
    "status": lambda t, run: t.status(run),
    "publish_status": lambda t, run: t.publish_status(Status(run=run, state="running")),
    "publish_outcome": lambda t, run: t.publish_outcome(Outcome(run=run, revision=1, result="applied", step=1)),
    "outcome": lambda t, run: t.outcome(run, 1),
    "outcomes": lambda t, run: t.outcomes(run),
    "watch_outcome": lambda t, run: t.watch_outcome(run, 1).__anext__(),
}


async def _assert_every_call_is_cancelled_promptly(url: str, pid: int) -> None:
    run = f"cancel-{uuid.uuid4().hex[:8]}"
    transport = open_transport(url)
    await transport.connect()
    try:
        await transport.put(Revision(run=run, revision=1, config={"n": 1}))
        late: dict[str, float] = {}
        with stopped(pid):
            for name, call in CALLS.items():
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    with anyio.fail_after(DEADLINE):
                        await call(transport, run)
                elapsed = time.monotonic() - started
                if elapsed > DEADLINE + GRACE:
                    late[name] = round(elapsed, 2)
        assert late == {}, f"calls that outlived their {DEADLINE}s deadline by more than {GRACE}s: {late}"
        # Once the server is resumed the same transport works, and no late reply to a cancelled call is taken
        # for the answer to a later one. (The cancelled writes may or may not have landed.)
        with anyio.fail_after(10):
            while True:
                try:
                    latest = await transport.latest(run)
                    break
                except TransportUnavailable:
                    await anyio.sleep(0.1)
            assert isinstance(latest, Revision)
            assert latest.config == {"n": latest.revision}
            # A cancelled write may still land after this read (a NATS direct get is not ordered after a
            # publish still in flight): write on top of whatever is newest then.
            while True:
                try:
                    await transport.put(
                        Revision(run=run, revision=latest.revision + 1, config={"n": latest.revision + 1})
                    )
                    break
                except RevisionConflict:
                    latest = await transport.latest(run)
                    assert isinstance(latest, Revision)
                    assert latest.config == {"n": latest.revision}
            status = await transport.status(run)
            assert status is None or isinstance(status, Status)
            outcome = await transport.outcome(run, 1)
            assert outcome is None or isinstance(outcome, Outcome)
            assert run in await transport.runs()
    finally:
        with anyio.move_on_after(10, shield=True):
            await transport.aclose()


async def test_nats_calls_are_cancelled_promptly_against_a_stopped_server(
    weavelet_nats_server_factory: NatsServerFactory,
) -> None:
    server = weavelet_nats_server_factory()
    assert server.process is not None
    await _assert_every_call_is_cancelled_promptly(server.url, server.process.pid)


async def test_redis_calls_are_cancelled_promptly_against_a_stopped_server(
    weavelet_redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = weavelet_redis_server_factory()
    assert server.pid is not None
    await _assert_every_call_is_cancelled_promptly(server.url, server.pid)
