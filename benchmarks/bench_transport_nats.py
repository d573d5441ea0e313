"""NATS transport, the write path: latency from writing a revision to a watcher in another process seeing it, beside
the raw client doing the same, measured in the same run.

Starts its own nats-server (JetStream, file storage, loopback, free port). Each row writes one revision at a time and
waits until its watcher, a process of its own (as a sidecar is), has it; the rows take turns, one write each:

- baseline: raw nats-py, ``kv.put`` -> a ``kv.watch`` watcher's ``updates()`` (what the transport builds on);
- ``Weaver.set()``, the synchronous API (its event loop runs in a thread), -> ``NatsTransport.watch`` yields:
  the target, p50 within 1.5x of the baseline;
- ``AsyncWeaver.set()`` -> ``NatsTransport.watch`` yields;
- ``NatsTransport.put()`` of the next revision -> ``NatsTransport.watch`` yields (the transport without the Weaver).

Usage: ``python benchmarks/bench_transport_nats.py [--count N]`` (default 1000 per row, at least 200). Exit status 1
if the target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable

import nats
from _latency import Watcher, interleaved, percentile, row
from nats.js.kv import KeyValue

from weavelet_core import AsyncWeaver, Weaver, open_transport
from weavelet_core.protocol import Revision
from weavelet_nats.embedded import NatsServer

WARMUP = 50
TARGET_RATIO = 1.5
BUCKET = "bench-raw"


async def raw_watch(url: str, key: str, seen: Callable[[int], None]) -> None:
    nc = await nats.connect(url)
    kv = await nc.jetstream().key_value(BUCKET)
    watcher = await kv.watch(key)
    while True:
        entry = await watcher.updates(timeout=3600)  # type: ignore[no-untyped-call]
        if isinstance(entry, KeyValue.Entry) and entry.value:
            seen(int(entry.value.split(b",", 1)[0]))


async def weavelet_watch(url: str, run: str, seen: Callable[[int], None]) -> None:
    async with open_transport(url) as transport:
        async for entry in transport.watch(run):
            seen(entry.revision)


async def measure(url: str, count: int) -> list[list[float]]:
    nc = await nats.connect(url)
    kv = await nc.jetstream().create_key_value(bucket=BUCKET, history=64)
    transport = open_transport(url)
    await transport.connect()
    async_weaver = AsyncWeaver(url)
    await async_weaver.transport.connect()
    sync_weaver = Weaver(url)
    watchers = [
        Watcher(raw_watch, url, "raw"),
        Watcher(weavelet_watch, url, "bench-sync"),
        Watcher(weavelet_watch, url, "bench-async"),
        Watcher(weavelet_watch, url, "bench-put"),
    ]
    payload = b',{"v":2,"kind":"revision","run":"run","config":{"lr":0.1}}'

    async def raw_put(i: int) -> None:
        await kv.put("raw", b"%d" % i + payload)

    def sync_set(i: int) -> None:
        sync_weaver.set("bench-sync", {"lr": 0.1, "i": i})

    async def async_set(i: int) -> None:
        await async_weaver.set("bench-async", {"lr": 0.1, "i": i})

    async def put(i: int) -> None:
        await transport.put(Revision(run="bench-put", revision=i, config={"lr": 0.1, "i": i}))

    try:
        return await interleaved(list(zip([raw_put, sync_set, async_set, put], watchers, strict=True)), count, WARMUP)
    finally:
        for watcher in watchers:
            watcher.close()
        sync_weaver.close()
        await async_weaver.aclose()
        await transport.aclose()
        await nc.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="samples per row (at least 200)")
    args = parser.parse_args(argv)
    count = max(200, args.count)
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as store, NatsServer(store) as server:
        raw, sync, async_, put = asyncio.run(measure(server.url, count))
    print(f"NATS write -> watcher in another process, loopback, {count} samples per row after {WARMUP} warm-up, ms")
    print(f"  {'':<52} {'p50':>8} {'p99':>8}   vs baseline p50")
    print(row("baseline: raw kv.put -> kv.watch", raw, raw))
    print(row("Weaver.set() (sync) -> NatsTransport.watch", sync, raw))
    print(row("AsyncWeaver.set() -> NatsTransport.watch", async_, raw))
    print(row("NatsTransport.put() -> NatsTransport.watch", put, raw))
    ratio = percentile(sync, 0.5) / percentile(raw, 0.5)
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"target: Weaver.set() (sync) p50 within {TARGET_RATIO:g}x of the baseline: {ratio:.2f}x, {verdict}")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
