"""file:// watching: how soon a watcher sees a write, and what an idle watcher costs, inotify beside polling,
measured in the same run.

1. Latency: ``FileTransport.put()`` in this process -> ``FileTransport.watch()`` yields in a watcher process of its
   own (as a sidecar is); the rows take turns, one write each:

   - baseline: ``?watch=poll``, ``stat`` every 50 ms (what the transport did before);
   - ``?watch=auto`` (inotify on a local filesystem): the target, p50 within 1.5x of the floor's;
   - floor: a bare inotify watcher of the run's directory (weavelet's own, no transport) woken by the same write.

   Every figure includes the write itself (a lock and two fsynced files), which is most of it.

2. Idle cost of a process whose only work is one watch of a run nobody writes, over a quiet window: wake-ups a
   second (context switches of all its threads) and CPU seconds a minute, beside a process idle in ``sleep``:

   - ``?watch=poll``; ``?watch=auto`` (inotify);
   - for reference, the ``watchfiles`` library (when installed) waiting with a 1 ms step, the step its latency needs
     to be comparable: its Rust side polls a change set every step.

Usage: ``python benchmarks/bench_file_watch.py [--count N]``. Exit status 1 if the inotify p50 is more than 1.5x the
floor's or an idle inotify watch wakes more than once a second.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path

from _latency import Watcher, interleaved, percentile, row

from weavelet_core import open_transport
from weavelet_core.protocol import Revision
from weavelet_core.transport import Transport

WARMUP = 20
IDLE_WINDOW = 5.0
SETTLE = 1.5
TARGET_RATIO = 1.5
TARGET_WAKEUPS = 1.0


async def transport_watch(url: str, run: str, seen: Callable[[int], None]) -> None:
    async with open_transport(url) as transport:
        async for entry in transport.watch(run):
            seen(entry.revision)


async def bare_inotify(url: str, run: str, seen: Callable[[int], None]) -> None:
    """The floor: weavelet's inotify watcher alone on the run's directory, reading the number from the file."""
    import json

    from weavelet_file.transport import path_from_url
    from weavelet_file.watching import RENAMES, DirectoryWatcher

    directory = path_from_url(url) / "runs" / run
    watcher = DirectoryWatcher()
    watcher.add(directory, RENAMES)
    while True:
        for event in await watcher.wait(3600):
            if event.name == "latest.json":
                seen(json.loads((directory / "latest.json").read_bytes())["revision"])


def latency(root: Path, count: int) -> list[list[float]]:
    base = root.as_uri()
    polled, watched = f"{base}?watch=poll", f"{base}?watch=auto"

    async def go() -> list[list[float]]:
        writers: list[Transport] = [open_transport(polled), open_transport(watched), open_transport(watched)]
        for writer in writers:
            await writer.connect()
        (root / "runs" / "floor").mkdir(mode=0o700)  # the bare watcher watches the run's directory from the start
        runs = ["polled", "watched", "floor"]
        watchers = [
            Watcher(transport_watch, polled, "polled"),
            Watcher(transport_watch, watched, "watched"),
            Watcher(bare_inotify, watched, "floor"),
        ]
        await asyncio.sleep(SETTLE)  # every watch armed before the first write

        def write(writer: Transport, run: str) -> Callable[[int], Awaitable[None]]:
            async def put(number: int) -> None:
                await writer.put(Revision(run=run, revision=number, config={"n": number}))

            return put

        try:
            rows = [(write(writer, run), watcher) for writer, run, watcher in zip(writers, runs, watchers, strict=True)]
            return await interleaved(rows, count, WARMUP)
        finally:
            for watcher in watchers:
                watcher.close()
            for writer in writers:
                await writer.aclose()

    return asyncio.run(go())


# -- idle cost ----------------------------------------------------------------------------------------------


def _idle_main(kind: str, url: str, conn: Connection) -> None:
    async def main() -> None:
        if kind == "sleep":
            conn.send("ready")
            await asyncio.sleep(3600)
        elif kind == "watchfiles":
            import watchfiles

            directory = Path(url)
            conn.send("ready")
            async for _ in watchfiles.awatch(directory, step=1, debounce=1, rust_timeout=3600_000):
                pass
        else:
            async with open_transport(url) as transport:
                conn.send("ready")
                async for _ in transport.watch("idle"):
                    pass

    asyncio.run(main())


def _counters(pid: int) -> tuple[int, float]:
    """(context switches of all the process's threads, CPU seconds)."""
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return switches, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cost(kind: str, url: str) -> tuple[float, float]:
    """(wake-ups a second, CPU seconds a minute) of a process idle in ``kind``."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_idle_main, args=(kind, url, writer), daemon=True)
    process.start()
    writer.close()
    try:
        if not reader.poll(60):
            raise RuntimeError(f"the idle {kind} process did not start")
        reader.recv()
        time.sleep(SETTLE)
        assert process.pid is not None
        switches, cpu = _counters(process.pid)
        time.sleep(IDLE_WINDOW)
        switches_after, cpu_after = _counters(process.pid)
    finally:
        process.terminate()
        process.join(5)
    return (switches_after - switches) / IDLE_WINDOW, (cpu_after - cpu) / IDLE_WINDOW * 60


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--count", type=int, default=300, help="writes timed per row")
    args = parser.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-file-watch-") as directory:
        root = Path(directory)
        polled, watched, floor = latency(root / "latency", args.count)
        print(f"file:// write -> watcher in another process, {args.count} writes per row after {WARMUP} warm-up, ms")
        print(f"  {'':<52} {'p50':>8} {'p99':>8}   vs baseline p50")
        print(row("baseline: ?watch=poll (stat every 50 ms)", polled, polled))
        print(row("?watch=auto: inotify", watched, polled))
        print(row("floor: a bare inotify watcher of the directory", floor, polled))
        ratio = percentile(watched, 0.5) / percentile(floor, 0.5)
        failed |= ratio > TARGET_RATIO
        verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
        print(f"target: inotify p50 within {TARGET_RATIO:g}x of the floor's: {ratio:.2f}x, {verdict}")

        store = (root / "idle").as_uri()
        kinds = [
            ("sleep", "baseline: a process asleep"),
            (f"{store}?watch=poll", "watch, ?watch=poll"),
            (store, "watch, ?watch=auto: inotify"),
        ]
        try:
            import watchfiles  # noqa: F401

            (root / "wf").mkdir()
            kinds.append((str(root / "wf"), "watchfiles.awatch, 1 ms step (reference)"))
        except ImportError:
            pass
        print(f"\nidle cost of one watch over {IDLE_WINDOW:g} s (nothing written)")
        print(f"  {'':<52} {'wake-ups/s':>10} {'CPU-s/min':>10}")
        for target, label in kinds:
            kind = "watchfiles" if "watchfiles" in label else "sleep" if target == "sleep" else "watch"
            wakeups, cpu = idle_cost(kind, target)
            print(f"  {label:<52} {wakeups:10.1f} {cpu:10.3f}")
            if "inotify" in label:
                failed |= wakeups > TARGET_WAKEUPS
                verdict = "met" if wakeups <= TARGET_WAKEUPS else "MISSED"
                print(f"target: an idle inotify watch wakes at most {TARGET_WAKEUPS:g}/s: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
