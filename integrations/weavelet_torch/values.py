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

from weavelet_core import schema
from weavelet_core.schema import BETA_KEYS, NON_NEGATIVE, UNIT_INTERVAL
from weavelet_torch.errors import Rejected

__all__ = ["BETA_KEYS", "NON_NEGATIVE", "UNIT_INTERVAL", "check_value", "spec_of", "to_json"]


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


def spec_of(name: str, reference: object) -> dict[str, Any]:
    """The value spec (see :func:`weavelet_core.schema.spec_for`) of hyperparameter ``name`` whose reference
    value (held now, or the constructor default) is ``reference``; published in the run's schema."""
    kind = _reference_kind(reference)
    if kind == "sequence":
        assert isinstance(reference, (tuple, list))
        items = [spec_of(f"{name}.{i}", ref) if ref is not None else None for i, ref in enumerate(reference)]
        return schema.spec_for(name, kind, length=len(reference), items=items)
    return schema.spec_for(name, kind)


def check_value(key: str, name: str, value: object, reference: object) -> Any:
    """Return ``value`` checked and converted for hyperparameter ``name``; raise :class:`Rejected`.

    :param key: the key as written in the revision (``param_groups.1.lr``), for messages.
    :param name: the hyperparameter name (``lr``).
    :param reference: the value the optimizer holds now, or the constructor default; ``None`` when unknown.
    """
    try:
        return schema.check_value(key, value, spec_of(name, reference))
    except schema.ConfigProblem as exc:
        raise Rejected(str(exc)) from None


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
