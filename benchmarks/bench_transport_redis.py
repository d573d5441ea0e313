"""Redis transport: latency from a write to a watcher receiving it, beside the raw redis-py round trip.

Starts its own redis-server on a free loopback port (no persistence). Measured one write at a time, each
waiting for its delivery, so every figure is a latency, not a throughput:

- baseline A: raw redis-py, ``XADD`` sent -> a reader blocked in ``XREAD BLOCK`` has the entry;
- baseline B: raw ``XREVRANGE COUNT 1`` then ``XADD`` sent -> the reader has it (the two round trips a
  compare-and-set change needs: read the current revision, write the next);
- ``AsyncWeaver.set()`` returned -> the transport's ``watch()`` yielded the revision (the target: p50 within
  2x of baseline A). The notification travels while the write's reply does, so this is near zero and can
  be negative (the watcher had it before ``set()`` returned to its caller);
- ``Weaver.set()`` (synchronous, its own event-loop thread) returned -> yielded in the main event loop;
- ``AsyncWeaver.set()`` called -> yielded: the whole change, compared with baseline B.

Usage: ``python benchmarks/bench_transport_redis.py [--count N]`` (default 1000, at least 500).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

from weavelet_core import AsyncWeaver, Revision, Weaver, open_transport
from weavelet_redis.testing import RedisServer, find_redis_server

TARGET_RATIO = 2.0
WARMUP = 50


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def raw_round_trip(url: str, count: int, *, read_first: bool = False) -> list[float]:
    """``XADD`` sent -> ``XREAD BLOCK`` returned it, with plain redis-py clients.

    With ``read_first``, each write first reads the newest entry (``XREVRANGE COUNT 1``), as a
    compare-and-set change must: the same two round trips as ``AsyncWeaver.set()``.
    """
    key = f"bench-raw-{uuid.uuid4().hex}"
    writer = aioredis.Redis.from_url(url)
    reader = aioredis.Redis.from_url(url, socket_timeout=10)
    samples: list[float] = []
    received = anyio.Event()
    arrived = 0.0
    try:

        async def read() -> None:
            nonlocal received, arrived
            last = b"0-0"
            while True:
                reply: Any = await reader.xread({key: last}, block=5000, count=100)
                if reply:
                    last = reply[0][1][-1][0]
                    arrived = time.perf_counter()
                    received.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.sleep(0.1)
            for i in range(count + WARMUP):
                received = anyio.Event()
                sent = time.perf_counter()
                if read_first:
                    await writer.xrevrange(key, count=1)
                await writer.xadd(key, {"revision": i + 1, "data": b"{}"}, maxlen=1000, approximate=True)
                await received.wait()
                if i >= WARMUP:
                    samples.append(arrived - sent)
            tg.cancel_scope.cancel()
    finally:
        await writer.delete(key)
        await writer.aclose()
        await reader.aclose()
    return samples


async def weaver_round_trip(url: str, count: int) -> tuple[list[float], list[float]]:
    """``AsyncWeaver.set()`` returned -> ``watch()`` yielded, and ``set()`` called -> yielded."""
    run = f"bench-{uuid.uuid4().hex[:10]}"
    after_return: list[float] = []
    whole: list[float] = []
    async with open_transport(url) as watching, AsyncWeaver(url) as weaver:
        yielded = anyio.Event()
        arrived = 0.0

        async def watch() -> None:
            nonlocal yielded, arrived
            watcher: AsyncIterator[Revision] = watching.watch(run)
            async for _ in watcher:
                arrived = time.perf_counter()
                yielded.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.sleep(0.1)
            for i in range(count + WARMUP):
                yielded = anyio.Event()
                called = time.perf_counter()
                await weaver.set(run, {"lr": 0.001 * (i % 100 + 1), "step": i})
                returned = time.perf_counter()
                await yielded.wait()
                if i >= WARMUP:
                    after_return.append(arrived - returned)
                    whole.append(arrived - called)
            tg.cancel_scope.cancel()
    return after_return, whole


async def sync_weaver_round_trip(url: str, count: int) -> list[float]:
    """``Weaver.set()`` (in a worker thread) returned -> ``watch()`` yielded in this event loop."""
    run = f"bench-sync-{uuid.uuid4().hex[:10]}"
    samples: list[float] = []
    weaver = await anyio.to_thread.run_sync(Weaver, url)
    try:
        async with open_transport(url) as watching:
            yielded = anyio.Event()
            arrived = 0.0

            async def watch() -> None:
                nonlocal yielded, arrived
                watcher: AsyncIterator[Revision] = watching.watch(run)
                async for _ in watcher:
                    arrived = time.perf_counter()
                    yielded.set()

            def write(i: int) -> float:
                weaver.set(run, {"lr": 0.001 * (i % 100 + 1), "step": i})
                return time.perf_counter()

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await anyio.sleep(0.1)
                for i in range(count + WARMUP):
                    yielded = anyio.Event()
                    returned = await anyio.to_thread.run_sync(write, i)
                    await yielded.wait()
                    if i >= WARMUP:
                        samples.append(arrived - returned)
                tg.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(weaver.close)
    return samples


def server_version() -> str:
    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, check=False).stdout
    return next((word[2:] for word in out.split() if word.startswith("v=")), "?")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="revisions per measurement (at least 500)")
    args = parser.parse_args(argv)
    count = max(500, args.count)
    with tempfile.TemporaryDirectory(prefix="weavelet-bench-redis-") as directory:
        server = RedisServer(Path(directory)).start()
        try:
            url = server.url
            raw = anyio.run(raw_round_trip, url, count)
            raw_read_first = anyio.run(lambda: raw_round_trip(url, count, read_first=True))
            after_return, whole = anyio.run(weaver_round_trip, url, count)
            sync = anyio.run(sync_weaver_round_trip, url, count)
        finally:
            server.stop()

    print(f"redis-server {server_version()} on loopback, {count} revisions each (after {WARMUP} warm-up)")
    print("(negative: the watcher had the revision before set() had returned to its caller)")
    baseline = "raw XADD sent -> XREAD BLOCK got it"
    baseline_cas = "raw XREVRANGE + XADD sent -> XREAD got it"
    rows = [
        (f"baseline A: {baseline}", raw, None),
        (f"baseline B: {baseline_cas}", raw_read_first, None),
        ("AsyncWeaver.set() returned -> watch() yielded", after_return, ("A", raw)),
        ("Weaver.set() returned -> watch() yielded", sync, ("A", raw)),
        ("AsyncWeaver.set() called -> watch() yielded", whole, ("B", raw_read_first)),
    ]
    print(f"{'':56} {'p50 ms':>8} {'p99 ms':>8}   p50 vs baseline")
    for label, samples, against in rows:
        p50, p99 = percentiles(samples)
        versus = ""
        if against is not None:
            name, base = against
            versus = f"{p50 / percentiles(base)[0]:.2f}x {name}" if p50 > 0 else f"<= 0, so within 1x {name}"
        print(f"{label:56} {p50:8.3f} {p99:8.3f}   {versus}")
    ratio = percentiles(after_return)[0] / percentiles(raw)[0]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"target (set() returned -> yielded, p50 within {TARGET_RATIO:g}x of A): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
