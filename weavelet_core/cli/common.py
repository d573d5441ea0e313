"""What every command module shares: exit statuses, errors, argument types and shared options."""

from __future__ import annotations

import argparse
import math
import re
import time
from typing import Any

from weavelet_core.errors import CorruptEntry, WeaveletError
from weavelet_core.plugins import URL_ENV, default_url, mask_password
from weavelet_core.protocol import STALE_KEEPALIVES, Revision, Status
from weavelet_core.weaver import AsyncWeaver

PROG = "weavelet"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_WAIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130
DEBUG_ENV = "WEAVELET_DEBUG"


class CliError(WeaveletError):
    """A mistake in the command line, reported as one line with exit status 1."""


class UsageError(Exception):
    """An argument argparse refused; reported with the usage and exit status 2."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of exiting, so that ``main`` can
    report them as text or, with ``--json``, as a JSON object."""

    def error(self, message: str) -> Any:
        raise UsageError(message, self.format_usage())


def url_of(args: argparse.Namespace) -> str:
    """The transport URL the command uses (``--url``, else ``WEAVELET_URL``, else the per-user directory)."""
    url: str | None = getattr(args, "url", None)
    return url or default_url()


def weaver(args: argparse.Namespace) -> AsyncWeaver:
    """A weaver on the command's transport (open it with ``async with``), signing with ``--signing-key`` (else
    ``WEAVELET_SIGNING_KEY``) where the command writes."""
    if not getattr(args, "signs", False):
        return AsyncWeaver(getattr(args, "url", None))
    return AsyncWeaver(
        getattr(args, "url", None),
        signing_key=getattr(args, "signing_key", None),
        trusted_keys=getattr(args, "trusted_keys", None) or None,
    )


def where(args: argparse.Namespace) -> str:
    return mask_password(url_of(args))


def missing_run(run: str) -> CliError:
    return CliError(f"run {run!r} has no revisions yet; write one with: weavelet set {run} KEY=VALUE")


def is_stale(status: Status, stale_after: float | None, now: float) -> bool:
    """Whether a live status has gone without a heartbeat for too long (see :meth:`Status.stale`)."""
    return status.stale(now, after=stale_after)


# -- argument types ----------------------------------------------------------------------------------------


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def wait_seconds(text: str) -> float:
    """``--wait S``: a positive number of seconds, or ``inf`` to wait as long as it takes."""
    if text.strip().lower() in ("inf", "infinity", "forever"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds or 'inf', got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds (or 'inf'), got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def revision_number(text: str) -> int:
    """A revision number: ``3`` or ``r3``."""
    return positive_int(text[1:] if text[:1] in ("r", "R") else text)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` or combinations (``1d12h``), in seconds."""
    compact = text.strip().lower()
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 30m, 12h, 7d or 2w, got {text!r}")
    return sum(float(number) * _UNIT[unit] for number, unit in parts)


# -- shared options ----------------------------------------------------------------------------------------

URL_HELP = f"transport URL (default: ${URL_ENV}, else the per-user file:// directory)"


def add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=argparse.SUPPRESS, help=URL_HELP)


def add_output(parser: argparse.ArgumentParser, *, wide: bool = False) -> None:
    """``--json`` and, with ``wide``, ``-o {text,wide,json}``."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text (errors too)")
    if wide:
        parser.add_argument(
            "-o",
            "--output",
            choices=("text", "wide", "json"),
            default="text",
            help="text (default), wide (more columns, nothing truncated) or json (same as --json)",
        )


def add_trusted_keys(parser: argparse.ArgumentParser, what: str) -> None:
    """``--trusted-keys PATH`` (repeatable): ``.pub`` files or directories; default ``WEAVELET_TRUSTED_KEYS``."""
    parser.add_argument(
        "--trusted-keys",
        action="append",
        default=[],
        metavar="PATH",
        help=f"public keys (NAME.pub files or directories of them, repeatable) {what} (default: "
        "$WEAVELET_TRUSTED_KEYS)",
    )


def add_signing(parser: argparse.ArgumentParser) -> None:
    """``--signing-key PATH`` and ``--trusted-keys PATH`` for commands that write revisions."""
    parser.add_argument(
        "--signing-key",
        metavar="PATH",
        default=None,
        help="sign what is written with this private key (NAME.key from 'weavelet keygen'; default: "
        "$WEAVELET_SIGNING_KEY); needed by runs whose trainer accepts only signed revisions",
    )
    add_trusted_keys(parser, "of other signers whose revisions a signing write may build on")
    parser.set_defaults(signs=True)


def add_stale(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stale-after",
        type=positive_float,
        default=None,
        metavar="S",
        help=f"flag a running run as stale after S seconds without a heartbeat (default: {STALE_KEEPALIVES} of "
        "the run's keepalive intervals plus 2 s)",
    )


def add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=wait_seconds,
        metavar="S",
        help="wait up to S seconds (or 'inf') for the trainer's outcome (applied or rejected); fails at once "
        "when the run's incarnation has ended",
    )


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False)) or getattr(args, "output", None) == "json"


def wide(args: argparse.Namespace) -> bool:
    return getattr(args, "output", None) == "wide"


async def unreachable_reason(w: AsyncWeaver, run: str, latest: Revision | None = None) -> str | None:
    """Why a revision written to ``run`` now would never reach its live trainer, or ``None``.

    A live trainer's sidecar forwards only revisions numbered above the newest it has taken. After ``weavelet rm
    --force`` of a live run (or a store emptied under it), revisions are numbered from 1 again: at or below that
    number, the trainer takes them for old ones and ignores them, ``stop`` included, until it restarts. Written
    anyway, such a revision would wait for an outcome that never comes; refusing it says so instead.

    ``latest``: the run's newest revision when the caller has read it (``None``: read here, an unreadable one
    counting with its number).
    """
    status = (await w.statuses([run])).get(run)
    if status is None or not status.live or is_stale(status, None, time.time()):
        return None
    last = status.last_outcome or {}
    taken = max(status.applied_revision, last["revision"] if isinstance(last.get("revision"), int) else 0)
    if latest is not None:
        newest = latest.revision
    else:
        try:
            found = await w.get(run)
            newest = found.revision if found is not None else 0
        except CorruptEntry as exc:
            newest = exc.revision
    if newest + 1 > taken:
        return None
    return (
        f"not written: the live trainer of run {run!r} (pid {status.pid} on {status.host}) has taken revisions up "
        f"to {taken} of a history that is no longer stored (the run was removed with weavelet rm --force while it "
        f"trained), and ignores new ones up to that number: this one would be {newest + 1}, so it would never "
        f"reach it. Restart the trainer (it then reads the store again), or end it with a signal "
        f"(kill -TERM {status.pid} on {status.host})"
    )
