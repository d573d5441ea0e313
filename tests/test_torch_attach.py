"""attach() in hand-written PyTorch loops, with a real sidecar over a file:// transport."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from weavelet_core import Weaver
from weavelet_torch import Attachment, attach

WAIT = 30.0


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "weavelet").as_uri()


@pytest.fixture
def weaver(url: str) -> Iterator[Weaver]:
    with Weaver(url) as w:
        yield w


def make_problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(512, 8)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return model, x, y


class Loop:
    """A plain training loop that sends revisions at given steps and waits (stepping) for their verdicts."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.losses: list[float] = []
        self.stepped: list[str] = []

    def run(
        self, live: Attachment, weaver: Weaver, steps: int, plan: dict[int, dict[str, Any]], *, start: int = 0
    ) -> None:
        waiting: tuple[int, float] | None = None
        pending = sorted(plan.items())
        for step in range(start + 1, start + steps + 1):
            batch = torch.randint(0, len(self.x), (32,))
            loss = torch.nn.functional.mse_loss(self.model(self.x[batch]), self.y[batch])
            live.optimizer.zero_grad()
            torch.autograd.backward(loss)
            live.optimizer.step()
            self.stepped.append(type(live.optimizer).__name__)
            self.losses.append(float(loss.detach()))
            verdict = live.poll(step, loss=loss)
            if waiting is not None and verdict is not None and verdict.revision == waiting[0]:
                waiting = None
            # A planned revision goes out at its step, or once the previous one has its verdict: in order,
            # one at a time, so none supersedes another however long delivery takes.
            if waiting is None and pending and pending[0][0] <= step:
                waiting = (weaver.set(live.run, pending.pop(0)[1]).revision, time.monotonic())
            if waiting is not None:
                assert time.monotonic() - waiting[1] < WAIT, f"revision {waiting[0]} got no verdict"
                time.sleep(0.01)
            if live.should_stop:
                break


def test_switch_to_adam_in_a_plain_loop(url: str, weaver: Weaver) -> None:
    model, x, y = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loop = Loop(model, x, y)
    with attach(optimizer, run="plain", url=url) as live:
        loop.run(live, weaver, 150, {20: {"optimizer": "adam", "lr": 0.001}})
        process = live.process
    assert process is not None
    assert process.state == "stopped"

    outcome = weaver.outcome("plain", 1)
    assert outcome is not None
    assert outcome.result == "applied", outcome
    assert outcome.step is not None
    assert 20 < outcome.step < 150
    assert set(loop.stepped[: outcome.step]) == {"SGD"}
    assert set(loop.stepped[outcome.step :]) == {"Adam"}
    assert isinstance(live.optimizer, torch.optim.Adam)
    assert live.optimizer.param_groups[0]["params"][0] is next(model.parameters())
    assert all(int(live.optimizer.state[p]["step"]) == 150 - outcome.step for p in model.parameters())
    after = loop.losses[outcome.step :]
    assert sum(after[-20:]) < sum(after[:20])

    status = weaver.status("plain")
    assert status is not None
    assert status.state == "stopped"
    assert status.step == 150
    assert status.optimizer is not None
    assert status.optimizer["name"] == "adam"
    assert status.applied_revision == 1


