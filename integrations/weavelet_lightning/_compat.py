"""Finding Lightning: the ``lightning`` package (``lightning.pytorch``) and/or ``pytorch_lightning``.

The callback derives from the ``Callback`` class of every one of them that is installed, so a trainer from
either accepts it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
INSTALL_HINT = 'pip install "weavelet[lightning]"'


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def lightning_modules() -> list[Any]:
    """The installed Lightning modules (``lightning.pytorch`` first); raise ImportError saying how to install."""
    found = []
    for name in PACKAGES:
        if _installed(name.split(".")[0]) and _installed(name):
            found.append(importlib.import_module(name))
    if not found:
        raise ImportError(
            f"weavelet_lightning needs Lightning, which is not installed; install it with: {INSTALL_HINT}"
        )
    return found


def callback_base() -> type:
    """A ``Callback`` base class accepted by the trainer of every installed Lightning package."""
    bases = tuple(module.Callback for module in lightning_modules())
    if len(bases) == 1:
        return bases[0]  # type: ignore[no-any-return]
    return type("LightningCallback", bases, {})


def trainer_module() -> Any:
    """The Lightning module the demo builds its model and trainer from: ``pytorch_lightning`` (what
    ``weavelet[lightning]`` installs) when present, else ``lightning.pytorch``. A model and its trainer must
    come from the same package."""
    modules = lightning_modules()
    return modules[-1]
