"""``weavelet demo`` run as a new user would: the real CLI in a subprocess, no configuration."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

DEMO_TIMEOUT = 180


def run_demo(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weavelet_core", "demo", "--quick", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )


def applied_steps(stdout: str) -> list[int]:
    return [int(m) for m in re.findall(r"\[trainer\] revision \d+ applied at step (\d+)", stdout)]


def test_demo_runs_to_the_end_and_writes_its_plot(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    done = run_demo([], isolated_env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "optimizer=adam lr=0.003" in out
    assert "optimizer sgd -> adam" in out
    assert "lr 0.003 -> 0.0005" in out
    assert "stopping" in out
    steps = applied_steps(out)
    assert len(steps) == 3
    assert steps == sorted(steps)
    # Each outcome is printed once, in order with the trainer's progress lines, and nothing goes to stderr for it.
    everything = out + done.stderr
    for number in (1, 2, 3):
        assert len(re.findall(rf"revision {number} (applied|rejected)", everything)) == 1, everything
    lines = out.splitlines()
    sent = next(i for i, line in enumerate(lines) if "weavelet set" in line and "lr=0.0005" in line)
    applied = next(i for i, line in enumerate(lines) if line.startswith("[trainer] revision 2 applied"))
    assert sent < applied
    assert all("revision" not in line for line in lines if line.startswith("[weaver]") and "weavelet set" not in line)
    assert "SGD lr=0.05" in out
    assert "Adam lr=0.0005" in out
    assert re.search(r"fit ended at step (\d+) with Adam", out)

    plot = tmp_path / "weavelet-demo.png"
    assert f"revisions marked: {plot.name}" in out or str(plot) in out
    header = plot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 600
    assert height > 300

    # The run lives in the per-user directory, where `weavelet status` finds it.
    run_id = re.search(r"run '([^']+)'", out)
    assert run_id is not None
    status = subprocess.run(
        [sys.executable, "-m", "weavelet_core", "status", run_id.group(1)],
        env=isolated_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert "stopped" in status.stdout


@pytest.mark.slow
@pytest.mark.parametrize("server", ["weavelet_nats_server", "weavelet_redis_server"])
def test_demo_over_a_server(
    tmp_path: Path, isolated_env: dict[str, str], server: str, request: pytest.FixtureRequest
) -> None:
    url: str = request.getfixturevalue(server).url
    done = run_demo(["--url", url, "--plot", str(tmp_path / "server.png")], isolated_env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert url.split("://")[0] + "://127.0.0.1" in done.stdout
    assert len(applied_steps(done.stdout)) == 3
    assert (tmp_path / "server.png").read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_the_demo_says_how_to_get_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from weavelet_lightning import demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails as if not installed
    demo._plot([(0, 1.0), (1, 0.5)], [(1, "optimizer sgd->adam")], tmp_path / "p.png", "r")
    assert (
        'no plot: matplotlib is not installed; install it with: pip install "weavelet[plot]"' in capsys.readouterr().out
    )
    assert not (tmp_path / "p.png").exists()


def test_the_plot_labels_every_mark_with_its_revision_and_what_it_did() -> None:
    from weavelet_lightning import demo

    decided = [
        SimpleNamespace(revision=1, step=56, detail={"changes": {"optimizer": ["sgd", "adam"], "lr": [0.05, 0.003]}},
                        commands={}),
        SimpleNamespace(revision=2, step=105, detail={"changes": {"lr": [0.003, 0.0005]}}, commands={}),
        SimpleNamespace(revision=3, step=154, detail={"changes": {}, "commands": {"stop": "stopping"}},
                        commands={"stop": "stopping at the end of this step"}),
        SimpleNamespace(revision=4, step=160, detail={}, commands={}),
    ]  # fmt: skip
    assert demo.marks(decided) == [
        (56, "r1: optimizer sgd\u2192adam, lr 0.05\u21920.003"),
        (105, "r2: lr 0.003\u21920.0005"),
        (154, "r3: stop"),
        (160, "r4: no change"),
    ]


def test_the_plot_draws_each_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from weavelet_lightning import demo

    drawn: list[str] = []
    original = matplotlib.axes.Axes.annotate

    def annotate(self: Any, text: str, *args: Any, **kwargs: Any) -> Any:
        drawn.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", annotate)
    marked = [(50, "r1: lr 0.1\u21920.01"), (90, "r2: stop")]
    demo._plot([(0, 1.0), (50, 0.5), (100, 0.2)], marked, tmp_path / "p.png", "r")
    assert drawn == ["r1: lr 0.1\u21920.01", "r2: stop"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_module_does_not_import_torch() -> None:
    code = (
        "import sys, weavelet_lightning.demo as d, argparse; d.add_arguments(argparse.ArgumentParser()); "
        "print('torch' in sys.modules, 'pytorch_lightning' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "False"]
