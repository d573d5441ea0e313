"""weavelet: reconfigure a running training job remotely.

The control side is :class:`Weaver` (or :class:`AsyncWeaver`); the trainer side is :class:`WeaveletProcess`
(normally used through the Lightning callback or ``weavelet_torch.attach``). Transports are plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weavelet_core.errors import (
    AuthenticationFailed,
    CorruptEntry,
    DuplicateScheme,
    InvalidRunId,
    MissingDriver,
    PermissionDenied,
    PluginError,
    ProtocolError,
    RevisionConflict,
    RunEnded,
    RunOwned,
    SigningError,
    StaleRevision,
    TransportError,
    TransportUnavailable,
    UnknownTransport,
    UntrustedRevision,
    WaitTimeout,
    WeaveletError,
)
from weavelet_core.hookspecs import hookimpl
from weavelet_core.plugins import default_url, get_registry, open_transport
from weavelet_core.protocol import MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, Outcome, Revision, Status, validate_run_id
from weavelet_core.specs import OptimizerSpec, SubcommandSpec, TransportSpec
from weavelet_core.transport import Transport

if TYPE_CHECKING:
    from weavelet_core.process import WeaveletProcess
    from weavelet_core.weaver import AsyncWeaver, Weaver

__version__ = "0.1.0"

_LAZY = {
    "Weaver": "weavelet_core.weaver",
    "AsyncWeaver": "weavelet_core.weaver",
    "WeaveletProcess": "weavelet_core.process",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weavelet_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "AsyncWeaver",
    "AuthenticationFailed",
    "CorruptEntry",
    "DuplicateScheme",
    "InvalidRunId",
    "MissingDriver",
    "OptimizerSpec",
    "Outcome",
    "PermissionDenied",
    "PluginError",
    "ProtocolError",
    "Revision",
    "RevisionConflict",
    "RunEnded",
    "RunOwned",
    "SigningError",
    "StaleRevision",
    "Status",
    "SubcommandSpec",
    "Transport",
    "TransportError",
    "TransportSpec",
    "TransportUnavailable",
    "UnknownTransport",
    "UntrustedRevision",
    "WaitTimeout",
    "WeaveletError",
    "WeaveletProcess",
    "Weaver",
    "default_url",
    "get_registry",
    "hookimpl",
    "open_transport",
    "validate_run_id",
]
