"""Commands are the emergency brake: they act even when the rest of a revision is rejected, once, and only in the
incarnation they were written for. Rejections name every problem and the revision that introduced it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from weavelet_torch import Applier, LoopHost
from weavelet_torch.applier import MAX_PROBLEMS_SHOWN, STATE_FORMAT, Verdict


def make_host(save: Any = None) -> LoopHost:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return LoopHost(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), save_checkpoint=save)


class Saver:
    def __init__(self, fail: bool = False) -> None:
        self.names: list[str] = []
        self.fail = fail

    def __call__(self, name: str) -> str:
        if self.fail:
            raise OSError("No space left on device")
        self.names.append(name)
        return f"/ckpt/{name}.pt"


def positive(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError("send a positive number")


def with_clip(host: LoopHost) -> tuple[Applier, list[Any]]:
    applier = Applier(host)
    clips: list[Any] = []
    applier.on("grad_clip_val", clips.append, validate=positive)
    return applier, clips


def rejected(verdict: Verdict) -> Verdict:
    assert verdict.result == "rejected", verdict.message
    assert verdict.step is None
    return verdict


def applied(verdict: Verdict) -> Verdict:
    assert verdict.result == "applied", verdict.message
    return verdict


# ---------------------------------------------------------------------------------------- the brake


def test_stop_and_checkpoint_act_while_a_bad_key_keeps_the_config_rejected() -> None:
    saver = Saver()
    host = make_host(saver)
    applier, clips = with_clip(host)
    optimizer = host.optimizer

    rejected(applier.apply(7, {"grad_clip_val": 0}, step=100))
    verdict = rejected(applier.apply(8, {"grad_clip_val": 0, "momentum": 0.5}, step=101))
    assert "grad_clip_val=0, set in revision 7: send a positive number" in verdict.message
    assert not verdict.commands
    assert not verdict.stop

    brake = rejected(applier.apply(9, {"grad_clip_val": 0, "momentum": 0.5, "checkpoint": 1, "stop": True}, step=102))

    assert brake.stop is True
    assert host.stop_requested
    assert saver.names == ["weavelet-r9-step102"]
    assert brake.commands == {"checkpoint": "/ckpt/weavelet-r9-step102.pt", "stop": "stopping at the end of this step"}
    assert brake.detail["commands"] == brake.commands
    assert brake.detail["checkpoint"] == "/ckpt/weavelet-r9-step102.pt"
    assert brake.message.startswith("grad_clip_val=0, set in revision 7: send a positive number")
    assert brake.message.endswith("commands carried out: checkpoint saved to /ckpt/weavelet-r9-step102.pt, stopping")
    assert optimizer.param_groups[0]["momentum"] == 0.9, "nothing of the config may apply"
    assert applier.applied_revision == 0
    assert applier.acted_commands == {"checkpoint": 1, "stop": True}

    # Fixing the key later applies the queued config change, and the commands do not act again.
    host.stop_requested = False
    fixed = applied(applier.apply(10, {"grad_clip_val": 1, "momentum": 0.5, "checkpoint": 1, "stop": True}, step=103))
    assert not fixed.stop
    assert not fixed.commands
    assert not host.stop_requested
    assert saver.names == ["weavelet-r9-step102"]
    assert optimizer.param_groups[0]["momentum"] == 0.5
    assert clips == [1]
    assert "momentum 0.9 -> 0.5 (set in revision 8)" in fixed.message
    assert fixed.detail["set_in"] == {"momentum": 8}


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"lrr": 0.1}, "unknown key 'lrr'; did you mean 'lr'?"),
        ({"optimizer": "adamx"}, "unknown optimizer 'adamx'; did you mean 'adamax'?"),
        ({"checkpoint": {"when": "now"}}, "checkpoint: a command object has only"),
    ],
    ids=["unknown-key", "unknown-optimizer", "bad-checkpoint-token"],
)
def test_stop_acts_beside_any_kind_of_rejected_key(bad: dict[str, Any], expected: str) -> None:
    host = make_host(Saver())
    applier = Applier(host)
    verdict = rejected(applier.apply(1, {**bad, "stop": True, "lr": 0.5}, step=5))
    assert expected in verdict.message
    assert verdict.stop
    assert host.stop_requested
    assert verdict.message.endswith("commands carried out: stopping")
    assert host.optimizer.param_groups[0]["lr"] == 0.1


def test_a_raising_handler_rejects_the_config_but_not_the_stop() -> None:
    host = make_host()
    applier = Applier(host)

    def explode(value: Any) -> None:
        raise RuntimeError("clip backend offline")

    applier.on("grad_clip_val", explode)
    verdict = rejected(applier.apply(1, {"grad_clip_val": 1.0, "stop": "now"}, step=3))
    assert "grad_clip_val: its handler raised RuntimeError: clip backend offline" in verdict.message
    assert verdict.stop
    assert host.stop_requested


def test_a_failing_checkpoint_is_reported_and_stop_still_acts() -> None:
    host = make_host(Saver(fail=True))
    applier, _ = with_clip(host)
    verdict = rejected(applier.apply(3, {"grad_clip_val": -1, "checkpoint": "a", "stop": True}, step=9))
    assert verdict.commands["checkpoint"].startswith("failed: OSError: No space left on device")
    assert "send a new checkpoint token to try again" in verdict.commands["checkpoint"]
    assert verdict.commands["stop"] == "stopping at the end of this step"
    assert verdict.stop
    assert host.stop_requested
    assert "checkpoint failed: OSError: No space left on device" in verdict.message
    assert "checkpoint" not in verdict.detail, "no path: nothing was saved"


def test_a_failing_checkpoint_beside_valid_changes_puts_them_back_and_stops() -> None:
    host = make_host(Saver(fail=True))
    applier = Applier(host)
    verdict = rejected(applier.apply(1, {"lr": 0.5, "checkpoint": 1, "stop": True}, step=2))
    assert "could not apply, nothing was changed: checkpoint failed: OSError" in verdict.message
    assert host.optimizer.param_groups[0]["lr"] == 0.1
    assert applier.applied_revision == 0
    assert verdict.stop
    assert host.stop_requested
    # The config is still desired: the next revision applies it, the failed token is not retried.
    again = applied(applier.apply(2, {"lr": 0.5, "checkpoint": 1, "stop": True}, step=3))
    assert "lr 0.1 -> 0.5 (set in revision 1)" in again.message
    assert not again.commands


def test_commands_in_an_applied_revision_are_reported_with_it() -> None:
    host = make_host(Saver())
    verdict = applied(Applier(host).apply(4, {"lr": 0.05, "checkpoint": 1, "stop": True}, step=40))
    assert verdict.commands == {"checkpoint": "/ckpt/weavelet-r4-step40.pt", "stop": "stopping at the end of this step"}
    assert verdict.message == "lr 0.1 -> 0.05; checkpoint saved to /ckpt/weavelet-r4-step40.pt, stopping"
    assert verdict.stop


def test_acted_tokens_survive_a_resume_and_format_1_state_is_still_read() -> None:
    host = make_host(Saver())
    applier, _ = with_clip(host)
    rejected(applier.apply(5, {"grad_clip_val": 0, "stop": True, "checkpoint": 2}, step=50))
    state = applier.state_dict()
    assert state["format"] == STATE_FORMAT == 2
    assert state["acted_commands"] == {"stop": True, "checkpoint": 2}

    resumed_host = make_host(Saver())
    resumed, _ = with_clip(resumed_host)
    resumed.load_state_dict(state)
    verdict = applied(resumed.apply(6, {"grad_clip_val": 1, "stop": True, "checkpoint": 2}, step=51))
    assert not verdict.commands
    assert not resumed_host.stop_requested

    old = make_host(Saver())
    legacy = Applier(old)
    legacy.load_state_dict(
        {"format": 1, "optimizer": "sgd", "applied_revision": 3, "applied_config": {"lr": 0.1, "stop": True}}
    )
    assert legacy.acted_commands == {"stop": True}
    assert not legacy.apply(4, {"lr": 0.1, "stop": True}, step=1).stop
    assert legacy.apply(5, {"lr": 0.1, "stop": 2}, step=2).stop


# ---------------------------------------------------------------------------------------- problems


def test_every_problem_is_named_with_the_revision_that_introduced_it() -> None:
    host = make_host()
    applier, _ = with_clip(host)
    rejected(applier.apply(7, {"grad_clip_val": 0}, step=1))
    rejected(applier.apply(8, {"grad_clip_val": 0, "lrr": 0.1}, step=2))
    verdict = rejected(applier.apply(9, {"grad_clip_val": 0, "lrr": 0.1, "momentum": 0.5}, step=3))
    assert verdict.message.startswith(
        "2 problems: grad_clip_val=0, set in revision 7: send a positive number; "
        "lrr=0.1, set in revision 8: unknown key 'lrr'; did you mean 'lr'?"
    )
    assert verdict.detail["problems"] == 2
    # A problem of the revision itself reads as before, without naming it.
    fresh = rejected(applier.apply(10, {"lr": -1}, step=4))
    assert fresh.message == "lr: -1 is negative; send a value >= 0"


def test_a_changed_value_is_dated_from_the_revision_that_changed_it() -> None:
    applier, _ = with_clip(make_host())
    rejected(applier.apply(1, {"grad_clip_val": 0}, step=1))
    rejected(applier.apply(2, {"grad_clip_val": -3}, step=2))
    verdict = rejected(applier.apply(3, {"grad_clip_val": -3, "lr": 0.2}, step=3))
    assert verdict.message == "grad_clip_val=-3, set in revision 2: send a positive number"


def test_thousands_of_bad_keys_give_a_bounded_readable_message() -> None:
    applier = Applier(make_host())
    config = {f"bogus_{i}": i for i in range(2000)}
    applier.apply(1, config, step=1)
    verdict = rejected(applier.apply(2, {**config, "stop": True}, step=2))
    assert verdict.message.startswith("2000 problems: bogus_0=0, set in revision 1: unknown key 'bogus_0'")
    assert f"and {2000 - MAX_PROBLEMS_SHOWN} more" in verdict.message
    assert verdict.message.count("known keys:") == 1, "the list of known keys is given once"
    assert len(verdict.message) < 4000
    assert verdict.stop


def test_a_huge_bad_value_is_cut_in_the_message() -> None:
    applier = Applier(make_host())
    verdict = rejected(applier.apply(1, {"lr": "x" * 100_000, "momentum": "y" * 100_000}, step=1))
    assert verdict.message.startswith("2 problems: lr: expected a number, got the string 'xxx")
    assert verdict.message.count("...") == 2
    assert len(verdict.message) < 1300


def test_an_applied_revision_lists_every_change_pending_since_the_last_applied_one() -> None:
    host = make_host()
    applier, _ = with_clip(host)
    applied(applier.apply(1, {"lr": 0.1}, step=1))
    rejected(applier.apply(2, {"lr": 0.1, "momentum": 0.5, "grad_clip_val": 0}, step=2))
    rejected(applier.apply(3, {"lr": 0.1, "momentum": 0.5, "grad_clip_val": 0, "weight_decay": 0.01}, step=3))
    fixed = {"lr": 0.1, "momentum": 0.5, "grad_clip_val": 2, "weight_decay": 0.01, "dampening": 0.1}
    verdict = applied(applier.apply(4, fixed, step=4))
    assert set(verdict.detail["changes"]) == {"momentum", "weight_decay", "dampening"}
    assert "momentum 0.9 -> 0.5 (set in revision 2)" in verdict.message
    assert "weight_decay 0 -> 0.01 (set in revision 3)" in verdict.message
    assert "dampening 0 -> 0.1;" in verdict.message + ";"
    assert "dampening 0 -> 0.1 (set" not in verdict.message
    assert verdict.detail["set_in"] == {"momentum": 2, "weight_decay": 3, "dampening": 4}


# ---------------------------------------------------------------------------------------- incarnations


def test_a_command_object_acts_only_in_its_incarnation() -> None:
    host = make_host(Saver())
    applier = Applier(host)
    applier.incarnation = "inc-2"

    other = {"token": "s1", "incarnation": "inc-1"}
    verdict = applied(applier.apply(1, {"stop": other, "lr": 0.05}, step=1))
    assert not verdict.stop
    assert not host.stop_requested
    assert verdict.detail["commands_ignored"] == {"stop": "stop: written for incarnation inc-1, this is inc-2"}
    assert "ignored: stop: written for incarnation inc-1, this is inc-2" in verdict.message
    assert host.optimizer.param_groups[0]["lr"] == 0.05

    again = applied(applier.apply(2, {"stop": other, "lr": 0.05}, step=2))
    assert "commands_ignored" not in again.detail, "an ignored token is reported once"

    mine = applied(applier.apply(3, {"stop": {"token": "s2", "incarnation": "inc-2"}, "lr": 0.05}, step=3))
    assert mine.stop
    assert host.stop_requested
    assert mine.commands == {"stop": "stopping at the end of this step"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"token": "s1"}, 'a command object\'s "incarnation" must be a non-empty string'),
        ({"token": 3, "incarnation": "i"}, '"token" must be a non-empty string of at most 200 characters, got int'),
        ({"token": "", "incarnation": "i"}, '"token" must be a non-empty string'),
        ({"token": "t", "incarnation": "i" * 201}, '"incarnation" must be a non-empty string of at most 200'),
        ({"token": "t", "incarnation": "i", "when": 1}, 'has only "token" and "incarnation", got also when'),
        ([1, 2], "expected true, a number or a short string"),
    ],
)
def test_a_malformed_command_object_is_refused_with_the_form_to_send(value: Any, expected: str) -> None:
    host = make_host()
    verdict = rejected(Applier(host).apply(1, {"stop": value, "lr": 0.5}, step=1))
    assert expected in verdict.message
    assert not host.stop_requested
    assert host.optimizer.param_groups[0]["lr"] == 0.1


def test_a_baseline_revision_records_its_commands_without_acting_and_applies_its_config() -> None:
    saver = Saver()
    host = make_host(saver)
    applier = Applier(host)
    applier.incarnation = "inc-9"
    verdict = applied(applier.apply(12, {"stop": True, "checkpoint": 4, "lr": 0.02}, step=0, baseline=True))
    assert not verdict.stop
    assert not host.stop_requested
    assert saver.names == []
    assert verdict.detail["commands_ignored"] == {
        "checkpoint": "checkpoint: written before this incarnation started",
        "stop": "stop: written before this incarnation started",
    }
    assert host.optimizer.param_groups[0]["lr"] == 0.02
    assert applier.acted_commands == {"stop": True, "checkpoint": 4}

    assert not applier.apply(13, {"stop": True, "checkpoint": 4, "lr": 0.02}, step=1).commands
    fresh = applier.apply(14, {"stop": True, "checkpoint": 5, "lr": 0.02}, step=2)
    assert fresh.commands == {"checkpoint": "/ckpt/weavelet-r14-step2.pt"}


def test_a_baseline_already_applied_still_records_its_commands() -> None:
    host = make_host()
    applier = Applier(host)
    applier.load_state_dict({"format": 2, "optimizer": "sgd", "applied_revision": 8, "applied_config": {}})
    verdict = applier.apply(8, {"stop": {"token": "x", "incarnation": "old"}}, step=0, baseline=True)
    assert verdict.result == "superseded"
    assert verdict.detail["commands_ignored"] == {"stop": "stop: written before this incarnation started"}
    assert not applier.apply(9, {"stop": {"token": "x", "incarnation": "old"}}, step=1).commands
    assert not host.stop_requested


def test_a_baseline_with_a_bad_key_is_rejected_and_still_acts_on_nothing() -> None:
    host = make_host()
    applier = Applier(host)
    verdict = rejected(applier.apply(3, {"lrr": 1, "stop": True}, step=0, baseline=True))
    assert "unknown key 'lrr'" in verdict.message
    assert not verdict.stop
    assert not host.stop_requested
    assert "stop" in verdict.detail["commands_ignored"]


@pytest.mark.parametrize(("sent", "meant"), [("learning_rate", "lr"), ("wd", "weight_decay"), ("mom", "momentum")])
def test_a_common_other_name_for_a_key_gets_the_right_suggestion(sent: str, meant: str) -> None:
    verdict = rejected(Applier(make_host()).apply(1, {sent: 0.1}, step=1))
    assert verdict.message.startswith(f"unknown key {sent!r}; did you mean {meant!r}?")
