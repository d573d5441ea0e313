"""The ``file://`` transport beyond the conformance suite: layout, unwritable directories, crashes mid-write."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from weavelet_core.errors import CorruptEntry, RevisionConflict, TransportError, TransportUnavailable
from weavelet_core.plugins import open_transport
from weavelet_core.protocol import MAX_REVISION, Outcome, Revision, Status, encode
from weavelet_core.weaver import AsyncWeaver
from weavelet_file.transport import FileTransport, path_from_url

T = TypeVar("T")

CliRunner = Callable[..., subprocess.CompletedProcess[str]]  # the run_cli fixture of conftest.py


def _run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return anyio.run(fn, *args, backend="asyncio")


async def _write(url: str | None, run: str, *configs: dict[str, object]) -> None:
    async with AsyncWeaver(url) as weaver:
        for config in configs:
            await weaver.set(run, config)


async def _read(url: str, run: str) -> tuple[Revision | None, list[Revision]]:
    async with AsyncWeaver(url) as weaver:
        return await weaver.get(run), await weaver.history(run)


# -- layout ------------------------------------------------------------------------------------------------


def test_layout_is_one_directory_per_run_with_plain_json(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()

    async def go() -> None:
        async with open_transport(url) as transport:
            await transport.put(Revision(run="demo", revision=1, config={"lr": 0.1}))
            await transport.publish_status(Status(run="demo", state="running", step=3))
            await transport.publish_outcome(Outcome(run="demo", revision=1, result="applied", step=3))

    _run(go)
    run_dir = tmp_path / "store" / "runs" / "demo"
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "latest.json", "outcomes", "revisions", "status.json"]
    assert json.loads((run_dir / "latest.json").read_text())["config"] == {"lr": 0.1}
    assert (run_dir / "revisions" / ("0" * 19 + "1.json")).is_file()
    assert json.loads((run_dir / "outcomes" / ("0" * 19 + "1.json")).read_text())["result"] == "applied"
    assert json.loads((run_dir / "status.json").read_text())["step"] == 3


def test_history_is_bounded_and_keeps_the_newest(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()

    async def go() -> list[int]:
        async with open_transport(url, history=3) as transport:
            for n in range(1, 8):
                await transport.put(Revision(run="demo", revision=n, config={"n": n}))
            return [r.revision for r in await transport.history("demo")]

    assert _run(go) == [5, 6, 7]
    assert len(list((tmp_path / "store" / "runs" / "demo" / "revisions").iterdir())) == 3


def test_foreign_entries_in_the_store_are_ignored(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    _run(_write, url, "demo", {"lr": 0.1})
    runs = tmp_path / "store" / "runs"
    (runs / "bad name").mkdir()
    (runs / "bad name" / "latest.json").write_text("{}")
    (runs / "empty").mkdir()
    (runs / "demo" / "revisions" / "notes.txt").write_text("hello")

    async def go() -> tuple[list[str], list[Revision]]:
        async with open_transport(url) as transport:
            return await transport.runs(), await transport.history("demo")

    names, history = _run(go)
    assert names == ["demo"]
    assert [r.revision for r in history] == [1]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://server/share", "names host 'server'; write an absolute local path as file:///path/to/dir"),
        ("file://", "has no directory; write it as file:///path/to/dir"),
    ],
)
def test_file_urls_that_name_no_local_directory_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        path_from_url(url)


def test_localhost_and_percent_escapes_are_accepted(tmp_path: Path) -> None:
    target = tmp_path / "with space"
    assert path_from_url(f"file://localhost{target.as_uri()[7:]}") == target
    assert FileTransport(target.as_uri()).root == target


# -- a directory that is not writable ----------------------------------------------------------------------


def _connect(url: str) -> None:
    async def go() -> None:
        async with open_transport(url):
            pass

    _run(go)


def test_store_under_a_regular_file_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    for store in (blocker, blocker / "store"):
        with pytest.raises(TransportError) as info:
            _connect(store.as_uri())
        message = str(info.value)
        assert message.startswith("file transport: cannot create ")
        assert "part of this path is a file, not a directory" in message
        assert "choose another directory with --url file:///path or WEAVELET_URL" in message
    assert blocker.read_text() == "not a directory"


def test_cli_reports_an_unusable_store_in_one_line(run_cli: CliRunner, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    done = run_cli("--url", (blocker / "store").as_uri(), "set", "demo", "lr=0.1")
    assert done.returncode == 1
    assert done.stderr.startswith("weavelet: error: file transport: cannot create ")
    assert done.stderr.count("\n") == 1
    # The default store: WEAVELET_STATE_DIR pointing below a file.
    done = run_cli("get", "demo", env_extra={"WEAVELET_STATE_DIR": str(blocker / "state")})
    assert done.returncode == 1
    assert "part of this path is a file, not a directory" in done.stderr


def _chattr(flag: str, path: Path) -> bool:
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, flag, str(path)], capture_output=True, check=False).returncode == 0


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Directories made immutable (``chattr +i``: refused even to root); restored after the test."""
    made: list[Path] = []
    yield made
    for path in reversed(made):
        _chattr("-i", path)


