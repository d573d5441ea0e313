"""Shared fixtures: an isolated environment for the ``weavelet`` command, run as a real OS process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
