"""The conformance suite against the in-process and file transports."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from weavelet_core.testing import TransportConformance


class TestMemoryTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self) -> str:
        return f"memory://conformance-{uuid.uuid4().hex[:8]}"


class TestFileTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self, tmp_path: Path) -> str:
        return (tmp_path / "store").as_uri()
