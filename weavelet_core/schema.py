"""What a live run accepts, and checking a change against it before it is written. Pure Python, no torch.

A trainer's applier (``weavelet_torch.Applier``) publishes its **schema** in the run's status
(:attr:`weavelet_core.protocol.Status.schema`); :func:`check` judges a change against it with the applier's own
messages, so ``weavelet set`` can refuse a typo before it lands in the desired config. The config language both
sides share lives here too: :func:`flatten` (nested objects and dotted keys to one flat mapping), the command
tokens (:func:`check_command`), value kinds and ranges (:func:`spec_for`, :func:`check_value`), ``lr_scale``
(:func:`check_scale`) and the wording of every problem. The applier raises these messages; :func:`check`
returns them.

Schema format (version :data:`SCHEMA_VERSION`), a JSON object::

    {
      "version": 1,
      "nested": false,                  # true: several optimizers, each one's keys nested under its name
      "optimizers": [                   # one entry per optimizer the run steers
        {"name": null,                  # its name (null: the only one; its keys are top-level)
         "type": "sgd",                 # the optimizer type active now
         "param_groups": 2,             # how many param groups it has
         "keys": {"lr": {"kind": "float", "min": 0}, ...},  # its group 0's hyperparameters, kind and range
         "group_keys": ["initial_lr"],  # other keys its param groups hold (set by schedulers or the script)
         "swap": null}                  # why its type cannot be switched, or null
      ],
      "types": {"adam": {"keys": {"lr": {...}, ...}}, ...},  # every optimizer type a revision may name,
                                        # its hyperparameters with the kinds of their defaults; "keys": null
                                        # when its factory takes any keyword
      "flags": ["capturable", ...],     # implementation flags: never set remotely
      "handlers": ["grad_clip_val"],    # keys of the script's own (values checked by the trainer only)
      "commands": ["stop", "checkpoint", "rollback"],
      "allow": null                     # the allow-list of remotely settable keys, or null (the default set)
    }

A value's kind (``spec``) is ``{"kind": K}`` with ``K`` one of ``bool``, ``int``, ``float`` (with optional
``min``/``max``), ``betas`` (``length`` numbers in [0, 1)), ``sequence`` (``items``: a spec or null each),
``str`` or ``any``.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SCHEMA_VERSION = 1

OPTIMIZER = "optimizer"
PARAM_GROUPS = "param_groups"
LR_SCALE = "lr_scale"
STOP = "stop"
CHECKPOINT = "checkpoint"
ROLLBACK = "rollback"
COMMANDS = (STOP, CHECKPOINT, ROLLBACK)
TOKEN_MAX_CHARS = 200
"""Longest command token string (and incarnation id) accepted."""
ROLLBACK_TARGETS = ("latest", "snapshot")
"""The named targets of a ``rollback`` command's ``to``; besides these, a step (an integer >= 0) or a path."""
PATH_MAX_CHARS = 1000
"""Longest checkpoint path a ``rollback`` command's ``to`` may name."""

RESERVED = frozenset({OPTIMIZER, PARAM_GROUPS, LR_SCALE, *COMMANDS, "name"})
"""Names an optimizer of a job (``optimizers={...}``) or a handler key may not take."""

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

BOOL_KEYS = frozenset({"nesterov", "amsgrad", "maximize", "centered", "decoupled_weight_decay"})
"""Keys that are always booleans."""

KEY_ALIASES = {
    "learning_rate": "lr",
    "learningrate": "lr",
    "wd": "weight_decay",
    "weightdecay": "weight_decay",
    "epsilon": "eps",
    "beta1": "betas",
    "beta2": "betas",
    "mom": "momentum",
    "lr_multiplier": "lr_scale",
    "lr_factor": "lr_scale",
}
"""Names people use for a key under another spelling, suggested when a revision sends them."""

_GROUP_KEY = re.compile(r"param_groups\.(0|[1-9][0-9]{0,5})\.([A-Za-z_][A-Za-z0-9_]*)")


