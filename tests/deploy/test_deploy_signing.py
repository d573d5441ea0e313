"""docs/deploy.md, signed revisions: the documented commands make a key, trust it, start a trainer that verifies
and sign writes with it; the trainer applies the signed change and rejects an unsigned one."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from tests.cli.conftest import console_script
from weavelet_core import WeaveletProcess, Weaver


def _run(line: str, env: dict[str, str], home: Path, trusted: Path) -> subprocess.CompletedProcess[str]:
    """One documented command line, with the home directory and the trusted-key directory moved under the test's
    own; ``sudo`` is dropped (the test's user owns both)."""
    line = line.replace("/etc/weavelet/trusted-keys", str(trusted)).replace("~", str(home))
    args = shlex.split(line)
    if args[0] == "sudo":
        args = args[1:]
    if args[0] == "weavelet":
        args[0] = console_script()
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)


def _exports(text: str, home: Path, trusted: Path) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, value = line.removeprefix("export ").split("=", 1)
            found[name] = value.replace("/etc/weavelet/trusted-keys", str(trusted)).replace("~", str(home))
    return found


def test_the_documented_signing_setup_applies_signed_writes_only(
    snippet: dict[str, str], tmp_path: Path, isolated_env: dict[str, str]
) -> None:
    home, trusted = tmp_path / "home", tmp_path / "etc" / "trusted-keys"
    trusted.parent.mkdir(parents=True)
    url = (tmp_path / "store").as_uri()
    env = {**isolated_env, "HOME": str(home), "WEAVELET_URL": url, "PYTHONPATH": os.pathsep.join(sys.path)}
    for line in (*snippet["signing-keygen"].splitlines(), *snippet["signing-trusted"].splitlines()):
        done = _run(line, env, home, trusted)
        assert done.returncode == 0, done.stderr
    assert (home / ".config/weavelet/keys/alice.key").stat().st_mode & 0o777 == 0o600
    assert (trusted / "alice.pub").is_file()

    trainer_env = _exports(snippet["signing-trainer"], home, trusted)
    assert trainer_env == {"WEAVELET_TRUSTED_KEYS": str(trusted)}
    saved = {name: os.environ.get(name) for name in trainer_env}
    os.environ.update(trainer_env)
    try:
        process = WeaveletProcess("resnet50", url, heartbeat_interval=0.2, status_interval=0.05)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert process.trusted_keys is not None
    handed: list[dict[str, object]] = []
    done_event = threading.Event()

    def loop() -> None:
        step = 0
        while not done_event.wait(0.01):
            step += 1
            got = process.poll()
            if got is not None:
                handed.append(got.config)
                process.report_outcome(got.revision, "applied", step=step)
                process.report(step=step, force=True)

    with process:
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            weaver_env = {**env, **_exports(snippet["signing-weaver"], home, trusted)}
            for line in snippet["signing-weaver"].splitlines():
                if not line.startswith("export "):
                    done = _run(line, weaver_env, home, trusted)
                    assert done.returncode == 0, done.stdout + done.stderr
                    assert "applied" in done.stdout, done.stdout
                    with Weaver(url) as anyone:
                        anyone.set("resnet50", {"lr": 10.0})  # then a store writer without the key
        finally:
            done_event.set()
            thread.join(5)
    assert [config.get("lr") for config in handed] == [0.01, 0.01]  # never 10.0
    assert "stop" in handed[-1]
    with Weaver(url) as reader:
        forged = reader.outcome("resnet50", 2)
    assert forged is not None
    assert forged.result == "rejected"
    assert "unsigned" in (forged.message or "")
