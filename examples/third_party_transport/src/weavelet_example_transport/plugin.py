"""The plugin module named by this package's ``weavelet`` entry point."""

from __future__ import annotations

from typing import Any

from weavelet_core import Transport, TransportSpec, hookimpl


def make_transport(url: str, **options: Any) -> Transport:
    """Build the transport for ``url`` (no I/O here; the driver, if any, is imported now, not at load)."""
    from weavelet_example_transport.transport import ExampleTransport

    transport: Transport = ExampleTransport(url, **options)
    return transport


@hookimpl
def weavelet_transports() -> list[TransportSpec]:
    return [
        TransportSpec(
            name="example",
            schemes=("example",),
            factory=make_transport,
            install_hint="pip install weavelet-example-transport",
            description="example plugin: a shared directory under the example:// scheme",
        )
    ]
