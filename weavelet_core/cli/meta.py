"""Commands about weavelet itself: ``plugins``, ``help``, ``completion``; and ``--version``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

from weavelet_core.cli import output
from weavelet_core.cli.common import EXIT_OK, CliError, add_output, wants_json
from weavelet_core.plugins import get_registry

SHELLS = ("bash", "zsh", "fish")


def version() -> str:
    """``weavelet X.Y.Z`` (the installed distribution's version)."""
    try:
        number = importlib.metadata.version("weavelet")
    except importlib.metadata.PackageNotFoundError:
        number = "unknown (not installed)"
    return f"weavelet {number}"


def cmd_plugins(args: argparse.Namespace, out: TextIO) -> int:
    from weavelet_core.cli.app import BUILTIN_COMMANDS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # broken plugins are listed below instead
        registry = get_registry()
        transports = registry.transports()
        conflicts = {
            scheme: [f"{t.spec.name} ({t.package})" for t in claimants]
            for scheme, claimants in registry.claims().items()
            if len(claimants) > 1
        }
        commands = registry.subcommands(BUILTIN_COMMANDS)
    rows: list[dict[str, Any]] = []
    for loaded in transports:
        missing = loaded.spec.missing_modules()
        rows.append(
            {
                "name": loaded.spec.name,
                "schemes": list(loaded.spec.schemes),
                "package": loaded.package,
                "description": loaded.spec.description,
                "driver_installed": not missing,
                "missing_modules": missing,
                "install": loaded.spec.install_command() if missing else None,
            }
        )
    command_rows: list[dict[str, Any]] = [
        {
            "name": c.spec.name,
            "summary": c.spec.summary,
            "package": c.package,
            "installed": not c.spec.missing_modules(),
            "install": c.spec.install_command() if c.spec.missing_modules() else None,
        }
        for c in commands
    ]
    broken = [dataclasses.asdict(b) for b in _unique(registry.broken)]
    if wants_json(args):
        output.print_json(
            {
                "transports": rows,
                "commands": command_rows,
                "broken": broken,
                "conflicts": conflicts,
                "optimizers": sorted(registry.optimizers()),
                "autoload": registry.autoload,
            },
            out,
        )
        return EXIT_OK
    table = [("TRANSPORT", "SCHEMES", "PACKAGE", "DRIVER")]
    for row in rows:
        driver = "installed" if row["driver_installed"] else f"missing: {row['install']}"
        table.append((row["name"], ", ".join(f"{s}://" for s in row["schemes"]), row["package"], driver))
    output.print_table(table, out)
    if command_rows:
        out.write("\n")
        table = [("COMMAND", "PACKAGE", "NEEDS", "SUMMARY")]
        c: dict[str, Any]
        for c in command_rows:
            table.append((c["name"], c["package"], "installed" if c["installed"] else f"missing: {c['install']}",
                          c["summary"]))  # fmt: skip
        output.print_table(table, out)
    for scheme, names in sorted(conflicts.items()):
        out.write(f"conflict: {scheme}:// is claimed by {' and '.join(names)}; uninstall one of them\n")
    for item in broken:
        out.write(f"broken: plugin {item['name']!r} from package {item['package']!r}: {item['error']}\n")
    if not registry.autoload:
        out.write("third-party plugins are not loaded (WEAVELET_DISABLE_PLUGIN_AUTOLOAD is set)\n")
    return EXIT_OK


def _unique(items: Sequence[Any]) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def cmd_help(args: argparse.Namespace, out: TextIO) -> int:
    from weavelet_core.cli.app import build_parser, subparsers_of

    names: list[str] = args.topic
    parser = build_parser(load=names[:1])
    if not names:
        out.write(parser.format_help())
        return EXIT_OK
    choices = subparsers_of(parser)
    if names[0] not in choices:
        raise CliError(f"no command {names[0]!r}; the commands are: {', '.join(sorted(choices))}")
    out.write(choices[names[0]].format_help())
    return EXIT_OK


def cmd_completion(args: argparse.Namespace, out: TextIO) -> int:
    import shtab

    from weavelet_core.cli.app import build_parser

    parser = build_parser(load=True)
    out.write(shtab.complete(parser, shell=args.shell))
    return EXIT_OK


COMPLETION_HELP = """install:
  bash:  weavelet completion bash > ~/.local/share/bash-completion/completions/weavelet
  zsh:   weavelet completion zsh > "${fpath[1]}/_weavelet"     (a directory on your $fpath)
  fish:  weavelet completion fish > ~/.config/fish/completions/weavelet.fish
"""


def add_parsers(subparsers: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = subparsers.add_parser(
        "plugins",
        help="list transports, plugin commands, their drivers, and broken plugins",
        epilog="examples:\n  weavelet plugins\n  weavelet plugins --json\n",
        formatter_class=formatter,
    )
    add_output(p)
    p.set_defaults(handler=cmd_plugins, is_async=False)

    p = subparsers.add_parser(
        "help",
        help="show the help of weavelet or of one command",
        epilog="examples:\n  weavelet help\n  weavelet help set\n",
        formatter_class=formatter,
    )
    p.add_argument("topic", metavar="COMMAND", nargs="*", help="the command to explain")
    p.set_defaults(handler=cmd_help, is_async=False)

    p = subparsers.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, fish)",
        description="Print the tab-completion script for SHELL, generated from weavelet's own parser by shtab.",
        epilog=COMPLETION_HELP,
        formatter_class=formatter,
    )
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    p.set_defaults(handler=cmd_completion, is_async=False)
