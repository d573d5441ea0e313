"""How the ``file://`` transport learns of changes: inotify where the filesystem raises events, polling where it
does not (network and FUSE filesystems, or ``?watch=poll``), and either way a watch that wakes on close and misses
no write made while it starts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from weavelet_core.plugins import open_transport
from weavelet_core.protocol import Outcome, Revision
from weavelet_file.transport import FileTransport
from weavelet_file.watching import (
    DirectoryWatcher,
    choose_mode,
    filesystem_type,
    inotify_unavailable,
    is_remote,
)

T = TypeVar("T")

needs_inotify = pytest.mark.skipif(inotify_unavailable() is not None, reason=f"no inotify: {inotify_unavailable()}")

SLOW_POLL = 30.0
"""A poll interval no test waits out: what arrives sooner arrived by an event."""
PROMPT = 3.0
"""How long an event-driven wake-up may take here, generously (a loaded 2-core machine)."""


def _run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return anyio.run(fn, *args, backend="asyncio")


async def _next(iterator: AsyncIterator[T], timeout: float = PROMPT) -> T:
    with anyio.fail_after(timeout):
        return await iterator.__anext__()


# -- choosing between inotify and polling -------------------------------------------------------------------

MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 22 0:31 / /srv/shared rw,relatime shared:20 - nfs4 fileserver:/export rw,vers=4.2
36 35 0:32 / /srv/shared/local\040disk rw,relatime shared:21 - xfs /dev/sdb1 rw
37 22 0:33 / /home/ann/remote rw,nosuid,nodev - fuse.sshfs ann@build:/data rw,user_id=1000
38 22 0:34 / /srv/over rw - ext4 /dev/sdc1 rw
39 22 0:35 / /srv/over rw - cifs //nas/share rw
"""


def test_the_filesystem_type_is_that_of_the_innermost_mount() -> None:
    assert filesystem_type(Path("/srv/shared/weavelet"), MOUNTINFO) == "nfs4"
    assert filesystem_type(Path("/srv/shared"), MOUNTINFO) == "nfs4"
    assert filesystem_type(Path("/srv/shared/local disk/w"), MOUNTINFO) == "xfs", "an escaped space in a mount point"
    assert filesystem_type(Path("/srv/sharedother"), MOUNTINFO) == "ext4", "a mount point is a whole path component"
    assert filesystem_type(Path("/home/ann/remote/runs"), MOUNTINFO) == "fuse.sshfs"
    assert filesystem_type(Path("/srv/over/x"), MOUNTINFO) == "cifs", "the mount made last hides the one below"
    assert filesystem_type(Path("/tmp"), "") is None


def test_network_and_fuse_filesystems_are_polled() -> None:
    for remote in ("nfs", "nfs4", "cifs", "smb3", "9p", "ceph", "lustre", "fuse", "fuse.sshfs", "fuse.s3fs"):
        assert is_remote(remote), remote
    for local in ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "fuseblk"):
        assert not is_remote(local), local


@needs_inotify
def test_a_local_store_is_watched_with_inotify(tmp_path: Path) -> None:
    local = filesystem_type(tmp_path)
    if local is not None and is_remote(local):
        pytest.skip(f"the temporary directory is on {local}")
    assert choose_mode("auto", tmp_path)[0] == "inotify"
    assert choose_mode("poll", tmp_path) == ("poll", "asked for (watch=poll)")
    assert choose_mode("inotify", tmp_path)[0] == "inotify"

    async def go() -> None:
        async with open_transport((tmp_path / "auto").as_uri()) as auto:
            assert isinstance(auto, FileTransport)
            assert auto.watch_mode == "inotify"
        async with open_transport((tmp_path / "polled").as_uri() + "?watch=poll") as polled:
            assert isinstance(polled, FileTransport)
            assert polled.watch_mode == "poll"

    _run(go)


def test_an_unknown_watch_option_is_refused_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown watch='sometimes'.*use one of auto, inotify, poll"):
        open_transport((tmp_path / "s").as_uri() + "?watch=sometimes")
    with pytest.raises(ValueError, match="use one of auto, inotify, poll"):
        choose_mode("fast", tmp_path)