def _make_immutable(path: Path, made: list[Path]) -> None:
    if not _chattr("+i", path):
        pytest.skip("this filesystem does not support chattr +i (immutable directories)")
    made.append(path)


def test_unwritable_store_directory_is_reported_and_nothing_lost(tmp_path: Path, immutable: list[Path]) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _make_immutable(fresh, immutable)
    with pytest.raises(TransportError) as info:
        _connect(fresh.as_uri())
    assert str(info.value).startswith(f"file transport: cannot create {fresh}: Operation not permitted")
    assert "fix its permissions or choose another directory" in str(info.value)

    url = (tmp_path / "store").as_uri()
    _run(_write, url, "demo", {"lr": 0.1})
    run_dir = tmp_path / "store" / "runs" / "demo"
    _make_immutable(run_dir / "revisions", immutable)
    with pytest.raises(TransportError) as info:
        _run(_write, url, "demo", {"lr": 0.2})
    assert "Operation not permitted; the store is read-only for this user (reading still works" in str(info.value)
    latest, history = _run(_read, url, "demo")
    assert latest is not None
    assert (latest.revision, latest.config) == (1, {"lr": 0.1})
    assert [r.revision for r in history] == [1]

    _make_immutable(tmp_path / "store" / "runs", immutable)
    with pytest.raises(TransportError) as info:
        _run(_write, url, "other", {"lr": 0.3})
    assert str(info.value) == (
        f"file transport: cannot write {tmp_path / 'store' / 'runs' / 'other'}: Operation not permitted; the store "
        "is read-only for this user (reading still works: weavelet get, status, history, runs); to write, fix its "
        "permissions or choose another directory with --url file:///path or WEAVELET_URL"
    )
    assert not isinstance(info.value, TransportUnavailable)  # retrying cannot help: the weaver fails at once
    latest, _ = _run(_read, url, "demo")
    assert latest is not None, "a read-only store still serves reads"


# -- a crash in the middle of a write ----------------------------------------------------------------------

_CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import anyio
    from weavelet_core.weaver import AsyncWeaver

    url, kill_at = sys.argv[1], int(sys.argv[2])
    calls = 0
    real_replace = os.replace

    def replace(src, dst):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the temporary file is written and synced, not yet renamed
        return real_replace(src, dst)

    async def main():
        async with AsyncWeaver(url) as weaver:
            await weaver.set("demo", {"lr": 0.1})
            os.replace = replace
            await weaver.set("demo", {"lr": 0.2, "wd": 0.01})

    anyio.run(main, backend="asyncio")
    """
)


@pytest.mark.parametrize("kill_at", [1, 2], ids=["before-revision-file", "before-latest"])
def test_writer_killed_mid_write_leaves_the_previous_revision(tmp_path: Path, kill_at: int) -> None:
    store = tmp_path / "store"
    url = store.as_uri()
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, url, str(kill_at)], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == -9, done.stderr
    run_dir = store / "runs" / "demo"
    leftovers = [p.name for p in run_dir.rglob("*.tmp")]
    assert len(leftovers) == 1  # the killed writer's temporary file

    latest, history = _run(_read, url, "demo")
    assert latest is not None
    assert (latest.revision, latest.config) == (1, {"lr": 0.1})
    assert [r.revision for r in history] == [1]

    # The lock died with the writer: the next writer proceeds and the store is consistent again.
    _run(_write, url, "demo", {"lr": 0.3})
    latest, history = _run(_read, url, "demo")
    assert latest is not None
    assert (latest.revision, latest.config) == (2, {"lr": 0.3})
    assert [(r.revision, r.config) for r in history] == [(1, {"lr": 0.1}), (2, {"lr": 0.3})]


def test_damaged_latest_file_falls_back_to_the_revision_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = (tmp_path / "store").as_uri()
    _run(_write, url, "demo", {"lr": 0.1}, {"lr": 0.2})
    latest_path = tmp_path / "store" / "runs" / "demo" / "latest.json"
    latest_path.write_bytes(latest_path.read_bytes()[:20])  # torn by something that is not weavelet
    with caplog.at_level(logging.DEBUG, logger="weavelet_file.transport"):
        latest, _ = _run(_read, url, "demo")
    assert latest is not None
    assert (latest.revision, latest.config) == (2, {"lr": 0.2})
    assert "unreadable" in caplog.text
    assert "is damaged; falling back to the newest revision file" in caplog.text
    _run(_write, url, "demo", {"wd": 0.1})
    latest, history = _run(_read, url, "demo")
    assert latest is not None
    assert (latest.revision, latest.config) == (3, {"lr": 0.2, "wd": 0.1})
    assert [r.revision for r in history] == [1, 2, 3]
    assert json.loads(latest_path.read_text())["revision"] == 3


def test_default_store_is_the_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEAVELET_URL", raising=False)
    monkeypatch.setenv("WEAVELET_STATE_DIR", str(tmp_path / "state"))
    _run(_write, None, "demo", {"lr": 0.1})
    assert (tmp_path / "state" / "runs" / "demo" / "latest.json").is_file()
    assert os.listdir(tmp_path / "state") == ["runs"]


# -- revision numbers that jump ----------------------------------------------------------------------------


@pytest.mark.parametrize("jump", [10**7, MAX_REVISION - 1], ids=["1e7", "2**53-1"])
@pytest.mark.parametrize("where", ["latest.json", "revision-file"])
def test_a_jump_in_revision_numbers_is_followed_at_once_without_blocking(tmp_path: Path, jump: int, where: str) -> None:
    """A revision number far ahead (written by hand, or a bug elsewhere) must not make any method walk the numbers
    in between: the watch delivers it within a poll or two while another task keeps running."""
    url = (tmp_path / "store").as_uri()
    run_dir = tmp_path / "store" / "runs" / "demo"

    async def go() -> None:
        async with open_transport(url, poll_interval=0.02) as transport:
            assert isinstance(transport, FileTransport)
            await transport.put(Revision(run="demo", revision=1, config={"n": 1}))
            ticks = 0
            stop = anyio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await anyio.sleep(0.005)

            jumped = Revision(run="demo", revision=jump, config={"n": "far"})
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                watcher = transport.watch("demo")
                with anyio.fail_after(2):
                    assert (await watcher.__anext__()).revision == 1
                if where == "latest.json":
                    (run_dir / "latest.json").write_bytes(encode(jumped))
                else:  # a revision file of that number, and a damaged latest.json pointing nowhere
                    (run_dir / "revisions" / f"{jump:020d}.json").write_bytes(encode(jumped))
                    (run_dir / "latest.json").write_bytes(b"{torn")
                before = ticks
                started = time.monotonic()
                with anyio.fail_after(2):
                    got = await watcher.__anext__()
                assert time.monotonic() - started < 1.0
                assert got == jumped
                assert ticks > before, "the concurrent task kept running"
                assert await transport.latest("demo") == jumped
                assert [e.revision for e in await transport.history("demo")] == [1, jump]
                assert [e.revision for e in await transport.history("demo", limit=1)] == [jump]
                # Writers number on top of it, and the watch follows.
                following = Revision(run="demo", revision=jump + 1, config={"n": "next"})
                await transport.put(following)
                with anyio.fail_after(2):
                    assert await watcher.__anext__() == following
                await transport.publish_outcome(Outcome(run="demo", revision=jump, result="applied", step=1))
                outcome = await transport.outcome("demo", jump)
                assert outcome is not None
                assert outcome.revision == jump
                await watcher.aclose()  # type: ignore[attr-defined]
                stop.set()

    _run(go)


def test_a_corrupt_latest_file_showing_a_number_is_that_revision(tmp_path: Path) -> None:
    """latest.json of a newer protocol version: reported as that revision, never the older revision file."""
    url = (tmp_path / "store").as_uri()
    _run(_write, url, "demo", {"lr": 0.1})
    latest_path = tmp_path / "store" / "runs" / "demo" / "latest.json"
    latest_path.write_text(json.dumps({"v": 3, "kind": "revision", "run": "demo", "revision": 7, "config": {}}))

    async def go() -> None:
        async with open_transport(url) as transport:
            with pytest.raises(CorruptEntry) as info:
                await transport.latest("demo")
            assert info.value.revision == 7
            assert "unsupported protocol version 3" in info.value.reason
            assert str(latest_path) in info.value.reason
            with pytest.raises(RevisionConflict) as conflict:
                await transport.put(Revision(run="demo", revision=2, config={}))
            assert conflict.value.current == 7
            await transport.put(Revision(run="demo", revision=8, config={"lr": 0.2}))
            history = await transport.history("demo")
            assert [(type(e).__name__, e.revision) for e in history] == [("Revision", 1), ("Revision", 8)]

    _run(go)


def test_version_1_outcome_files_still_read(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    outcomes_dir = tmp_path / "store" / "runs" / "demo" / "outcomes"
    outcomes_dir.mkdir(parents=True)
    v1 = {"v": 1, "kind": "outcome", "run": "demo", "revision": 1, "result": "applied", "step": 4, "at": 100.0}
    (outcomes_dir / f"{1:020d}.json").write_text(json.dumps(v1))

    async def go() -> None:
        async with open_transport(url) as transport:
            legacy = await transport.outcome("demo", 1)
            assert legacy is not None
            assert (legacy.result, legacy.step, legacy.incarnation, legacy.revision_id) == ("applied", 4, "", "")
            odd = Outcome(run="demo", revision=1, result="rejected", at=200.0, incarnation="../not a/file name")
            await transport.publish_outcome(odd)
            assert await transport.outcomes("demo") == [legacy, odd]
            assert await transport.outcome("demo", 1) == odd
            names = sorted(p.name for p in outcomes_dir.iterdir() if p.name != f"{1:020d}.json")
            assert len(names) == 1
            assert names[0].startswith(f"{1:020d}.%")

    _run(go)


def test_outcomes_are_bounded_per_revision_and_per_run(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()

    async def go() -> None:
        async with open_transport(url, history=3) as transport:
            for incarnation in range(12):
                await transport.publish_outcome(
                    Outcome(
                        run="demo", revision=1, result="applied", at=1000.0 + incarnation, incarnation=f"i{incarnation}"
                    )
                )
            kept = await transport.outcomes("demo")
            assert [o.incarnation for o in kept] == [f"i{n}" for n in range(4, 12)]
            for number in range(2, 6):
                await transport.publish_outcome(Outcome(run="demo", revision=number, result="applied"))
            assert [o.revision for o in await transport.outcomes("demo")] == [3, 4, 5]

    _run(go)


# -- shared storage: ownership, modes, a team group, read-only stores -------------------------------------------
OTHER_UID = 65534  # nobody
TEAM_GROUP = "nogroup"  # gid 65534 on Debian and Ubuntu


def _connect_ok(url: str) -> None:
    async def go() -> None:
        transport = open_transport(url)
        await transport.connect()
        await transport.aclose()

    _run(go)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_new_store_directories_are_private(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _run(_write, store.as_uri(), "demo", {"lr": 0.1})
    run_dir = store / "runs" / "demo"
    for directory in (store, store / "runs", run_dir, run_dir / "revisions"):
        assert _mode(directory) == 0o700, directory
    assert _mode(run_dir / "latest.json") == 0o600


def test_group_option_makes_a_team_directory(tmp_path: Path) -> None:
    import grp

    gid = grp.getgrnam(TEAM_GROUP).gr_gid
    store = tmp_path / "team"
    url = f"{store.as_uri()}?group={TEAM_GROUP}"
    _run(_write, url, "demo", {"lr": 0.1})
    run_dir = store / "runs" / "demo"
    for directory in (store, store / "runs", run_dir, run_dir / "revisions"):
        assert _mode(directory) == 0o2770, directory  # setgid: what teammates create keeps the group
        assert directory.stat().st_gid == gid
    assert _mode(run_dir / "latest.json") == 0o660
    assert (run_dir / "latest.json").stat().st_gid == gid
    latest, _ = _run(_read, url, "demo")
    assert latest is not None


def test_an_unknown_group_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"group 'no-such-team' does not exist on this host; create it"):
        open_transport(f"{(tmp_path / 's').as_uri()}?group=no-such-team")


def test_a_store_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _run(_write, store.as_uri(), "demo", {"lr": 0.1})
    os.chown(store, OTHER_UID, OTHER_UID)
    with pytest.raises(TransportError) as info:
        _connect_ok(store.as_uri())
    message = str(info.value)
    assert message.startswith(f"file transport: refusing {store}: it is owned by nobody (uid {OTHER_UID})")
    assert "chown -R root" in message
    assert "?group=GROUP" in message
    # Owned by the team group, named in the URL: trusted.
    _connect_ok(f"{store.as_uri()}?group={TEAM_GROUP}")


def test_a_store_or_run_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    url = store.as_uri()
    _run(_write, url, "demo", {"lr": 0.1})
    store.chmod(0o707)
    with pytest.raises(TransportError, match=r"every user may write it \(mode 0707\).*chmod -R o-w"):
        _connect_ok(url)
    store.chmod(0o700)
    run_dir = store / "runs" / "demo"
    run_dir.chmod(0o777)
    with pytest.raises(TransportError, match=rf"refusing {run_dir}: every user may write it"):
        _run(_read, url, "demo")
    run_dir.chmod(0o700)
    latest, _ = _run(_read, url, "demo")
    assert latest is not None


def test_a_run_directory_replaced_by_another_user_is_refused(run_cli: CliRunner, tmp_path: Path) -> None:
    """The probe of the issue: another local user swapped a run's directory for one with a forged revision."""
    store = tmp_path / "store"
    url = store.as_uri()
    _run(_write, url, "demo", {"lr": 0.1})
    run_dir = store / "runs" / "demo"
    shutil.rmtree(run_dir)
    (run_dir / "revisions").mkdir(parents=True)
    forged = encode(Revision(run="demo", revision=2, config={"lr": 99.0}, author="root@vm"))
    (run_dir / "latest.json").write_bytes(forged)
    for path in (run_dir, run_dir / "revisions", run_dir / "latest.json"):
        os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(TransportError, match=rf"refusing {run_dir}: it is owned by nobody"):
        _run(_read, url, "demo")
    done = run_cli("get", "demo", "--url", url)
    assert done.returncode == 1
    assert "refusing" in done.stderr
    assert "99" not in done.stdout


