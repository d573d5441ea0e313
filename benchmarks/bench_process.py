"""Benchmarks of the weavelet process, each median printed beside a baseline measured in the same run.

- idle ``poll()`` vs ``Queue.get_nowait()`` on an empty queue (the naive per-step check);    target <= 0.2 us
- ``report()`` vs ``Queue.put_nowait()`` of the same status (the naive channel);              target <= 5 us
- sidecar start to ``running`` (file transport) vs a bare spawned child signalling ready;   target <= 0.6 s
- sidecar resident memory vs a bare ``python -c`` child;                                   target <= 60 MB
- ``stop()`` vs a bare spawned child told to exit through a queue and joined;              target <= 1 s
- detection of trainer death vs a bare child blocked on its parent's sentinel;             target <= 1 s

Usage: ``python benchmarks/bench_process.py [--quick]``. Exit status 1 if a target is missed.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any

import psutil

from weavelet_core import WeaveletProcess
from weavelet_core.spawning import SIDECAR_NAME_PREFIX
from weavelet_core.testing.process import TrainerProcess, wait_until

US = 1e6


def per_call(fn: Callable[[], Any], calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean seconds per call in a batch of ``calls`` calls."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples)


def report_per_call(process: WeaveletProcess) -> float:
    """Seconds per ``report()`` of a changing step and two metrics, as a training loop calls it."""
    metrics = {"loss": 0.25, "acc": 0.5}
    step = iter(range(10**9))
    return per_call(lambda: process.report(step=next(step), metrics=metrics), 100_000, 21)


def _queue_child(inbox: Any) -> None:
    inbox.get()


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


ORPHAN_CODE = """
import multiprocessing, multiprocessing.connection

def child():
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])

if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=child)
    process.start()
    print(process.pid, flush=True)
    process.join()
"""


def bare_orphan_detection() -> float:
    """Seconds from SIGKILL of a parent until its bare spawned child, blocked on the sentinel, is gone."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "orphan.py"
        script.write_text(ORPHAN_CODE)
        parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.2)
        os.kill(parent.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: gone(child), 10.0, interval=0.002)
        elapsed = time.monotonic() - killed
        parent.wait()
        parent.stdout.close()
        return elapsed


def weavelet_orphan_detection(url: str) -> float:
    with TrainerProcess(f"bench-{uuid.uuid4().hex[:8]}", url) as trainer:
        time.sleep(0.2)
        os.kill(trainer.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: gone(trainer.sidecar_pid), 10.0, interval=0.002)
        return time.monotonic() - killed


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    repeats = 3 if quick else 7
    ctx: SpawnContext = multiprocessing.get_context("spawn")
    rows: list[tuple[str, float, float, str, float, bool]] = []

    def row(name: str, value: float, baseline: float, unit: str, target: float) -> None:
        rows.append((name, value, baseline, unit, target, value <= target))

    with tempfile.TemporaryDirectory() as tmp:
        url = (Path(tmp) / "store").as_uri()

        # -- start, memory, per-step calls, stop ---------------------------------------------------------
        starts, rss, stops = [], [], []
        poll_cost = report_cost = 0.0
        for index in range(repeats):
            process = WeaveletProcess(f"bench-{index}", url)
            started = time.perf_counter()
            process.start(timeout=30)
            starts.append(time.perf_counter() - started)
            assert process.state == "running", process.message
            pid = process.pid
            assert pid is not None
            time.sleep(0.3)
            rss.append(psutil.Process(pid).memory_info().rss)
            if index == 0:
                poll_cost = per_call(process.poll, 100_000, 21)
                report_cost = report_per_call(process)
            started = time.perf_counter()
            process.stop()
            stops.append(time.perf_counter() - started)

        empty = ctx.Queue()
        get_cost = per_call(lambda: _get_nowait(empty), 20_000, 21)
        full = ctx.Queue()
        status = {"step": 1, "epoch": 0, "metrics": {"loss": 0.25, "acc": 0.5}}
        put_cost = per_call(lambda: full.put_nowait(status), 20_000, 21)
        _drain(full)
        for queue in (empty, full):
            queue.close()
            queue.cancel_join_thread()

        row("idle poll()  [us]", poll_cost * US, get_cost * US, "Queue.get_nowait() on an empty queue", 0.2)
        row("report()     [us]", report_cost * US, put_cost * US, "Queue.put_nowait() of the status", 5.0)

        bare_starts, bare_stops = [], []
        for _ in range(repeats):
            reader, writer = ctx.Pipe(duplex=False)
            # Named like a sidecar, so that it skips the __main__ re-import as the sidecar does; hence a
            # target importable without this script.
            child = ctx.Process(
                target=multiprocessing.connection.Connection.send_bytes,
                args=(writer, b"ready"),
                name=f"{SIDECAR_NAME_PREFIX}-baseline",
            )
            started = time.perf_counter()
            child.start()
            if not reader.poll(30):
                raise RuntimeError("the baseline child did not start")
            reader.recv_bytes()
            bare_starts.append(time.perf_counter() - started)
            child.join()
            reader.close()
            writer.close()

            inbox = ctx.Queue()
            child = ctx.Process(target=_queue_child, args=(inbox,))
            child.start()
            time.sleep(0.3)
            started = time.perf_counter()
            inbox.put(None)
            child.join()
            bare_stops.append(time.perf_counter() - started)
            inbox.close()
            inbox.join_thread()

        row(
            "start to running [s]",
            statistics.median(starts),
            statistics.median(bare_starts),
            "bare spawned child signalling ready",
            0.6,
        )

        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        time.sleep(0.5)
        bare_rss = psutil.Process(bare.pid).memory_info().rss
        bare.kill()
        bare.wait()
        row("sidecar RSS [MB]", statistics.median(rss) / 1e6, bare_rss / 1e6, "bare python -c", 60.0)
        row("stop()      [s]", statistics.median(stops), statistics.median(bare_stops), "bare queue stop+join", 1.0)

        # -- trainer death --------------------------------------------------------------------------------
        detect = [weavelet_orphan_detection(url) for _ in range(max(3, repeats // 2))]
        bare_detect = [bare_orphan_detection() for _ in range(max(3, repeats // 2))]
        row(
            "trainer death detected [s]",
            statistics.median(detect),
            statistics.median(bare_detect),
            "bare child on the sentinel",
            1.0,
        )

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'median':>10}  {'baseline':>10}  {'target':>8}  baseline is")
    failed = False
    for name, value, baseline, what, target, ok in rows:
        mark = "" if ok else "  MISSED"
        failed |= not ok
        print(f"{name:<{width}}  {value:>10.3f}  {baseline:>10.3f}  {target:>8.2f}  {what}{mark}")
    return 1 if failed else 0


def _get_nowait(queue: Any) -> None:
    try:
        queue.get_nowait()
    except Exception:
        pass


def _drain(queue: Any) -> None:
    while True:
        try:
            queue.get(timeout=0.2)
        except Exception:
            return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
