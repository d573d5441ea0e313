"""Shared fixtures for the ``torch.distributed`` tests: real ``torchrun`` (``python -m torch.distributed.run``)
subprocesses on gloo and the CPU, whose ranks write their results to files the tests read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
WORKER = HERE / "loop_worker.py"

Torchrun = Callable[..., list[dict[str, Any]]]


def torchrun_env(extra_path: Sequence[str] = ()) -> dict[str, str]:
    """This environment without weavelet or torch.distributed settings, with this process's import path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WEAVELET_", "LOCAL_RANK", "NODE_RANK", "MASTER_", "TORCHELASTIC_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    }
    env["PYTHONPATH"] = os.pathsep.join([*extra_path, *sys.path[1:], env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def read_ranks(out: Path, world: int) -> list[dict[str, Any]]:
    """Every rank's ``rank<N>.json`` from ``out``, in rank order."""
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def torchrun() -> Torchrun:
    """``torchrun(script, *args, out=DIR, nproc=2, timeout=180)``: run ``script`` on ``nproc`` local ranks with
    ``python -m torch.distributed.run --standalone`` (a c10d rendezvous on a free port), fail with its output when
    it exits non-zero, and return what each rank wrote to ``DIR/rank<N>.json``."""

    def run(script: Path, *args: str, out: Path, nproc: int = 2, timeout: float = 180) -> list[dict[str, Any]]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        done = subprocess.run(
            [*command, str(script), *args],
            env=torchrun_env(),
            cwd=out,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"torchrun exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return read_ranks(out, nproc)

    return run