def test_a_store_below_a_directory_anyone_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(TransportError, match=r"its parent .*shared is writable by every user \(mode 0777\)"):
        _connect_ok((shared / "store").as_uri())
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot rename what is not theirs
    _connect_ok((shared / "store").as_uri())


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory under /tmp that another user can reach (pytest's tmp_path is private to root)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="weavelet-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_read_only_team_store_serves_read_commands_to_another_user(
    run_cli: CliRunner, world_readable_dir: Path, isolated_env: dict[str, str]
) -> None:
    """Written by one user; a teammate (another uid in the store's group, without write permission) reads it with
    ``status``, ``get``, ``history`` and ``runs``, and a write fails saying the store is read-only."""
    store = world_readable_dir / "team"
    url = f"{store.as_uri()}?group={TEAM_GROUP}"
    _run(_write, url, "demo", {"lr": 0.1}, {"lr": 0.2})

    async def status() -> None:
        async with open_transport(url) as transport:
            await transport.publish_status(Status(run="demo", state="running", step=5))

    _run(status)
    for path in [store, *store.rglob("*")]:
        path.chmod(_mode(path) & ~0o020)  # the group may read, not write
    env = {
        **isolated_env,
        "HOME": str(world_readable_dir),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }

    def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        command = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups"]
        return subprocess.run(
            [*command, sys.executable, "-m", "weavelet_core", *args, "--url", url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=world_readable_dir,
        )

    for args, expected in (
        (("status", "demo"), "running"),
        (("get", "demo"), "0.2"),
        (("history", "demo"), "0.1"),
        (("runs",), "demo"),
    ):
        done = as_nobody(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert expected in done.stdout, (args, done.stdout)
    done = as_nobody("set", "demo", "lr=0.3")
    assert done.returncode == 1
    assert "Permission denied; the store is read-only for this user (reading still works" in done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("weavelet: note:")]
    assert len(errors) == 1, done.stderr  # one line, no traceback (a note that the run was not checked may precede)
