"""docs/deploy.md, a shared ``file://`` directory: the documented commands make a team store that members of the
group can write and that weavelet trusts (run as root here; the team member is ``nobody`` in ``nogroup``)."""

from __future__ import annotations

import grp
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from weavelet_core import Weaver

GROUP = "nogroup"  # stands for the documented "mlteam": a group that exists here
MEMBER_UID = 65534  # nobody, whose primary group is nogroup


@pytest.fixture
def shared_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="weavelet-doc-file-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_the_documented_team_store_is_shared_by_the_group(snippet: dict[str, str], shared_root: Path) -> None:
    text = snippet["file-team"].replace("/srv/weavelet", str(shared_root / "weavelet")).replace("mlteam", GROUP)
    url = ""
    for line in text.splitlines():
        args = shlex.split(line)
        if args[:2] == ["sudo", "groupadd"]:
            continue  # the group exists here
        if args[0] == "sudo":
            subprocess.run(args[1:], check=True, timeout=30)
        else:
            found = re.search(r'WEAVELET_URL="([^"]+)"', line)
            assert found is not None
            url = found.group(1)
    store = shared_root / "weavelet"
    assert store.stat().st_mode & 0o7777 == 0o2770
    with Weaver(url) as weaver:
        weaver.set("team-run", {"lr": 0.1})
    # A teammate (another user in the group) writes on top, through the same URL.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HOME": str(shared_root)}
    done = subprocess.run(
        ["setpriv", f"--reuid={MEMBER_UID}", f"--regid={grp.getgrnam(GROUP).gr_gid}", "--clear-groups",
         sys.executable, "-m", "weavelet_core", "set", "team-run", "lr=0.2", "--url", url],
        env=env, capture_output=True, text=True, timeout=60, check=False, cwd=shared_root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Weaver(url) as weaver:
        history = weaver.history("team-run")
    assert [r.config["lr"] for r in history] == [0.1, 0.2]
    run_dir = store / "runs" / "team-run"
    assert run_dir.stat().st_gid == grp.getgrnam(GROUP).gr_gid
    assert (run_dir / "latest.json").stat().st_mode & 0o777 == 0o660
    assert (run_dir / "latest.json").stat().st_uid == MEMBER_UID
