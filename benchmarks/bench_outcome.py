"""Set -> outcome with 1 ms training steps: ``Weaver.set(wait=...)`` until the trainer's outcome is back, on file://,
NATS and Redis, each beside the polling wait it replaced, measured in the same run.

A trainer process (spawned, as a training script is) runs steps of 1 ms, calls ``WeaveletProcess.poll()`` at each
step boundary and reports ``applied`` at once; its steps are of two kinds, each measured:

- ``busy``: the step keeps a core busy in native code that releases the GIL, as torch's CPU kernels do (SHA-256
  over 16 KiB blocks): on two cores, everything else shares the other one;
- ``waiting``: the step sleeps, as a training thread waits for an accelerator, leaving the cores free.

This process writes one ``lr`` change at a time and waits for its outcome:

- baseline: the wait as it was: ``Weaver.set()``, then ``Weaver.outcome()`` every 10 ms, the interval growing 1.5x
  to 100 ms (on file:// the sidecar also polled ``latest.json`` every 50 ms: the baseline trainer runs with
  ``?watch=poll``);
- weavelet: ``Weaver.set(wait=...)``, which watches the outcome (and on file:// the sidecar watches with inotify).

Targets (p50), for both kinds of step: <= 5 ms on file://, <= 3 ms on NATS and Redis. The two waits are interleaved
on NATS and Redis (one trainer answers both), one after the other on file:// (each needs its own trainer). Usage:
``python benchmarks/bench_outcome.py [--count N] [--transports file,nats,redis] [--steps busy,waiting]``. Exit
status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from weavelet_core import Outcome, WeaveletProcess, Weaver

STEP = 0.001
WARMUP = 20
TARGETS = {"file": 0.005, "nats": 0.003, "redis": 0.003}
POLL_FIRST, POLL_MAX, POLL_GROWTH = 0.01, 0.1, 1.5
"""The polling wait ``Weaver.wait`` used before it watched outcomes."""


def train(url: str, run: str, kind: str, ready: EventType, stop: EventType) -> None:
    """The trainer: 1 ms steps of ``kind`` (``busy`` or ``waiting``), a poll at each boundary, every revision applied
    at once."""
    process = WeaveletProcess(run, url)
    process.start(timeout=30)
    ready.set()
    block = bytes(16 * 1024)
    step = 0
    try:
        while not stop.is_set():
            if kind == "busy":
                until = time.perf_counter() + STEP
                while time.perf_counter() < until:
                    hashlib.sha256(block)  # releases the GIL while it hashes, as a torch kernel does
            else:
                time.sleep(STEP)
            step += 1
            revision = process.poll()
            if revision is not None:
                process.report_outcome(revision.revision, "applied", step=step)
    finally:
        process.stop(timeout=10)


@contextmanager
def trainer(url: str, run: str, kind: str) -> Iterator[None]:
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    child = context.Process(target=train, args=(url, run, kind, ready, stop))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.1):
            if not child.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the trainer did not start (exit code {child.exitcode})")
        yield
    finally:
        stop.set()
        child.join(20)
        if child.is_alive():
            child.kill()
            child.join(5)


def polled_wait(weaver: Weaver, run: str, changes: dict[str, float], timeout: float = 10.0) -> Outcome:
    """``set()``, then ``outcome()`` polled as ``Weaver.wait`` did before it watched."""
    revision = weaver.set(run, changes)
    deadline = time.monotonic() + timeout
    interval = POLL_FIRST
    while time.monotonic() < deadline:
        found = weaver.outcome(run, revision.revision)
        if found is not None and found.revision_id == revision.id:
            return found
        time.sleep(interval)
        interval = min(interval * POLL_GROWTH, POLL_MAX)
    raise TimeoutError(f"no outcome for revision {revision.revision} within {timeout:g}s")


def watched_wait(weaver: Weaver, run: str, changes: dict[str, float]) -> Outcome:
    return weaver.set(run, changes, wait=10.0)


Wait = Callable[[Weaver, str, dict[str, float]], Outcome]


def measure(weaver: Weaver, run: str, waits: list[Wait], count: int) -> list[list[float]]:
    """Per wait function, ``count`` seconds from calling it to its return, interleaved, after a warm-up."""
    samples: list[list[float]] = [[] for _ in waits]
    for i in range(WARMUP + count):
        for index, wait in enumerate(waits):
            started = time.perf_counter()
            outcome = wait(weaver, run, {"lr": 0.001 * (i % 50 + 1)})
            elapsed = time.perf_counter() - started
            assert outcome.result == "applied", outcome
            if i >= WARMUP:
                samples[index].append(elapsed)
    return samples


@contextmanager
def file_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bench-outcome-") as directory:
        yield Path(directory).as_uri()


@contextmanager
def nats_url() -> Iterator[str]:
    from weavelet_nats.embedded import NatsServer

    with tempfile.TemporaryDirectory(prefix="bench-outcome-nats-") as store, NatsServer(store) as server:
        yield server.url


@contextmanager
def redis_url() -> Iterator[str]:
    from weavelet_redis.testing import RedisServer

    with tempfile.TemporaryDirectory(prefix="bench-outcome-redis-") as directory:
        server = RedisServer(Path(directory)).start()
        try:
            yield server.url
        finally:
            server.stop()


STORES: dict[str, Callable[[], AbstractContextManager[str]]] = {
    "file": file_url,
    "nats": nats_url,
    "redis": redis_url,
}


def run_one(name: str, kind: str, count: int) -> tuple[list[float], list[float]]:
    """(baseline samples, weavelet samples) for one transport and kind of step."""
    with STORES[name]() as url:
        run = f"bench-{uuid.uuid4().hex[:8]}"
        with Weaver(url) as weaver:
            if name == "file":
                with trainer(f"{url}?watch=poll", f"{run}-polled", kind):
                    [baseline] = measure(weaver, f"{run}-polled", [polled_wait], max(20, count // 4))
                with trainer(url, run, kind):
                    [watched] = measure(weaver, run, [watched_wait], count)
            else:
                with trainer(url, run, kind):
                    baseline, watched = measure(weaver, run, [polled_wait, watched_wait], count)
    return baseline, watched


def ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--count", type=int, default=200, help="changes timed per transport and kind (at least 50)")
    parser.add_argument("--transports", default=",".join(STORES))
    parser.add_argument("--steps", default="busy,waiting", help="kinds of training step: busy, waiting")
    args = parser.parse_args(argv)
    count = max(50, args.count)
    print(f"set -> outcome with {STEP * 1e3:g} ms training steps, {count} changes each after {WARMUP} warm-up")
    print(f"{'':58} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}   vs baseline   target")
    missed = False
    for kind in args.steps.split(","):
        for name in args.transports.split(","):
            try:
                baseline, watched = run_one(name, kind, count)
            except Exception as exc:  # a server that cannot start here: say so, keep going
                print(f"{name}, {kind} steps: skipped: {type(exc).__name__}: {exc}")
                continue
            before = "outcome() polled" + (", sidecar polls" if name == "file" else "")
            rows = (
                (f"{name}, {kind}: baseline ({before})", baseline),
                (f"{name}, {kind}: Weaver.set(wait=...)", watched),
            )
            for label, samples in rows:
                p50 = ms(samples, 0.5)
                ratio = p50 / ms(baseline, 0.5)
                target = ""
                if samples is watched:
                    ok = p50 <= TARGETS[name] * 1e3
                    missed |= not ok
                    target = f"<= {TARGETS[name] * 1e3:g} ms: {'met' if ok else 'MISSED'}"
                print(
                    f"{label:58} {p50:8.2f} {ms(samples, 0.9):8.2f} {ms(samples, 0.99):8.2f} "
                    f"{statistics.fmean(samples) * 1e3:8.2f}   {ratio:8.2f}x   {target}"
                )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