_WITHOUT_INOTIFY = """
import sys

sys.modules["asyncinotify"] = None  # the library absent: importing it raises ImportError
import anyio

from weavelet_core.errors import TransportError
from weavelet_core.plugins import open_transport
from weavelet_file.watching import inotify_unavailable


async def go(url: str) -> None:
    print(inotify_unavailable())
    try:
        async with open_transport(url + "?watch=inotify"):
            print("opened")
    except TransportError as exc:
        print(exc)
    async with open_transport(url) as auto:
        print(auto.watch_mode, auto.watch_reason, sep=": ")


anyio.run(go, sys.argv[1])
"""


def test_asking_for_inotify_where_there_is_none_says_so(tmp_path: Path) -> None:
    """In a process where inotify cannot be had (its library absent), ``watch=inotify`` is refused with the reason
    and the fix, and ``auto`` polls, saying why."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_INOTIFY, (tmp_path / "s").as_uri()],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    reason, refused, auto = done.stdout.splitlines()
    if sys.platform.startswith("linux"):
        assert reason.startswith("the asyncinotify library cannot be imported"), reason
        assert "pip install asyncinotify" in reason
    assert re.fullmatch(r"file transport: watch=inotify: .+; use watch=poll or auto", refused), refused
    assert reason in refused
    assert auto == f"poll: {reason}"


# -- the inotify watcher itself -----------------------------------------------------------------------------


@needs_inotify
def test_the_directory_watcher_reports_renames_and_its_directory_going(tmp_path: Path) -> None:
    async def go() -> None:
        watched = tmp_path / "d"
        watched.mkdir()
        watcher = DirectoryWatcher()
        try:
            assert not watcher.add(tmp_path / "missing")
            assert watcher.add(watched)
            assert await watcher.wait(0.05) == []
            (tmp_path / "staged").write_text("x")
            (tmp_path / "staged").rename(watched / "latest.json")
            events = await watcher.wait(PROMPT)
            assert [(e.directory, e.name) for e in events] == [(watched, "latest.json")]
            shutil.rmtree(watched)
            gone = await watcher.wait(PROMPT)
            assert any(e.directory == watched and not e.name for e in gone), gone
            assert not watcher.watching(watched)
            watched.mkdir()
            assert watcher.add(watched), "a directory made again at the same path is watched again"
            (watched / "queued.json").write_text("x")
            watcher.reset()  # ready for another watch: nothing watched, nothing queued
            assert not watcher.watching(watched)
            (watched / "unwatched.json").write_text("x")
            assert await watcher.wait(0.05) == []
            assert watcher.add(tmp_path)
            (tmp_path / "again.json").write_text("x")
            assert {e.name for e in await watcher.wait(PROMPT)} == {"again.json"}
        finally:
            watcher.close()
            watcher.close()
        assert watcher.closed

    _run(go)


# -- watches wake on a write, on close, and miss nothing ----------------------------------------------------


@needs_inotify
def test_an_inotify_watch_sees_a_write_at_once(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()

    async def go() -> None:
        async with open_transport(url, poll_interval=SLOW_POLL) as watching, open_transport(url) as writing:
            assert isinstance(watching, FileTransport)
            assert watching.watch_mode == "inotify"
            watcher = watching.watch("w")
            try:
                async with anyio.create_task_group() as tg:

                    async def write_later() -> None:
                        await anyio.sleep(0.2)  # the run's directory does not exist yet: it is announced too
                        await writing.put(Revision(run="w", revision=1, config={"lr": 0.1}))

                    tg.start_soon(write_later)
                    assert (await _next(watcher)).revision == 1
                for number in range(2, 6):
                    await writing.put(Revision(run="w", revision=number, config={"lr": number}))
                    assert (await _next(watcher)).revision == number
            finally:
                await watcher.aclose()  # type: ignore[attr-defined]

    _run(go)


@needs_inotify
def test_an_inotify_outcome_watch_sees_the_outcome_at_once(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()

    async def go() -> None:
        async with open_transport(url, poll_interval=SLOW_POLL) as watching, open_transport(url) as writing:
            watcher = watching.watch_outcome("w", 2)
            answer = Outcome(run="w", revision=2, result="applied", step=5, at=1000.0, incarnation="i1")
            try:
                async with anyio.create_task_group() as tg:

                    async def publish_later() -> None:
                        await anyio.sleep(0.2)  # neither the run's directory nor outcomes/ exists yet
                        await writing.publish_outcome(Outcome(run="w", revision=1, result="applied", at=999.0))
                        await writing.publish_outcome(answer)

                    tg.start_soon(publish_later)
                    assert await _next(watcher) == answer
                newer = Outcome(run="w", revision=2, result="superseded", at=1001.0, incarnation="i2")
                await writing.publish_outcome(newer)
                assert await _next(watcher) == newer
            finally:
                await watcher.aclose()  # type: ignore[attr-defined]

    _run(go)


@needs_inotify
def test_a_watch_follows_a_run_deleted_and_written_again(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()

    async def go() -> None:
        async with open_transport(url, poll_interval=SLOW_POLL) as watching, open_transport(url) as writing:
            await writing.put(Revision(run="w", revision=1, config={"n": 1}))
            watcher = watching.watch("w")
            try:
                assert (await _next(watcher)).revision == 1
                await writing.delete("w")
                for number in (1, 2):
                    await writing.put(Revision(run="w", revision=number, config={"n": number, "again": True}))
                again = await _next(watcher)
                assert (again.revision, again.config) == (2, {"n": 2, "again": True})  # type: ignore[union-attr]
            finally:
                await watcher.aclose()  # type: ignore[attr-defined]

    _run(go)


@needs_inotify
def test_an_outcome_watch_follows_a_run_deleted_and_answered_again(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()

    async def go() -> None:
        async with open_transport(url, poll_interval=SLOW_POLL) as watching, open_transport(url) as writing:
            await writing.publish_outcome(Outcome(run="w", revision=2, result="applied", at=999.0))
            watcher = watching.watch_outcome("w", 1)
            answer = Outcome(run="w", revision=1, result="rejected", message="no", at=1000.0, incarnation="i2")
            try:
                async with anyio.create_task_group() as tg:

                    async def delete_then_answer() -> None:
                        await anyio.sleep(0.2)  # the watch has armed outcomes/, which the delete takes away
                        await writing.delete("w")
                        await anyio.sleep(0.2)
                        await writing.publish_outcome(answer)

                    tg.start_soon(delete_then_answer)
                    assert await _next(watcher) == answer
            finally:
                await watcher.aclose()  # type: ignore[attr-defined]

    _run(go)


@pytest.mark.parametrize("mode", [pytest.param("inotify", marks=needs_inotify), "poll"])
def test_closing_the_transport_ends_its_waiting_watches_at_once(tmp_path: Path, mode: str) -> None:
    url = (tmp_path / "store").as_uri() + f"?watch={mode}"

    async def go() -> None:
        transport = open_transport(url, poll_interval=SLOW_POLL)
        await transport.connect()
        await transport.put(Revision(run="w", revision=1, config={"n": 1}))
        revisions = transport.watch("w")
        outcomes = transport.watch_outcome("w", 1)
        assert (await _next(revisions)).revision == 1
        ended: list[str] = []

        async def drain(name: str, iterator: AsyncIterator[object]) -> None:
            async for _ in iterator:
                pass
            ended.append(name)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, "watch", revisions)
            tg.start_soon(drain, "watch_outcome", outcomes)
            await anyio.sleep(0.2)
            with anyio.fail_after(PROMPT):
                await transport.aclose()
        assert sorted(ended) == ["watch", "watch_outcome"]
        assert time.monotonic() - started < PROMPT

    _run(go)


def test_a_polled_watch_still_sees_writes(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri() + "?watch=poll&poll_interval=0.02"

    async def go() -> None:
        async with open_transport(url) as watching, open_transport(url) as writing:
            assert isinstance(watching, FileTransport)
            assert (watching.watch_mode, watching.poll_interval) == ("poll", 0.02)
            watcher = watching.watch("w")
            outcome_watcher = watching.watch_outcome("w", 1)
            try:
                await writing.put(Revision(run="w", revision=1, config={"n": 1}))
                assert (await _next(watcher)).revision == 1
                answer = Outcome(run="w", revision=1, result="applied", step=1)
                await writing.publish_outcome(answer)
                assert await _next(outcome_watcher) == answer
            finally:
                await watcher.aclose()  # type: ignore[attr-defined]
                await outcome_watcher.aclose()  # type: ignore[attr-defined]

    _run(go)
