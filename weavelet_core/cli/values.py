"""``KEY=VALUE`` arguments: parsing them, and checking that they merge onto a config without loss."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from weavelet_core.cli.common import CliError


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (``1e-3``, ``true``, ``[0.9,0.99]``, ``{"a":1}``, ``"x"``),
    else the text itself as a string; the empty text and ``null`` mean ``None`` (remove the key)."""
    if text == "":
        return None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` arguments into a changes object; dotted keys (``optimizer.name=adam``) nest.

    Raises :class:`CliError` for an argument without ``=``, an empty key part, or two arguments that set the
    same key or a key and one inside it (``a=1 a.b=2``).
    """
    changes: dict[str, Any] = {}
    seen: dict[tuple[str, ...], str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CliError(f"expected KEY=VALUE, got {item!r} (write lr=0.01, or lr= to remove lr)")
        path = tuple(key.split("."))
        if any(not part.strip() for part in path):
            raise CliError(f"invalid key {key!r} in {item!r}: use names separated by single dots, like optimizer.lr")
        for other, other_item in seen.items():
            shorter = min(len(other), len(path))
            if other[:shorter] == path[:shorter]:
                raise CliError(f"{item!r} conflicts with {other_item!r}: give each key once")
        seen[path] = item
        node = changes
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = parse_value(raw)
    return changes


def check_merge(base: Mapping[str, Any], changes: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse changes that would silently replace a value with an object: ``optimizer.lr=0.1`` while
    ``optimizer`` is the string ``"adam"`` would drop the name. Raises :class:`CliError` saying how to write it.
    """
    for key, value in changes.items():
        if not isinstance(value, Mapping):
            continue
        current = base.get(key)
        path = f"{prefix}{key}"
        if current is None or isinstance(current, Mapping):
            check_merge(current or {}, value, f"{path}.")
            continue
        if all(v is None for v in value.values()):
            continue  # only removes keys inside a value that has none: nothing is lost
        inner = next(iter(value))
        raise CliError(
            f"{path}.{inner}=... would replace {path}={json.dumps(current)} (not an object) and lose it; set the "
            f"key at the top level ({inner}=...), or replace {path} whole: {path}='{{...}}', or remove it first "
            f"with {path}="
        )
