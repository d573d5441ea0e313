"""The trust scenarios as an operator meets them: the example script and the ``weavelet`` command, as processes.

- A run id used again does not replay the past (the old stop, the old checkpoint, the old hyperparameters).
- ``stop`` and ``checkpoint`` act even while another key of the desired config is rejected, and a rejection
  names every problem with the revision that set it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from weavelet_core import Weaver
from weavelet_core.testing.process import wait_until

from .conftest import WAIT

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plain_loop.py"
CliRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def start_loop(
    url: str, tmp_path: Path, isolated_env: dict[str, str]
) -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(run: str) -> subprocess.Popen[str]:
        loop = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLE),
                "--run",
                run,
                "--url",
                url,
                "--steps",
                "100000000",
                "--checkpoint-dir",
                str(tmp_path / "checkpoints"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=isolated_env,
        )
        started.append(loop)
        return loop

    yield start
    for loop in started:
        if loop.poll() is None:
            loop.kill()
            loop.wait(10)


def _live(weaver: Weaver, run: str, after: float = 0.0) -> bool:
    status = weaver.status(run)
    return status is not None and status.live and status.started_at > after and status.step > 50


def test_a_run_id_used_again_does_not_replay_the_past(
    start_loop: Callable[[str], subprocess.Popen[str]], run_cli: CliRunner, url: str, weaver: Weaver, tmp_path: Path
) -> None:
    first = start_loop("dup")
    assert wait_until(lambda: _live(weaver, "dup"), WAIT)
    assert run_cli("--url", url, "set", "dup", "lr=0.01", "momentum=0.5", "--wait", "20").returncode == 0
    done = run_cli("--url", url, "checkpoint", "dup", "--wait", "20")
    assert done.returncode == 0, done.stderr
    stopped = run_cli("--url", url, "stop", "dup", "--wait", "30")
    assert stopped.returncode == 0, stopped.stderr
    first.wait(30)
    first_incarnation = weaver.status("dup").incarnation  # type: ignore[union-attr]
    stop_outcome = weaver.outcome("dup", weaver.get("dup").revision)  # type: ignore[union-attr]
    assert stop_outcome is not None
    assert stop_outcome.step is not None
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 1

    started = time.time()
    second = start_loop("dup")
    assert wait_until(lambda: _live(weaver, "dup", after=started - 1), WAIT)
    time.sleep(1.0)
    assert second.poll() is None, "the second start stopped: an old stop token acted again"
    status = weaver.status("dup")
    assert status is not None
    assert status.incarnation != first_incarnation
    assert status.optimizer is not None
    assert status.optimizer["momentum"] == 0.9  # the script's own value, not the old run's 0.5
    assert sorted((tmp_path / "checkpoints").glob("*.pt")) == checkpoints  # no old checkpoint token acted
    history = json.loads(run_cli("--url", url, "history", "dup", "--json").stdout)
    kept = [o for row in history for o in row["outcomes"] if o["revision"] == stop_outcome.revision]
    assert [(o["step"], o["incarnation"]) for o in kept] == [(stop_outcome.step, first_incarnation)]
    assert run_cli("--url", url, "stop", "dup", "--wait", "30").returncode == 0
    _, err = second.communicate(timeout=30)
    assert "fresh start; the store held revision" in err
    assert "not inherited: cleared it with revision" in err


def test_stop_and_checkpoint_act_while_another_key_is_rejected(
    start_loop: Callable[[str], subprocess.Popen[str]], run_cli: CliRunner, url: str, weaver: Weaver, tmp_path: Path
) -> None:
    loop = start_loop("brake")
    assert wait_until(lambda: _live(weaver, "brake"), WAIT)
    bad = run_cli("--url", url, "set", "brake", "grad_clip=0", "--wait", "20")
    assert bad.returncode == 1
    assert "rejected: grad_clip: send a positive number" in bad.stdout
    # The live run's schema refuses a typo before anything is written; --force writes it anyway.
    refused = run_cli("--url", url, "set", "brake", "lrr=0.1", "momentum=0.5", "--wait", "20")
    assert refused.returncode == 1
    assert "not written" in refused.stdout + refused.stderr
    both = run_cli("--url", url, "set", "brake", "lrr=0.1", "momentum=0.5", "--wait", "20", "--force")
    assert both.returncode == 1
    # Every problem at once, each with the revision that set it.
    assert "2 problems" in both.stdout, both.stdout
    assert "grad_clip=0, set in revision 1: send a positive number" in both.stdout
    assert "did you mean 'lr'" in both.stdout
    checkpoint = run_cli("--url", url, "checkpoint", "brake", "--wait", "20")
    assert "checkpoint" in checkpoint.stdout, checkpoint.stdout
    assert ".pt" in checkpoint.stdout, checkpoint.stdout
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 1
    # Fixing the keys applies every pending change at once and says so; the checkpoint does not act again.
    fixed = run_cli("--url", url, "set", "brake", "grad_clip=0.5", "lrr=", "--wait", "20")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "momentum 0.9 -> 0.5" in fixed.stdout, fixed.stdout
    assert "revision 2" in fixed.stdout, fixed.stdout
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 1
    stop = run_cli("--url", url, "stop", "brake", "--wait", "30")
    assert "stop" in stop.stdout
    loop.wait(30)
    assert loop.returncode == 0
    assert weaver.status("brake").state == "stopped"  # type: ignore[union-attr]
