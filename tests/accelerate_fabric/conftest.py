"""Fixtures for attach() under accelerate and Lightning Fabric: a file:// run directory and a Weaver on it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from weavelet_core import Weaver

WAIT = 30.0
"""The longest a test waits for a revision to reach the trainer's side (seconds)."""


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "weavelet").as_uri()


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as w:
        yield w


@pytest.fixture
def arrived() -> Callable[[Any], None]:
    """``arrived(live)``: wait (bounded) until a revision written for ``live``'s run reached the trainer's side,
    without taking it."""

    def wait(live: Any) -> None:
        deadline = time.monotonic() + WAIT
        while not live.process.waiting:
            assert time.monotonic() < deadline, f"no revision reached the trainer in {WAIT}s"
            time.sleep(0.005)

    return wait
