"""weavelet for PyTorch: the applier shared by the integrations, and :func:`attach` for plain loops.

``pip install "weavelet[torch]"``. The Lightning callback (``weavelet_lightning``) uses the same applier.
"""

from __future__ import annotations

from weavelet_torch.applier import Applier, Verdict
from weavelet_torch.attach import Attachment, LoopHost, attach
from weavelet_torch.config import COMMANDS
from weavelet_torch.errors import Rejected
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
    "Verdict",
    "attach",
    "known_optimizers",
]
