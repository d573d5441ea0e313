"""The console with signed revisions: keygen, --signing-key on the writing commands, and what history and status
show of a signature, against a trainer with trusted keys over a file:// store."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import Trainer, Weavelet, blocker_env, wait_for_status
from weavelet_core import WeaveletProcess


@pytest.fixture
def keydir(tmp_path: Path, weavelet: Weavelet) -> Path:
    done = weavelet("keygen", "alice", "--dir", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    return tmp_path / "keys"


class Applier:
    """Polls a trainer's WeaveletProcess in a thread and reports each revision applied, as a loop would."""

    def __init__(self, process: WeaveletProcess) -> None:
        self.process = process
        self.handed: list[int] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = 0
        while not self._done.wait(0.01):
            step += 1
            got = self.process.poll()
            if got is not None:
                self.handed.append(got.revision)
                self.process.report_outcome(got.revision, "applied", step=step)
                self.process.report(step=step, force=True)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)


@pytest.fixture
def applier(trainer: Trainer, keydir: Path) -> Iterator[Applier]:
    process = trainer("signed", trusted_keys=keydir / "alice.pub")
    applying = Applier(process)
    yield applying
    applying.close()


def test_keygen_writes_the_pair_and_refuses_to_overwrite_it(tmp_path: Path, weavelet: Weavelet) -> None:
    keys = tmp_path / "keys"
    done = weavelet("keygen", "ci-bot", "--dir", str(keys), "--json")
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert made["name"] == "ci-bot"
    assert made["key_id"].startswith("SHA256:")
    assert (keys / "ci-bot.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "ci-bot.pub").read_text().endswith(" ci-bot\n")
    before = (keys / "ci-bot.key").read_bytes()
    again = weavelet("keygen", "ci-bot", "--dir", str(keys))
    assert again.returncode == 1
    assert "exists; weavelet keygen never overwrites a key" in again.stderr
    assert (keys / "ci-bot.key").read_bytes() == before


def test_keygen_without_cryptography_names_the_pip_line(tmp_path: Path, weavelet: Weavelet) -> None:
    done = weavelet("keygen", "alice", "--dir", str(tmp_path), env=blocker_env(tmp_path, "cryptography"))
    assert done.returncode == 1
    assert 'install it with: pip install "weavelet[signing]"' in done.stderr
    assert not (tmp_path / "alice.key").exists()


def test_signed_writes_apply_unsigned_ones_are_rejected_and_history_says_which(
    weavelet: Weavelet, applier: Applier, keydir: Path, store: str
) -> None:
    key = str(keydir / "alice.key")
    signed = weavelet("set", "signed", "lr=0.1", "--signing-key", key, "--wait", "30")
    assert signed.returncode == 0, signed.stderr
    assert "revision 1 applied" in signed.stdout
    assert "signed by key alice (SHA256:" in signed.stdout

    unsigned = weavelet("set", "signed", "lr=0.2", "--wait", "30")
    assert unsigned.returncode == 1
    assert "revision 2 rejected: revision 2 is unsigned" in unsigned.stdout
    assert "--signing-key" in unsigned.stdout

    # The key in the environment signs as well as the option; the stop builds on revision 1, not the forgery.
    stop = weavelet("stop", "signed", "--wait", "30", env={"WEAVELET_SIGNING_KEY": key})
    assert stop.returncode == 0, stop.stderr + stop.stdout
    assert "weavelet: warning: revision 2 of run 'signed' is unsigned; signed on top of revision 1" in stop.stderr
    assert applier.handed == [1, 3]

    built = weavelet("set", "signed", "momentum=0.9", "--signing-key", key)
    assert built.returncode == 0, built.stderr  # revision 3 is signed: revision 4 builds on it
    assert "warning" not in built.stderr
    weavelet("set", "signed", "lr=0.5")  # an unsigned write on top
    refused = weavelet("set", "signed", "momentum=0.8", "--signing-key", key)
    assert refused.returncode == 1
    assert "revision 5 of run 'signed' is unsigned; this weaver signs, and will not merge" in refused.stderr

    history = weavelet("history", "signed", "-o", "wide")
    assert history.returncode == 0, history.stderr
    rows = {line.split()[0]: line for line in history.stdout.splitlines()[1:]}
    assert "key alice (" in rows["1"]
    assert "(UNSIGNED)" in rows["2"]
    assert "key alice (" in rows["3"]
    as_json = json.loads(weavelet("history", "signed", "--json", "--trusted-keys", str(keydir)).stdout)
    first = as_json[0]["signature"]
    assert first["signed"] is True
    assert first["trainer"] == {"verified": True, "key": "alice", "key_id": first["key_id"]}
    assert first["here"]["verified"] is True
    assert as_json[1]["signature"]["trainer"]["problem"] == "unsigned"

    status = wait_for_status(store, "signed", lambda s: (s.last_outcome or {}).get("revision") == 5)
    assert status.last_outcome["result"] == "rejected"
    shown = weavelet("status", "signed")
    assert "desired     revision 5 REJECTED: revision 5 is unsigned" in shown.stdout, shown.stdout


def test_status_names_the_key_that_signed_the_applied_revision(
    weavelet: Weavelet, applier: Applier, keydir: Path, store: str
) -> None:
    done = weavelet("set", "signed", "lr=0.1", "--signing-key", str(keydir / "alice.key"), "--wait", "30")
    assert done.returncode == 0, done.stderr
    wait_for_status(store, "signed", lambda s: s.applied_revision == 1)
    shown = weavelet("status", "signed")
    assert "applied     revision 1 (signed by key alice, verified by the trainer)" in shown.stdout, shown.stdout
