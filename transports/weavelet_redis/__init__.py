"""``redis://HOST:PORT/DB``: weavelet's Redis transport (one stream per run; extra ``redis``).

``RedisTransport`` is imported on first use, so importing this package (and its plugin module) works without
redis-py installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weavelet_redis.transport import RedisTransport


def __getattr__(name: str) -> Any:
    if name == "RedisTransport":
        from weavelet_redis.transport import RedisTransport

        return RedisTransport
    raise AttributeError(f"module 'weavelet_redis' has no attribute {name!r}")


__all__ = ["RedisTransport"]
