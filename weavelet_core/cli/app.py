"""The parser and the entry point of the ``weavelet`` command."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TextIO

import anyio

if sys.version_info < (3, 11):  # pragma: no cover - a builtin from 3.11 on; anyio brings the backport
    from exceptiongroup import BaseExceptionGroup

from weavelet_core.cli import housekeeping, keys, meta, read, top, write
from weavelet_core.cli.common import (
    DEBUG_ENV,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    URL_HELP,
    CliError,
    Parser,
    UsageError,
)
from weavelet_core.cli.output import error_json, error_line
from weavelet_core.errors import WeaveletError
from weavelet_core.plugins import LoadedSubcommand, get_registry

BUILTIN_COMMANDS = (
    "plugins", "set", "checkpoint", "stop", "rollback", "revert", "get", "status", "history", "runs", "diff", "watch",
    "rm", "prune", "top", "help", "completion", "keygen",
)  # fmt: skip
"""Commands of the core; a plugin command may not take one of these names."""

FORMATTER = argparse.RawDescriptionHelpFormatter

MAIN_EPILOG = """examples:
  weavelet set demo lr=0.01 --wait 30      change a running fit, wait for the trainer's answer
  weavelet status demo                     what its trainer last reported
  weavelet top                             every run at a glance (weavelet top --once for scripts)
  weavelet history demo --follow           revisions and outcomes, then live
  weavelet revert demo 3                   undo: back to revision 3's config
  weavelet stop -l sweep=3                 every live run labelled sweep=3

Values parse as JSON when they can (lr=1e-3 is a number, optimizer=adam a string); dotted keys nest
(optimizer.name=adam); KEY= or KEY=null removes a key. 'weavelet help COMMAND' explains a command.
"""


def plugin_commands() -> list[LoadedSubcommand]:
    """The subcommands plugins offer through the ``weavelet_subcommands`` hook."""
    registry = get_registry()  # a plugin that fails to load warns here, once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a shadowed name: 'weavelet plugins' lists the rest
        return registry.subcommands(BUILTIN_COMMANDS)


def build_parser(load: Collection[str] | bool = ()) -> argparse.ArgumentParser:
    """The argument parser. Plugin subcommands named in ``load`` (all with ``True``) get their own arguments
    (``configure_parser``); the others a placeholder that shows their summary and takes any arguments."""
    parser = Parser(prog=PROG, description=(
        "Reconfigure running training jobs: write desired config revisions, read status and outcomes."
    ), epilog=MAIN_EPILOG, formatter_class=FORMATTER)  # fmt: skip
    parser.add_argument("--url", default=None, help=URL_HELP)
    parser.add_argument("--version", action="version", version=meta.version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    write.add_parsers(subparsers, FORMATTER)
    read.add_parsers(subparsers, FORMATTER)
    housekeeping.add_parsers(subparsers, FORMATTER)
    top.add_parsers(subparsers, FORMATTER)
    keys.add_parsers(subparsers, FORMATTER)
    meta.add_parsers(subparsers, FORMATTER)
    for loaded in plugin_commands():
        _add_plugin_command(
            subparsers, loaded, load is True or (not isinstance(load, bool) and loaded.spec.name in load)
        )
    return parser


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser, by name."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _add_plugin_command(subparsers: Any, loaded: LoadedSubcommand, load: bool) -> None:
    spec = loaded.spec
    missing = spec.missing_modules()
    if missing:
        p = subparsers.add_parser(
            spec.name,
            help=f"{spec.summary} (needs: {spec.install_command()})",
            description=f"{spec.summary}. Needs {', '.join(missing)}: {spec.install_command()}",
        )

        def unavailable(args: argparse.Namespace) -> int:
            what = f"the {spec.extra} extra" if spec.extra else ", ".join(missing)
            raise CliError(
                f"'weavelet {spec.name}' needs {what}, which is not installed; install it with: "
                f"{spec.install_command()}"
            )

        p.set_defaults(handler=unavailable, is_async=False, plugin=spec.name, placeholder=True)
        return
    p = subparsers.add_parser(spec.name, help=spec.summary, description=spec.summary)
    if load and spec.configure_parser is not None:
        spec.configure_parser(p)
        placeholder = False
    else:
        placeholder = spec.configure_parser is not None

    def action(args: argparse.Namespace) -> int:
        result = spec.action(args)
        return EXIT_OK if result is None else int(result)

    p.set_defaults(handler=action, is_async=False, plugin=spec.name, placeholder=placeholder)


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (skipping global options), without parsing it."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--url":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _wants_json(argv: Sequence[str]) -> bool:
    return (
        "--json" in argv
        or any(a == "json" and i > 0 and argv[i - 1] in ("-o", "--output") for i, a in enumerate(argv))
        or "-ojson" in argv
        or "--output=json" in argv
    )


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    0 success; 1 an error (one line on stderr, ``weavelet: error: ...``; with ``--json`` a JSON object on
    stdout instead), a revision rejected by the trainer, or a run with no live incarnation to wait for; 2 a
    usage error; 3 ``--wait`` ran out of time (the revision is stored and stays desired); 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    as_json = _wants_json(argv)
    saved_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning

    def fail(message: str, kind: str, status: int) -> int:
        if as_json:
            error_json(message, kind, status, sys.stdout)
        else:
            error_line(message)
        return status

    try:
        try:
            return _main(argv)
        except BaseExceptionGroup as group:  # a task group's: its one error, when it had only one
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], (BrokenPipeError, KeyboardInterrupt)):
                raise group.exceptions[0] from None
            raise
    except KeyboardInterrupt:
        return fail("interrupted", "KeyboardInterrupt", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader of our output went away (``weavelet history RUN | head``): not an error.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # keep the final flush quiet
        return EXIT_OK
    except UsageError as exc:
        if as_json:
            return fail(str(exc), "UsageError", EXIT_USAGE)
        sys.stderr.write(exc.usage)
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except (WeaveletError, ValueError) as exc:  # ValueError: a value the user gave, refused where it is read
        if debug:
            raise
        return fail(str(exc), type(exc).__name__, EXIT_ERROR)
    except Exception as exc:
        if debug:
            raise
        return fail(
            f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 to see where it happened)",
            type(exc).__name__,
            EXIT_ERROR,
        )
    finally:
        warnings.showwarning = saved_showwarning


def _main(argv: list[str]) -> int:
    command = _chosen_command(argv)
    parser = build_parser(load=[command] if command else [])
    if command is None and not any(a in ("-h", "--help", "--version") for a in argv):
        sys.stdout.write(parser.format_help())  # 'weavelet' alone: the help, not an error
        return EXIT_OK
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and getattr(args, "extra_words", False):
            # 'set RUN --json lr=0.1': argparse ends a '*' positional at the first option; the rest come here.
            args.words += [word for word in unknown if not word.startswith("-")]
            unknown = [word for word in unknown if word.startswith("-")]
        if unknown and not getattr(args, "placeholder", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse printed help or the version
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[..., Any] = args.handler
    if getattr(args, "plugin", None):
        return int(handler(args))
    if args.is_async:
        coroutine_function: Callable[[argparse.Namespace, TextIO], Awaitable[int]] = handler
        out = sys.stdout

        async def run() -> int:
            return await coroutine_function(args, out)

        return anyio.run(run, backend="asyncio")
    return int(handler(args, sys.stdout))


__all__ = ["BUILTIN_COMMANDS", "EXIT_ERROR", "CliError", "build_parser", "main", "plugin_commands", "subparsers_of"]
