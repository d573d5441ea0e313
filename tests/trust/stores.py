"""Stores for the chaos test: a transport URL plus what a hostile writer and a fault injector can do to it.

A :class:`Store` writes raw bytes as a run's newest revision (bypassing every check, as a foreign writer, a
corrupting disk or a newer weavelet could), and, where a server process exists, stops it (SIGSTOP) or kills
and restarts it on the same port and data.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterator

import anyio

from weavelet_core import open_transport
from weavelet_core.testing.servers import ManagedServer


@dataclasses.dataclass
class Store:
    """One transport under test; ``server`` is its broker process, if it has one."""

    name: str
    url: str
    write_raw: Callable[[str, int, bytes], None]
    server: ManagedServer | None = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[bool]:
        """SIGSTOP the server for the block; yields whether there was one to stop."""
        if self.server is None:
            yield False
            return
        self.server.pause()
        try:
            yield True
        finally:
            self.server.resume()

    def restart(self) -> bool:
        """SIGKILL the server and start it again on the same port and data; whether there was one."""
        if self.server is None:
            return False
        self.server.kill()
        self.server.start()
        return True


def _run_async(fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with anyio.fail_after(10):
            await fn()

    anyio.run(main, backend="asyncio")


def file_store(url: str) -> Store:
    from weavelet_file import FileTransport

    def write_raw(run: str, number: int, data: bytes) -> None:
        async def go() -> None:
            async with open_transport(url) as transport:
                assert isinstance(transport, FileTransport)
                await transport.put_raw(run, number, data)

        _run_async(go)

    return Store("file", url, write_raw)


def nats_store(server: ManagedServer) -> Store:
    from weavelet_nats.transport import NatsTransport, run_key

    def write_raw(run: str, number: int, data: bytes) -> None:
        async def go() -> None:
            async with open_transport(server.url) as transport:
                assert isinstance(transport, NatsTransport)
                await transport._kv("desired").put(run_key(run), data)  # the key holds no number of its own

        _run_async(go)

    return Store("nats", server.url, write_raw, server)


def redis_store(server: ManagedServer) -> Store:
    import redis.asyncio as aioredis

    from weavelet_redis.transport import RedisTransport

    def write_raw(run: str, number: int, data: bytes) -> None:
        async def go() -> None:
            async with open_transport(server.url) as transport:
                assert isinstance(transport, RedisTransport)
                client = aioredis.Redis.from_url(transport.settings.driver_url)
                try:
                    await client.xadd(transport.keys.revisions(run), {"revision": number, "data": data})
                    await client.sadd(transport.keys.runs(), run)
                finally:
                    await client.aclose()

        _run_async(go)

    return Store("redis", server.url, write_raw, server)
