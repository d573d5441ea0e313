"""WeaveletCallback in a real Hugging Face Trainer: switches, lr_scale, checkpoint, stop and resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from weavelet_core import Weaver
from weavelet_transformers import WeaveletCallback

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


class Observe(transformers.TrainerCallback):  # type: ignore[misc]
    """Records the optimizer the Trainer holds when training (re)starts, after its state was loaded."""

    def __init__(self) -> None:
        self.type = ""
        self.state: dict[str, Any] = {}
        self.groups: list[dict[str, Any]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        inner = kwargs["optimizer"].optimizer
        self.type = type(inner).__name__
        self.state = {k: {n: t.clone() for n, t in v.items()} for k, v in inner.state_dict()["state"].items()}
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        return control


def outcomes(weaver: Weaver, run: str) -> dict[int, Any]:
    return {o.revision: o for o in weaver.outcomes(run)}


def test_switch_to_adam_and_lr_scale_survive_resume(
    tmp_path: Path, url: str, weaver: Weaver, make_trainer: Any, driver_class: Any
) -> None:
    run = "hf-swap"
    wc = WeaveletCallback(run, url)
    plan = {3: {"optimizer": "adam", "lr_scale": 0.5}, 6: {"checkpoint": 1}}
    driver = driver_class(weaver, run, plan, wc)
    first = make_trainer([wc, driver], max_steps=12)
    assert isinstance(first.create_optimizer(), torch.optim.AdamW)  # the Trainer's own choice (adamw_torch)
    first.optimizer = None  # let train() build it as usual
    first.train()

    found = outcomes(weaver, run)
    swap, saved = found[1], found[2]
    assert swap.result == "applied", swap.message
    assert saved.result == "applied", saved.message
    assert swap.step is not None
    assert saved.step is not None
    # Applied at a step boundary: the Trainer stepped AdamW before the switch and Adam from that step on.
    assert driver.types[swap.step - 1] == "AdamW"
    assert all(driver.types[s] == "Adam" for s in range(swap.step, 13))
    # lr_scale halves the whole linear schedule: the lr right after the switch is half what it would have been.
    unscaled = 1e-3 * (12 - swap.step) / (12 - 2)
    assert driver.lrs[swap.step] == pytest.approx(0.5 * unscaled)
    checkpoint = Path(str(saved.detail["checkpoint"]))
    assert checkpoint == tmp_path / "out" / f"checkpoint-{saved.step}"
    assert (checkpoint / "optimizer.pt").is_file()
    assert str(checkpoint) in saved.message
    on_disk = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert set(on_disk["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert on_disk["param_groups"][0]["decoupled_weight_decay"] is False  # Adam's, not AdamW's

    # While the job is down, someone raises the lr: the resumed run applies it on top of the checkpoint.
    weaver.set(run, {"lr": 4e-4})
    wc2, observe = WeaveletCallback(run, url), Observe()
    driver2 = driver_class(weaver, run, {}, wc2)
    second = make_trainer([observe, wc2, driver2], max_steps=12)  # observe sees the state before reconciling
    second.train(resume_from_checkpoint=str(checkpoint))

    assert observe.type == "Adam"  # recreated before optimizer.pt was loaded, not rebuilt from TrainingArguments
    for index, saved_state in on_disk["state"].items():
        for name, tensor in saved_state.items():
            assert torch.equal(observe.state[index][name], tensor), (index, name)
    assert observe.groups[0]["initial_lr"] == pytest.approx(0.5e-3)  # the lr_scale is in the resumed schedule
    assert observe.groups[0]["decoupled_weight_decay"] is False  # Adam's own, as saved
    newer = outcomes(weaver, run)[3]
    assert newer.result == "applied", newer.message
    assert newer.step is not None
    assert newer.step >= saved.step
    assert [v.revision for v in wc2.verdicts] == [3]  # revisions 1 and 2 are not applied again
    assert all(t == "Adam" for t in driver2.types.values())
    assert driver2.lrs[newer.step] == pytest.approx(4e-4)
    status = weaver.status(run)
    assert status is not None
    assert status.optimizer is not None
    assert status.optimizer["name"] == "adam"


def test_switch_to_sgd_then_stop_and_resume(
    tmp_path: Path, url: str, weaver: Weaver, make_trainer: Any, driver_class: Any
) -> None:
    # Loading SGD's state into the AdamW the Trainer builds from its arguments would fail (no 'step' entries):
    # the resume must build SGD before the Trainer loads optimizer.pt.
    run = "hf-sgd"
    wc = WeaveletCallback(run, url)
    plan = {2: {"optimizer": {"name": "sgd", "momentum": 0.9}}, 4: {"checkpoint": "a", "stop": True}}
    driver = driver_class(weaver, run, plan, wc)
    first = make_trainer([wc, driver], max_steps=40)
    output = first.train()

    found = outcomes(weaver, run)
    assert found[1].result == "applied", found[1].message
    stopped = found[2]
    assert stopped.result == "applied", stopped.message
    assert stopped.step is not None
    assert output.global_step == stopped.step < 40  # the stop ended training after that step
    assert "stopping" in stopped.message
    checkpoint = tmp_path / "out" / f"checkpoint-{stopped.step}"
    assert Path(str(stopped.detail["checkpoint"])) == checkpoint
    final = weaver.status(run)
    assert final is not None
    assert final.state == "stopped"

    wc2, observe = WeaveletCallback(run, url), Observe()
    second = make_trainer([observe, wc2], max_steps=stopped.step + 3)
    result = second.train(resume_from_checkpoint=str(checkpoint))
    assert result.global_step == stopped.step + 3  # the stop already carried out does not stop it again
    assert observe.type == "SGD"
    assert observe.groups[0]["momentum"] == 0.9
    assert all("momentum_buffer" in s for s in observe.state.values())
    assert list(wc2.verdicts) == []  # nothing newer than the checkpoint


def test_rejected_revision_leaves_the_trainer_alone(
    url: str, weaver: Weaver, make_trainer: Any, driver_class: Any
) -> None:
    run = "hf-reject"
    wc = WeaveletCallback(run, url)
    plan = {2: {"optimizer": "adamx"}, 4: {"optimizer": "adamw", "weight_decay": 0.05}, 6: {"rollback": True}}
    driver = driver_class(weaver, run, plan, wc)
    result = make_trainer([wc, driver], max_steps=12).train()
    found = outcomes(weaver, run)
    assert found[1].result == "rejected"
    assert "unknown optimizer 'adamx'" in found[1].message
    assert found[2].result == "applied", found[2].message
    assert set(driver.types.values()) == {"AdamW"}
    assert "weight_decay" in found[2].message
    assert found[3].result == "rejected"
    assert "not supported with the Hugging Face Trainer" in found[3].message
    assert result.global_step == 12  # training went on


def test_a_second_callback_is_refused(url: str, make_trainer: Any) -> None:
    with pytest.raises(ValueError, match="two WeaveletCallbacks"):
        make_trainer([WeaveletCallback("a", url), WeaveletCallback("b", url)])


def test_a_failed_train_ends_the_run_failed(url: str, weaver: Weaver, make_trainer: Any) -> None:
    class Boom(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step == 2:
                raise RuntimeError("boom at step 2")
            return control

    wc = WeaveletCallback("hf-fail", url)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer([wc, Boom()], max_steps=6).train()
    status = weaver.status("hf-fail")
    assert status is not None
    assert status.state == "failed"
    assert "boom at step 2" in str(status.message)
    assert wc.process.state == "failed"  # the sidecar was stopped with the error, not left running


def test_missing_transformers_says_how_to_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "transformers.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'transformers'\", name='transformers')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", "from weavelet_transformers import WeaveletCallback"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert 'pip install "weavelet[transformers]"' in done.stderr


class Windows(transformers.TrainerCallback):  # type: ignore[misc]
    """Records, per accumulation window, the optimizer type at each micro-batch and the type that stepped."""

    def __init__(self) -> None:
        self.micro: dict[int, list[str]] = {}
        self.stepped: dict[int, str] = {}

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.micro.setdefault(state.global_step + 1, []).append(type(kwargs["optimizer"].optimizer).__name__)
        return control

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.stepped[state.global_step + 1] = type(kwargs["optimizer"].optimizer).__name__
        return control


def test_switch_waits_for_the_end_of_an_accumulation_window(
    url: str, weaver: Weaver, make_trainer: Any, driver_class: Any
) -> None:
    run = "hf-accumulate"
    wc, windows = WeaveletCallback(run, url), Windows()
    driver = driver_class(weaver, run, {2: {"optimizer": "adam"}}, wc)
    make_trainer(
        [windows, wc, driver], max_steps=8, gradient_accumulation_steps=4, per_device_train_batch_size=2
    ).train()
    swap = outcomes(weaver, run)[1]
    assert swap.result == "applied", swap.message
    assert swap.step is not None
    assert sorted(windows.stepped) == list(range(1, 9))  # on_step_end ran once per optimizer step, not per batch
    for step, kinds in windows.micro.items():
        assert len(kinds) == 3  # three micro-batches before the window's last one
        assert set(kinds) == {windows.stepped[step]}, step  # the type never changed inside a window
    assert windows.stepped[swap.step] == "AdamW"
    assert windows.stepped[swap.step + 1] == "Adam"


def test_a_callback_added_later_still_resumes_with_the_saved_type(
    tmp_path: Path, url: str, weaver: Weaver, make_trainer: Any, driver_class: Any, caplog: pytest.LogCaptureFixture
) -> None:
    run = "hf-late"
    wc = WeaveletCallback(run, url)
    driver = driver_class(weaver, run, {2: {"optimizer": "adam"}, 3: {"checkpoint": 1}}, wc)
    make_trainer([wc, driver], max_steps=6).train()
    saved = outcomes(weaver, run)[2]
    assert saved.result == "applied", saved.message
    checkpoint = str(saved.detail["checkpoint"])
    on_disk = torch.load(Path(checkpoint) / "optimizer.pt", weights_only=True)

    # Added after the Trainer was built: the callback never saw on_init_end, so the Trainer loads Adam's state
    # into the AdamW its arguments name; the callback moves it into an Adam when training begins, and says so.
    observe, late = Observe(), WeaveletCallback(run, url)
    second = make_trainer([], max_steps=6)
    second.add_callback(late)
    second.add_callback(observe)
    with caplog.at_level("WARNING", logger="weavelet_transformers"):
        second.train(resume_from_checkpoint=checkpoint)
    assert late.trainer is second  # found at on_train_begin
    assert observe.type == "Adam"
    for index, saved_state in on_disk["state"].items():
        for name, tensor in saved_state.items():
            assert torch.equal(observe.state[index][name], tensor), (index, name)
    assert observe.groups[0]["decoupled_weight_decay"] is False
    assert any("reloaded optimizer.pt" in r.getMessage() for r in caplog.records)
    assert any("callback.bind(trainer)" in r.getMessage() for r in caplog.records)
