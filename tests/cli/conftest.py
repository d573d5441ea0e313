"""Fixtures for the console tests: a file:// store, the installed ``weavelet`` script, real trainers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from weavelet_core import WeaveletProcess

Weavelet = Callable[..., subprocess.CompletedProcess[str]]
Trainer = Callable[..., WeaveletProcess]


def console_script() -> str:
    found = shutil.which("weavelet", path=sysconfig.get_path("scripts")) or shutil.which("weavelet")
    assert found, "the weavelet console script is not installed; run: pip install -e ."
    return found


@pytest.fixture
def store(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def cli_env(isolated_env: dict[str, str], store: str) -> dict[str, str]:
    return {**isolated_env, "WEAVELET_URL": store, "COLUMNS": "400"}


@pytest.fixture
def weavelet(cli_env: dict[str, str]) -> Weavelet:
    """``weavelet("set", "demo", "lr=0.1")``: the installed console script against the test's store."""
    script = console_script()

    def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [script, *args], env={**cli_env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr
        return done

    return run


@pytest.fixture
def trainer(store: str) -> Iterator[Trainer]:
    """``trainer("run-a", labels={...}, step=5, loss=0.3)``: a real, started WeaveletProcess reporting a status."""
    started: list[WeaveletProcess] = []

    def start(
        run: str, *, labels: dict[str, str] | None = None, step: int = 5, loss: float = 0.5, **kw: Any
    ) -> WeaveletProcess:
        process = WeaveletProcess(run, store, labels=labels, heartbeat_interval=0.2, status_interval=0.05, **kw)
        process.start(timeout=30)
        started.append(process)
        process.report(step=step, metrics={"loss": loss}, optimizer={"name": "sgd", "lr": 0.1}, force=True)
        wait_for_status(store, run, lambda s: s.step == step and s.live)
        return process

    yield start
    for process in started:
        process.stop(timeout=5)


def wait_for_status(url: str, run: str, check: Callable[[Any], bool], timeout: float = 20) -> Any:
    from weavelet_core import Weaver

    with Weaver(url) as weaver:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = weaver.status(run)
            if status is not None and check(status):
                return status
            time.sleep(0.05)
    raise AssertionError(f"run {run!r} never reported the expected status")


def blocker_env(tmp_path: Path, *modules: str) -> dict[str, str]:
    """Environment for a subprocess in which ``import MODULE`` fails as if it were not installed."""
    directory = tmp_path / "blocker"
    directory.mkdir(exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        f"    names = {list(modules)!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


__all__ = ["Trainer", "Weavelet", "blocker_env", "console_script", "sys", "wait_for_status"]
