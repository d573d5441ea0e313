"""Registers the ``redis`` transport with weavelet (entry point ``weavelet: redis``).

Importing this module does not import redis-py: ``weavelet plugins`` lists the transport, and says how to
install its driver, on machines without it.
"""

from __future__ import annotations

from typing import Any

from weavelet_core import Transport, TransportSpec, hookimpl


def _make(url: str, **options: Any) -> Transport:
    from weavelet_redis.transport import RedisTransport

    return RedisTransport(url, **options)


@hookimpl
def weavelet_transports() -> list[TransportSpec]:
    return [
        TransportSpec(
            name="redis",
            schemes=("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"),
            factory=_make,
            requires=("redis",),
            extra="redis",
            description="Redis streams (redis-server 5 or newer); rediss:// for TLS, redis+sentinel://, redis+cluster://",
        )
    ]
