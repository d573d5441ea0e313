"""Stores for the chaos test: a transport URL plus what a hostile writer and a fault injector can do to it.

A :class:`Store` writes raw bytes as a run's newest revision (bypassing every check, as a foreign writer, a
corrupting disk or a newer weavelet could), and, where a server process exists, stops it (SIGSTOP) or kills
and restarts it on the same port and data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import Callable, Iterator

import anyio

from weavelet_core import open_transport


@dataclasses.dataclass
class Store:
    """One transport under test."""

    name: str
    url: str
    write_raw: Callable[[str, int, bytes], None]
    pid: Callable[[], int | None] = lambda: None
    restart: Callable[[], None] | None = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[bool]:
        """SIGSTOP the server for the block; yields whether there was one to stop."""
        pid = self.pid()
        if pid is None:
            yield False
            return
        os.kill(pid, signal.SIGSTOP)
        try:
            yield True
        finally:
            os.kill(pid, signal.SIGCONT)


def _run_async(fn: Callable[[], object]) -> None:
    async def main() -> None:
        with anyio.fail_after(10):
            await fn()  # type: ignore[misc]

    anyio.run(main, backend="asyncio")


def file_store(url: str) -> Store:
    def write_raw(run: str, number: int, data: bytes) -> None:
        async def go() -> None:
            async with open_transport(url) as transport:
                await transport.put_raw(run, number, data)  # type: ignore[attr-defined]

        _run_async(go)

    return Store("file", url, write_raw)


def nats_store(server: object) -> Store:
    from weavelet_nats.transport import NatsTransport, run_key

    url: str = server.url  # type: ignore[attr-defined]

    def write_raw(run: str, number: int, data: bytes) -> None:
        async def go() -> None:
            async with open_transport(url) as transport:
                assert isinstance(transport, NatsTransport)
                await transport._kv("desired").put(run_key(run), data)  # the key holds no number of its own

        _run_async(go)

    def pid() -> int | None:
        process = server.process  # type: ignore[attr-defined]
        return process.pid if process is not None and process.poll() is None else None

    def restart() -> None:
        server.kill()  # type: ignore[attr-defined]
        server.start()  # type: ignore[attr-defined]

    return Store("nats", url, write_raw, pid, restart)


def redis_store(server: object) -> Store:
    import redis.asyncio as aioredis

    from weavelet_redis.transport import RedisTransport

    url: str = server.url  # type: ignore[attr-defined]

    def write_raw(run: str, number: int, data: bytes) -> None:
        async def go() -> None:
            async with open_transport(url) as transport:
                assert isinstance(transport, RedisTransport)
                client = aioredis.Redis.from_url(transport.settings.driver_url)
                try:
                    await client.xadd(transport.keys.revisions(run), {"revision": number, "data": data})
                    await client.sadd(transport.keys.runs(), run)
                finally:
                    await client.aclose()

        _run_async(go)

    def pid() -> int | None:
        return server.pid  # type: ignore[attr-defined, no-any-return]

    def restart() -> None:
        server.kill()  # type: ignore[attr-defined]
        server.start()  # type: ignore[attr-defined]

    return Store("redis", url, write_raw, pid, restart)
