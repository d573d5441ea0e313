"""Write-to-watch latency with the watcher in a process of its own, as a sidecar watches: shared by the transport
benchmarks.

A watcher process (spawned) runs one ``watch`` coroutine and sends ``(number, time.monotonic())`` through a pipe for
each revision it sees; ``CLOCK_MONOTONIC`` is the same clock in every process of a Linux host, so the writer
subtracts its own start time. Several watchers, one per way of writing, are measured interleaved (one write of each
in turn), so that a change in the machine's load hits every row alike.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

Watch = Callable[[str, str, Callable[[int], None]], Awaitable[None]]
"""``watch(url, name, seen)``: follow ``name`` at ``url`` for ever, calling ``seen(number)`` for each revision."""


def _watch_main(watch: Watch, url: str, name: str, conn: Connection) -> None:
    def seen(number: int) -> None:
        conn.send((number, time.monotonic()))

    async def main() -> None:
        conn.send((0, time.monotonic()))  # started; the watch itself says when it is armed by its first ``seen``
        await watch(url, name, seen)

    asyncio.run(main())


class Watcher:
    """A spawned process running ``watch(url, name, ...)``; :meth:`arrival` returns when it saw ``number``."""

    def __init__(self, watch: Watch, url: str, name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe(duplex=False)
        self._process = context.Process(target=_watch_main, args=(watch, url, name, child), daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(60):
            raise RuntimeError(f"the watcher of {name!r} did not start")
        self._conn.recv()

    def arrival(self, number: int, timeout: float = 10.0) -> float:
        """The monotonic time at which the watcher saw revision ``number`` (earlier ones are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._conn.poll(remaining):
                raise TimeoutError(f"revision {number} did not reach the watcher within {timeout:g}s")
            seen, at = self._conn.recv()
            if seen == number:
                return float(at)
            if seen > number:
                raise RuntimeError(f"the watcher saw revision {seen} while waiting for {number}")

    def close(self) -> None:
        self._process.terminate()
        self._process.join(5)
        self._conn.close()


Write = Callable[[int], Any]
"""``write(number)``: write revision ``number`` (a coroutine function, or a plain one for the synchronous Weaver)."""


async def interleaved(rows: list[tuple[Write, Watcher]], count: int, warmup: int) -> list[list[float]]:
    """Seconds from each write to its watcher seeing it, ``count`` per row after ``warmup``, one write of each row in
    turn. Revision numbers start at 1 for every row."""
    samples: list[list[float]] = [[] for _ in rows]
    for number in range(1, warmup + count + 1):
        for index, (write, watcher) in enumerate(rows):
            started = time.monotonic()
            result = write(number)
            if asyncio.iscoroutine(result):
                await result
            latency = watcher.arrival(number) - started
            if number > warmup:
                samples[index].append(latency)
    return samples


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def row(label: str, samples: list[float], baseline: list[float], width: int = 52) -> str:
    """``label  p50  p99  ratio`` in milliseconds, the ratio of the p50s to ``baseline``'s."""
    p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
    return f"  {label:<{width}} {p50 * 1e3:8.3f} {p99 * 1e3:8.3f}   {p50 / percentile(baseline, 0.5):5.2f}x"
