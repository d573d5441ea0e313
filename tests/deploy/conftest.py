"""Fixtures of the deployment tests: the configuration blocks of docs/deploy.md, read as they are written."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from weavelet_core import Revision, open_transport
from weavelet_core.protocol import Outcome

DEPLOY_MD = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
_SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\n```[^\n]*\n(.*?)\n```", re.S)


def snippets() -> dict[str, str]:
    """Every marked block of docs/deploy.md by name (``<!-- snippet: NAME -->`` before a fenced block)."""
    return {name: body for name, body in _SNIPPET.findall(DEPLOY_MD.read_text())}


@pytest.fixture(scope="session")
def snippet() -> dict[str, str]:
    found = snippets()
    assert found, f"no snippets in {DEPLOY_MD}"
    return found


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


AnswerLater = Callable[[str, Revision], threading.Thread]


@pytest.fixture
def answer_later() -> AnswerLater:
    """``answer_later(url, revision)``: publish an ``applied`` outcome of ``revision`` through ``url`` in a thread,
    0.3 s from now (a trainer answering while a scoped weaver waits); returns the thread to join."""

    def start(url: str, revision: Revision) -> threading.Thread:
        async def answer() -> None:
            await anyio.sleep(0.3)
            async with open_transport(url) as transport:
                await transport.publish_outcome(
                    Outcome(run=revision.run, revision=revision.revision, revision_id=revision.id, result="applied")
                )

        thread = threading.Thread(target=anyio.run, args=(answer,), daemon=True)
        thread.start()
        return thread

    return start
