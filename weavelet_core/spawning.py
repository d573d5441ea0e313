"""Spawning the sidecar without re-importing the trainer's ``__main__``.

A ``spawn``-started child normally re-imports the parent's main module (``train.py``) before it runs its
target: a training script that imports torch at the top would make the sidecar import torch too (seconds of
start-up, hundreds of MB) and run any unguarded top-level code. The sidecar needs nothing from ``__main__``
(its target lives in :mod:`weavelet_core.sidecar`), so for processes whose name starts with
:data:`SIDECAR_NAME_PREFIX` the main-module entries are left out of the spawn preparation data. Other
processes (DataLoader workers and the like) are untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from multiprocessing import spawn
from typing import Any

SIDECAR_NAME_PREFIX = "weavelet-sidecar"
_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")

_lock = threading.Lock()


def _wrap(original: Callable[[str], dict[str, Any]]) -> Callable[[str], dict[str, Any]]:
    def get_preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        if isinstance(name, str) and name.startswith(SIDECAR_NAME_PREFIX):
            for key in _MAIN_KEYS:
                data.pop(key, None)
        return data

    get_preparation_data.__wrapped__ = original  # type: ignore[attr-defined]
    get_preparation_data._weavelet = True  # type: ignore[attr-defined]
    return get_preparation_data


def install() -> None:
    """Make spawned sidecar processes skip the main-module re-import. Idempotent and thread-safe."""
    with _lock:
        current = spawn.get_preparation_data
        if not getattr(current, "_weavelet", False):
            spawn.get_preparation_data = _wrap(current)  # type: ignore[assignment]


__all__ = ["SIDECAR_NAME_PREFIX", "install"]
