"""examples/hf_trainer.py runs, and changes optimizer type and schedule while it trains."""

from __future__ import annotations

from typing import Any

import pytest

from weavelet_core import Weaver

pytest.importorskip("transformers")


def test_trainer_example_switches_and_stops(weaver: Weaver, drive_example: Any) -> None:
    done, outcome = drive_example("hf_trainer.py", weaver, "example-hf", {"optimizer": "adam", "lr_scale": 0.5})
    assert outcome.result == "applied", outcome.message
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'name': 'adam'" in done.stdout  # the optimizer the Trainer ended with
    status = weaver.status("example-hf")
    assert status is not None
    assert status.state == "stopped"
    assert status.step < 100000
