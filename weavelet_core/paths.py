"""Where weavelet keeps per-user state when no URL is configured."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

STATE_DIR_ENV = "WEAVELET_STATE_DIR"


def default_state_dir() -> Path:
    """The directory behind the default ``file://`` transport.

    ``WEAVELET_STATE_DIR`` if set, else the per-user state directory (``~/.local/state/weavelet`` on Linux).
    A training script and ``weavelet set`` in another terminal of the same user find each other there.
    """
    override = os.environ.get(STATE_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser().resolve()
    return Path(platformdirs.user_state_dir("weavelet", appauthor=False)).resolve()
