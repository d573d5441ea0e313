"""weavelet for PyTorch: the applier shared by the integrations, and :func:`attach` for plain loops.

``pip install "weavelet[torch]"``. The Lightning callback (``weavelet_lightning``) uses the same applier.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401  (checked first, so a missing torch says how to install it)
except ModuleNotFoundError as _missing:  # pragma: no cover - exercised in a subprocess without torch
    if _missing.name != "torch":
        raise
    raise ModuleNotFoundError(
        'weavelet_torch needs PyTorch, which is not installed; install it with: pip install "weavelet[torch]"',
        name="torch",
    ) from None

from weavelet_torch.applier import Applier, Verdict
from weavelet_torch.attach import Attachment, LoopHost, attach
from weavelet_torch.config import COMMANDS
from weavelet_torch.errors import Rejected
from weavelet_torch.guard import SpikeGuard
from weavelet_torch.host import OptimizerHost
from weavelet_torch.optimizers import OptimizerChoice, known_optimizers

__all__ = [
    "COMMANDS",
    "Applier",
    "Attachment",
    "LoopHost",
    "OptimizerChoice",
    "OptimizerHost",
    "Rejected",
    "SpikeGuard",
    "Verdict",
    "attach",
    "known_optimizers",
]
