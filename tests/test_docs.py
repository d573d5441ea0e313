"""The documentation keeps up with the code: hooks, CLI commands and options, Transport methods, fields."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import types
import uuid
from pathlib import Path

import pytest

from weavelet_core import hookspecs
from weavelet_core.cli import build_parser, plugin_commands
from weavelet_core.cli import main as cli_main
from weavelet_core.plugins import get_registry
from weavelet_core.protocol import Outcome, Revision, Status
from weavelet_core.transport import Transport

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _doc(name: str) -> str:
    return (DOCS / name).read_text()


def _hookspecs() -> list[str]:
    return [
        name
        for name, value in vars(hookspecs).items()
        if callable(value) and hasattr(value, f"{hookspecs.PROJECT_NAME}_spec")
    ]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _public_transport_methods() -> list[str]:
    return [
        name
        for name, value in vars(Transport).items()
        if not name.startswith("_") and (inspect.isfunction(value) or inspect.isasyncgenfunction(value))
    ]


def test_hookspecs_are_found() -> None:
    assert set(_hookspecs()) == {"weavelet_transports", "weavelet_optimizers", "weavelet_subcommands"}


@pytest.mark.parametrize("name", _hookspecs())
def test_every_hookspec_has_a_docstring_with_an_example(name: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert doc, f"hookspec {name} has no docstring"
    assert "Example" in doc, f"hookspec {name}'s docstring has no example"
    example = doc.split("::", 1)[1] if "::" in doc else ""
    code = "\n".join(line[4:] for line in example.splitlines() if line.startswith("    ") or not line.strip())
    assert "@hookimpl" in code, f"hookspec {name}'s example does not show a hookimpl"
    ast.parse(code)  # the example is valid Python


@pytest.mark.parametrize("name", _hookspecs())
def test_every_hook_is_documented_in_plugins_md(name: str) -> None:
    assert f"### `{name}()`" in _doc("plugins.md"), f"docs/plugins.md has no section for the {name} hook"


def test_cli_subcommands_are_found() -> None:
    assert {
        "plugins", "set", "get", "status", "history", "runs", "server", "demo", "top", "watch", "revert", "diff",
        "rm", "prune", "help", "completion", "checkpoint", "stop",
    } <= set(_subcommands())  # fmt: skip


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_cli_subcommand_is_documented(name: str) -> None:
    assert f"## `weavelet {name}`" in _doc("cli.md"), f"docs/cli.md has no section for 'weavelet {name}'"


@pytest.mark.parametrize("name", sorted(set(_subcommands()) - {c.spec.name for c in plugin_commands()}))
def test_every_cli_option_is_documented(name: str) -> None:
    text = _doc("cli.md")
    section = text.split(f"## `weavelet {name}`", 1)[1].split("\n## ", 1)[0]
    for action in _subcommands()[name]._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert option in section, f"docs/cli.md does not mention {option} under 'weavelet {name}'"


def test_transport_methods_are_found() -> None:
    assert {"put", "latest", "watch", "history", "runs", "connect", "aclose"} <= set(_public_transport_methods())


@pytest.mark.parametrize("name", _public_transport_methods())
def test_every_transport_method_is_documented(name: str) -> None:
    text = _doc("transports.md")
    assert re.search(rf"^### `{name}\(", text, re.MULTILINE), f"docs/transports.md has no section for {name}()"


@pytest.mark.parametrize("kind", [Revision, Status, Outcome], ids=lambda k: k.kind)
def test_every_protocol_field_is_documented(kind: type[Revision] | type[Status] | type[Outcome]) -> None:
    text = _doc("protocol.md")
    section = text.split(f"## {kind.__name__}", 1)[1].split("\n## ", 1)[0]
    for field in dataclasses.fields(kind):
        assert f"| `{field.name}` |" in section, f"docs/protocol.md does not describe {kind.kind}.{field.name}"


@pytest.mark.parametrize("page", ["plugins.md", "protocol.md", "transports.md"])
def test_python_examples_in_docs_are_valid_python(page: str) -> None:
    blocks = re.findall(r"```python\n(.*?)```", _doc(page), re.DOTALL)
    assert blocks, f"docs/{page} has no Python example"
    for block in blocks:
        ast.parse(block)


def test_relative_links_in_docs_resolve() -> None:
    for page in ("cli.md", "plugins.md", "protocol.md", "transports.md"):
        for target in re.findall(r"\]\(([^)#:]+)\)", _doc(page)):
            if target.startswith("../"):
                assert (DOCS / target).resolve().exists(), f"docs/{page} links to missing {target}"


def test_the_subcommand_example_in_plugins_md_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The ``weavelet_subcommands`` example, registered as a plugin, is a working ``weavelet`` command."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", _doc("plugins.md"), re.DOTALL) if "SubcommandSpec" in b)
    module = types.ModuleType("weavelet_doc_example")
    exec(compile(block, "docs/plugins.md", "exec"), module.__dict__)
    registry = get_registry()
    registry.register(module, name="weavelet-doc-example", package="weavelet-doc-example")
    try:
        url = f"memory://doc-{uuid.uuid4().hex[:8]}"
        command = re.search(r"^\$ weavelet --url memory://doc (halve-lr .*)$", _doc("plugins.md"), re.MULTILINE)
        assert command is not None
        expected = _doc("plugins.md").split(command.group(0), 1)[1].strip().splitlines()[0]
        assert cli_main(["--url", url, *command.group(1).split()]) == 0
        assert capsys.readouterr().out.strip() == expected
        assert "halve-lr" in build_parser().format_help()
    finally:
        registry.pm.unregister(module)
