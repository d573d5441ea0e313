"""The conformance suite against the in-process and file transports."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from weavelet_core.memory import MemoryTransport
from weavelet_core.testing import TransportConformance
from weavelet_core.transport import Transport
from weavelet_file.transport import FileTransport


class TestMemoryTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self) -> str:
        return f"memory://conformance-{uuid.uuid4().hex[:8]}"

    async def write_raw_revision(self, transport: Transport, run: str, number: int, data: bytes) -> None:
        assert isinstance(transport, MemoryTransport)
        await transport.put_raw(run, number, data)

    async def write_raw_status(self, transport: Transport, run: str, data: bytes) -> None:
        assert isinstance(transport, MemoryTransport)
        await transport.put_raw_status(run, data)


class TestFileTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self, tmp_path: Path) -> str:
        return (tmp_path / "store").as_uri()

    async def write_raw_revision(self, transport: Transport, run: str, number: int, data: bytes) -> None:
        assert isinstance(transport, FileTransport)
        await transport.put_raw(run, number, data)

    async def write_raw_status(self, transport: Transport, run: str, data: bytes) -> None:
        assert isinstance(transport, FileTransport)
        path = transport._run_dir(run) / "status.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
