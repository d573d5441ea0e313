"""examples/accelerate_loop.py and examples/fabric_loop.py run, and change optimizer type while they run."""

from __future__ import annotations

from typing import Any

import pytest

from weavelet_core import Weaver

pytest.importorskip("accelerate")
pytest.importorskip("lightning.fabric")


@pytest.mark.parametrize("script", ["accelerate_loop.py", "fabric_loop.py"])
def test_example_switches_and_stops(script: str, weaver: Weaver, drive_example: Any) -> None:
    run = script.removesuffix(".py").replace("_", "-")
    done, outcome = drive_example(script, weaver, run, {"optimizer": "adam", "lr": 0.001})
    assert outcome.result == "applied", outcome.message
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"revision {outcome.revision} applied" in done.stdout
    assert "with Adam" in done.stdout  # the wrapper the loop steps holds Adam at the end
    status = weaver.status(run)
    assert status is not None
    assert status.state == "stopped"
    assert status.optimizer is not None
    assert status.optimizer["name"] == "adam"
