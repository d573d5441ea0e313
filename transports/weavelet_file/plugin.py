"""Registers the ``file`` transport with weavelet (entry point ``weavelet: file``)."""

from __future__ import annotations

from typing import Any

from weavelet_core import Transport, TransportSpec, hookimpl


def _make(url: str, **options: Any) -> Transport:
    from weavelet_file.transport import FileTransport

    return FileTransport(url, **options)


@hookimpl
def weavelet_transports() -> list[TransportSpec]:
    return [
        TransportSpec(
            name="file",
            schemes=("file",),
            factory=_make,
            description="a shared directory, no server (the default: a per-user state directory)",
        )
    ]
