"""How the command line prints: times, ages, changes, outcomes, tables fitted to the terminal, JSON, errors."""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from weavelet_core.cli.common import PROG
from weavelet_core.protocol import Outcome

SPARK = "▁▂▃▄▅▆▇█"
ELLIPSIS = "…"
MIN_LAST_COLUMN = 20
"""A table's last column is cut to the terminal width, but never narrower than this."""


def format_age(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_time(timestamp: float) -> str:
    """ISO 8601 in the local zone, to the second, with the zone offset: ``2026-05-01T10:02:11+02:00``."""
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def value_text(value: Any) -> str:
    """A value as compact JSON (``0.1``, ``"adam"``, ``[0.9,0.99]``)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (empty objects stay as values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def change_list(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """``(key, old, new, kind)`` for each flattened key that differs; kind is ``added``, ``removed`` or
    ``changed``."""
    old = flatten(before or {})
    new = flatten(after)
    found = []
    for key in sorted(old.keys() | new.keys()):
        if key not in new:
            found.append((key, old[key], None, "removed"))
        elif key not in old:
            found.append((key, None, new[key], "added"))
        elif old[key] != new[key]:
            found.append((key, old[key], new[key], "changed"))
    return found


def describe_changes(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str:
    """What changed between two configs, as ``lr=0.01 momentum: 0.9->0.95 -nesterov``."""
    parts = []
    for key, old, new, kind in change_list(before, after):
        if kind == "removed":
            parts.append(f"-{key}")
        elif kind == "added":
            parts.append(f"{key}={value_text(new)}")
        else:
            parts.append(f"{key}: {value_text(old)}->{value_text(new)}")
    return " ".join(parts) if parts else "(no change)"


def describe_outcome(outcome: Outcome | None, *, full: bool = False) -> str:
    """``applied at step 12``, or ``rejected: why``; with ``full``, an applied outcome's message too."""
    if outcome is None:
        return "pending"
    if outcome.result == "applied":
        head = f"applied at step {outcome.step}" if outcome.step is not None else "applied"
        return f"{head}: {outcome.message}" if full and outcome.message else head
    if outcome.message:
        return f"{outcome.result}: {outcome.message}"
    return outcome.result


DETAIL_SHOWN_ELSEWHERE = ("changes", "commands")
"""Outcome detail keys the outcome's message already says (``changes``) or that get their own lines."""


def detail_lines(outcome: Outcome) -> list[str]:
    """The outcome's detail, a line each: ``checkpoint: PATH``, ``optimizer: {...}``, ``not applicable: ...``."""
    lines = []
    for key, value in outcome.detail.items():
        if key in DETAIL_SHOWN_ELSEWHERE:
            continue
        label = key.replace("_", " ")
        if key == "signature" and isinstance(value, dict):
            if value.get("verified") is True:  # a refused signature is what the outcome's message is about
                lines.append(f"signed by key {value.get('key')} ({value.get('key_id')}), verified by the trainer")
        elif isinstance(value, str):
            lines.append(f"{label}: {value}")
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            lines.append(f"{label}: {', '.join(value)}")
        else:
            lines.append(f"{label}: {value_text(value)}")
    return lines


def sparkline(values: Sequence[float], width: int = 12) -> str:
    """The newest ``width`` values as block characters, low to high (``▁▂▅█``)."""
    values = list(values)[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    if span <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in values)


def print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def terminal_width(out: TextIO) -> int | None:
    """The terminal's width when ``out`` is one (or ``COLUMNS`` is set), else ``None``: piped output is not cut."""
    import os

    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        return shutil.get_terminal_size().columns
    return None


def cut(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters, ending in ``…`` when cut."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + ELLIPSIS


def print_table(rows: Sequence[Sequence[str]], out: TextIO, *, width: int | None = None, full: bool = False) -> None:
    """Rows as aligned columns (the first row is the header). Cells are single-line; unless ``full``, the
    last column is cut with ``…`` to fit ``width`` (default: the terminal's, when printing to one)."""
    if width is None and not full:
        width = terminal_width(out)
    rows = [[" ".join(cell.split()) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    start = sum(w + 2 for w in widths[:-1])
    room = None if full or width is None else max(MIN_LAST_COLUMN, width - start)
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths[:-1], strict=True)]
        last = row[-1] if room is None else cut(row[-1], room)
        out.write("  ".join([*cells, last]).rstrip() + "\n")


def error_line(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def error_json(message: str, kind: str, status: int, out: TextIO) -> None:
    """An error as one JSON object on stdout: ``{"error": {"message", "type", "exit_status"}}``."""
    out.write(json.dumps({"error": {"message": message, "type": kind, "exit_status": status}}) + "\n")
    out.flush()
