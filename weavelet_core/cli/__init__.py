"""The ``weavelet`` command line.

``weavelet [--url URL] COMMAND ...``: ``set``, ``checkpoint``, ``stop``, ``rollback``, ``revert``
(:mod:`.write`); ``get``, ``status``, ``history``, ``runs``, ``diff``, ``watch`` (:mod:`.read`); ``rm``,
``prune`` (:mod:`.housekeeping`); ``top`` (:mod:`.top`); ``plugins``, ``help``, ``completion`` (:mod:`.meta`); and
the commands plugins add through the ``weavelet_subcommands`` hook (``server`` from ``weavelet_nats``, ``demo``
from ``weavelet_lightning``).
Printing is in :mod:`.output`, the parser and ``main`` in :mod:`.app`. The transport URL is ``--url``, else
``WEAVELET_URL``, else the per-user ``file://`` directory. ``keygen`` (:mod:`.keys`) makes signing keys.

Exit status: 0 success; 1 an error (one line on stderr, ``weavelet: error: ...``, or with ``--json`` a JSON
object on stdout), a revision rejected by the trainer, or a run with no live incarnation to wait for; 2 a usage
error; 3 ``--wait`` ran out of time (the revision is stored and stays desired); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

from weavelet_core.cli.app import BUILTIN_COMMANDS, build_parser, main, plugin_commands, subparsers_of
from weavelet_core.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WAIT_TIMEOUT,
    CliError,
)
from weavelet_core.cli.output import describe_changes, format_age, format_time
from weavelet_core.cli.values import check_merge, parse_assignments, parse_value

__all__ = [
    "BUILTIN_COMMANDS",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_WAIT_TIMEOUT",
    "CliError",
    "build_parser",
    "check_merge",
    "describe_changes",
    "format_age",
    "format_time",
    "main",
    "parse_assignments",
    "parse_value",
    "plugin_commands",
    "subparsers_of",
]
