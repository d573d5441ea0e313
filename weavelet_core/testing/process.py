"""Helpers for testing code around :class:`~weavelet_core.WeaveletProcess` with real OS processes.

- :func:`wait_until`: poll a condition with a deadline.
- :func:`sidecars_of`: the live weavelet sidecar processes of a trainer (by psutil).
- :func:`leftovers`: what a stopped ``WeaveletProcess`` must not leave behind in this process.
- :class:`TrainerProcess`: a small training loop in its own Python process (``python -c``) that uses a
  ``WeaveletProcess``: polls every step, reports ``applied`` for each revision it gets and its step, and
  prints ``READY <sidecar pid>`` once started. For faults that need the trainer itself to die.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO

import psutil


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.01) -> bool:
    """Call ``predicate`` until it returns something true or ``timeout`` seconds pass; return the last result
    as a bool."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _is_sidecar(process: psutil.Process) -> bool:
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "multiprocessing.spawn" in cmdline and "resource_tracker" not in cmdline


def sidecars_of(pid: int) -> list[psutil.Process]:
    """Live spawned children of process ``pid`` other than multiprocessing's resource tracker (a per-interpreter
    helper that multiprocessing itself owns)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    return [child for child in children if _is_sidecar(child)]


def leftovers() -> list[str]:
    """Sidecar processes, supervisor threads and queue feeder threads still alive in this process."""
    found = [f"process {p.pid}" for p in sidecars_of(os.getpid())]
    for thread in threading.enumerate():
        if thread.is_alive() and (thread.name.startswith("weavelet-supervisor") or thread.name == "QueueFeederThread"):
            found.append(f"thread {thread.name}")
    return found


TRAINER_CODE = """
import sys, time
from weavelet_core import WeaveletProcess
run, url, heavy = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if heavy:
    import torch  # a realistic trainer imports torch before it starts its weavelet
weavelet = WeaveletProcess(run, url, heartbeat_interval=0.1, restart_backoff=(0.1, 1.0))
weavelet.start(timeout=30)
print("READY", weavelet.pid, flush=True)
step = 0
while True:
    revision = weavelet.poll()
    if revision is not None:
        weavelet.report_outcome(revision.revision, "applied", step=step)
    weavelet.report(step=step, metrics={"loss": 1.0 / (step + 1)})
    step += 1
    time.sleep(0.001)
"""
"""The trainer's code: deliberately without a ``__main__`` guard, which the sidecar must not need."""


class TrainerProcess:
    """A training loop with a weavelet, in its own process; use as a context manager (killed on exit)."""

    def __init__(self, run: str, url: str, *, import_torch: bool = False, ready_timeout: float = 60.0) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in __exit__)
        self.popen = subprocess.Popen(
            [sys.executable, "-c", TRAINER_CODE, run, url, "1" if import_torch else "0"],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.pid = self.popen.pid
        stdout: IO[str] | None = self.popen.stdout
        assert stdout is not None
        line = _readline(stdout, ready_timeout)
        if not line.startswith("READY "):
            self.kill()
            raise RuntimeError(f"trainer did not start: {line!r}; stderr: {self.stderr_text()}")
        self.sidecar_pid = int(line.split()[1])

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)

    def stderr_text(self) -> str:
        """What the trainer (and its sidecar) wrote to stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read()

    def __enter__(self) -> TrainerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._stderr.close()
        try:
            sidecar = psutil.Process(self.sidecar_pid)
            if _is_sidecar(sidecar):
                sidecar.kill()
        except psutil.NoSuchProcess:
            pass


def _readline(stream: IO[str], timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


__all__ = ["TRAINER_CODE", "TrainerProcess", "leftovers", "sidecars_of", "wait_until"]
