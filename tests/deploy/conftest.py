"""Fixtures of the deployment tests: the configuration blocks of docs/deploy.md, read as they are written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
