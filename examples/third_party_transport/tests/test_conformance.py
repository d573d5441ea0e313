"""weavelet's transport conformance suite, run against this plugin (install the package first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from weavelet_core.testing import TransportConformance


class TestExampleTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self, tmp_path: Path) -> str:
        return f"example://{tmp_path / 'store'}"