class ConfigProblem(ValueError):
    """One thing wrong with a config; the message names the key and what to send instead.

    :param key: the flat key it concerns (``None`` for the config's shape).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# ----------------------------------------------------------------------------------------------- the shape


def flatten(config: Mapping[str, Any], names: Sequence[str] = ()) -> dict[str, Any]:
    """``config`` as one flat mapping (``{"param_groups.1.lr": 0.1, "lr": 0.01}``), so that two revisions can be
    compared key by key.

    :param names: the optimizers of a run steering several: each one's keys are nested under its name
        (``{"generator": {"lr": 1e-4}}`` or the dotted key ``"generator.lr"``) and come out prefixed
        (``"generator.lr"``, ``"generator.param_groups.0.lr"``, ``"generator.optimizer"``). Empty: one
        optimizer, its keys top-level.
    :raises ConfigProblem: for a malformed ``optimizer``/``param_groups``, a key given twice with different
        values, or (with ``names``) an optimizer's entry that is not an object.
    """
    if not names:
        return _flatten_one(config, "")
    flat: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        head, dot, rest = key.partition(".") if isinstance(key, str) else (key, "", "")
        if head in names and not dot:
            if not isinstance(value, Mapping):
                raise ConfigProblem(
                    f"{head}: expected an object of {head}'s keys, got {_show(value)}; send for example "
                    f"{head}.lr=0.001 (the object {{{head!r}: {{'lr': 0.001}}}})",
                    head,
                )
            for sub, item in value.items():
                _put(nested.setdefault(head, {}), sub, item, f"{head}.{sub}")
        elif head in names:
            _put(nested.setdefault(head, {}), rest, value, key)
        else:
            _put(flat, key, value, key)
    for name in names:
        if name in nested:
            for sub, item in _flatten_one(nested[name], f"{name}.").items():
                _put(flat, f"{name}.{sub}", item, f"{name}.{sub}")
    return flat


def _put(flat: dict[str, Any], key: str, value: Any, origin: str) -> None:
    if key in flat and flat[key] != value:
        raise ConfigProblem(
            f"{origin}: {key} is given twice with different values ({flat[key]!r} and {value!r}); send it once"
        )
    flat[key] = value


def _flatten_one(config: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        where = f"{prefix}{key}"
        if key == OPTIMIZER:
            if isinstance(value, Mapping):
                if "name" not in value:
                    raise ConfigProblem(
                        f'{where}: an optimizer object needs a "name", for example {{"name": "adam", "lr": 0.001}}'
                    )
                _put(flat, OPTIMIZER, _optimizer_name(value["name"]), where)
                for sub, item in value.items():
                    if sub != "name":
                        _put(flat, sub, item, f"{where}.{sub}")
            else:
                _put(flat, OPTIMIZER, _optimizer_name(value), where)
        elif key == PARAM_GROUPS:
            for index, overrides in _group_items(value, prefix):
                if not isinstance(overrides, Mapping):
                    raise ConfigProblem(
                        f"{prefix}param_groups.{index}: expected an object of hyperparameters, got "
                        f"{type(overrides).__name__}"
                    )
                for sub, item in overrides.items():
                    _put(flat, f"{PARAM_GROUPS}.{index}.{sub}", item, f"{prefix}param_groups.{index}.{sub}")
        elif isinstance(key, str) and key.startswith(PARAM_GROUPS + "."):
            if not _GROUP_KEY.fullmatch(key):
                raise ConfigProblem(
                    f"{where}: per-group keys are written {prefix}param_groups.<index>.<hyperparameter>, "
                    f"for example {prefix}param_groups.1.lr"
                )
            _put(flat, key, value, where)
        else:
            _put(flat, key, value, where)
    return flat


def _optimizer_name(value: object) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _group_items(value: object, prefix: str) -> list[tuple[int, Any]]:
    if isinstance(value, list):
        return [(i, item) for i, item in enumerate(value) if item is not None]
    if isinstance(value, Mapping):
        items = []
        for index, item in value.items():
            if not (isinstance(index, str) and index.isdigit() and str(int(index)) == index):
                raise ConfigProblem(f"{prefix}param_groups.{index}: group indexes are 0, 1, 2, ...")
            items.append((int(index), item))
        return items
    raise ConfigProblem(
        f'{prefix}param_groups: expected an object such as {{"1": {{"lr": 0.1}}}} (or use the key '
        f"{prefix}param_groups.1.lr)"
    )


def group_key(key: str) -> tuple[int, str] | None:
    """``(index, hyperparameter)`` for a flat ``param_groups.<i>.<key>`` key, else ``None``."""
    match = _GROUP_KEY.fullmatch(key)
    return (int(match.group(1)), match.group(2)) if match else None


def check_optimizer_names(names: Iterable[object]) -> tuple[str, ...]:
    """The names of a job's optimizers, checked: non-empty identifiers without dots, unique, not reserved.

    :raises ValueError: naming the bad name and what to use instead.
    """
    seen: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"optimizer name {name!r}: use a non-empty identifier without dots, like 'generator' (it becomes "
                "the key prefix of a revision: generator.lr=0.001)"
            )
        if name in RESERVED:
            raise ValueError(f"optimizer name {name!r} is a key weavelet uses itself; choose another name")
        if name in seen:
            raise ValueError(f"optimizer name {name!r} is given twice")
        seen.append(name)
    return tuple(seen)


# ----------------------------------------------------------------------------------------------- commands


def _short_string(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= TOKEN_MAX_CHARS


def check_command(key: str, value: object) -> None:
    """Raise :class:`ConfigProblem` unless ``value`` is a usable command token.

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
        fields = ("token", "incarnation", "to", "set") if key == ROLLBACK else ("token", "incarnation")
        extra = sorted(str(k) for k in value if k not in fields)[:5]
        if extra:
            allowed = (
                " and ".join(f'"{f}"' for f in fields) if len(fields) == 2 else ", ".join(f'"{f}"' for f in fields)
            )
            raise ConfigProblem(
                f"{key}: a command object has only {allowed}, got also {', '.join(extra)}; "
                f"send for example {key}={example}",
                key,
            )
        if key == ROLLBACK:
            check_rollback_fields(value)
        for field in ("token", "incarnation"):
            if not _short_string(value.get(field)):
                got = value.get(field)
                shown = "nothing" if got is None else f"{type(got).__name__} {str(got)[:40]!r}"
                raise ConfigProblem(
                    f'{key}: a command object\'s "{field}" must be a non-empty string of at most '
                    f"{TOKEN_MAX_CHARS} characters, got {shown}; send for example {key}={example}",
                    key,
                )
        return
    raise ConfigProblem(
        f"{key}: expected true, a number or a short string as the command's token, got "
        f"{type(value).__name__}; send for example {key}=true, or a new number each time ({key}=2)",
        key,
    )


