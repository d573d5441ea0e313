"""The ``weavelet`` command line: value parsing, every subcommand, errors, and real OS processes."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from weavelet_core import SubcommandSpec, cli, hookimpl
from weavelet_core.cli import CliError, parse_assignments, parse_value
from weavelet_core.plugins import get_registry, open_transport
from weavelet_core.protocol import MAX_PAYLOAD_BYTES, Outcome, Status

CliRunner = Callable[..., subprocess.CompletedProcess[str]]  # the run_cli fixture of conftest.py


@pytest.fixture
def url() -> str:
    return f"memory://cli-{uuid.uuid4().hex[:8]}"


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def answer_next_write(url: str, run: str, **fields: Any) -> threading.Thread:
    """A stand-in trainer: once a revision of ``run`` is stored, publish an outcome answering it (by its id)."""

    def go() -> None:
        async def main() -> None:
            async with open_transport(url) as transport:
                with anyio.fail_after(20):
                    while (revision := await transport.latest(run)) is None:
                        await anyio.sleep(0.01)
                await transport.publish_outcome(
                    Outcome(run=run, revision=revision.revision, revision_id=revision.id, **fields)
                )

        anyio.run(main, backend="asyncio")

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def publish(url: str, *messages: Status | Outcome) -> None:
    async def go() -> None:
        async with open_transport(url) as transport:
            for message in messages:
                if isinstance(message, Status):
                    await transport.publish_status(message)
                else:
                    await transport.publish_outcome(message)

    anyio.run(go, backend="asyncio")


# -- values and keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e-3", 1e-3),
        ("3", 3),
        ("-0.5", -0.5),
        ("adam", "adam"),
        ("true", True),
        ('"true"', "true"),
        ("[0.9,0.99]", [0.9, 0.99]),
        ('{"name":"sgd","lr":0.1}', {"name": "sgd", "lr": 0.1}),
        ("", None),
        ("null", None),
        ('"null"', "null"),
        ("NaN", "NaN"),
        ("hello world", "hello world"),
        ("[1,", "[1,"),
    ],
)
def test_values_parse_as_json_when_they_can(text: str, expected: Any) -> None:
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_dotted_keys_nest_and_empty_values_remove() -> None:
    changes = parse_assignments(["optimizer.name=adam", "optimizer.betas=[0.9,0.99]", "lr=1e-3", "wd="])
    assert changes == {"optimizer": {"name": "adam", "betas": [0.9, 0.99]}, "lr": 1e-3, "wd": None}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["lr"], "expected KEY=VALUE, got 'lr'"),
        (["=3"], "invalid key ''"),
        (["a..b=1"], "invalid key 'a..b'"),
        (["a.=1"], "invalid key 'a.'"),
        (["lr=1", "lr=2"], "'lr=2' conflicts with 'lr=1'"),
        (["a=1", "a.b=2"], "'a.b=2' conflicts with 'a=1'"),
        (["a.b=2", "a=1"], "'a=1' conflicts with 'a.b=2'"),
    ],
)
def test_bad_assignments_are_refused_with_the_reason(items: list[str], message: str) -> None:
    with pytest.raises(CliError) as info:
        parse_assignments(items)
    assert message in str(info.value)


# -- subcommands, in process -------------------------------------------------------------------------------


def test_set_get_merge_and_remove(capsys: pytest.CaptureFixture[str], url: str) -> None:
    assert invoke(capsys, "--url", url, "set", "r1", "lr=0.1", "optimizer.name=sgd")[0] == 0
    code, out, _ = invoke(capsys, "set", "r1", "--url", url, "optimizer.momentum=0.9", "lr=0.01")
    assert code == 0
    assert out == "r1: revision 2 stored (lr: 0.1->0.01 optimizer.momentum=0.9)\n"
    code, out, _ = invoke(capsys, "--url", url, "get", "r1", "--json")
    body = json.loads(out)
    assert body["revision"] == 2
    assert body["config"] == {"lr": 0.01, "optimizer": {"name": "sgd", "momentum": 0.9}}
    assert body["v"] == 2
    assert body["kind"] == "revision"
    # Removing a key that does not exist changes nothing and adds no empty object.
    invoke(capsys, "--url", url, "set", "r1", "optimizer.momentum=", "scheduler.gamma=")
    code, out, _ = invoke(capsys, "--url", url, "get", "r1", "--json")
    assert json.loads(out)["config"] == {"lr": 0.01, "optimizer": {"name": "sgd"}}
    invoke(capsys, "--url", url, "set", "r1", "optimizer=null")
    code, out, _ = invoke(capsys, "--url", url, "get", "r1")
    assert code == 0
    assert out.startswith("run r1  revision 4  by ")
    assert json.loads(out.split("\n", 1)[1]) == {"lr": 0.01}


def test_set_replace_drops_other_keys(capsys: pytest.CaptureFixture[str], url: str) -> None:
    invoke(capsys, "--url", url, "set", "r", "lr=0.1", "wd=0.01")
    code, out, _ = invoke(capsys, "--url", url, "set", "r", "--replace", "--json", "lr=0.2")
    assert code == 0
    body = json.loads(out)
    assert body["revision"]["config"] == {"lr": 0.2}
    assert body["outcome"] is None


def test_set_wait_reports_applied_outcome_with_its_message(capsys: pytest.CaptureFixture[str], url: str) -> None:
    answer_next_write(url, "w", result="applied", step=120, message="lr 0.01 -> 0.1")
    code, out, err = invoke(capsys, "--url", url, "set", "w", "lr=0.1", "--wait", "10")
    assert code == 0, err
    assert out.splitlines() == ["w: revision 1 stored (lr=0.1)", "w: revision 1 applied at step 120: lr 0.01 -> 0.1"]


def test_set_wait_ignores_an_outcome_of_another_write_with_the_same_number(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    # An outcome left for revision 1 by an earlier write (a store whose numbering restarted) is not the answer.
    publish(url, Outcome(run="w", revision=1, revision_id="an-older-write", result="applied", step=184))
    code, _, err = invoke(capsys, "--url", url, "set", "w", "lr=0.05", "--wait", "0.5")
    assert code == 3
    assert "no outcome for revision 1" in err


def test_set_wait_rejected_exits_1_with_the_reason(capsys: pytest.CaptureFixture[str], url: str) -> None:
    answer_next_write(url, "w", result="rejected", message="unknown optimizer 'adamx'")
    code, out, err = invoke(capsys, "--url", url, "set", "w", "optimizer=adamx", "--wait", "10", "--json")
    assert code == 1
    assert json.loads(out)["outcome"]["result"] == "rejected"
    assert err == ""  # said once, on stdout (in the JSON here), not repeated on stderr
    code, out, err = invoke(capsys, "--url", url, "set", "w", "optimizer=adamy", "--wait", "0.3")
    assert code == 3  # the stand-in trainer answered once only


def test_set_wait_timeout_exits_3_and_keeps_the_revision(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, err = invoke(capsys, "--url", url, "set", "w", "lr=0.1", "--wait", "0.2")
    assert code == 3
    assert "no outcome for revision 1 of run 'w' within 0.2s" in err
    assert "no trainer has reported for this run yet" in err
    assert out == "w: revision 1 stored (lr=0.1)\n"  # the timeout is said once, on stderr
    code, out, _ = invoke(capsys, "--url", url, "get", "w", "--json")
    assert json.loads(out)["config"] == {"lr": 0.1}


def test_status_shows_heartbeat_age_and_flags_stale(capsys: pytest.CaptureFixture[str], url: str) -> None:
    invoke(capsys, "--url", url, "set", "s", "lr=0.1")
    invoke(capsys, "--url", url, "set", "s", "lr=0.2")
    old = time.time() - 125
    publish(
        url,
        Status(
            run="s",
            state="running",
            step=40,
            epoch=2,
            applied_revision=1,
            optimizer={"name": "sgd", "lr": 0.1},
            metrics={"loss": 0.25},
            heartbeat=old,
        ),
    )
    code, out, _ = invoke(capsys, "--url", url, "status", "s")
    assert code == 0
    assert re.search(r"^state       running  STALE: no heartbeat for 2m\d\ds$", out, re.MULTILINE), out
    assert "applied     revision 1\n" in out
    assert "desired     revision 2, not applied yet" in out
    assert "metrics     loss=0.25" in out
    code, out, _ = invoke(capsys, "--url", url, "status", "s", "--json", "--stale-after", "300")
    body = json.loads(out)
    assert body["stale"] is False
    assert 124 < body["heartbeat_age"] < 200
    assert body["desired_revision"] == 2
    assert body["step"] == 40


def test_status_of_a_stopped_run_is_not_stale(capsys: pytest.CaptureFixture[str], url: str) -> None:
    publish(url, Status(run="s", state="stopped", heartbeat=time.time() - 3600))
    code, out, _ = invoke(capsys, "--url", url, "status", "s", "--json")
    assert code == 0
    assert json.loads(out)["stale"] is False


def test_status_without_report_says_what_to_check(capsys: pytest.CaptureFixture[str], url: str) -> None:
    invoke(capsys, "--url", url, "set", "s", "lr=0.1")
    code, out, err = invoke(capsys, "--url", url, "status", "s")
    assert (code, out) == (1, "")
    assert err.startswith("weavelet: error: run 's' has not reported a status (its desired config is at revision 1)")
    assert "Traceback" not in err


def test_history_shows_revisions_beside_outcomes(capsys: pytest.CaptureFixture[str], url: str) -> None:
    for item in ("lr=0.1", "optimizer=adamx", "lr=0.05"):
        invoke(capsys, "--url", url, "set", "h", item)
    publish(
        url,
        Outcome(run="h", revision=1, result="applied", step=0),
        Outcome(run="h", revision=2, result="rejected", message="unknown optimizer 'adamx'"),
    )
    code, out, _ = invoke(capsys, "--url", url, "history", "h")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["REV", "WRITTEN", "AUTHOR", "INCARNATION", "OUTCOME", "CHANGES"]
    assert "applied at step 0" in lines[1]
    assert lines[1].endswith("lr=0.1")
    assert "rejected: unknown optimizer 'adamx'" in lines[2]
    assert lines[2].endswith('optimizer="adamx"')
    assert "pending" in lines[3]
    assert lines[3].endswith("lr: 0.1->0.05")
    code, out, _ = invoke(capsys, "--url", url, "history", "h", "--json", "--limit", "2")
    rows = json.loads(out)
    assert [r["revision"]["revision"] for r in rows] == [2, 3]
    assert rows[0]["outcome"]["result"] == "rejected"
    assert rows[1]["outcome"] is None


def test_runs_lists_runs_with_their_state(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, _ = invoke(capsys, "--url", url, "runs")
    assert (code, out) == (0, f"no runs at {url}\n")
    invoke(capsys, "--url", url, "set", "b", "lr=0.1")
    publish(url, Status(run="a", state="running", applied_revision=0))
    code, out, _ = invoke(capsys, "--url", url, "runs", "--json")
    rows = json.loads(out)
    assert [(r["run"], r["revision"], r["state"], r["stale"]) for r in rows] == [
        ("a", None, "running", False),
        ("b", 1, None, None),
    ]
    code, out, _ = invoke(capsys, "--url", url, "runs")
    assert out.splitlines()[0].split() == ["RUN", "REVISION", "APPLIED", "STATE", "HEARTBEAT"]


def test_plugins_lists_builtin_transports(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(capsys, "plugins", "--json")
    assert code == 0
    body = json.loads(out)
    by_name = {t["name"]: t for t in body["transports"]}
    assert by_name["memory"]["schemes"] == ["memory"]
    assert by_name["file"]["package"] == "weavelet"
    assert by_name["file"]["driver_installed"] is True
    code, out, _ = invoke(capsys, "plugins")
    assert any(line.split()[:3] == ["file", "file://", "weavelet"] for line in out.splitlines())


# -- errors: one line on stderr, no traceback, nothing stored lost -----------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["get", "nothing-here"], "run 'nothing-here' has no revisions yet; write one with: weavelet set"),
        (["history", "nothing-here"], "run 'nothing-here' has no revisions yet"),
        (["get", "../etc"], "invalid run id '../etc'"),
        (["set", "a/b", "x=1"], "invalid run id 'a/b'"),
        (["set", "a b", "x=1"], "invalid run id 'a b'"),
        (["set", "r", "x=1e999"], "revision.config.x: inf is not valid JSON"),
    ],
)
def test_errors_are_one_clear_line(capsys: pytest.CaptureFixture[str], url: str, args: list[str], message: str) -> None:
    code, out, err = invoke(capsys, "--url", url, *args)
    assert code == 1
    assert out == ""
    assert err.startswith("weavelet: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_unknown_scheme_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = invoke(capsys, "--url", "memroy://x", "runs")
    assert code == 1
    assert "unknown transport URL scheme 'memroy'" in err
    assert "did you mean 'memory'?" in err
    assert "file, memory" in err


def test_oversized_value_is_refused_and_the_stored_revision_kept(capsys: pytest.CaptureFixture[str], url: str) -> None:
    invoke(capsys, "--url", url, "set", "big", "lr=0.1")
    code, _, err = invoke(capsys, "--url", url, "set", "big", "notes=" + "x" * MAX_PAYLOAD_BYTES)
    assert code == 1
    assert f"exceeds the {MAX_PAYLOAD_BYTES}-byte cap" in err
    code, out, _ = invoke(capsys, "--url", url, "get", "big", "--json")
    assert json.loads(out)["revision"] == 1
    assert json.loads(out)["config"] == {"lr": 0.1}


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = invoke(capsys, "set", "r")
    assert code == 2
    assert "the following arguments are required: KEY=VALUE" in err
    code, _, err = invoke(capsys, "set", "r", "x=1", "--wait", "-1")
    assert code == 2
    assert "expected a positive number of seconds" in err


# -- subcommands provided by plugins (the weavelet_subcommands hook) ----------------------------------------


def test_plugin_subcommand_without_its_driver_names_the_extra(
    capsys: pytest.CaptureFixture[str], add_plugin: Callable[[object], None]
) -> None:
    add_plugin(
        _subcommands(
            SubcommandSpec("fake-server", "start a server", _fail, requires=("weavelet_no_such_mod",), extra="nats")
        )
    )
    code, _, err = invoke(capsys, "fake-server", "--port", "4222")
    assert code == 1
    assert err == (
        "weavelet: error: 'weavelet fake-server' needs the nats extra, which is not installed; "
        'install it with: pip install "weavelet[nats]"\n'
    )


def test_plugin_subcommand_parser_is_set_up_only_when_chosen(
    capsys: pytest.CaptureFixture[str], add_plugin: Callable[[object], None], url: str
) -> None:
    configured: list[str] = []

    def configure(parser: Any) -> None:
        configured.append("yes")
        parser.add_argument("--epochs", type=int, default=1)

    def train(args: Any) -> int:
        print(f"training for {args.epochs} epochs")
        return 7

    add_plugin(_subcommands(SubcommandSpec("fake-demo", "train a demo", train, configure_parser=configure)))
    invoke(capsys, "--url", url, "runs")
    assert configured == []
    code, out, _ = invoke(capsys, "fake-demo", "--epochs", "3")
    assert (code, out) == (7, "training for 3 epochs\n")
    assert configured == ["yes"]


def test_a_plugin_command_may_not_shadow_a_builtin(
    capsys: pytest.CaptureFixture[str], add_plugin: Callable[[object], None], url: str
) -> None:
    add_plugin(_subcommands(SubcommandSpec("runs", "not the real runs", _fail)))
    code, out, _ = invoke(capsys, "--url", url, "runs")
    assert code == 0
    assert out.startswith("no runs at")


def _fail(args: Any) -> int:
    raise AssertionError("must not run")


def _subcommands(*specs: SubcommandSpec) -> object:
    class Plugin:
        @hookimpl
        def weavelet_subcommands(self) -> list[SubcommandSpec]:
            return list(specs)

    return Plugin()


@pytest.fixture
def add_plugin() -> Iterator[Callable[[object], None]]:
    registry = get_registry()
    added: list[object] = []

    def add(plugin: object) -> None:
        registry.register(plugin, package="weavelet-test-plugin")
        added.append(plugin)

    yield add
    for plugin in added:
        registry.pm.unregister(plugin)


# -- real processes ----------------------------------------------------------------------------------------


def _console_script() -> str:
    found = shutil.which("weavelet", path=sysconfig.get_path("scripts")) or shutil.which("weavelet")
    assert found, "the weavelet console script is not installed; run: pip install -e ."
    return found


def test_two_terminals_with_no_configuration(isolated_env: dict[str, str], tmp_path: Path) -> None:
    """`weavelet set` in one terminal and `weavelet get` in another find each other with no configuration."""
    script = _console_script()

    def weavelet(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [script, *args], env=isolated_env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return done

    assert weavelet("set", "demo", "lr=0.01").stdout == "demo: revision 1 stored (lr=0.01)\n"
    first = json.loads(weavelet("get", "demo", "--json").stdout)
    assert (first["revision"], first["config"]) == (1, {"lr": 0.01})
    weavelet("set", "demo", "optimizer=adam")
    second = json.loads(weavelet("get", "demo", "--json").stdout)
    assert (second["revision"], second["config"]) == (2, {"lr": 0.01, "optimizer": "adam"})
    history = json.loads(weavelet("history", "demo", "--json").stdout)
    assert [(h["revision"]["revision"], h["revision"]["config"]) for h in history] == [
        (1, {"lr": 0.01}),
        (2, {"lr": 0.01, "optimizer": "adam"}),
    ]
    text = weavelet("history", "demo").stdout.splitlines()
    assert len(text) == 3
    assert text[2].endswith('optimizer="adam"')
    # The default store is the per-user state directory.
    assert (tmp_path / "xdg-state" / "weavelet" / "runs" / "demo" / "latest.json").is_file()
    assert json.loads(weavelet("runs", "--json").stdout)[0]["run"] == "demo"


def test_ctrl_c_exits_130_without_traceback(isolated_env: dict[str, str]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "weavelet_core", "set", "demo", "lr=0.1", "--wait", "60"],
        env=isolated_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "demo: revision 1 stored (lr=0.1)\n"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert err.endswith("weavelet: error: interrupted\n")
    assert "Traceback" not in err


def test_unexpected_errors_print_one_line(run_cli: CliRunner, tmp_path: Path) -> None:
    done = run_cli("--url", "file://otherhost/srv/weavelet", "runs")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "names host 'otherhost'; write an absolute local path as file:///path/to/dir" in done.stderr
    assert done.stderr.count("weavelet: error:") == 1


def test_weavelet_url_environment_variable_is_used(run_cli: CliRunner, tmp_path: Path) -> None:
    store = tmp_path / "elsewhere"
    done = run_cli("set", "r", "lr=0.1", env_extra={"WEAVELET_URL": store.as_uri()})
    assert done.returncode == 0, done.stderr
    assert (store / "runs" / "r" / "latest.json").is_file()
    assert not (tmp_path / "xdg-state" / "weavelet").exists()


def test_checkpoint_and_stop_send_a_fresh_token_for_the_live_incarnation(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    code, _, err = invoke(capsys, "--url", url, "stop", "cmd")
    assert code == 1
    assert "run 'cmd' has no trainer reporting; a stop command would act in no incarnation" in err
    publish(url, Status(run="cmd", state="running", incarnation="abc123"))
    tokens = []
    for _ in range(2):
        code, out, _ = invoke(capsys, "--url", url, "checkpoint", "cmd", "--json")
        assert code == 0
        tokens.append(json.loads(out)["revision"]["config"]["checkpoint"])
    assert tokens[0] != tokens[1]
    assert all(t["incarnation"] == "abc123" and isinstance(t["token"], str) and t["token"] for t in tokens)
    code, out, _ = invoke(capsys, "--url", url, "stop", "cmd")
    assert code == 0
    assert out.startswith('cmd: revision 3 stored (stop.incarnation="abc123" stop.token=')
    code, out, _ = invoke(capsys, "--url", url, "get", "cmd", "--json")
    config = json.loads(out)["config"]
    assert set(config) == {"checkpoint", "stop"}
    assert config["checkpoint"] == tokens[1]
    publish(url, Status(run="cmd", state="stopped", incarnation="abc123", heartbeat=time.time() - 60))
    code, _, err = invoke(capsys, "--url", url, "checkpoint", "cmd")
    assert code == 1
    assert "run 'cmd' has no live incarnation (incarnation abc123 ended stopped at step 0" in err
    assert "A trainer started later does not act on commands written before it" in err
