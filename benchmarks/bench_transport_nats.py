"""NATS transport: latency from writing a revision to a watcher yielding it, beside the raw client's own.

Starts its own nats-server (JetStream, file storage, loopback, free port) and measures, one message at a
time (write, wait until the watcher has it, next):

- raw core NATS: ``nc.publish`` to a subscriber's callback (at-most-once, no storage; the floor);
- raw KV: ``kv.put`` to a ``kv.watch`` watcher's ``updates()`` (what the transport builds on: the baseline);
- weavelet: ``AsyncWeaver.set()`` called to ``NatsTransport.watch`` yielding the revision (another
  connection), and the same with the synchronous ``Weaver.set()`` (its event loop runs in a thread);
- a bare ``NatsTransport.put`` of the next revision (the transport without the Weaver's merge);
- the duration of the write calls themselves.

Usage: ``python benchmarks/bench_transport_nats.py [--count N]`` (default 1000 per figure, at least 500).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable

import nats
from nats.js.kv import KeyValue

from weavelet_core import AsyncWeaver, Weaver, open_transport
from weavelet_core.protocol import Revision
from weavelet_core.transport import Transport
from weavelet_nats.embedded import NatsServer

WARMUP = 50
TARGET_RATIO = 2.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def bench_core(url: str, count: int) -> list[float]:
    nc = await nats.connect(url)
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def on_message(msg: object) -> None:
        arrived.put_nowait(time.perf_counter())

    await nc.subscribe("bench.core", cb=on_message)
    await nc.flush()
    samples = []
    for i in range(count + WARMUP):
        start = time.perf_counter()
        await nc.publish("bench.core", b'{"lr":0.1}')
        end = await asyncio.wait_for(arrived.get(), 10)
        if i >= WARMUP:
            samples.append(end - start)
    await nc.close()
    return samples


async def bench_kv(url: str, count: int) -> list[float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    kv = await js.create_key_value(bucket="bench-raw", history=64)
    watcher = await kv.watch("run")
    samples = []
    payload = b'{"v":1,"kind":"revision","run":"run","revision":1,"config":{"lr":0.1}}'
    for i in range(count + WARMUP):
        start = time.perf_counter()
        await kv.put("run", payload)
        while True:
            entry = await watcher.updates(timeout=10)  # type: ignore[no-untyped-call]
            if isinstance(entry, KeyValue.Entry):
                break
        if i >= WARMUP:
            samples.append(time.perf_counter() - start)
    await watcher.stop()  # type: ignore[no-untyped-call]
    await nc.close()
    return samples


async def _watched(
    url: str, run: str, count: int, write: Callable[[int], Awaitable[None]]
) -> tuple[list[float], list[float]]:
    """Call ``write(i)`` and wait until a watch on another connection yields revision i; (latency, write time)."""
    watching = open_transport(url)
    await watching.connect()
    watch = watching.watch(run)
    latencies, write_times = [], []
    try:
        for i in range(1, count + WARMUP + 1):
            start = time.perf_counter()
            await write(i)
            written = time.perf_counter()
            revision = await asyncio.wait_for(watch.__anext__(), 10)
            end = time.perf_counter()
            assert revision.revision == i, (revision.revision, i)
            if i > WARMUP:
                latencies.append(end - start)
                write_times.append(written - start)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await watching.aclose()
    return latencies, write_times


async def bench_async_weaver(url: str, count: int) -> tuple[list[float], list[float]]:
    weaver = AsyncWeaver(url)
    await weaver.transport.connect()

    async def write(i: int) -> None:
        await weaver.set("bench-async", {"lr": 0.1, "i": i})

    try:
        return await _watched(url, "bench-async", count, write)
    finally:
        await weaver.aclose()


async def bench_transport_put(url: str, count: int) -> tuple[list[float], list[float]]:
    transport: Transport = open_transport(url)
    await transport.connect()

    async def write(i: int) -> None:
        await transport.put(Revision(run="bench-put", revision=i, config={"lr": 0.1, "i": i}))

    try:
        return await _watched(url, "bench-put", count, write)
    finally:
        await transport.aclose()


def bench_sync_weaver(url: str, count: int) -> list[float]:
    """``Weaver.set()`` in this thread; the watcher runs on an event loop in another thread."""
    arrivals: dict[int, float] = {}
    arrived = threading.Condition()
    ready = threading.Event()
    stop = threading.Event()

    async def watch() -> None:
        transport = open_transport(url)
        await transport.connect()
        iterator = transport.watch("bench-sync")
        ready.set()
        try:
            while not stop.is_set():
                try:
                    revision = await asyncio.wait_for(iterator.__anext__(), 0.5)
                except asyncio.TimeoutError:
                    continue
                with arrived:
                    arrivals[revision.revision] = time.perf_counter()
                    arrived.notify_all()
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]
            await transport.aclose()

    thread = threading.Thread(target=asyncio.run, args=(watch(),), daemon=True)
    thread.start()
    ready.wait(10)
    samples = []
    with Weaver(url) as weaver:
        for i in range(1, count + WARMUP + 1):
            start = time.perf_counter()
            weaver.set("bench-sync", {"lr": 0.1, "i": i})
            with arrived:
                if not arrived.wait_for(lambda i=i: i in arrivals, 10):  # type: ignore[misc]
                    raise RuntimeError(f"revision {i} never reached the watcher")
                end = arrivals[i]
            if i > WARMUP:
                samples.append(end - start)
    stop.set()
    thread.join(10)
    return samples


def row(name: str, samples: list[float], baseline: float | None) -> str:
    p50, p99 = percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3
    ratio = f"{p50 / (baseline * 1e3):5.2f}x" if baseline else "    -"
    return f"  {name:<48} {p50:8.3f} {p99:8.3f}   {ratio}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="samples per figure (at least 500)")
    args = parser.parse_args(argv)
    count = max(500, args.count)
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as store, NatsServer(store) as server:
        url = server.url
        core = asyncio.run(bench_core(url, count))
        kv = asyncio.run(bench_kv(url, count))
        weaver, set_times = asyncio.run(bench_async_weaver(url, count))
        put, put_times = asyncio.run(bench_transport_put(url, count))
        sync = bench_sync_weaver(url, count)
    baseline = percentile(kv, 50)
    print(f"NATS write-to-watch latency, loopback, {count} samples each after {WARMUP} warm-up, in ms")
    print(f"  {'':<48} {'p50':>8} {'p99':>8}   vs raw KV p50")
    print(row("raw core NATS publish -> subscriber", core, baseline))
    print(row("raw KV put -> watch (baseline)", kv, baseline))
    print(row("weavelet AsyncWeaver.set() -> watch yields", weaver, baseline))
    print(row("weavelet Weaver.set() (sync) -> watch yields", sync, baseline))
    print(row("weavelet NatsTransport.put() -> watch yields", put, baseline))
    print(row("  (AsyncWeaver.set() call alone)", set_times, baseline))
    print(row("  (NatsTransport.put() call alone)", put_times, baseline))
    ratio = percentile(weaver, 50) / baseline
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"target: AsyncWeaver.set() -> watch p50 within {TARGET_RATIO:g}x of raw KV: {ratio:.2f}x, {verdict}")
    spread = statistics.pstdev(kv) * 1e3
    print(f"(raw KV standard deviation {spread:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