def check_rollback_fields(value: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigProblem` unless a ``rollback`` command object's ``to`` and ``set`` are usable.

    ``to`` (default ``"latest"``): ``"latest"``, ``"snapshot"``, a step (an integer >= 0: the newest checkpoint at
    or before it) or a checkpoint path (a string of at most :data:`PATH_MAX_CHARS` characters, on the trainer's
    machine). ``set`` (default none): an object of changes applied on top of the restored checkpoint's config,
    without commands.
    """
    to = value.get("to", "latest")
    if isinstance(to, bool) or not (
        (isinstance(to, int) and to >= 0) or (isinstance(to, str) and 0 < len(to) <= PATH_MAX_CHARS)
    ):
        raise ConfigProblem(
            f'{ROLLBACK}: "to" must be "latest", "snapshot", a step (an integer >= 0) or a checkpoint path of at '
            f"most {PATH_MAX_CHARS} characters, got {_show(to)}; send for example --to latest",
            ROLLBACK,
        )
    changes = value.get("set")
    if changes is None:
        return
    if not isinstance(changes, Mapping):
        raise ConfigProblem(
            f'{ROLLBACK}: "set" must be an object of changes such as {{"lr_scale": 0.5}}, got {_show(changes)}',
            ROLLBACK,
        )
    commands = sorted(str(k) for k in changes if str(k).partition(".")[0] in COMMANDS)
    if commands:
        raise ConfigProblem(
            f"{ROLLBACK}: the changes applied after a rollback cannot hold commands ({', '.join(commands)}); "
            "send them as their own command",
            ROLLBACK,
        )


# ----------------------------------------------------------------------------------------------- values


def _show(value: object) -> str:
    if isinstance(value, str):
        shown = repr(value)
        return f"the string {shown if len(shown) <= 80 else shown[:60] + f'... ({len(value)} characters)'}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    return repr(value)


def spec_for(name: str, kind: str, *, length: int | None = None, items: Sequence[Any] | None = None) -> dict[str, Any]:
    """The spec of hyperparameter ``name`` whose reference value (held now, or the default) is of ``kind``
    (``bool``, ``int``, ``float``, ``sequence`` with ``length`` and item specs, ``str`` or ``any``)."""
    if name in BETA_KEYS or (kind == "sequence" and name.startswith("beta")):
        return {"kind": "betas", "length": length if length is not None else 2}
    if kind == "bool" or name in BOOL_KEYS:
        return {"kind": "bool"}
    ranged: dict[str, Any] = {}
    if name in NON_NEGATIVE:
        ranged = {"min": 0}
    elif name in UNIT_INTERVAL:
        ranged = {"min": 0, "max": 1}
    if kind == "int":
        return {"kind": "int", **ranged}
    if kind == "float" or ranged:
        return {"kind": "float", **ranged}
    if kind == "sequence":
        return {"kind": "sequence", "items": list(items or [])}
    if kind in ("str", "any"):
        return {"kind": kind}
    return {"kind": "any"}


def _to_float(value: int | float) -> float:
    """``float(value)``, or an infinity of its sign for an integer too large for any float (hundreds of digits)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigProblem(f"{key}: expected a number, got {_show(value)}", key)
    number = _to_float(value)
    if not math.isfinite(number):
        raise ConfigProblem(f"{key}: {_show(value)} is not a finite number; send a finite number", key)
    return number


def _check_range(key: str, spec: Mapping[str, Any], number: float) -> None:
    low, high = spec.get("min"), spec.get("max")
    if low is not None and high is not None and not low <= number <= high:
        raise ConfigProblem(f"{key}: {number:g} is outside [{low:g}, {high:g}]; send a value between {low} and {high}")
    if low is not None and high is None and number < low:
        if low == 0:
            raise ConfigProblem(f"{key}: {number:g} is negative; send a value >= 0", key)
        raise ConfigProblem(f"{key}: {number:g} is below {low:g}; send a value >= {low:g}", key)


def check_value(key: str, value: object, spec: Mapping[str, Any]) -> Any:
    """``value`` checked against ``spec`` (see :func:`spec_for`) and converted (lists to tuples, integers to
    floats where a float is held); ``key`` is the key as written in the revision, for messages.

    :raises ConfigProblem: naming the key, what was sent and what to send.
    """
    kind = spec.get("kind", "any")
    if kind == "betas":
        return _check_betas(key, value, int(spec.get("length", 2)))
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigProblem(f"{key}: expected true or false, got {_show(value)}", key)
        return value
    if kind == "int":
        # torch writes many float defaults as integers (weight_decay=0): any number is accepted.
        number = _number(key, value)
        _check_range(key, spec, number)
        return value if isinstance(value, int) else number
    if kind == "float":
        number = _number(key, value)
        _check_range(key, spec, number)
        return number
    if kind == "sequence":
        items = list(spec.get("items", ()))
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigProblem(f"{key}: expected a list of {len(items)} values, got {_show(value)}", key)
        return tuple(
            check_value(f"{key}.{i}", item, sub) if sub is not None else item
            for i, (item, sub) in enumerate(zip(value, items, strict=True))
        )
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigProblem(f"{key}: expected a string, got {_show(value)}", key)
        return value
    if isinstance(value, (dict, list)):
        raise ConfigProblem(f"{key}: expected a number, string or boolean, got {_show(value)}", key)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigProblem(f"{key}: {value!r} is not a finite number; send a finite number", key)
    return value


def _check_betas(key: str, value: object, length: int) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ConfigProblem(f"{key}: expected a list of {length} numbers in [0, 1), got {_show(value)}", key)
    numbers = tuple(_number(f"{key}.{i}", item) for i, item in enumerate(value))
    if not all(0.0 <= b < 1.0 for b in numbers):
        shown = ", ".join(f"{b:g}" for b in numbers)
        raise ConfigProblem(f"{key}: each value must be in [0, 1), got [{shown}]; for example {key}=[0.9, 0.999]", key)
    return numbers


def check_scale(key: str, value: object) -> float:
    """An ``lr_scale`` value as a factor (``null``: 1); raise :class:`ConfigProblem` unless a finite number > 0."""
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = f"the string {value!r}" if isinstance(value, str) else type(value).__name__
        raise ConfigProblem(f"{key}: expected a number > 0 (1 = the schedule as built), got {shown}", key)
    number = _to_float(value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigProblem(
            f"{key}: {_show(value)} is not a finite number > 0; send for example {key}=0.5 (1 = as built)", key
        )
    return number


# ----------------------------------------------------------------------------------------------- messages


def unknown_optimizer(name: object, known: Iterable[str]) -> str:
    """``unknown optimizer 'adamx'; did you mean 'adamax'? known: ...`` (or the message for a non-name)."""
    names = sorted(known)
    if not isinstance(name, str) or not name.strip():
        return f"optimizer: expected an optimizer name, got {name!r}; known: {', '.join(names)}"
    close = difflib.get_close_matches(name.strip().lower(), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown optimizer {name!r}; {hint}known: {', '.join(names)}"


def unknown_key(key: str, name: str, candidates: Iterable[str], prefix: str = "") -> tuple[str, str]:
    """``(text, hint)`` for an unknown key: the text names it with the closest candidate (or the usual other
    spelling, ``learning_rate`` -> ``lr``); the hint lists the known keys (shown once among several problems)."""
    names = sorted(set(candidates))
    alias = KEY_ALIASES.get(name.lower())
    close = [alias] if alias in names else difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {prefix + close[0]!r}? " if close else ""
    if prefix:
        owner = prefix[:-1]
        return f"unknown key {key!r}; {hint}{owner} has no such key", f"known keys of {owner}: {', '.join(names)}"
    return (
        f"unknown key {key!r}; {hint}a key of your own needs a handler in the training script "
        f"(live.on({name!r}, ...) or callback.on({name!r}, ...))",
        f"known keys: {', '.join(names)}",
    )


def not_allowed(key: str, allow: Iterable[str] | None, handlers: Iterable[str]) -> str:
    """The message for a key outside the run's allow-list."""
    allowed = sorted({*(allow or ()), *handlers})
    return (
        f"{key}: not in this run's allow-list of remotely settable keys "
        f"({', '.join(allowed) if allowed else 'none'}); the training script decides which keys are allowed"
    )


def not_a_hyperparameter(key: str, name: str, target: str, keys: str, flags: Iterable[str]) -> str:
    """The message for a key the target optimizer type does not take (``keys``: its hyperparameters)."""
    why = (
        "it selects a kernel, not a hyperparameter, and is never set remotely"
        if name in set(flags)
        else f"{target}'s hyperparameters are {keys}"
    )
    return f"{key}: not a hyperparameter of {target} ({why}); remove it with {key}=null"


def describe_keys(hyperparameters: Iterable[str] | None) -> str:
    """How a message lists an optimizer type's hyperparameters."""
    if hyperparameters is None:
        return "any keyword its factory accepts"
    return ", ".join(sorted(hyperparameters))


def group_out_of_range(key: str, count: int) -> str:
    return f"{key}: the optimizer has {count} param group{'s' if count != 1 else ''} (indexes 0 to {count - 1})"


def group_lr_scale(key: str, index: int, prefix: str = "") -> str:
    return (
        f"{key}: lr_scale scales every param group's schedule; send {prefix}lr_scale=<factor>, or "
        f"{prefix}param_groups.{index}.lr for this group's learning rate"
    )


def not_nested(key: str, names: Sequence[str]) -> str:
    """A key of an optimizer sent at the top level of a run that steers several."""
    ways = " or ".join(f"{name}.{key}=..." for name in names[:4])
    return (
        f"{key}: this run steers several optimizers ({', '.join(names)}), each one's keys nested under its name; "
        f"send {ways}"
    )


def unknown_top_level(key: str, names: Sequence[str], handlers: Iterable[str]) -> tuple[str, str]:
    """``(text, hint)`` for an unknown top-level key of a run that steers several optimizers: perhaps a
    misspelt optimizer name."""
    candidates = sorted({*names, *COMMANDS, *handlers})
    close = difflib.get_close_matches(key, list(names), n=1) or difflib.get_close_matches(key, candidates, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"unknown optimizer or key {key!r}; {hint}a key of your own needs a handler in the training script "
        f"(live.on({key!r}, ...) or callback.on({key!r}, ...))",
        f"this run's optimizers: {', '.join(names)}; other keys: {', '.join(sorted({*COMMANDS, *handlers}))}",
    )


# ----------------------------------------------------------------------------------------------- the checker


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def _merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            current = merged.get(key)
            merged[key] = _merge(current if isinstance(current, Mapping) else {}, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class _Checker:
    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.nested = bool(schema.get("nested"))
        self.slots: dict[str | None, Mapping[str, Any]] = {
            entry.get("name"): entry for entry in schema.get("optimizers") or () if isinstance(entry, Mapping)
        }
        self.names = [n for n in self.slots if isinstance(n, str)]
        self.types: Mapping[str, Any] = schema.get("types") or {}
        self.flags = list(schema.get("flags") or ())
        self.handlers = list(schema.get("handlers") or ())
        self.commands = list(schema.get("commands") or COMMANDS)
        allow = schema.get("allow")
        self.allow = frozenset(allow) if isinstance(allow, list) else None
        self.unsupported: Mapping[str, Any] = schema.get("unsupported") or {}
        self.hints: set[str] = set()

    def hyper(self, type_name: str) -> set[str] | None:
        keys = (self.types.get(type_name) or {}).get("keys")
        return None if keys is None else set(keys)

    def everywhere(self, slot: Mapping[str, Any]) -> set[str]:
        names: set[str] = set()
        for entry in self.types.values():
            names |= set((entry or {}).get("keys") or ())
        return names | set(slot.get("keys") or {})

    def accepts(self, type_name: str, name: str) -> bool:
        hyper = self.hyper(type_name)
        return name not in self.flags and (hyper is None or name in hyper)

    def allowed(self, prefix: str, name: str) -> bool:
        return self.allow is None or name in self.allow or f"{prefix}{name}" in self.allow

    def unknown(self, text: str, hint: str) -> str:
        if hint in self.hints:
            return text
        self.hints.add(hint)
        return f"{text}; {hint}"


def check(
    schema: Mapping[str, Any], changes: Mapping[str, Any], current_config: Mapping[str, Any] | None = None
) -> list[str]:
    """What the live run described by ``schema`` would refuse in ``changes`` merged onto ``current_config``
    (its desired config now), in the applier's own words; empty when nothing is wrong that can be seen here.

    Only keys whose value ``changes`` sets or alters are judged (a bad value already stored is the trainer's to
    report). Checked: the config's shape, key names (allow-list, unknown keys with a suggestion, keys the
    target optimizer type does not take), value kinds and ranges, param-group indexes, ``lr_scale``, command
    tokens, the optimizer type's name and, for a run steering several optimizers, their names. Not checked
    (the trainer still judges them): the script's own validators, whether the combination is accepted by the
    optimizer's constructor, and the rehearsal of the next step.
    """
    c = _Checker(schema)
    names = tuple(c.names) if c.nested else ()
    base = dict(current_config or {})
    try:
        flat = flatten(_merge(base, changes), names)
    except ConfigProblem as exc:
        return [str(exc)]
    try:
        old = flatten(base, names)
    except ConfigProblem:
        old = {}
    problems: list[str] = []
    changed = {k: v for k, v in flat.items() if k not in old or not _same(old[k], v)}
    for key, value in changed.items():
        try:
            if key in c.commands:
                check_command(key, value)
            elif key in c.handlers:
                continue
            elif c.nested:
                head, dot, rest = key.partition(".")
                if dot and head in c.slots:
                    _check_slot_key(c, c.slots[head], f"{head}.", key, rest, value, flat)
                elif key in (OPTIMIZER, LR_SCALE) or group_key(key) is not None or key in c.everywhere({}):
                    problems.append(not_nested(key, c.names))
                else:
                    problems.append(c.unknown(*unknown_top_level(head, c.names, c.handlers)))
            else:
                slot = c.slots.get(None)
                if slot is None:
                    return problems
                _check_slot_key(c, slot, "", key, key, value, flat)
        except ConfigProblem as exc:
            problems.append(str(exc))
        except _UnknownKey as exc:
            problems.append(c.unknown(exc.text, exc.hint))
    return problems


class _UnknownKey(Exception):
    def __init__(self, text: str, hint: str) -> None:
        super().__init__(text)
        self.text, self.hint = text, hint


def _check_slot_key(
    c: _Checker, slot: Mapping[str, Any], prefix: str, key: str, local: str, value: Any, flat: Mapping[str, Any]
) -> None:
    active = str(slot.get("type"))
    target: str | None = active
    wanted = flat.get(prefix + OPTIMIZER)
    if wanted is not None:
        target = wanted.strip().lower() if isinstance(wanted, str) else None
        if target not in c.types:
            target = None
    if local == OPTIMIZER:
        if not c.allowed(prefix, OPTIMIZER):
            raise ConfigProblem(not_allowed(key, c.allow, c.handlers))
        named = value.strip().lower() if isinstance(value, str) else ""
        if named in c.unsupported:
            raise ConfigProblem(f"optimizer {value!r} cannot be switched to in a running fit: {c.unsupported[named]}")
        if target is None:
            raise ConfigProblem(unknown_optimizer(value, c.types))
        if target != active and slot.get("swap"):
            raise ConfigProblem(
                f"{key}: cannot switch {active} to {target}: {slot['swap']}; hyperparameter edits (lr, "
                "weight_decay, ...) still apply"
            )
        return
    if local == LR_SCALE:
        if not c.allowed(prefix, LR_SCALE):
            raise ConfigProblem(not_allowed(key, c.allow, c.handlers))
        check_scale(key, value)
        return
    swap = target is not None and target != active
    parsed = group_key(local)
    if parsed is not None:
        index, name = parsed
        if name == LR_SCALE:
            raise ConfigProblem(group_lr_scale(key, index, prefix))
        count = int(slot.get("param_groups") or 0)
        if index >= count:
            raise ConfigProblem(group_out_of_range(key, count))
    else:
        name = local
    _check_name(c, slot, prefix, key, name, target)
    check_value(key, value, _spec(c, slot, name, target or active, swap))


def _spec(c: _Checker, slot: Mapping[str, Any], name: str, target: str, swap: bool) -> Mapping[str, Any]:
    defaults: Mapping[str, Any] = (c.types.get(target) or {}).get("keys") or {}
    held: Mapping[str, Any] = slot.get("keys") or {}
    found: Mapping[str, Any] | None = None
    if swap and defaults.get(name) is not None:
        found = defaults[name]
    elif held.get(name) is not None:
        found = held[name]
    elif defaults.get(name) is not None:
        found = defaults[name]
    return found if found is not None else spec_for(name, "any")


def _check_name(c: _Checker, slot: Mapping[str, Any], prefix: str, key: str, name: str, target: str | None) -> None:
    everywhere = c.everywhere(slot)
    if c.accepts(target, name) if target is not None else name in everywhere and name not in c.flags:
        if not c.allowed(prefix, name):
            raise ConfigProblem(not_allowed(key, c.allow, c.handlers))
        return
    assert target is not None
    if name in everywhere or name in c.flags or name in set(slot.get("group_keys") or ()):
        raise ConfigProblem(not_a_hyperparameter(key, name, target, describe_keys(c.hyper(target)), c.flags))
    hyper = c.hyper(target) or set()
    if prefix:
        candidates = {*hyper, OPTIMIZER, LR_SCALE} if c.allow is None else {*c.allow}
    else:
        candidates = (
            {*hyper, OPTIMIZER, LR_SCALE, *c.commands, *c.handlers}
            if c.allow is None
            else {
                *c.allow,
                *c.handlers,
            }
        )
    raise _UnknownKey(*unknown_key(key, name, candidates, prefix))


__all__ = [
    "BETA_KEYS",
    "BOOL_KEYS",
    "COMMANDS",
    "KEY_ALIASES",
    "NON_NEGATIVE",
    "PATH_MAX_CHARS",
    "RESERVED",
    "ROLLBACK",
    "ROLLBACK_TARGETS",
    "SCHEMA_VERSION",
    "UNIT_INTERVAL",
    "ConfigProblem",
    "check",
    "check_command",
    "check_optimizer_names",
    "check_rollback_fields",
    "check_scale",
    "check_value",
    "flatten",
    "group_key",
    "spec_for",
    "unknown_key",
    "unknown_optimizer",
]
