"""weavelet for the Hugging Face ``Trainer``: :class:`WeaveletCallback` (``pip install "weavelet[transformers]"``).

Importing this package imports neither torch nor transformers; the callback class is loaded on first use, and says
how to install what is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weavelet_transformers.callback import WeaveletCallback

__all__ = ["WeaveletCallback"]


def __getattr__(name: str) -> Any:
    if name == "WeaveletCallback":
        from weavelet_transformers.callback import WeaveletCallback

        return WeaveletCallback
    raise AttributeError(f"module 'weavelet_transformers' has no attribute {name!r}")
