"""examples/torchrun_loop.py under real ``torchrun`` (2 ranks, gloo, CPU), steered while it runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.conftest import torchrun_env

EXAMPLE = Path(__file__).parents[2] / "examples" / "torchrun_loop.py"
RUN = "example-torchrun"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tail(log: Path, ranks: Path) -> str:
    """torchrun's own output and each rank's, last lines of each, for a failure message."""
    files = [log, *sorted(ranks.glob("*/attempt_*/*/std*.log"))]
    return "\n".join(f"--- {path.relative_to(log.parent)}\n{path.read_text()[-2000:]}" for path in files)


def test_torchrun_example_swaps_and_stops_on_both_ranks_at_one_step(tmp_path: Path) -> None:
    from weavelet_core import Weaver

    url = (tmp_path / "weavelet").as_uri()
    # Each rank writes to its own file: two processes sharing one stream interleave their writes, so
    # one rank's line can land in the middle of the other's.
    ranks = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["--log-dir", str(ranks), "--redirects", "3"]
    log = tmp_path / "example.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*command, str(EXAMPLE), "--run-id", RUN, "--url", url, "--steps", "1000000"],
            env=torchrun_env(),
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with Weaver(url) as weaver:
            deadline = time.monotonic() + 90
            while (status := weaver.status(RUN)) is None or status.state != "running" or status.step < 1:
                assert proc.poll() is None, _tail(log, ranks)
                assert time.monotonic() < deadline, f"the example never reported running:\n{_tail(log, ranks)}"
                time.sleep(0.1)
            swap = weaver.set(RUN, {"optimizer": "adam", "lr": 0.001}, wait=30)
            assert swap.result == "applied", swap
            stop = weaver.command(RUN, "stop", wait=30)
            assert stop.result == "applied", stop  # type: ignore[union-attr]
        assert proc.wait(timeout=60) == 0, _tail(log, ranks)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for rank in (0, 1):
        (stdout,) = ranks.glob(f"*/attempt_0/{rank}/stdout.log")
        text = stdout.read_text()
        assert re.search(rf"^rank {rank} step {swap.step}: revision {swap.revision} applied$", text, re.M), text
        assert re.search(rf"^rank {rank} step {stop.step}: stopping as asked$", text, re.M), text  # type: ignore[union-attr]
