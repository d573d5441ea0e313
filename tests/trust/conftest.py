"""Shared fixtures of the trust tests: a file store, a run id, a Weaver and WeaveletProcess factory."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from weavelet_core import Revision, WeaveletProcess, Weaver

WAIT = 15.0  # generous: two shared cores

Make = Callable[..., WeaveletProcess]
PollUntil = Callable[..., Revision]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def url(request: pytest.FixtureRequest, store: Path) -> str:
    """A ``file://`` store; ``nats`` or ``redis`` through indirect parametrization: the session's server (a
    transport that versions statuses, so the sidecar's keepalive writes conditionally instead of reading first)."""
    kind = getattr(request, "param", "file")
    if kind in ("nats", "redis"):
        return str(request.getfixturevalue(f"weavelet_{kind}_url"))
    return store.as_uri()


@pytest.fixture
def run() -> str:
    return f"trust-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as weaver:
        yield weaver


@pytest.fixture
def make(url: str, run: str) -> Iterator[Make]:
    """``make(**kwargs)``: a WeaveletProcess of ``run`` on ``url`` with a fast heartbeat; all stopped after."""
    made: list[WeaveletProcess] = []

    def factory(**kwargs: Any) -> WeaveletProcess:
        kwargs.setdefault("heartbeat_interval", 0.1)
        kwargs.setdefault("restart_backoff", (0.1, 1.0))
        process = WeaveletProcess(kwargs.pop("run", run), kwargs.pop("url", url), **kwargs)
        made.append(process)
        return process

    yield factory
    for process in made:
        process.stop(timeout=5)


@pytest.fixture
def poll_until() -> PollUntil:
    """``poll_until(process, timeout=WAIT)``: the next revision the process hands out, or fail."""

    def poll(process: WeaveletProcess, timeout: float = WAIT) -> Revision:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            revision = process.poll()
            if revision is not None:
                return revision
            time.sleep(0.005)
        raise AssertionError(f"no revision within {timeout}s")

    return poll
