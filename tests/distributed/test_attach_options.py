"""attach()'s distributed options checked in this process: bad values, a world of one, what Collective refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from weavelet_torch import attach
from weavelet_torch.collective import Collective


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank in this process, destroyed afterwards."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_check_every_must_be_a_positive_whole_number(bad: object) -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="check_every must be None"):
        attach(torch.optim.SGD(model.parameters(), lr=0.1), check_every=bad)  # type: ignore[arg-type]


def test_not_distributed_means_no_collective() -> None:
    assert not dist.is_initialized()
    assert Collective.current() is None
    with pytest.raises(RuntimeError, match="init_process_group"):
        Collective()


def test_a_world_of_one_is_a_single_process(world_of_one: None, tmp_path: Path) -> None:
    assert Collective.current() is None
    model = torch.nn.Linear(2, 1)
    live = attach(
        torch.optim.SGD(model.parameters(), lr=0.1), url=(tmp_path / "w").as_uri(), snapshot_every=5, model=model
    )
    assert live.collective is None
    assert live.is_leader


def test_collective_refuses_what_json_cannot_carry(world_of_one: None) -> None:
    collective = Collective()  # a world of one still broadcasts: rank 0 to itself
    assert collective.share_with({"a": [1, 2]}, 7) == ({"a": [1, 2]}, 7)
    assert collective.share_with(None, 3) == (None, 3)
    with pytest.raises(TypeError):
        collective.share(object())
    assert collective.all_same(False)
    assert not collective.all_true(False)
