"""The shape of a run's desired config, as the applier reads it.

A config is a JSON object. The applier understands:

``optimizer``
    an optimizer name (``"adam"``), or an object with ``name`` plus hyperparameters
    (``{"name": "adam", "lr": 1e-3}``, the same as ``optimizer=adam`` with ``lr=1e-3`` beside it).
any hyperparameter of the optimizer (``lr``, ``momentum``, ``weight_decay``, ``betas``, ``eps``, ...)
    applied to every param group.
``param_groups.<i>.<key>`` (or ``{"param_groups": {"<i>": {"<key>": value}}}``, or a list)
    applied to param group ``i`` only; it wins over the same key given for all groups.
``stop``, ``checkpoint`` and ``rollback``
    commands; see :data:`COMMANDS`. A command's value is a token: ``true``, a number, a short string, or an
    object ``{"token": "<string>", "incarnation": "<id>"}`` that acts only in that trainer incarnation.
``lr_scale``
    a number > 0 multiplying the whole learning-rate schedule (see :data:`LR_SCALE`).
keys with a registered handler
    passed to the handler.

A run steering several optimizers nests each optimizer's keys (all of the above but commands and handler keys)
under its name: ``{"generator": {"lr": 1e-4}, "discriminator": {"optimizer": "sgd"}, "stop": true}``.

:func:`flatten` turns a config into one flat mapping (``{"param_groups.1.lr": 0.1, "lr": 0.01}``, or with
several optimizers ``{"generator.lr": 1e-4}``) so that two revisions can be compared key by key. The language
itself, and its messages, live in :mod:`weavelet_core.schema` (shared with ``weavelet set``'s check).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from weavelet_core import schema as _schema
from weavelet_core.schema import (
    CHECKPOINT,
    LR_SCALE,
    OPTIMIZER,
    PARAM_GROUPS,
    ROLLBACK,
    STOP,
    TOKEN_MAX_CHARS,
    group_key,
)
from weavelet_torch.errors import Rejected

COMMANDS = (STOP, CHECKPOINT, ROLLBACK)
"""Commands act once each time their value changes to something other than ``false``/``null``.

They are the emergency brake: a command acts even when other keys of the same revision are rejected, and its
token is recorded apart from the applied config (a later fix of the bad key does not make it act again).

A config is desired *state*: a revision carries every key, also those set long ago. A command therefore holds a
token, and acts when the token differs from the one last applied: ``checkpoint=1``, later ``checkpoint=2``
(or any new string) each save one checkpoint; ``stop=true`` ends the fit. Sending the same value again does
nothing. A resumed fit remembers the tokens it applied (they are part of its checkpoint), so it does not
stop again or re-save because of a command it already carried out.
"""

__all__ = [
    "CHECKPOINT",
    "COMMANDS",
    "LR_SCALE",
    "OPTIMIZER",
    "PARAM_GROUPS",
    "ROLLBACK",
    "STOP",
    "TOKEN_MAX_CHARS",
    "check_command",
    "command_fires",
    "command_incarnation",
    "flatten",
    "group_key",
]


def flatten(config: Mapping[str, Any], names: Sequence[str] = ()) -> dict[str, Any]:
    """``config`` as one flat mapping (see :func:`weavelet_core.schema.flatten`); raise :class:`Rejected` for a
    malformed ``optimizer``/``param_groups`` or a key given twice."""
    try:
        return _schema.flatten(config, names)
    except _schema.ConfigProblem as exc:
        raise Rejected(str(exc)) from None


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


def check_command(key: str, value: object) -> None:
    """Raise :class:`Rejected` unless ``value`` is a usable command token (see
    :func:`weavelet_core.schema.check_command`)."""
    try:
        _schema.check_command(key, value)
    except _schema.ConfigProblem as exc:
        raise Rejected(str(exc)) from None
