"""Registers the ``nats`` transport with weavelet (entry point ``weavelet: nats``).

Importing this module does not import nats-py: the factory imports the transport when a URL asks for it.
"""

from __future__ import annotations

from typing import Any

from weavelet_core import Transport, TransportSpec, hookimpl


def _make(url: str, **options: Any) -> Transport:
    from weavelet_nats.transport import NatsTransport

    return NatsTransport(url, **options)


@hookimpl
def weavelet_transports() -> list[TransportSpec]:
    return [
        TransportSpec(
            name="nats",
            schemes=("nats", "tls"),
            factory=_make,
            requires=("nats",),
            extra="nats",
            description="NATS JetStream key-value buckets (nats://, tls://); 'weavelet server' runs one locally",
        )
    ]
