"""Shared fixtures: an isolated environment for the ``weavelet`` command, run as a real OS process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CliRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def isolated_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess with no weavelet configuration and a private home directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEAVELET_")}
    env["HOME"] = str(tmp_path / "home")
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    return env


@pytest.fixture
def run_cli(isolated_env: dict[str, str]) -> CliRunner:
    """``run_cli("set", "demo", "lr=0.01", env_extra={...})``: run ``python -m weavelet_core`` in a subprocess."""

    def run(
        *args: str, env_extra: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        env = {**isolated_env, **(env_extra or {})}
        return subprocess.run(
            [sys.executable, "-m", "weavelet_core", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


ExampleDriver = Callable[..., tuple[subprocess.CompletedProcess[str], Any]]


@pytest.fixture
def drive_example(tmp_path: Path) -> ExampleDriver:
    """``drive_example(script, weaver, run, changes)``: start ``examples/<script>`` for run ``run`` on the weaver's
    URL (``--steps 100000``), wait until it reports ``running``, write ``changes`` and wait for their outcome, then
    send ``stop`` and wait for the script to end. Returns the finished process and the outcome of ``changes``.
    Every wait is bounded; the script is killed if it outlives them."""

    def drive(script: str, weaver: Any, run: str, changes: dict[str, Any]) -> tuple[Any, Any]:
        path = Path(__file__).resolve().parents[1] / "examples" / script
        command = [sys.executable, str(path), "--run", run, "--url", weaver.url, "--steps", "100000"]
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 90
            while True:
                status = weaver.status(run)
                if status is not None and status.state == "running" and status.step > 0:
                    break
                if process.poll() is not None:
                    out, err = process.communicate()
                    raise AssertionError(f"{script} ended early ({process.returncode}): {err[-3000:]}")
                assert time.monotonic() < deadline, f"{script} did not report running in 90 s"
                time.sleep(0.1)
            outcome = weaver.set(run, changes, wait=60)
            weaver.set(run, {"stop": True}, wait=60)
            out, err = process.communicate(timeout=60)
            return subprocess.CompletedProcess(command, process.returncode, out, err), outcome
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()

    return drive
