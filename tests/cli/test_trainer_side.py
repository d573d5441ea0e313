"""What the console needs from the trainer side: labels, run ids in checkpoint names, a line per applied change,
and the pip line when torch is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.cli.conftest import blocker_env, wait_for_status


def test_without_torch_importing_attach_names_the_pip_line(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from weavelet_torch import attach"],
        env={**isolated_env, **blocker_env(tmp_path, "torch")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "ModuleNotFoundError: weavelet_torch needs PyTorch, which is not installed" in done.stderr
    assert 'install it with: pip install "weavelet[torch]"' in done.stderr


def test_attach_declares_labels_names_checkpoints_by_run_and_prints_applied_changes(
    store: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    import weavelet_torch

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    from weavelet_torch.applier import Verdict

    with weavelet_torch.attach(
        optimizer, run="lab-1", url=store, model=model, checkpoint_dir=tmp_path / "ckpt", labels={"sweep": "3"},
        report_interval=0.05,
    ) as live:  # fmt: skip
        status = wait_for_status(store, "lab-1", lambda s: s.live)
        assert status.labels == {"sweep": "3"}
        path = live._save_default("weavelet-r3-step10")
        live.link.settle(Verdict(3, "applied", 10, "lr 0.1 -> 0.05"), live.applier)
    assert Path(path).name == "lab-1-weavelet-r3-step10.pt"
    assert Path(path).is_file()
    err = capfd.readouterr().err
    assert "weavelet: run 'lab-1' revision 3 applied at step 10: lr 0.1 -> 0.05\n" in err


def test_lightning_checkpoint_names_carry_the_run_id(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from weavelet_lightning.host import LightningHost

    saved: list[str] = []
    host = LightningHost(checkpoint_dir=tmp_path)
    host.trainer = SimpleNamespace(save_checkpoint=saved.append)
    host.run = "run-7"
    assert host.save_checkpoint("weavelet-r3-step10") == str(tmp_path / "run-7-weavelet-r3-step10.ckpt")
    assert saved == [str(tmp_path / "run-7-weavelet-r3-step10.ckpt")]
