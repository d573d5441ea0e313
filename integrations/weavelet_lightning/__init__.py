"""weavelet for Lightning: :class:`WeaveletCallback` (``pip install "weavelet[lightning]"``).

Works with ``lightning.pytorch`` and with ``pytorch_lightning``. Importing this package does not import torch or
Lightning; the callback class is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weavelet_lightning.callback import WeaveletCallback

__all__ = ["WeaveletCallback"]


def __getattr__(name: str) -> Any:
    if name == "WeaveletCallback":
        from weavelet_lightning.callback import WeaveletCallback

        return WeaveletCallback
    raise AttributeError(f"module 'weavelet_lightning' has no attribute {name!r}")