def test_checkpoint_and_resume_in_a_plain_loop(tmp_path: Path, url: str, weaver: Weaver) -> None:
    model, x, y = make_problem()
    scheduler_optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(scheduler_optimizer, step_size=100, gamma=0.5)
    loop = Loop(model, x, y)
    with attach(
        scheduler_optimizer,
        run="plain-resume",
        url=url,
        model=model,
        schedulers=[scheduler],
        checkpoint_dir=tmp_path / "ckpt",
    ) as live:
        loop.run(live, weaver, 40, {5: {"optimizer": "adam", "lr": 0.002}, 15: {"checkpoint": "a"}})
    saved = weaver.outcome("plain-resume", 2)
    swapped = weaver.outcome("plain-resume", 1)
    assert saved is not None
    assert swapped is not None
    assert saved.result == "applied"
    assert swapped.step is not None
    assert saved.step is not None
    path = Path(str(saved.detail["checkpoint"]))
    assert path.parent == tmp_path / "ckpt"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["step"] == saved.step
    assert scheduler.optimizer is live.optimizer

    # A new process of the script: it builds SGD again, then resumes.
    model2, _, _ = make_problem(seed=1)
    model2.load_state_dict(checkpoint["model"])
    sgd = torch.optim.SGD(model2.parameters(), lr=0.05)
    scheduler2 = torch.optim.lr_scheduler.StepLR(sgd, step_size=100, gamma=0.5)
    with attach(sgd, run="plain-resume", url=url, schedulers=[scheduler2], state=checkpoint["weavelet"]) as live2:
        assert isinstance(live2.optimizer, torch.optim.Adam)
        assert scheduler2.optimizer is live2.optimizer
        live2.optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler2.load_state_dict(checkpoint["schedulers"][0])
        first = next(model2.parameters())
        assert int(live2.optimizer.state[first]["step"]) == saved.step - swapped.step
        resumed = Loop(model2, x, y)
        resumed.run(live2, weaver, 10, {}, start=saved.step)
    assert set(resumed.stepped) == {"Adam"}
    assert list(live2.verdicts) == [], "already applied revisions must not be applied again"


def test_stop_and_bad_input_in_a_plain_loop(url: str, weaver: Weaver) -> None:
    model, x, y = make_problem()
    loop = Loop(model, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with attach(optimizer, run="plain-stop", url=url) as live:
        loop.run(live, weaver, 2000, {3: {"lr": -1}, 6: {"lr": 0.01, "stop": True}})
    rejected = weaver.outcome("plain-stop", 1)
    stopped = weaver.outcome("plain-stop", 2)
    assert rejected is not None
    assert rejected.result == "rejected"
    assert "lr: -1 is negative" in (rejected.message or "")
    # Revision 2 carries lr=0.01 over the rejected -1, and stop: both applied, then the loop ended.
    assert stopped is not None
    assert stopped.result == "applied", stopped
    assert live.should_stop
    assert stopped.step == len(loop.losses) < 2000
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_handler_for_own_key(url: str, weaver: Weaver) -> None:
    model, x, y = make_problem()
    loop = Loop(model, x, y)
    clip: list[float] = []
    with attach(torch.optim.SGD(model.parameters(), lr=0.05), run="plain-handler", url=url) as live:
        live.on("grad_clip_val", clip.append)
        loop.run(live, weaver, 30, {3: {"grad_clip_val": 1.5}})
    outcome = weaver.outcome("plain-handler", 1)
    assert outcome is not None
    assert outcome.result == "applied"
    assert clip == [1.5]


def test_sidecar_stops_when_the_loop_raises(url: str) -> None:
    model, _, _ = make_problem()
    live = attach(torch.optim.SGD(model.parameters(), lr=0.05), run="plain-raise", url=url)
    states: list[str] = []

    def train() -> None:
        with live:
            states.append(live.process.state)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train()
    assert states == ["running"]
    # The sidecar is gone, and the run ended failed with the exception (a loop that raised is not "stopped").
    assert live.process.pid is None
    assert live.process.state == "failed"
    assert live.process.message == "the training loop raised RuntimeError: boom"


def test_attach_rejects_a_non_optimizer(url: str) -> None:
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        attach(object(), url=url)  # type: ignore[arg-type]


def test_plain_loop_example_runs(tmp_path: Path, url: str, weaver: Weaver) -> None:
    script = Path(__file__).parent.parent / "examples" / "plain_loop.py"
    done = subprocess.run(
        [sys.executable, str(script), "--run", "example-plain", "--url", url, "--steps", "1000"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 1000: loss" in done.stdout
    status = weaver.status("example-plain")
    assert status is not None
    assert (status.state, status.step) == ("stopped", 1000)
    assert status.optimizer is not None
    assert status.optimizer["name"] == "sgd"
