"""``weavelet runs`` at scale: listing N runs (default 10,000) on every transport, beside a baseline.

- baseline: what ``weavelet runs`` did before: ``runs()``, then for each run ``latest(run)`` and ``status(run)``,
  one after another (two sequential requests per run).
- batched: what it does now (:func:`weavelet_core.cli.read.overview`): ``runs()``, then ``latests(runs)`` and
  ``statuses(runs)`` (the transport's batched read, or the default concurrent one).

Target: the batched listing of 10,000 runs within 1 s on every transport. Usage:
``python benchmarks/bench_runs.py [--runs N] [--transports memory,file,redis,nats]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import anyio

from weavelet_core import AsyncWeaver, Revision, Status, open_transport
from weavelet_core.cli.read import overview
from weavelet_core.transport import Transport

TARGET_S = 1.0


@contextmanager
def memory_url() -> Iterator[str]:
    yield f"memory://bench-runs-{uuid.uuid4().hex[:8]}"


@contextmanager
def file_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as directory:
        yield Path(directory).as_uri()


@contextmanager
def redis_url() -> Iterator[str]:
    from weavelet_redis.testing import RedisServer

    with tempfile.TemporaryDirectory(prefix="bench-runs-redis-") as directory:
        server = RedisServer(Path(directory)).start()
        try:
            yield server.url
        finally:
            server.stop()


@contextmanager
def nats_url() -> Iterator[str]:
    from weavelet_nats.embedded import NatsServer

    with tempfile.TemporaryDirectory(prefix="bench-runs-nats-") as store, NatsServer(store) as server:
        yield server.url


STORES: dict[str, Callable[[], AbstractContextManager[str]]] = {
    "memory": memory_url,
    "file": file_url,
    "redis": redis_url,
    "nats": nats_url,
}


async def populate(transport: Transport, count: int) -> None:
    semaphore = anyio.Semaphore(64)

    async def one(index: int) -> None:
        run = f"run-{index:05d}"
        async with semaphore:
            await transport.put(Revision(run=run, revision=1, config={"lr": 0.1}))
            await transport.publish_status(Status(run=run, state="running", step=index))

    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(one, index)


async def baseline(transport: Transport) -> int:
    rows = 0
    for run in await transport.runs():
        await transport.latest(run)
        await transport.status(run)
        rows += 1
    return rows


async def batched(weaver: AsyncWeaver) -> int:
    return len(await overview(weaver, await weaver.runs(), None))


async def measure(url: str, count: int) -> tuple[float, float, float]:
    async with open_transport(url) as transport:
        started = time.perf_counter()
        await populate(transport, count)
        filled = time.perf_counter() - started
        async with AsyncWeaver(transport=transport) as weaver:
            started = time.perf_counter()
            assert await batched(weaver) == count
            new = time.perf_counter() - started
        started = time.perf_counter()
        assert await baseline(transport) == count
        old = time.perf_counter() - started
    return filled, old, new


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--transports", default=",".join(STORES))
    args = parser.parse_args(argv)
    print(f"listing {args.runs:,} runs (revision + status each); target: batched <= {TARGET_S:g} s")
    print(f"{'TRANSPORT':10} {'BASELINE (sequential)':>22} {'BATCHED (weavelet runs)':>24} {'SPEED-UP':>9}  TARGET")
    failed = False
    for name in args.transports.split(","):
        try:
            with STORES[name]() as url:
                _, old, new = anyio.run(measure, url, args.runs, backend="asyncio")
        except Exception as exc:  # a server that cannot start here: say so, keep going
            print(f"{name:10} skipped: {type(exc).__name__}: {exc}")
            continue
        ok = new <= TARGET_S
        failed |= not ok
        print(f"{name:10} {old:>20.3f} s {new:>22.3f} s {old / new:>8.1f}x  {'ok' if ok else 'MISSED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
