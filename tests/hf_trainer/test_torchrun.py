"""WeaveletCallback under torchrun: two CPU ranks (gloo) apply every revision at the same global step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from weavelet_core import Weaver

pytest.importorskip("transformers")

SCRIPT = Path(__file__).with_name("ddp_train.py")


@pytest.mark.slow  # two processes importing torch and transformers on CPU: ~25 s on two cores
def test_two_ranks_switch_at_the_same_step(tmp_path: Path, url: str, weaver: Weaver) -> None:
    run = "hf-ddp"
    root = Path(__file__).resolve().parents[2]
    paths = [str(root), str(root / "transports"), str(root / "integrations"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         "--weavelet-url", url, "--weavelet-run", run, "--record-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["sidecar"] for r in ranks] == [True, False]  # only rank 0 runs a weavelet

    outcomes = {o.revision: o for o in weaver.outcomes(run)}
    assert [outcomes[n].result for n in (1, 2, 3)] == ["applied", "rejected", "applied"]
    assert "betas" in outcomes[2].message
    # Every rank decided every revision the same way at the same global step.
    expected = [[n, outcomes[n].result, outcomes[n].step] for n in (1, 2, 3)]
    assert ranks[0]["verdicts"] == expected
    assert ranks[1]["verdicts"] == expected
    assert ranks[0]["types"] == ranks[1]["types"]
    assert ranks[0]["lrs"] == ranks[1]["lrs"]
    swap = outcomes[1].step
    assert swap is not None
    assert ranks[0]["types"][str(swap - 1)] == "AdamW"
    assert ranks[0]["types"][str(swap)] == "Adam"
    assert ranks[0]["types"]["16"] == "Adam"
