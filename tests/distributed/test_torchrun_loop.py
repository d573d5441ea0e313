"""``attach()`` in a plain loop under ``torchrun`` (2 ranks, gloo, CPU): rank 0 alone runs the weavelet; a swap,
an lr change, a checkpoint, a refused rollback and a stop land at the same step on every rank; with DDP and with
FSDP2 (``fully_shard``: the new optimizer is built over the sharded DTensor parameters, and the checkpoint is a
``torch.distributed.checkpoint`` directory that loads back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed.conftest import WORKER, Torchrun

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_loop(torchrun: Torchrun, tmp_path_factory: pytest.TempPathFactory, mode: str, check_every: str) -> Any:
    out = tmp_path_factory.mktemp(mode)
    url = (out / "weavelet").as_uri()
    ranks = torchrun(WORKER, mode, url, f"{mode}-run", str(out), check_every, out=out)
    return out, url, ranks


@pytest.fixture(scope="module")
def ddp(torchrun: Torchrun, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return run_loop(torchrun, tmp_path_factory, "ddp", "2")


@pytest.fixture(scope="module")
def fsdp(torchrun: Torchrun, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return run_loop(torchrun, tmp_path_factory, "fsdp", "auto")  # check_every=None: rank 0 spaces the checks


def check_same_steps(ranks: list[dict[str, Any]], check_every: int | None) -> dict[str, Any]:
    """The assertions both modes share; returns rank 0's record."""
    zero, one = ranks
    assert [r["has_weavelet"] for r in ranks] == [True, False]  # only rank 0 started a sidecar
    assert one["run"] == zero["run"]
    verdicts = [[v["revision"], v["at"]] for v in zero["verdicts"]]
    assert [[v["revision"], v["at"]] for v in one["verdicts"]] == verdicts  # every revision at the same step
    results = ["applied", "applied", "applied", "rejected", "applied", "applied", "applied"]
    assert [v["result"] for v in zero["verdicts"]] == results
    assert [v["result"] for v in one["verdicts"]] == [*results[:4], "rejected", *results[5:]]
    assert [v["ranks_agree"] for v in zero["verdicts"]] == [True, True, True, True, False, True, True]
    assert [v["ranks_agree"] for v in one["verdicts"]] == [True, True, True, True, False, True, True]
    assert "rank 1 refuses tag 1" in one["verdicts"][4]["message"]
    assert (zero["tags"], one["tags"]) == ([1, 2], [2])
    if check_every is not None:
        assert all(v["at"] % check_every == 0 for v in zero["verdicts"]), verdicts
    swap, lr, checkpoint, rollback, _differ, _agree, stop = zero["verdicts"]
    for record in ranks:
        for step, name, value in record["steps"]:  # step N ran before poll(N) applied what landed at N
            assert name == ("SGD" if step <= swap["step"] else "Adam"), (record["rank"], step, name)
            expected = 0.05 if step <= swap["step"] else 0.002 if step <= lr["step"] else 0.0005
            assert value == pytest.approx(expected), (record["rank"], step, value)
        assert record["stopped_at"] == stop["step"]
    assert "not supported by attach() under torch.distributed" in rollback["commands"]["rollback"]
    assert Path(checkpoint["commands"]["checkpoint"], ".metadata").is_file()  # one DCP directory
    return zero


def test_ddp_ranks_apply_every_revision_at_the_same_step(ddp: Any) -> None:
    from weavelet_core import Weaver

    _out, url, ranks = ddp
    zero = check_same_steps(ranks, check_every=2)
    assert ranks[0]["weights"] == ranks[1]["weights"], "the DDP replicas diverged"
    with Weaver(url) as weaver:
        outcome = weaver.outcome("ddp-run", zero["verdicts"][0]["revision"])
        status = weaver.status("ddp-run")
    assert outcome is not None
    assert outcome.result == "applied"
    assert outcome.step == zero["verdicts"][0]["step"]
    assert status is not None
    assert status.state == "stopped"
    with Weaver(url) as weaver:
        differ = weaver.outcome("ddp-run", zero["verdicts"][4]["revision"])
    assert differ is not None
    assert differ.result == "applied"  # rank 0's verdict, marked
    assert differ.detail.get("ranks_agree") is False


def test_fsdp2_swaps_over_sharded_parameters_and_checkpoints_with_dcp(fsdp: Any) -> None:
    _out, _url, ranks = fsdp
    check_same_steps(ranks, check_every=None)
    for record in ranks:
        assert record["param_types"] == ["DTensor"]
        assert "DTensor" in record["state_types"]  # Adam's moments live on the shards
        assert record["checkpoint_sums"] is not None
        assert record["loaded_sums"] == pytest.approx(record["checkpoint_sums"], rel=1e-6, abs=1e-6)
        assert record["final_sums"] != pytest.approx(record["checkpoint_sums"], rel=1e-9, abs=1e-9)


def test_collective_shares_rank_zeros_json_and_reduces_booleans(ddp: Any) -> None:
    _out, _url, ranks = ddp
    zero, one = (r["collective"] for r in ranks)
    assert [zero["is_leader"], one["is_leader"]] == [True, False]
    for c in (zero, one):
        assert c["none"] is None
        assert c["nested"] == {"a": [1, 2.5, "é"], "t": [1, 2], "f": float("inf")}
        assert c["big_length"] == 200_000
        assert [c["all_true_true"], c["all_true_mixed"]] == [True, False]
        assert [c["all_same_true"], c["all_same_false"], c["all_same_mixed"]] == [True, True, False]


def test_every_rank_raises_when_rank_zero_cannot_start(ddp: Any) -> None:
    _out, _url, ranks = ddp
    zero, one = (r["start_failures"] for r in ranks)
    assert zero["labels"][0] == "ValueError"
    assert one["labels"][0] == "RuntimeError"
    assert "rank 0 could not start" in one["labels"][1]
    assert zero["labels"][1] in one["labels"][1]  # rank 0's own message, for the person reading rank 1's log
    assert [zero["owned"][0], one["owned"][0]] == ["RunOwned", "RunOwned"]
    assert one["owned"][1] == zero["owned"][1]
