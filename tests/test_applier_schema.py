"""The run's schema: what the applier publishes, the torch-free checker that judges a change against it with the
applier's own messages, ``Weaver.check`` and the check ``weavelet set`` makes before writing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from weavelet_core import Weaver
from weavelet_core.cli.app import main
from weavelet_core.schema import check
from weavelet_torch import Applier, LoopHost, attach


def model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def sgd_applier(allow: list[str] | None = None) -> Applier:
    net = model()
    groups = [{"params": list(net[0].parameters())}, {"params": list(net[2].parameters()), "lr": 0.01}]
    applier = Applier(LoopHost(torch.optim.SGD(groups, lr=0.1, momentum=0.9)), allow=allow)
    applier.on("grad_clip_val", lambda value: None)
    return applier


def adam_applier() -> Applier:
    return Applier(LoopHost(torch.optim.Adam(model().parameters(), lr=1e-3)))


def job_applier() -> Applier:
    g, d = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    host = LoopHost({"generator": torch.optim.Adam(g.parameters()), "discriminator": torch.optim.SGD(d.parameters())})
    return Applier(host)


SINGLE = [
    {"lr": -1},
    {"lr": "fast"},
    {"lrr": 0.1},
    {"learning_rate": 0.1},
    {"optimizer": "adamx"},
    {"optimizer": "lbfgs"},
    {"optimizer": 3},
    {"betas": [0.9, 0.99]},
    {"optimizer": "adam", "betas": [2, 0.9]},
    {"optimizer": "adam", "momentum": 0.5},
    {"param_groups.9.lr": 0.1},
    {"param_groups": {"1": {"lr": -2}}},
    {"param_groups.1.lr_scale": 2},
    {"lr_scale": 0},
    {"lr_scale": "half"},
    {"nesterov": 1},
    {"foreach": True},
    {"stop": [1]},
    {"checkpoint": {"token": "a", "x": 1}},
    {"eps": -1},
    {"optimizer": "adadelta", "rho": 2},
    {"dampening": "x"},
    {"optimizer": {"lr": 1}},
    {"lr": 10**400},  # no float holds it
    {"lr_scale": -(10**400)},
    {"eps": 10**400},
    {"lr": "9" * 5000},  # shown cut, not echoed whole
]


@pytest.mark.parametrize("changes", SINGLE, ids=[json.dumps(c) for c in SINGLE])
def test_the_checker_says_what_the_applier_says(changes: dict[str, Any]) -> None:
    applier = sgd_applier()
    verdict = applier.apply(1, changes, step=1)
    assert verdict.result == "rejected"
    assert check(applier.schema(), changes, {}) == [verdict.message]


ADAM = [{"momentum": 0.9}, {"betas": [1.5, 0.9]}, {"amsgrad": "yes"}, {"lr": -1}]


@pytest.mark.parametrize("changes", ADAM, ids=[json.dumps(c) for c in ADAM])
def test_the_checker_knows_the_active_type(changes: dict[str, Any]) -> None:
    applier = adam_applier()
    verdict = applier.apply(1, changes, step=1)
    assert verdict.result == "rejected"
    assert check(applier.schema(), changes, {}) == [verdict.message]


JOB = [
    {"lr": 1},
    {"generatr": {"lr": 1}},
    {"generator": {"lrr": 1}},
    {"generator": {"momentum": 0.9}},
    {"discriminator": {"lr": -1}},
    {"generator": {"optimizer": "adamx"}},
    {"generator": "adam"},
    {"discriminator": {"param_groups.3.lr": 0.1}},
    {"discriminator": {"lr_scale": -1}},
]


@pytest.mark.parametrize("changes", JOB, ids=[json.dumps(c) for c in JOB])
def test_the_checker_knows_a_job_of_several_optimizers(changes: dict[str, Any]) -> None:
    applier = job_applier()
    verdict = applier.apply(1, changes, step=1)
    assert verdict.result == "rejected"
    assert check(applier.schema(), changes, {}) == [verdict.message]


def test_several_problems_and_allow_lists_match() -> None:
    applier = sgd_applier()
    changes = {"lr": -1, "lrr": 2, "eps": "x"}
    verdict = applier.apply(1, changes, step=1)
    found = check(applier.schema(), changes, {})
    assert len(found) == 3
    assert verdict.message == "3 problems: " + "; ".join(found)

    allowed = sgd_applier(allow=["lr"])
    for changes in ({"momentum": 0.5}, {"optimizer": "adam"}, {"lrr": 1}):
        verdict = allowed.apply(1, changes, step=1)
        assert check(allowed.schema(), changes, {}) == [verdict.message]


VALID = [
    {"lr": 0.05},
    {"optimizer": "adam", "lr": 1e-3, "betas": [0.8, 0.9]},
    {"param_groups": {"1": {"lr": 0.5}}, "lr_scale": 0.5},
    {"grad_clip_val": "anything: its validator runs in the trainer"},
    {"stop": True},
    {"momentum": 0.0, "nesterov": False},
]


@pytest.mark.parametrize("changes", VALID, ids=[json.dumps(c) for c in VALID])
def test_what_the_applier_accepts_the_checker_passes(changes: dict[str, Any]) -> None:
    applier = sgd_applier()
    assert check(applier.schema(), changes, {}) == []
    assert applier.apply(1, changes, step=1).result == "applied"


def test_only_changed_keys_are_judged_and_the_target_type_counts() -> None:
    applier = sgd_applier()
    schema = applier.schema()
    # A momentum already in the config is left behind by a switch to Adam: not an error.
    assert check(schema, {"optimizer": "adam"}, {"momentum": 0.9}) == []
    # Sent with the switch, it is.
    assert check(schema, {"optimizer": "adam", "momentum": 0.8}, {}) != []
    # The config already names Adam: betas is judged for Adam.
    assert check(schema, {"betas": [0.9, 0.99]}, {"optimizer": "adam"}) == []


def test_schema_is_small_json_and_the_same_object_until_it_changes() -> None:
    applier = job_applier()
    schema = applier.schema()
    text = json.dumps(schema)
    assert len(text) < 24_000
    assert schema is applier.schema()
    assert schema["nested"] is True
    assert [o["name"] for o in schema["optimizers"]] == ["generator", "discriminator"]
    assert schema["optimizers"][0]["keys"]["lr"] == {"kind": "float", "min": 0}
    assert schema["optimizers"][0]["keys"]["betas"] == {"kind": "betas", "length": 2}
    assert schema["commands"] == ["stop", "checkpoint", "rollback"]
    assert applier.apply(1, {"discriminator": {"optimizer": "adam"}}, step=1).result == "applied"
    after = applier.apply and applier.schema()
    assert after is not schema
    assert after["optimizers"][1]["type"] == "adam"
    applier.on("grad_clip_val", lambda value: None)
    assert applier.schema()["handlers"] == ["grad_clip_val"]


# ---------------------------------------------------------------------------------- through a live run


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as w:
        yield w


def wait_for_schema(weaver: Weaver, run: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = weaver.status(run)
        if status is not None and status.schema:
            return status.schema
        time.sleep(0.05)
    raise AssertionError("the live run published no schema")


def test_weaver_check_and_weavelet_set_refuse_before_writing(
    url: str, weaver: Weaver, capsys: pytest.CaptureFixture[str]
) -> None:
    g, d = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    optimizers = {"generator": torch.optim.Adam(g.parameters()), "discriminator": torch.optim.SGD(d.parameters())}
    assert weaver.check("gan", {"generator": {"lrr": 1}}) == [], "no live status: nothing to check against"
    with attach(optimizers, run="gan", url=url) as live:
        schema = wait_for_schema(weaver, "gan")
        assert schema == live.applier.schema()
        problems = weaver.check("gan", {"generator": {"lrr": 1}})
        assert problems[0].startswith("unknown key 'generator.lrr'; did you mean 'generator.lr'?")
        assert weaver.check("gan", {"generator": {"lr": 1e-4}}) == []

        code = main(["set", "--url", url, "gan", "generator.lrr=1", "discriminator.lr=-1"])
        err = capsys.readouterr().err
        assert code == 1
        assert "not written: run 'gan' would reject it: 2 problems: unknown key 'generator.lrr'" in err
        assert "discriminator.lr: -1 is negative; send a value >= 0" in err
        assert weaver.get("gan") is None or "generator" not in weaver.get("gan").config  # type: ignore[union-attr]

        assert main(["set", "--url", url, "gan", "generator.lr=1e-4", "discriminator.optimizer=adam"]) == 0
        assert main(["set", "--url", url, "gan", "generator.lrr=1", "--force"]) == 0
        stored = weaver.get("gan")
        assert stored is not None
        assert stored.config["generator"] == {"lr": 1e-4, "lrr": 1}
        capsys.readouterr()
        # The trainer applies the good revision once it is polled; the forced typo is its to reject.
        live.poll(1)
    assert main(["set", "--url", url, "gan", "generator.lr=2e-4"]) == 0
    assert "note: run 'gan' has no live trainer: not checked before writing" in capsys.readouterr().err
