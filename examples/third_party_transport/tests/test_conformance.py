"""weavelet's transport conformance suite, run against this plugin (install the package first)."""

from __future__ import annotations

from pathlib import Path

import pytest
from weavelet_example_transport.transport import ExampleTransport

from weavelet_core.testing import TransportConformance
from weavelet_core.transport import Transport


class TestExampleTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self, tmp_path: Path) -> str:
        return f"example://{tmp_path / 'store'}"

    async def write_raw_revision(self, transport: Transport, run: str, number: int, data: bytes) -> None:
        # Runs the suite's tests of undecodable entries: store bytes as the newest revision, unchecked.
        assert isinstance(transport, ExampleTransport)
        await transport.put_raw(run, number, data)
