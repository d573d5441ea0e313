"""Testing helpers for weavelet and for authors of weavelet plugins.

- :class:`TransportConformance`: the shared suite every transport passes (subclass it, give a URL fixture).
- :class:`TransportFaultConformance`: the fault suite for transports with a server a test can kill, stop and
  pause (subclass it, give a ``fault_server`` fixture).
- :mod:`weavelet_core.testing.servers`: :class:`~weavelet_core.testing.servers.ManagedServer`, the base of every
  test-server helper (start, ready, stop, kill, pause/resume, log tail).

Names are imported on first use, so ``weavelet_core.testing.servers`` (used by ``weavelet server``) can be
imported without pytest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weavelet_core.testing.conformance import TransportConformance
    from weavelet_core.testing.faults import TransportFaultConformance


def __getattr__(name: str) -> Any:
    if name == "TransportConformance":
        from weavelet_core.testing.conformance import TransportConformance

        return TransportConformance
    if name == "TransportFaultConformance":
        from weavelet_core.testing.faults import TransportFaultConformance

        return TransportFaultConformance
    raise AttributeError(f"module 'weavelet_core.testing' has no attribute {name!r}")


__all__ = ["TransportConformance", "TransportFaultConformance"]
