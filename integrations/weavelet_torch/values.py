"""Checking one remote hyperparameter value before it reaches an optimizer.

Values arrive as JSON (numbers, strings, booleans, lists). Each is checked against the kind of value the
optimizer holds for that key (its current value, or the constructor's default) and against the ranges that
``torch.optim`` documents for the common keys, then converted to what torch expects (lists to tuples, integers
to floats where a float is held).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from weavelet_torch.errors import Rejected

NON_NEGATIVE = frozenset(
    {
        "lr",
        "weight_decay",
        "momentum",
        "dampening",
        "eps",
        "alpha",
        "lr_decay",
        "initial_accumulator_value",
        "momentum_decay",
        "lambd",
        "t0",
    }
)
"""Keys whose numeric value must be >= 0."""

UNIT_INTERVAL = frozenset({"rho"})
"""Keys whose value must lie in [0, 1]."""

BETA_KEYS = frozenset({"betas"})
"""Keys holding coefficients that must each lie in [0, 1)."""


def _show(value: object) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"{key}: expected a number, got {_show(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise Rejected(f"{key}: {value!r} is not a finite number; send a finite number")
    return number


def _check_range(key: str, name: str, number: float) -> None:
    if name in NON_NEGATIVE and number < 0:
        raise Rejected(f"{key}: {number:g} is negative; send a value >= 0")
    if name in UNIT_INTERVAL and not 0.0 <= number <= 1.0:
        raise Rejected(f"{key}: {number:g} is outside [0, 1]; send a value between 0 and 1")


def _reference_kind(reference: object) -> str:
    if isinstance(reference, bool):
        return "bool"
    if isinstance(reference, int):
        return "int"
    if isinstance(reference, float) or (isinstance(reference, torch.Tensor) and reference.numel() == 1):
        return "float"
    if isinstance(reference, (tuple, list)):
        return "sequence"
    if isinstance(reference, str):
        return "str"
    return "any"


def check_value(key: str, name: str, value: object, reference: object) -> Any:
    """Return ``value`` checked and converted for hyperparameter ``name``; raise :class:`Rejected`.

    :param key: the key as written in the revision (``param_groups.1.lr``), for messages.
    :param name: the hyperparameter name (``lr``).
    :param reference: the value the optimizer holds now, or the constructor default; ``None`` when unknown.
    """
    kind = _reference_kind(reference)
    if name in BETA_KEYS or (kind == "sequence" and name.startswith("beta")):
        return _check_betas(key, value, reference)
    if kind == "bool" or name in ("nesterov", "amsgrad", "maximize", "centered", "decoupled_weight_decay"):
        if not isinstance(value, bool):
            raise Rejected(f"{key}: expected true or false, got {_show(value)}")
        return value
    if kind == "int":
        # torch writes many float defaults as integers (weight_decay=0): any number is accepted.
        number = _number(key, value)
        _check_range(key, name, number)
        return value if isinstance(value, int) else number
    if kind == "float" or name in NON_NEGATIVE or name in UNIT_INTERVAL:
        number = _number(key, value)
        _check_range(key, name, number)
        return number
    if kind == "sequence":
        assert isinstance(reference, (tuple, list))
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            raise Rejected(f"{key}: expected a list of {len(reference)} values, got {_show(value)}")
        items = []
        for i, (item, ref) in enumerate(zip(value, reference, strict=True)):
            items.append(check_value(f"{key}.{i}", f"{name}.{i}", item, ref) if ref is not None else item)
        return tuple(items)
    if kind == "str":
        if not isinstance(value, str):
            raise Rejected(f"{key}: expected a string, got {_show(value)}")
        return value
    if isinstance(value, (dict, list)):
        raise Rejected(f"{key}: expected a number, string or boolean, got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise Rejected(f"{key}: {value!r} is not a finite number; send a finite number")
    return value


def _check_betas(key: str, value: object, reference: object) -> tuple[float, ...]:
    length = len(reference) if isinstance(reference, (tuple, list)) else 2
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise Rejected(f"{key}: expected a list of {length} numbers in [0, 1), got {_show(value)}")
    numbers = tuple(_number(f"{key}.{i}", item) for i, item in enumerate(value))
    if not all(0.0 <= b < 1.0 for b in numbers):
        shown = ", ".join(f"{b:g}" for b in numbers)
        raise Rejected(f"{key}: each value must be in [0, 1), got [{shown}]; for example {key}=[0.9, 0.999]")
    return numbers


def to_json(value: object) -> Any:
    """``value`` (from a param group) as a JSON value for status reports, or ``None`` if it has none."""
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        items = [to_json(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value, strict=True)) else items
    return None
