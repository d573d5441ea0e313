"""The cost of ``sync_interval: always`` (what ``weavelet server`` runs with) beside nats-server's lazy default.

Starts two nats-servers in the same run (JetStream, file storage on the same disk, loopback, free ports): one with
the default (JetStream fsyncs its files every 2 minutes) and one that fsyncs every write before acknowledging it.
On each it measures, one write at a time, the time from a write call to its acknowledgement:

- raw KV: ``kv.put`` (nats-py) of a small value;
- weavelet: ``NatsTransport.put`` of the next revision of a run (the compare-and-set write a ``weavelet set`` does).

Usage: ``python benchmarks/bench_nats_sync.py [--count N]`` (default 500 per figure).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats

from weavelet_core import open_transport
from weavelet_core.protocol import Revision
from weavelet_nats.embedded import NatsServer

WARMUP = 20


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def _timed(count: int, write: Callable[[int], Awaitable[object]]) -> list[float]:
    samples = []
    for i in range(count + WARMUP):
        start = time.perf_counter()
        await write(i)
        if i >= WARMUP:
            samples.append(time.perf_counter() - start)
    return samples


async def bench_raw(url: str, count: int) -> list[float]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().create_key_value(bucket="bench-sync", history=1)
        return await _timed(count, lambda i: kv.put("k", b'{"lr":0.1,"i":%d}' % i))
    finally:
        await nc.close()


async def bench_transport(url: str, count: int) -> list[float]:
    transport = open_transport(url)
    await transport.connect()
    try:
        return await _timed(
            count, lambda i: transport.put(Revision(run="bench", revision=i + 1, config={"lr": 0.1, "i": i}))
        )
    finally:
        await transport.aclose()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args(argv)
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-nats-sync-") as root:
        for mode, sync_always in (("lazy (default)", False), ("always", True)):
            with NatsServer(Path(root) / mode.split()[0], sync_always=sync_always) as server:
                results[("raw kv.put", mode)] = asyncio.run(bench_raw(server.url, args.count))
                results[("NatsTransport.put", mode)] = asyncio.run(bench_transport(server.url, args.count))
    print(f"acknowledged write latency, {args.count} writes each, one at a time (ms)")
    print(f"{'write':<20} {'sync':<15} {'p50':>8} {'p99':>8} {'mean':>8} {'vs lazy p50':>12}")
    for (what, mode), samples in results.items():
        lazy = percentile(results[(what, "lazy (default)")], 50)
        p50 = percentile(samples, 50)
        print(
            f"{what:<20} {mode:<15} {p50 * 1e3:8.3f} {percentile(samples, 99) * 1e3:8.3f} "
            f"{statistics.fmean(samples) * 1e3:8.3f} {p50 / lazy:11.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
