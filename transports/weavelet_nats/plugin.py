"""Registers the ``nats`` transport with weavelet (entry point ``weavelet: nats``).

Importing this module does not import nats-py: the factory imports the transport when a URL asks for it.
"""

from __future__ import annotations

import argparse
from typing import Any

from weavelet_core import SubcommandSpec, Transport, TransportSpec, hookimpl


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


def _server_parser(parser: argparse.ArgumentParser) -> None:
    from weavelet_nats.server import add_arguments

    add_arguments(parser)


def _server(args: argparse.Namespace) -> int:
    from weavelet_nats.server import run

    return run(args)


@hookimpl
def weavelet_subcommands() -> list[SubcommandSpec]:
    return [
        SubcommandSpec(
            name="server",
            summary="start a local NATS server with JetStream for weavelet",
            action=_server,
            configure_parser=_server_parser,
            requires=("nats",),
            extra="nats",
        )
    ]
