"""The shape of a run's desired config, as the applier reads it.

A config is a JSON object. The applier understands:

``optimizer``
    an optimizer name (``"adam"``), or an object with ``name`` plus hyperparameters
    (``{"name": "adam", "lr": 1e-3}``, the same as ``optimizer=adam`` with ``lr=1e-3`` beside it).
any hyperparameter of the optimizer (``lr``, ``momentum``, ``weight_decay``, ``betas``, ``eps``, ...)
    applied to every param group.
``param_groups.<i>.<key>`` (or ``{"param_groups": {"<i>": {"<key>": value}}}``, or a list)
    applied to param group ``i`` only; it wins over the same key given for all groups.
``stop`` and ``checkpoint``
    commands; see :data:`COMMANDS`. A command's value is a token: ``true``, a number, a short string, or an
    object ``{"token": "<string>", "incarnation": "<id>"}`` that acts only in that trainer incarnation.
``lr_scale``
    a number > 0 multiplying the whole learning-rate schedule (see :data:`LR_SCALE`).
keys with a registered handler
    passed to the handler.

:func:`flatten` turns a config into one flat mapping (``{"param_groups.1.lr": 0.1, "lr": 0.01}``) so that two
revisions can be compared key by key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from weavelet_torch.errors import Rejected

OPTIMIZER = "optimizer"
PARAM_GROUPS = "param_groups"
STOP = "stop"
CHECKPOINT = "checkpoint"
COMMANDS = (STOP, CHECKPOINT)
"""Commands act once each time their value changes to something other than ``false``/``null``.

They are the emergency brake: a command acts even when other keys of the same revision are rejected, and its
token is recorded apart from the applied config (a later fix of the bad key does not make it act again).

A config is desired *state*: a revision carries every key, also those set long ago. A command therefore holds a
token, and acts when the token differs from the one last applied: ``checkpoint=1``, later ``checkpoint=2``
(or any new string) each save one checkpoint; ``stop=true`` ends the fit. Sending the same value again does
nothing. A resumed fit remembers the tokens it applied (they are part of its checkpoint), so it does not
stop again or re-save because of a command it already carried out.
"""

LR_SCALE = "lr_scale"
"""A number > 0 (default 1): every later learning rate is ``lr_scale`` times what the schedule would give.

Idempotent: the factor is relative to the schedule, not to the current value (0.5 twice is 0.5 once; 0.5
then 1 restores the schedule). Removing the key (``lr_scale=null``) is the same as 1.
"""

TOKEN_MAX_CHARS = 200
"""Longest command token string (and incarnation id) accepted."""

_GROUP_KEY = re.compile(r"param_groups\.(0|[1-9][0-9]{0,5})\.([A-Za-z_][A-Za-z0-9_]*)")


def flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as one flat mapping; raise :class:`Rejected` for a malformed ``optimizer``/``param_groups``."""
    flat: dict[str, Any] = {}

    def put(key: str, value: Any, origin: str) -> None:
        if key in flat and flat[key] != value:
            raise Rejected(
                f"{origin}: {key} is given twice with different values ({flat[key]!r} and {value!r}); send it once"
            )
        flat[key] = value

    for key, value in config.items():
        if key == OPTIMIZER:
            if isinstance(value, Mapping):
                if "name" not in value:
                    raise Rejected(
                        'optimizer: an optimizer object needs a "name", for example {"name": "adam", "lr": 0.001}'
                    )
                put(OPTIMIZER, _optimizer_name(value["name"]), "optimizer")
                for sub, item in value.items():
                    if sub != "name":
                        put(sub, item, f"optimizer.{sub}")
            else:
                put(OPTIMIZER, _optimizer_name(value), "optimizer")
        elif key == PARAM_GROUPS:
            for index, overrides in _group_items(value):
                if not isinstance(overrides, Mapping):
                    raise Rejected(
                        f"param_groups.{index}: expected an object of hyperparameters, got {type(overrides).__name__}"
                    )
                for sub, item in overrides.items():
                    put(f"{PARAM_GROUPS}.{index}.{sub}", item, f"param_groups.{index}.{sub}")
        elif key.startswith(PARAM_GROUPS + "."):
            if not _GROUP_KEY.fullmatch(key):
                raise Rejected(
                    f"{key}: per-group keys are written param_groups.<index>.<hyperparameter>, "
                    "for example param_groups.1.lr"
                )
            put(key, value, key)
        else:
            put(key, value, key)
    return flat


def _optimizer_name(value: object) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _group_items(value: object) -> list[tuple[int, Any]]:
    if isinstance(value, list):
        return [(i, item) for i, item in enumerate(value) if item is not None]
    if isinstance(value, Mapping):
        items = []
        for index, item in value.items():
            if not (isinstance(index, str) and index.isdigit() and str(int(index)) == index):
                raise Rejected(f"param_groups.{index}: group indexes are 0, 1, 2, ...")
            items.append((int(index), item))
        return items
    raise Rejected('param_groups: expected an object such as {"1": {"lr": 0.1}} (or use the key param_groups.1.lr)')


def group_key(key: str) -> tuple[int, str] | None:
    """``(index, hyperparameter)`` for a flat ``param_groups.<i>.<key>`` key, else ``None``."""
    match = _GROUP_KEY.fullmatch(key)
    return (int(match.group(1)), match.group(2)) if match else None


def command_fires(new: object, old: object) -> bool:
    """Whether a command whose value went from ``old`` to ``new`` acts now (see :data:`COMMANDS`)."""
    if new is None or new is False:
        return False
    return type(new) is not type(old) or new != old


def command_incarnation(value: object) -> str | None:
    """The incarnation a checked command value is written for, or ``None`` for a plain token."""
    if isinstance(value, Mapping):
        incarnation = value.get("incarnation")
        return incarnation if isinstance(incarnation, str) else None
    return None


def _short_string(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= TOKEN_MAX_CHARS


def check_command(key: str, value: object) -> None:
    """Raise :class:`Rejected` unless ``value`` is a usable command token.

    Accepted: ``null``/``false`` (no command), ``true``, an integer, a string of at most
    :data:`TOKEN_MAX_CHARS` characters, or an object ``{"token": "<string>", "incarnation": "<id>"}`` (both
    non-empty strings of at most :data:`TOKEN_MAX_CHARS` characters, no other fields).
    """
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str) and len(value) <= TOKEN_MAX_CHARS:
        return
    example = '{"token": "2", "incarnation": "<the trainer incarnation id>"}'
    if isinstance(value, Mapping):
        extra = sorted(str(k) for k in value if k not in ("token", "incarnation"))[:5]
        if extra:
            raise Rejected(
                f'{key}: a command object has only "token" and "incarnation", got also {", ".join(extra)}; '
                f"send for example {key}={example}"
            )
        for field in ("token", "incarnation"):
            if not _short_string(value.get(field)):
                got = value.get(field)
                shown = "nothing" if got is None else f"{type(got).__name__} {str(got)[:40]!r}"
                raise Rejected(
                    f'{key}: a command object\'s "{field}" must be a non-empty string of at most '
                    f"{TOKEN_MAX_CHARS} characters, got {shown}; send for example {key}={example}"
                )
        return
    raise Rejected(
        f"{key}: expected true, a number or a short string as the command's token, got "
        f"{type(value).__name__}; send for example {key}=true, or a new number each time ({key}=2)"
    )
