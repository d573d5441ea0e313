"""Finding Hugging Face transformers, or saying how to install it."""

from __future__ import annotations

import importlib
from typing import Any

INSTALL_HINT = 'pip install "weavelet[transformers]"'


def callback_base() -> Any:
    """``transformers.TrainerCallback``; raise ``ModuleNotFoundError`` saying how to install transformers and
    accelerate when either is missing."""
    try:
        importlib.import_module("accelerate")
        module = importlib.import_module("transformers")
    except ModuleNotFoundError as missing:
        if missing.name not in ("transformers", "accelerate"):
            raise
        raise ModuleNotFoundError(
            f"weavelet_transformers needs Hugging Face transformers and accelerate ({missing.name} is not "
            f"installed); install them with: {INSTALL_HINT}",
            name=missing.name,
        ) from None
    return module.TrainerCallback
