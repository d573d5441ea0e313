"""Testing helpers for weavelet and for authors of weavelet plugins.

- :class:`TransportConformance`: the shared suite every transport passes (subclass it, give a URL fixture).
"""

from weavelet_core.testing.conformance import TransportConformance

__all__ = ["TransportConformance"]
