"""WeaveletCallback in a real Trainer over a real nats-server (JetStream key-value), not the file transport."""

from __future__ import annotations

from typing import Any

import pytest

from weavelet_core import Weaver
from weavelet_transformers import WeaveletCallback

pytest.importorskip("transformers")
pytest.importorskip("nats")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def test_switch_and_stop_over_nats(weavelet_nats_url: str, make_trainer: Any, driver_class: Any) -> None:
    run = "hf-nats"
    with Weaver(weavelet_nats_url) as weaver:
        wc = WeaveletCallback(run, weavelet_nats_url)
        plan = {2: {"optimizer": "sgd", "lr": 0.05}, 4: {"stop": True}}
        driver = driver_class(weaver, run, plan, wc)
        output = make_trainer([wc, driver], max_steps=40).train()
        found = {o.revision: o for o in weaver.outcomes(run)}
        assert found[1].result == "applied", found[1].message
        assert found[2].result == "applied", found[2].message
        swap, stop = found[1].step, found[2].step
        assert swap is not None
        assert stop is not None
        assert output.global_step == stop < 40
        assert driver.types[swap] == "SGD"
        assert driver.lrs[swap] == pytest.approx(0.05)
        status = weaver.status(run)
        assert status is not None
        assert status.state == "stopped"
        assert status.step == stop
        assert status.optimizer is not None
        assert status.optimizer["name"] == "sgd"
