"""The one error the applier raises for a revision it will not apply."""

from __future__ import annotations

from weavelet_core.errors import WeaveletError


class Rejected(WeaveletError, ValueError):
    """A revision that cannot be applied; the message says why and what to send instead.

    Nothing has been changed when it is raised: validation happens before any effect.
    """
