"""The operator's console through the installed ``weavelet`` script: conventions, undo, selectors, housekeeping."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.cli.conftest import Trainer, Weavelet, blocker_env, console_script, wait_for_status
from weavelet_core import Outcome, Weaver

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


# -- conventions -------------------------------------------------------------------------------------------


def test_version_bare_help_and_help_command(weavelet: Weavelet) -> None:
    version = weavelet("--version")
    assert version.returncode == 0
    assert re.fullmatch(r"weavelet \d+\.\d+\.\d+\S*\n", version.stdout)
    bare = weavelet()
    assert bare.returncode == 0
    assert bare.stdout.startswith("usage: weavelet")
    for command in ("top", "watch", "revert", "diff", "rm", "prune", "server", "demo"):
        assert command in bare.stdout
    helped = weavelet("help", "set")
    assert helped.returncode == 0
    assert "examples:" in helped.stdout
    assert "weavelet set -l sweep=3" in helped.stdout
    assert weavelet("help", "nope").returncode == 1


@pytest.mark.parametrize("command", ["set", "stop", "checkpoint", "revert", "status", "history", "runs", "diff",
                                     "watch", "rm", "prune", "top", "get", "plugins", "completion"])  # fmt: skip
def test_every_command_help_has_examples(weavelet: Weavelet, command: str) -> None:
    done = weavelet(command, "-h")
    assert done.returncode == 0
    assert re.search(r"^(examples|install):", done.stdout, re.MULTILINE), done.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_come_from_shtab(weavelet: Weavelet, shell: str) -> None:
    done = weavelet("completion", shell)
    assert done.returncode == 0, done.stderr
    assert "shtab" in done.stdout
    for word in ("revert", "prune", "dry-run"):
        assert word in done.stdout


def test_json_errors_are_one_json_object(weavelet: Weavelet) -> None:
    done = weavelet("get", "nothing", "--json")
    assert done.returncode == 1
    assert done.stderr == ""
    error = json.loads(done.stdout)["error"]
    assert error["exit_status"] == 1
    assert "has no revisions yet" in error["message"]
    usage = weavelet("set", "r", "--json", "--wait", "-3", "x=1")
    assert usage.returncode == 2
    assert json.loads(usage.stdout)["error"]["type"] == "UsageError"


def test_times_are_iso_8601_with_the_zone(weavelet: Weavelet) -> None:
    weavelet("set", "t", "lr=0.1")
    assert re.search(rf"at {ISO}$", weavelet("get", "t").stdout.splitlines()[0])
    assert re.search(rf"^1\s+{ISO}\s", weavelet("history", "t").stdout.splitlines()[1])


def test_an_unusable_file_url_says_what_to_do(weavelet: Weavelet) -> None:
    done = weavelet("--url", "file:///proc/nope", "runs")
    assert done.returncode == 1
    assert "cannot create /proc/nope" in done.stderr
    assert "choose another directory with --url file:///path or WEAVELET_URL" in done.stderr


# -- what the trial found ----------------------------------------------------------------------------------


def test_an_unchanged_value_writes_nothing(weavelet: Weavelet, store: str) -> None:
    weavelet("set", "u", "lr=0.1")
    again = weavelet("set", "u", "lr=0.1")
    assert again.returncode == 0
    assert again.stdout == "u: no change: revision 1 already has this config; nothing written\n"
    with Weaver(store) as weaver:
        assert [e.revision for e in weaver.history("u")] == [1]


def test_a_dotted_key_into_a_string_is_refused(weavelet: Weavelet, store: str) -> None:
    weavelet("set", "o", "optimizer=adam")
    done = weavelet("set", "o", "optimizer.lr=0.1")
    assert done.returncode == 1
    assert 'optimizer.lr=... would replace optimizer="adam" (not an object) and lose it' in done.stderr
    with Weaver(store) as weaver:
        current = weaver.get("o")
        assert current is not None
        assert current.config == {"optimizer": "adam"}


def _answer(store: str, run: str, **fields: object) -> threading.Thread:
    """A stand-in trainer: answer the next revision written to ``run`` (after the current one)."""
    with Weaver(store) as weaver:
        current = weaver.get(run)
    start = current.revision if current else 0

    def go() -> None:
        with Weaver(store) as weaver:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                revision = weaver.get(run)
                if revision is not None and revision.revision > start:
                    weaver._portal.call(
                        weaver._async.transport.publish_outcome,
                        Outcome(run=run, revision=revision.revision, revision_id=revision.id, **fields),  # type: ignore[arg-type]
                    )
                    return
                time.sleep(0.02)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_wait_prints_the_outcome_message_and_detail(weavelet: Weavelet, store: str) -> None:
    _answer(
        store, "c", result="applied", step=921, message="checkpoint saved to /ckpt/c-weavelet-r1-step921.pt",
        detail={"checkpoint": "/ckpt/c-weavelet-r1-step921.pt", "optimizer": {"name": "sgd", "lr": 0.1}},
    )  # fmt: skip
    done = weavelet("set", "c", "lr=0.1", "--wait", "inf")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "c: revision 1 stored (lr=0.1)",
        "c: revision 1 applied at step 921: checkpoint saved to /ckpt/c-weavelet-r1-step921.pt",
        "c:   checkpoint: /ckpt/c-weavelet-r1-step921.pt",
        'c:   optimizer: {"name":"sgd","lr":0.1}',
    ]


def test_a_rejection_is_said_once(weavelet: Weavelet, store: str) -> None:
    _answer(store, "r", result="rejected", message="unknown optimizer 'adamx'; known: adam, sgd")
    done = weavelet("set", "r", "optimizer=adamx", "--wait", "20")
    assert done.returncode == 1
    assert done.stdout.count("unknown optimizer 'adamx'") == 1
    assert done.stderr == ""


def test_wait_on_a_stopped_run_fails_at_once(weavelet: Weavelet, trainer: Trainer) -> None:
    process = trainer("ended")
    process.stop(timeout=5)
    started = time.monotonic()
    done = weavelet("set", "ended", "lr=0.5", "--wait", "60")
    assert done.returncode == 1
    assert time.monotonic() - started < 10
    assert "has no live incarnation" in done.stdout + done.stderr


def test_history_limit_shows_changes_and_long_messages_are_cut(weavelet: Weavelet, store: str) -> None:
    for lr in (0.1, 0.2, 0.3):
        weavelet("set", "h", f"lr={lr}")
    _answer(store, "h", result="rejected", message="x" * 400)
    weavelet("set", "h", "wd=0.1", "--wait", "20")
    rows = weavelet("history", "h", "--limit", "2").stdout.splitlines()
    assert rows[1].endswith("lr: 0.2->0.3"), rows
    assert max(len(r) for r in rows) < 200
    assert "…" in rows[2]
    wide = weavelet("history", "h", "-o", "wide").stdout
    assert "x" * 400 in wide


# -- undo --------------------------------------------------------------------------------------------------


def test_revert_writes_the_old_config_recorded_as_a_revert_and_diff_shows_it(weavelet: Weavelet, store: str) -> None:
    weavelet("set", "v", "lr=0.1", "optimizer=sgd")
    weavelet("set", "v", "lr=0.05", "optimizer=adam")
    done = weavelet("revert", "v", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'v: revision 3 stored, a revert of revision 1 (lr: 0.05->0.1 optimizer: "adam"->"sgd")\n'
    with Weaver(store) as weaver:
        assert weaver.get("v").config == {"lr": 0.1, "optimizer": "sgd"}  # type: ignore[union-attr]
    history = weavelet("history", "v").stdout.splitlines()
    assert "revert of r1: lr: 0.05->0.1" in history[3]
    assert json.loads(weavelet("history", "v", "--json").stdout)[2]["reverts"] == 1
    diff = weavelet("diff", "v", "1", "2")
    assert diff.stdout.splitlines()[2:] == ["~ lr: 0.1 -> 0.05", '~ optimizer: "sgd" -> "adam"']
    assert "same config" in weavelet("diff", "v", "1").stdout
    missing = weavelet("revert", "v", "9")
    assert missing.returncode == 1
    assert "has no revision 9" in missing.stderr


# -- many runs at once -------------------------------------------------------------------------------------


def test_selectors_choose_by_glob_label_and_all(weavelet: Weavelet, trainer: Trainer, store: str) -> None:
    trainer("sweep-3-a", labels={"sweep": "3"})
    trainer("sweep-3-b", labels={"sweep": "3"})
    trainer("other", labels={"sweep": "4"})
    dry = weavelet("set", "-l", "sweep=3", "lr=0.01", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert [line.split(":")[0] for line in dry.stdout.splitlines()] == ["sweep-3-a", "sweep-3-b"]
    assert all("would write" in line for line in dry.stdout.splitlines())
    done = weavelet("set", "sweep-3-*", "lr=0.01")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2
    stop = weavelet("stop", "-l", "sweep=3")
    assert stop.returncode == 0, stop.stderr
    with Weaver(store) as weaver:
        assert "stop" in weaver.get("sweep-3-a").config  # type: ignore[union-attr]
        assert weaver.get("other") is None  # not chosen: nothing written
    status = weavelet("status", "--all", "-o", "wide")
    assert "sweep=3" in status.stdout
    assert "sweep=4" in status.stdout
    assert len(status.stdout.splitlines()) == 4


def test_one_failed_run_makes_the_exit_status_non_zero(weavelet: Weavelet) -> None:
    weavelet("set", "m-1", "optimizer=adam")
    weavelet("set", "m-2", "lr=0.1")
    done = weavelet("set", "m-*", "optimizer.lr=0.2")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("m-1: error: optimizer.lr=... would replace")
    assert lines[1].startswith("m-2: revision 2 stored")
    assert weavelet("set", "nothing-*", "lr=1").returncode == 1


# -- housekeeping ------------------------------------------------------------------------------------------


def test_rm_refuses_live_runs_and_prune_removes_old_ones(weavelet: Weavelet, trainer: Trainer, store: str) -> None:
    trainer("live")
    weavelet("set", "old", "lr=0.1")
    refused = weavelet("rm", "live")
    assert refused.returncode == 1
    assert "is live" in refused.stdout
    assert "--force" in refused.stdout
    assert weavelet("rm", "old").stdout == "old: removed\n"
    assert weavelet("runs", "-q").stdout == "live\n"
    assert weavelet("rm", "live", "--force").returncode == 0
    weavelet("set", "quiet", "lr=0.1")
    time.sleep(1.2)
    assert weavelet("prune", "--older-than", "1s", "--dry-run").stdout == "quiet: would prune\n"
    assert weavelet("prune", "--older-than", "1s").stdout == "quiet: pruned\n"
    assert weavelet("runs", "-q").stdout in ("", "live\n")  # the forced-away trainer may still report


def test_after_rm_force_of_a_live_run_writes_its_trainer_would_ignore_are_refused(
    weavelet: Weavelet, trainer: Trainer, store: str
) -> None:
    process = trainer("forced")
    assert weavelet("set", "forced", "lr=0.2").returncode == 0
    deadline = time.monotonic() + 20
    while (taken := process.poll()) is None:
        assert time.monotonic() < deadline, "the trainer never took revision 1"
        time.sleep(0.02)
    process.report_outcome(taken.revision, "applied", step=7)
    wait_for_status(store, "forced", lambda s: s.applied_revision == 1)

    removed = weavelet("rm", "forced", "--force")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("forced: removed\nforced: note: its live trainer trains on without remote control")
    wait_for_status(store, "forced", lambda s: s.live and s.applied_revision == 1)  # its next keepalive

    # Revision 1 again, which the trainer takes for the old one: refused, saying why and what to do instead.
    for command in (("set", "forced", "lr=0.3", "--wait", "5"), ("stop", "forced"), ("checkpoint", "forced")):
        refused = weavelet(*command)
        assert refused.returncode == 1, (command, refused.stdout, refused.stderr)
        assert "not written: the live trainer of run 'forced'" in refused.stderr
        assert "ignores new ones up to that number: this one would be 1" in refused.stderr
        assert f"kill -TERM {os.getpid()}" in refused.stderr  # the trainer: this test process
    assert "has no revisions" in weavelet("get", "forced").stderr  # nothing was written

    process.stop(timeout=5)  # a restart reads the store again: writes reach it
    trainer("forced")
    assert weavelet("set", "forced", "lr=0.3").returncode == 0


def test_runs_filters_by_state_and_quiet_prints_ids(weavelet: Weavelet, trainer: Trainer) -> None:
    trainer("running-one")
    weavelet("set", "no-status", "lr=0.1")
    assert weavelet("runs", "--state", "running", "-q").stdout == "running-one\n"
    assert weavelet("runs", "--state", "none", "-q").stdout == "no-status\n"
    wide = weavelet("runs", "-o", "wide").stdout
    assert "INCARNATION" in wide.splitlines()[0]


# -- live views --------------------------------------------------------------------------------------------


def test_watch_streams_status_revisions_and_outcomes_until_the_run_ends(
    cli_env: dict[str, str], trainer: Trainer, store: str
) -> None:
    process = trainer("w")
    watcher = subprocess.Popen(
        [console_script(), "watch", "w"], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1.0)
        with Weaver(store) as weaver:
            revision = weaver.set("w", {"lr": 0.2})
        deadline = time.monotonic() + 20
        while (got := process.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got is not None
        process.report_outcome(got.revision, "applied", step=7, message="lr 0.1 -> 0.2")
        process.report(step=7, force=True)
        time.sleep(1.0)
        process.stop(timeout=5)
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    lines = out.splitlines()

    def line_of(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert len(found) == 1, f"{pattern!r} printed {len(found)} times:\n{out}"
        return found[0]

    # One line per state, revision and outcome change, in the order they happened; a new step alone prints nothing
    # (the applied revision's line says where it took effect).
    started = line_of(rf"^{ISO}  w: running step 5 epoch 0 applied r0 loss=0.5 \(incarnation \w+\)$")
    written = line_of(rf"^{ISO}  w: revision {revision.revision} written by .+: lr=0.2$")
    applied = line_of(rf"^{ISO}  w: revision {revision.revision} applied at step 7: lr 0.1 -> 0.2")
    stopped = line_of(r"w: stopped step 7 ")
    assert started == 0
    assert started < written < applied < stopped
    assert not re.search(r"w: running step 7", out)


def test_history_follow_prints_new_revisions_and_outcomes(cli_env: dict[str, str], store: str) -> None:
    with Weaver(store) as weaver:
        weaver.set("f", {"lr": 0.1})
    follower = subprocess.Popen(
        [console_script(), "history", "f", "--follow"], env=cli_env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline().startswith("REV")
        follower.stdout.readline()
        with Weaver(store) as weaver:
            second = weaver.set("f", {"lr": 0.2})
            weaver._portal.call(
                weaver._async.transport.publish_outcome,
                Outcome(run="f", revision=2, revision_id=second.id, result="applied", step=3, message="lr 0.1 -> 0.2"),
            )
        lines = [follower.stdout.readline(), follower.stdout.readline()]
    finally:
        follower.kill()
        follower.wait()
    assert "f: revision 2 written by" in lines[0]
    assert "lr: 0.1->0.2" in lines[0]
    assert "f: revision 2 applied at step 3: lr 0.1 -> 0.2" in lines[1]


def test_top_once_prints_the_table(weavelet: Weavelet, trainer: Trainer) -> None:
    trainer("top-a", step=12, loss=0.25)
    done = weavelet("top", "--once")
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["RUN", "STATE", "AGE", "STEP", "LOSS", "TREND", "LR", "OPTIMIZER", "HEARTBEAT", "LAST",
                              "OUTCOME"]  # fmt: skip
    assert row.split()[:5] == ["top-a", "running", row.split()[2], "12", "0.25"]
    assert "sgd" in row


def test_top_without_textual_says_what_to_install(weavelet: Weavelet, tmp_path: Path) -> None:
    done = weavelet("top", env=blocker_env(tmp_path, "textual"))
    assert done.returncode == 1
    assert 'pip install "weavelet[tui]"' in done.stderr
    assert weavelet("top", "--once", env=blocker_env(tmp_path, "textual")).returncode == 0


def test_wait_into_a_reader_that_goes_away_is_no_error(store: str, cli_env: dict[str, str]) -> None:
    """``weavelet set RUN ... --wait S | head -1``: the reader leaves after the first line, the outcome lines that
    follow meet a closed pipe inside the wait's task group, and the command still ends quietly with 0."""
    _answer(store, "p", result="applied", step=7, message="applied lr", detail={"optimizer": {"name": "sgd"}})
    process = subprocess.Popen(
        [console_script(), "set", "p", "lr=0.1", "--wait", "30"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.readline() == "p: revision 1 stored (lr=0.1)\n"
    process.stdout.close()  # like head -1
    _, error = process.communicate(timeout=60)
    assert process.returncode == 0, error
    assert error == ""
