"""Applying one revision of a run's desired config to a live optimizer: all of it, or none of it.

The order of an apply, and what a failure at each point leaves behind:

1. **Commands** (``stop``, ``checkpoint``, ``rollback``) are read first and kept apart from the config: a
   command whose token is new acts in this apply whatever becomes of the rest of the revision (the emergency
   brake), once. Its token is recorded in :attr:`Applier.acted_commands` (part of :meth:`Applier.state_dict`),
   not in the applied config, so fixing a rejected key later does not make it act again.
2. **Validate** the whole config against the optimizer it asks for: key names (the allow-list, unknown keys
   with a suggestion), value types and ranges, param-group indexes, the optimizer name, whether this loop can
   switch optimizer types, user validators, and the values' combination (the target optimizer's own
   constructor checks them on a throwaway parameter). Every problem is reported at once, each with the revision
   that introduced the bad value. Nothing has changed when this fails.
3. **Rehearse** (dry run): a throwaway optimizer of the current type over tiny parameters of the same groups,
   deep copies of the schedulers bound to it, then exactly the changes of step 5 (the new optimizer built,
   the schedulers rescaled and rebound), an optimizer step and a scheduler step. What would raise rejects the
   revision; the live optimizer and schedulers are never touched by it.
4. **Handlers** registered with :meth:`Applier.on` run for their changed keys. A handler that raises rejects
   the revision; handlers that already ran for it are not undone (give them a ``validate`` function to fail
   in step 2 instead).
5. **Commit**: ``lr_scale``, param-group edits, scheduler rescaling and rebinding, installing the new optimizer;
   then the commands act (a checkpoint is saved, stop is requested). If committing, or saving a requested
   checkpoint, fails, every optimizer and scheduler change is put back (the commands still acted).

Only keys whose desired value differs from the last *applied* config are acted upon: a config is desired state,
so an unchanged ``lr`` that a scheduler has since decayed is left alone. The whole config is still validated
every time.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import torch

from weavelet_core import schema as core_schema
from weavelet_torch import config as cfg
from weavelet_torch import rollback
from weavelet_torch.errors import Rejected
from weavelet_torch.host import OptimizerHost
from weavelet_torch.optimizers import (
    CARRIED_ON_SWITCH,
    IMPLEMENTATION_FLAGS,
    UNSUPPORTED,
    OptimizerChoice,
    choice_for_class,
    decoupled_weight_decay,
    known_optimizers,
    name_of,
    resolve,
)
from weavelet_torch.rollback import Restorer
from weavelet_torch.schedulers import (
    Snapshot,
    check_rebind,
    copy_schedulers,
    rebind,
    rescale_lrs,
    scale_schedule,
)
from weavelet_torch.values import check_value, spec_of, to_json

Handler = Callable[[Any], None]
"""``handler(value)``: acts on a user key's new value; raising rejects the revision."""
Validator = Callable[[Any], None]
"""``validate(value)``: raises (any exception, its message is shown) if ``value`` is unacceptable."""
F = TypeVar("F", bound=Handler)

STATE_FORMAT = 2
"""Format of :meth:`Applier.state_dict`; 2 added ``acted_commands``. Format 1 is still read."""
Result = Literal["applied", "rejected", "superseded"]

MAX_PROBLEMS_SHOWN = 20
"""A rejection lists at most this many problems, then says how many more there are."""

MAX_PROBLEM_CHARS = 600
"""Each listed problem is cut to this many characters (a value sent can be long)."""

COMMAND_ORDER = (cfg.CHECKPOINT, cfg.STOP)
"""The order commands act in: a checkpoint is saved before the loop is asked to stop."""

STOPPING = "stopping at the end of this step"

KEY_ALIASES = core_schema.KEY_ALIASES
"""Names people use for a key under another spelling, suggested when a revision sends them."""

STATE_FORMAT_JOB = 3
"""Format of :meth:`Applier.state_dict` for a job steering several optimizers (adds ``optimizers``)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What became of one revision: the outcome to report.

    :param revision: the revision number.
    :param result: ``applied``, ``rejected`` or ``superseded``. It describes the config changes; commands act
        (see ``commands``) even when the result is ``rejected``.
    :param step: the global step the changes took effect at (``None`` unless applied).
    :param message: one line for a person: what changed, or every problem and what to send instead, and what
        the commands did.
    :param detail: machine-readable detail: ``changes`` (``{key: [before, after]}``), ``set_in`` (the revision
        each changed key's value came from), ``commands``, ``commands_ignored`` (``{command: why}``),
        ``checkpoint`` (its path), ``switch`` (``carried``/``defaulted``/``dropped`` keys of a type switch),
        ``notes``, ``optimizer`` (the active optimizer, after an apply), ``problems`` (count, when rejected).
    :param stop: true when a ``stop`` command acted in this revision (already requested from the host).
    :param commands: what each command that acted did (``{"checkpoint": "/path/ckpt.pt", "stop": "stopping at the
        end of this step"}``; a failed one: ``"failed: <why>"``).
    """

    revision: int
    result: Result
    step: int | None
    message: str
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    stop: bool = False
    commands: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Problem:
    key: str | None
    text: str
    hint: str = ""


class _Unknown(Rejected):
    """An unknown key: ``text`` names it, ``hint`` lists the known keys (shown once among several problems)."""

    def __init__(self, text: str, hint: str) -> None:
        super().__init__(f"{text}; {hint}")
        self.text, self.hint = text, hint


@dataclasses.dataclass
class _Switch:
    """How a switch of optimizer type builds each new param group."""

    specs: list[dict[str, Any]]
    carried: dict[str, Any]
    defaulted: dict[str, Any]
    dropped: list[str]
    was: dict[str, Any]
    notes: list[str]


@dataclasses.dataclass(eq=False)
class _Slot:
    """One optimizer the applier steers: the only one (``name`` ``None``, keys top-level) or one of a job's
    several (keys nested under ``name``)."""

    name: str | None
    host: OptimizerHost
    installed: torch.optim.Optimizer | None = None
    installed_name: str | None = None

    @property
    def prefix(self) -> str:
        return "" if self.name is None else f"{self.name}."

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.host.optimizer if self.name is None else self.host.optimizer_of(self.name)

    def schedulers(self) -> Sequence[Any]:
        return self.host.schedulers() if self.name is None else self.host.schedulers_of(self.name)

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        if self.name is None:
            self.host.install(optimizer)
        else:
            self.host.install_of(self.name, optimizer)

    def owns(self, key: str) -> bool:
        return self.name is None or key.startswith(self.prefix)

    def note(self, text: str) -> str:
        return text if self.name is None else f"{self.name}: {text}"


@dataclasses.dataclass
class _Plan:
    slot: _Slot
    revision: int
    flat: dict[str, Any]
    target: OptimizerChoice
    swap: bool
    values: dict[int, dict[str, Any]]
    explicit: dict[int, dict[str, Any]]
    changes: dict[str, list[Any]]
    scale_factor: float = 1.0
    new_optimizer: torch.optim.Optimizer | None = None
    switch: _Switch | None = None
    left_behind: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.item())
    return float(value)


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _scale_of(value: Any) -> float:
    """The ``lr_scale`` a checked config value stands for (absent or ``null``: 1)."""
    return 1.0 if value is None else float(value)


def _check_scale(key: str, value: object) -> float:
    try:
        return core_schema.check_scale(key, value)
    except core_schema.ConfigProblem as exc:
        raise Rejected(str(exc)) from None


def _show_value(value: Any, limit: int = 60) -> str:
    """A config value as a person would type it in ``weavelet set`` (bounded to ``limit`` characters)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, default=str, separators=(",", ":"))
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _corner(value: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``value``'s first (at most) 2 entries along each dimension."""
    return value.detach()[tuple(slice(0, 2) for _ in value.shape)].clone()


def _tiny_params(group: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Throwaway parameters standing for ``group``'s, each with the live parameter it copies: one per distinct
    (dtype, device, rank), at most 8; each holds the live one's first 2 entries along every dimension."""
    seen: dict[tuple[torch.dtype, torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for param in group.get("params", ()):
        if not isinstance(param, torch.Tensor):
            continue
        key = (param.dtype, param.device, param.dim())
        if key not in seen:
            if type(param) in (torch.Tensor, torch.nn.Parameter):
                tiny = _corner(param)
            else:  # a tensor subclass (DTensor, a quantised tensor...): indexing it may communicate or fail
                tiny = torch.zeros([min(n, 2) for n in param.shape], dtype=param.dtype, device=param.device)
            seen[key] = (tiny.requires_grad_(param.is_floating_point() or param.is_complex()), param)
            if len(seen) >= 8:
                break
    return list(seen.values())


def _tiny_state(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """``state`` (one parameter's optimizer state) cut down to the throwaway parameter's size; ``None`` when it
    holds tensor subclasses (left out: the rehearsal then starts that parameter from empty state)."""
    if any(isinstance(v, torch.Tensor) and type(v) is not torch.Tensor for v in state.values()):
        return None
    return {k: (_corner(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def _step_scheduler(scheduler: Any) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(0.0)
    else:
        scheduler.step()


class Applier:
    """Validates and applies revisions to the optimizers of one training loop.

    :param host: the loop's side (:class:`~weavelet_torch.host.OptimizerHost`). A host steering several
        optimizers (:meth:`~weavelet_torch.host.OptimizerHost.optimizer_names` not empty) makes this a *job*
        applier: each optimizer's keys nest under its name (``generator.lr``), a revision applies to all of them
        or to none (every optimizer is validated and rehearsed, then all are committed; a failure puts every one
        back), and commands and handler keys stay top-level.
    :param allow: the keys a revision may set remotely; default: the optimizer's hyperparameters,
        ``optimizer``, ``lr_scale``, per-group overrides and the commands. Keys with a handler are always
        allowed. With several optimizers, ``"lr"`` allows ``lr`` of every one, ``"generator.lr"`` of one.
    :param optimizers: the optimizers a revision may name; default: ``torch.optim`` plus plugins.
    :raises ValueError: when the host's optimizer names are not distinct identifiers, or collide with a key
        weavelet uses (``optimizer``, ``stop``, ...).

    Attributes the integration may set or read:

    - ``incarnation`` (str, default ``""``): the id of the trainer start this applier lives in. A command written
      as ``{"token": ..., "incarnation": ...}`` acts only when its incarnation equals this.
    - ``applied_revision``, ``applied_config``: the last applied revision and its flat config.
    - ``acted_commands``: the last token seen of each command (acted, ignored or failed).
    - ``last_checkpoint``: the path of the last checkpoint a ``checkpoint`` command saved.
    - ``names``: the optimizer names of a job (empty for one optimizer).
    """

    def __init__(
        self,
        host: OptimizerHost,
        *,
        allow: Iterable[str] | None = None,
        optimizers: Mapping[str, OptimizerChoice] | None = None,
    ) -> None:
        self.host = host
        self.allow = frozenset(allow) if allow is not None else None
        self._known = dict(optimizers) if optimizers is not None else None
        self._handlers: dict[str, tuple[Handler, Validator | None]] = {}
        self.incarnation = ""
        self.applied_revision = 0
        self.applied_config: dict[str, Any] = {}
        self.acted_commands: dict[str, Any] = {}
        self.last_checkpoint: str | None = None
        self.names: tuple[str, ...] = core_schema.check_optimizer_names(host.optimizer_names())
        self._slots = [_Slot(name, host) for name in self.names] if self.names else [_Slot(None, host)]
        self._received: dict[str, Any] = {}
        self._origin: dict[str, int] = {}
        self.saved_optimizers: dict[str, str] = {}
        """The optimizer types a loaded state recorded (``{"": "adam"}`` for one optimizer, else by name)."""
        self._types_schema: dict[str, Any] | None = None
        self._schema: dict[str, Any] | None = None
        self.restorer: Restorer | None = None
        """How this loop rolls back to a checkpoint (set by the integration; ``None``: it cannot)."""
        self.rewrite: dict[str, Any] | None = None
        """After a rollback: the flat config to write back as the run's desired config (the integration takes it)."""

    # ----------------------------------------------------------------- configuration

    @property
    def known(self) -> dict[str, OptimizerChoice]:
        """The optimizers a revision may name (loaded on first use)."""
        if self._known is None:
            self._known = known_optimizers()
        return self._known

    @overload
    def on(self, key: str, handler: None = None, *, validate: Validator | None = None) -> Callable[[F], F]: ...

    @overload
    def on(self, key: str, handler: F, *, validate: Validator | None = None) -> F: ...

    def on(self, key: str, handler: F | None = None, *, validate: Validator | None = None) -> Any:
        """Register ``handler(value)`` for the user key ``key``; usable as a decorator.

        The handler runs when a revision changes the key's value. ``validate(value)`` (optional) runs during
        validation, before anything is applied; either raising rejects the revision with its message.

        :raises ValueError: for an empty key, a key weavelet handles itself, or the name of one of the optimizers.
        :raises TypeError: for a handler that is not callable.
        """
        reserved = (cfg.OPTIMIZER, cfg.PARAM_GROUPS, cfg.LR_SCALE, *cfg.COMMANDS)
        if not isinstance(key, str) or not key or key in reserved or key.startswith(cfg.PARAM_GROUPS + "."):
            raise ValueError(f"cannot register a handler for {key!r}: it is empty or a key weavelet handles itself")
        if key in self.names or key.partition(".")[0] in self.names:
            raise ValueError(f"cannot register a handler for {key!r}: it names one of the optimizers of this run")

        def register(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"handler for {key!r} must be callable, got {type(fn).__name__}")
            self._handlers[key] = (fn, validate)
            self._schema = None
            return fn

        if handler is not None:
            return register(handler)
        return register

    # ----------------------------------------------------------------- state

    def _slot(self, name: str | None) -> _Slot:
        if name is None and len(self._slots) == 1:
            return self._slots[0]
        for slot in self._slots:
            if slot.name == name:
                return slot
        known = ", ".join(self.names) if self.names else "(one optimizer; give no name)"
        raise KeyError(f"no optimizer named {name!r} in this run; its optimizers: {known}")

    def current_choice(self, name: str | None = None) -> OptimizerChoice:
        """The optimizer type the loop steps now (``name``: which of a job's optimizers; ``None`` for the only
        one). Raises ``KeyError`` for an unknown name."""
        return self._choice(self._slot(name))

    def _choice(self, slot: _Slot) -> OptimizerChoice:
        optimizer = slot.optimizer
        if optimizer is slot.installed and slot.installed_name in self.known:
            return self.known[slot.installed_name]
        name = name_of(optimizer, self.known)
        choice = self.known.get(name)
        if choice is not None and (choice.cls is None or choice.cls is type(optimizer)):
            return choice
        return choice_for_class(type(optimizer), name)

    def _describe(self, slot: _Slot) -> dict[str, Any]:
        choice = self._choice(slot)
        groups = slot.optimizer.param_groups
        spec: dict[str, Any] = {"name": choice.name}
        if groups:
            for key, value in groups[0].items():
                if key != "params" and key not in IMPLEMENTATION_FLAGS and choice.accepts(key):
                    shown = to_json(value)
                    if shown is not None:
                        spec[key] = shown
        if len(groups) > 1:
            spec["param_groups"] = len(groups)
        return spec

    def describe(self) -> dict[str, Any]:
        """The active optimizer as a JSON object for status reports: name and group 0's hyperparameters. With
        several optimizers: ``{"name": "generator=adam, discriminator=sgd", "generator": {...}, ...}``."""
        if not self.names:
            return self._describe(self._slots[0])
        each = {str(slot.name): self._describe(slot) for slot in self._slots}
        return {"name": ", ".join(f"{n}={d['name']}" for n, d in each.items()), **each}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep: the active optimizer's name (with several, each one's under
        ``optimizers``), the last applied revision and config, and the command tokens already carried out (so a
        resume does not act on them again)."""
        types: dict[str, str] = {}
        for slot in self._slots:
            try:
                types[slot.name or ""] = self._choice(slot).name
            except RuntimeError:  # the host has no optimizer (a callback not attached to a fit)
                pass
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "optimizer": types.get("") if not self.names else None,
            "applied_revision": self.applied_revision,
            "applied_config": dict(self.applied_config),
            "acted_commands": dict(self.acted_commands),
            "last_checkpoint": self.last_checkpoint,
        }
        if self.names:
            state["format"] = STATE_FORMAT_JOB
            state["optimizers"] = types
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> str | None:
        """Take back :meth:`state_dict`; return the optimizer name it recorded for a single optimizer (see
        :meth:`recreate`). The types of every optimizer go to :attr:`saved_optimizers` (see
        :meth:`recreate_saved`).

        Reads formats 1, 2 and 3 (format 1 kept command tokens in the applied config; 3 is a job's).

        :raises ValueError: for any other format, or a state of several optimizers loaded into an applier of
            one (or the other way round).
        """
        if state.get("format") not in (1, STATE_FORMAT, STATE_FORMAT_JOB):
            raise ValueError(
                f"weavelet state has format {state.get('format')!r}, this version reads 1 to {STATE_FORMAT_JOB}; "
                "resume with the weavelet version that wrote the checkpoint"
            )
        saved = state.get("optimizers")
        if isinstance(saved, Mapping) and saved:
            types = {str(k): v for k, v in saved.items() if isinstance(v, str)}
            if not self.names:
                raise ValueError(
                    f"this weavelet state steered several optimizers ({', '.join(types)}); this run steers one: "
                    "resume with the same optimizers={...} as the run that wrote it"
                )
        else:
            name = state.get("optimizer")
            types = {"": name} if isinstance(name, str) else {}
            if self.names and types:
                raise ValueError(
                    f"this weavelet state steered one optimizer; this run steers several ({', '.join(self.names)}): "
                    "resume with one optimizer as the run that wrote it did"
                )
        self.applied_revision = int(state.get("applied_revision", 0))
        self.applied_config = dict(state.get("applied_config", {}))
        acted = state.get("acted_commands")
        if not isinstance(acted, Mapping):
            acted = {key: self.applied_config[key] for key in cfg.COMMANDS if key in self.applied_config}
        self.acted_commands = dict(acted)
        self.last_checkpoint = state.get("last_checkpoint")
        self.saved_optimizers = types
        return types.get("")

    def recreate(self, name: str, optimizer: str | None = None) -> bool:
        """Make the loop's optimizer an optimizer of type ``name`` (when resuming), over the same groups.

        :param optimizer: which of a job's optimizers (``None``: the only one).
        :returns: whether a new optimizer was installed (``False`` when it already has that type). Used before
            the optimizer's saved state is loaded, so the saved state lands in an optimizer of the right type.
        :raises Rejected: for a type this run cannot build.
        """
        slot = self._slot(optimizer)
        try:
            target = resolve(name, self.known)
        except Rejected as exc:
            raise Rejected(f"cannot resume with the optimizer the checkpoint was written with: {exc}") from None
        if self._same_type(slot, target):
            return False
        groups = slot.optimizer.param_groups
        switch = self._switch(slot, target, groups, {}, [g["params"] for g in groups])
        new = self._construct(target, switch.specs)
        self._install(slot, target, new)
        self._schema = None
        return True

    def recreate_saved(self) -> list[str]:
        """Recreate every optimizer type :meth:`load_state_dict` recorded (see :meth:`recreate`); return the
        names (``""`` for the only one) whose optimizer was replaced. Names this run no longer has are skipped."""
        replaced = []
        for name, kind in self.saved_optimizers.items():
            if name and name not in self.names:
                continue
            if self.recreate(kind, name or None):
                replaced.append(name)
        return replaced

    def saved_differs(self) -> bool:
        """Whether a recorded optimizer type (see :meth:`load_state_dict`) differs from the active one."""
        for name, kind in self.saved_optimizers.items():
            if name and name not in self.names:
                continue
            if self._choice(self._slot(name or None)).name != kind:
                return True
        return False

    # ----------------------------------------------------------------- schema

    def schema(self) -> dict[str, Any]:
        """What this run accepts, for the run's status (see :mod:`weavelet_core.schema` for the format): each
        optimizer's active type, param-group count and hyperparameters with kind and range, every optimizer type
        a revision may name with its hyperparameters, handler keys, commands and the allow-list.

        Returns the same object while nothing in it changed (a status report passes a new one on at once).
        """
        if self._types_schema is None:
            self._types_schema = {name: self._type_schema(choice) for name, choice in sorted(self.known.items())}
        types = self._types_schema
        try:
            refusal = self.host.swap_refusal()
        except RuntimeError:  # not attached to a running fit yet
            refusal = None
        entries = []
        for slot in self._slots:
            choice = self._choice(slot)
            if choice.name not in types:
                types = {**types, choice.name: self._type_schema(choice)}
            groups = slot.optimizer.param_groups
            first: Mapping[str, Any] = groups[0] if groups else {}
            names = choice.hyperparameters
            if names is None:
                names = frozenset(k for k in first if k != "params" and k not in IMPLEMENTATION_FLAGS)
            keys = {k: spec_of(k, first.get(k, choice.defaults.get(k))) for k in sorted(names)}
            own = sorted({k for g in groups for k in g if k != "params" and k not in keys} - IMPLEMENTATION_FLAGS)
            entries.append(
                {
                    "name": slot.name,
                    "type": choice.name,
                    "param_groups": len(groups),
                    "keys": keys,
                    "group_keys": own,
                    "swap": refusal,
                }
            )
        schema: dict[str, Any] = {
            "version": core_schema.SCHEMA_VERSION,
            "nested": bool(self.names),
            "optimizers": entries,
            "types": types,
            "unsupported": dict(UNSUPPORTED),
            "flags": sorted(IMPLEMENTATION_FLAGS),
            "handlers": sorted(self._handlers),
            "commands": list(cfg.COMMANDS),
            "allow": sorted(self.allow) if self.allow is not None else None,
        }
        if schema != self._schema:
            self._schema = schema
        assert self._schema is not None
        return self._schema

    @staticmethod
    def _type_schema(choice: OptimizerChoice) -> dict[str, Any]:
        if choice.hyperparameters is None:
            return {"keys": None}
        return {"keys": {k: spec_of(k, choice.defaults.get(k)) for k in sorted(choice.hyperparameters)}}

    # ----------------------------------------------------------------- apply

    def apply(self, revision: int, config: Mapping[str, Any], *, step: int, baseline: bool = False) -> Verdict:
        """Validate and apply ``config`` (revision number ``revision``) at global step ``step``.

        :param baseline: ``config`` was already stored when this incarnation started (the newest revision at
            startup, handed over on resume or when adopting a run): its command tokens are recorded as carried
            out without acting (listed in ``detail["commands_ignored"]``); its hyperparameters apply as usual.
        :returns: the :class:`Verdict`. Never raises for a bad config: every problem is in the verdict.
        """
        if revision <= self.applied_revision:
            detail: dict[str, Any] = {}
            if baseline:
                source = self._command_source(config)
                _, _, ignored = self._read_commands(source, baseline=True)
                if ignored:
                    detail["commands_ignored"] = ignored
            return Verdict(
                revision,
                "superseded",
                None,
                f"revision {revision} is not newer than the applied revision {self.applied_revision}",
                detail,
            )

        problems: list[_Problem] = []
        try:
            flat: dict[str, Any] | None = cfg.flatten(config, self.names)
        except Rejected as exc:
            flat = None
            problems.append(_Problem(None, str(exc)))
        source = flat if flat is not None else self._command_source(config)
        self._track_origins(revision, source)
        acting, command_problems, ignored = self._read_commands(source, baseline=baseline)
        if cfg.ROLLBACK in acting:  # the checkpoint's config plus the command's changes replace the revision's
            return rollback.perform(self, revision, acting, ignored, step)
        problems.extend(command_problems)

        plans: list[_Plan] = []
        handlers: list[tuple[str, Handler, Any]] = []
        if flat is not None:
            found: list[_Problem] = []
            try:
                handlers = self._plan_job(flat, found)
                for slot in self._slots:
                    plan = self._plan(slot, revision, flat, found)
                    if plan is not None:
                        plans.append(plan)
                order = {key: i for i, key in enumerate(flat)}
                found.sort(key=lambda p: order.get(p.key, -1) if p.key is not None else -1)
                problems.extend(found)
                if not problems:
                    for plan in plans:
                        self._check_combination(plan, revision)
                    for plan in plans:
                        self._rehearse(plan)
                    for plan in plans:
                        if plan.swap:
                            assert plan.switch is not None
                            plan.new_optimizer = self._construct(plan.target, plan.switch.specs)
            except Rejected as exc:
                problems.append(_Problem(getattr(exc, "key", None), str(exc)))
            except Exception as exc:  # a config shape nobody foresaw must not end the training run
                problems.append(_Problem(None, f"could not validate the config: {type(exc).__name__}: {exc}"))
        if problems or len(plans) != len(self._slots):
            if not problems:
                problems.append(_Problem(None, "could not validate the config"))
            return self._refuse(revision, step, self._render(problems, revision), acting, ignored, len(problems))

        for key, handler, value in handlers:
            try:
                handler(value)
            except Exception as exc:
                text = f"{key}: its handler raised {type(exc).__name__}: {exc}"
                return self._refuse(revision, step, self._render([_Problem(key, text)], revision), acting, ignored)

        previous = (self.applied_revision, self.applied_config, [(s.installed, s.installed_name) for s in self._slots])
        snapshots = [Snapshot(slot.optimizer, slot.schedulers()) for slot in self._slots]
        notes: list[str] = []
        try:
            for plan in plans:
                notes.extend(plan.slot.note(n) for n in self._commit(plan))
            self.applied_revision, self.applied_config = revision, flat if flat is not None else {}
        except Exception as exc:
            self._rollback(snapshots, previous)
            reason = str(exc) if isinstance(exc, Rejected) else f"{type(exc).__name__}: {exc}"
            return self._refuse(revision, step, f"could not apply, nothing was changed: {reason}", acting, ignored)

        commands = self._act(acting, revision, step)
        failed_checkpoint = commands.get(cfg.CHECKPOINT, "").startswith("failed:")
        if failed_checkpoint:
            # A checkpoint asked for together with changes must show them: without it, none of them stay.
            self._rollback(snapshots, previous)
            reason = f"could not apply, nothing was changed: checkpoint {commands[cfg.CHECKPOINT]}"
            return self._verdict(revision, "rejected", None, reason, {}, commands, ignored)

        if any(plan.swap for plan in plans):
            self._schema = None
        detail = self._applied_detail(plans, notes)
        message = self._summary(revision, plans, handlers, detail)
        return self._verdict(revision, "applied", step, message, detail, commands, ignored)

    # ----------------------------------------------------------------- commands

    @staticmethod
    def _command_source(config: Mapping[str, Any]) -> dict[str, Any]:
        return {key: config[key] for key in cfg.COMMANDS if isinstance(config, Mapping) and key in config}

    def _read_commands(
        self, source: Mapping[str, Any], *, baseline: bool
    ) -> tuple[dict[str, Any], list[_Problem], dict[str, str]]:
        """Which commands of ``source`` act now; record every valid token as seen (see :data:`cfg.COMMANDS`)."""
        acting: dict[str, Any] = {}
        problems: list[_Problem] = []
        ignored: dict[str, str] = {}
        for key in cfg.COMMANDS:
            if key not in source:
                continue
            value = source[key]
            if not self._allowed(key):
                problems.append(_Problem(key, self._not_allowed(key)))
                continue
            try:
                cfg.check_command(key, value)
            except Rejected as exc:
                problems.append(_Problem(key, str(exc)))
                continue
            fires = cfg.command_fires(value, self.acted_commands.get(key))
            self.acted_commands[key] = value
            if not fires:
                continue
            incarnation = cfg.command_incarnation(value)
            if baseline:
                ignored[key] = f"{key}: written before this incarnation started"
            elif incarnation is not None and incarnation != self.incarnation:
                ignored[key] = (
                    f"{key}: written for incarnation {incarnation}, this is {self.incarnation or '(unnamed)'}"
                )
            else:
                acting[key] = value
        return acting, problems, ignored

    def _act(self, acting: Mapping[str, Any], revision: int, step: int) -> dict[str, str]:
        """Carry out the commands in ``acting``; one failing does not keep the others from acting."""
        done: dict[str, str] = {}
        for key in COMMAND_ORDER:
            if key not in acting:
                continue
            try:
                if key == cfg.CHECKPOINT:
                    self.last_checkpoint = self.host.save_checkpoint(f"weavelet-r{revision}-step{step}")
                    done[key] = str(self.last_checkpoint)
                elif key == cfg.STOP:
                    self.host.request_stop()
                    done[key] = STOPPING
            except Exception as exc:
                reason = str(exc) if isinstance(exc, Rejected) else f"{type(exc).__name__}: {exc}"
                done[key] = f"failed: {reason}; send a new {key} token to try again"
        return done

    @staticmethod
    def _describe_commands(commands: Mapping[str, str]) -> str:
        parts = []
        for key, what in commands.items():
            if what.startswith("failed:"):
                parts.append(f"{key} {what}")
            elif key == cfg.CHECKPOINT:
                parts.append(f"checkpoint saved to {what}")
            elif key == cfg.STOP:
                parts.append("stopping")
            elif key == cfg.ROLLBACK:
                continue  # the message leads with what the rollback did
            else:
                parts.append(f"{key}: {what}")
        return ", ".join(parts)

    def _refuse(
        self,
        revision: int,
        step: int,
        message: str,
        acting: Mapping[str, Any],
        ignored: Mapping[str, str],
        count: int = 1,
    ) -> Verdict:
        """A rejected revision: nothing of its config applied; its commands act all the same."""
        commands = self._act(acting, revision, step)
        detail: dict[str, Any] = {"problems": count} if count > 1 else {}
        return self._verdict(revision, "rejected", None, message, detail, commands, ignored)

    def _verdict(
        self,
        revision: int,
        result: Result,
        step: int | None,
        message: str,
        detail: dict[str, Any],
        commands: Mapping[str, str],
        ignored: Mapping[str, str],
    ) -> Verdict:
        if commands:
            detail["commands"] = dict(commands)
            saved = commands.get(cfg.CHECKPOINT)
            if saved is not None and not saved.startswith("failed:"):
                detail["checkpoint"] = saved
            described = self._describe_commands(commands)
            if result == "rejected":
                message = f"{message}; commands carried out: {described}"
            elif described:
                message = described if message.startswith("nothing to change") else f"{message}; {described}"
        if ignored:
            detail["commands_ignored"] = dict(ignored)
            message = f"{message}; ignored: {'; '.join(ignored.values())}"
        stop = commands.get(cfg.STOP) == STOPPING
        return Verdict(revision, result, step, message, detail, stop=stop, commands=dict(commands))

    # ----------------------------------------------------------------- where values came from

    def _track_origins(self, revision: int, flat: Mapping[str, Any]) -> None:
        """Remember, per key, the first received revision in which it had its current value (bounded by the
        config's size: keys no longer in the config are forgotten)."""
        origin = {}
        for key, value in flat.items():
            if key in self._received and _same(self._received[key], value):
                origin[key] = self._origin.get(key, revision)
            else:
                origin[key] = revision
        self._received, self._origin = dict(flat), origin

    def _from_earlier(self, key: str | None, revision: int) -> int | None:
        origin = self._origin.get(key) if key is not None else None
        return origin if origin is not None and origin != revision else None

    def _render(self, problems: Sequence[_Problem], revision: int) -> str:
        """Every problem (the first :data:`MAX_PROBLEMS_SHOWN`), each naming the earlier revision that set it."""
        parts: list[str] = []
        hints: set[str] = set()
        for problem in problems[:MAX_PROBLEMS_SHOWN]:
            text = problem.text
            if problem.hint and problem.hint not in hints:
                hints.add(problem.hint)
                text = f"{text}; {problem.hint}"
            origin = self._from_earlier(problem.key, revision)
            if problem.key is not None and origin is not None:
                prefix = f"{problem.key}: "
                reason = text[len(prefix) :] if text.startswith(prefix) else text
                shown = _show_value(self._received.get(problem.key))
                text = f"{problem.key}={shown}, set in revision {origin}: {reason}"
            parts.append(text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 3] + "...")
        more = len(problems) - MAX_PROBLEMS_SHOWN
        body = "; ".join(parts)
        if more > 0:
            body += f"; and {more} more (not listed; fix or remove these first)"
        return body if len(problems) == 1 else f"{len(problems)} problems: {body}"

    # ----------------------------------------------------------------- validation

    def _same_type(self, slot: _Slot, target: OptimizerChoice) -> bool:
        current = self._choice(slot)
        return target.name == current.name or (target.cls is not None and target.cls is type(slot.optimizer))

    def _allowed(self, key: str, slot: _Slot | None = None) -> bool:
        if self.allow is None or key in self.allow:
            return True
        return slot is not None and slot.name is not None and f"{slot.prefix}{key}" in self.allow

    def _plan_job(self, flat: Mapping[str, Any], problems: list[_Problem]) -> list[tuple[str, Handler, Any]]:
        """Check the keys no optimizer owns (handler keys; with several optimizers, anything top-level that is
        not a command) and return the handlers to run."""
        old = self.applied_config
        handlers: list[tuple[str, Handler, Any]] = []
        for key, value in flat.items():
            if key in cfg.COMMANDS:
                continue
            if key in self._handlers:
                handler, validate = self._handlers[key]
                if validate is not None:
                    try:
                        validate(value)
                    except Exception as exc:
                        problems.append(_Problem(key, f"{key}: {exc}"))
                        continue
                if key not in old or not _same(old[key], value):
                    handlers.append((key, handler, value))
            elif self.names and not any(slot.owns(key) for slot in self._slots):
                if key in (cfg.OPTIMIZER, cfg.LR_SCALE) or cfg.group_key(key) is not None or key in self._everywhere():
                    problems.append(_Problem(key, core_schema.not_nested(key, self.names)))
                else:
                    text, hint = core_schema.unknown_top_level(key.partition(".")[0], self.names, self._handlers)
                    problems.append(_Problem(key, text, hint))
        return handlers

    def _plan(self, slot: _Slot, revision: int, flat: dict[str, Any], problems: list[_Problem]) -> _Plan | None:
        """The changes ``flat`` asks of ``slot``'s optimizer; append what is wrong with it to ``problems`` (then
        ``None``)."""
        old = self.applied_config
        prefix = slot.prefix
        optimizer = slot.optimizer
        groups = optimizer.param_groups
        current = self._choice(slot)
        optimizer_key = prefix + cfg.OPTIMIZER

        target: OptimizerChoice | None = current
        swap = False
        if optimizer_key in flat:
            if not self._allowed(cfg.OPTIMIZER, slot):
                problems.append(_Problem(optimizer_key, self._not_allowed(optimizer_key)))
            else:
                try:
                    target = resolve(flat[optimizer_key], self.known)
                except Rejected as exc:
                    problems.append(_Problem(optimizer_key, str(exc)))
                    target = None  # the other keys are checked against every known optimizer
                else:
                    swap = not self._same_type(slot, target)
                    refusal = self.host.swap_refusal() if swap else None
                    if refusal is not None:
                        problems.append(
                            _Problem(
                                optimizer_key,
                                f"{optimizer_key}: cannot switch {current.name} to {target.name}: {refusal}; "
                                "hyperparameter edits (lr, weight_decay, ...) still apply",
                            )
                        )
        checked = target if target is not None else current

        hyper: dict[str, Any] = {}
        per_group: dict[int, dict[str, Any]] = {}
        left_behind: list[str] = []
        scale = _scale_of(old.get(prefix + cfg.LR_SCALE))
        for key, value in flat.items():
            if key in cfg.COMMANDS or key in self._handlers or not slot.owns(key):
                continue
            local = key[len(prefix) :]
            if local == cfg.OPTIMIZER:
                continue
            if swap and self._left_behind(slot, key, local, value, old, checked):
                left_behind.append(key)
                continue
            try:
                if local == cfg.LR_SCALE:
                    if not self._allowed(local, slot):
                        raise Rejected(self._not_allowed(key))
                    scale = _check_scale(key, value)
                elif (parsed := cfg.group_key(local)) is not None:
                    index, name = parsed
                    if name == cfg.LR_SCALE:
                        raise Rejected(core_schema.group_lr_scale(key, index, prefix))
                    if index >= len(groups):
                        raise Rejected(core_schema.group_out_of_range(key, len(groups)))
                    self._check_hyper_key(slot, key, name, target)
                    per_group.setdefault(index, {})[name] = check_value(
                        key, name, value, self._reference(groups[index], name, checked, swap)
                    )
                else:
                    self._check_hyper_key(slot, key, local, target)
                    hyper[local] = check_value(key, local, value, self._reference(groups[0], local, checked, swap))
            except _Unknown as exc:
                problems.append(_Problem(key, exc.text, exc.hint))
            except Rejected as exc:
                problems.append(_Problem(key, str(exc)))
        if problems or target is None:
            return None

        values: dict[int, dict[str, Any]] = {}
        explicit: dict[int, dict[str, Any]] = {}
        changes: dict[str, list[Any]] = {optimizer_key: [current.name, target.name]} if swap else {}
        old_scale = _scale_of(old.get(prefix + cfg.LR_SCALE))
        if scale != old_scale:
            changes[prefix + cfg.LR_SCALE] = [old_scale, scale]
        for index, group in enumerate(groups):
            wanted = {**hyper, **per_group.get(index, {})}
            explicit[index] = dict(wanted)
            for name, value in wanted.items():
                key = f"{prefix}{cfg.PARAM_GROUPS}.{index}.{name}"
                raw_new = flat.get(key, flat.get(prefix + name))
                raw_old = old.get(key, old.get(prefix + name))
                unchanged = (key in old or prefix + name in old) and _same(raw_old, raw_new)
                # On a swap, an unchanged desired value the old optimizer had no slot for (momentum when
                # going from Adam back to SGD) is still the desired state of the new one.
                if unchanged and not (swap and name not in group):
                    continue
                values.setdefault(index, {})[name] = value
                shown = key if key in flat else prefix + name
                changes.setdefault(shown, [to_json(group.get(name)), to_json(value)])
        notes = [slot.note(n) for n in self._kept_own(prefix, flat, old, hyper, per_group, len(groups))]
        plan = _Plan(
            slot=slot,
            revision=revision,
            flat=flat,
            target=target,
            swap=swap,
            values=values,
            explicit=explicit,
            changes=changes,
            scale_factor=scale / old_scale,
            left_behind=left_behind,
            notes=notes,
        )
        if swap:
            plan.switch = self._switch(slot, target, groups, explicit, [g["params"] for g in groups])
        return plan

    @staticmethod
    def _kept_own(
        prefix: str,
        flat: Mapping[str, Any],
        old: Mapping[str, Any],
        hyper: Mapping[str, Any],
        per_group: Mapping[int, Mapping[str, Any]],
        count: int,
    ) -> list[str]:
        """Say which groups keep their own value of an all-groups key changed in this revision."""
        notes = []
        for name in hyper:
            key = prefix + name
            if key in old and _same(old[key], flat[key]):
                continue
            own = [i for i in range(count) if name in per_group.get(i, {})]
            if own:
                where = ", ".join(f"{i} ({_fmt(to_json(per_group[i][name]))})" for i in own[:10])
                plural = "s" if len(own) > 1 else ""
                notes.append(
                    f"{name} does not change param group{plural} {where}: {'they have' if plural else 'it has'} "
                    f"its own param_groups.<i>.{name}; remove that (=null) to follow {name}"
                )
        return notes

    def _left_behind(
        self, slot: _Slot, key: str, local: str, value: Any, old: Mapping[str, Any], target: OptimizerChoice
    ) -> bool:
        """Whether ``key`` is an unchanged hyperparameter of the previous optimizer that ``target`` does not
        take (``momentum`` after ``optimizer=adam``): it stays in the desired config for a later swap back,
        and is not an error. A key changed in this revision is still checked, and refused if it does not
        apply."""
        parsed = cfg.group_key(local)
        name = parsed[1] if parsed is not None else local
        if local == cfg.LR_SCALE or name in IMPLEMENTATION_FLAGS or target.accepts(name):
            return False
        return key in old and _same(old[key], value)

    def _everywhere(self, slot: _Slot | None = None) -> set[str]:
        """Every hyperparameter name of every known optimizer (and of the active one of ``slot``, or of all)."""
        names: set[str] = set().union(*(c.hyperparameters or () for c in self.known.values()))
        for each in [slot] if slot is not None else self._slots:
            names |= set(self._choice(each).hyperparameters or ())
        return names

    def _check_hyper_key(self, slot: _Slot, key: str, name: str, target: OptimizerChoice | None) -> None:
        """Raise unless ``name`` may be set for ``target`` (``None``: the optimizer name was bad; then any known
        optimizer's hyperparameter passes)."""
        everywhere = self._everywhere(slot)
        if target.accepts(name) if target is not None else name in everywhere and name not in IMPLEMENTATION_FLAGS:
            if not self._allowed(name, slot):
                raise Rejected(self._not_allowed(key))
            return
        assert target is not None
        if name in everywhere or name in IMPLEMENTATION_FLAGS or any(name in g for g in slot.optimizer.param_groups):
            raise Rejected(
                core_schema.not_a_hyperparameter(key, name, target.name, target.describe_keys(), IMPLEMENTATION_FLAGS)
            )
        hyper = target.hyperparameters or ()
        if slot.name is not None:
            candidates = {*hyper, cfg.OPTIMIZER, cfg.LR_SCALE} if self.allow is None else {*self.allow}
        elif self.allow is None:
            candidates = {*hyper, cfg.OPTIMIZER, cfg.LR_SCALE, *cfg.COMMANDS, *self._handlers}
        else:
            candidates = {*self.allow, *self._handlers}
        raise _Unknown(*core_schema.unknown_key(key, name, candidates, slot.prefix))

    def _not_allowed(self, key: str) -> str:
        return core_schema.not_allowed(key, self.allow, self._handlers)

    @staticmethod
    def _reference(group: Mapping[str, Any], name: str, target: OptimizerChoice, swap: bool) -> Any:
        if swap and name in target.defaults:
            return target.defaults[name]
        if name in group:
            return group[name]
        return target.defaults.get(name)

    def _check_combination(self, plan: _Plan, revision: int) -> None:
        """Let the target's own constructor judge each group's resulting hyperparameters."""
        groups = plan.slot.optimizer.param_groups
        target = plan.target
        for index, group in enumerate(groups):
            changed = plan.values.get(index, {})
            if not changed and not plan.swap:
                continue
            base = plan.switch.specs[index] if plan.switch is not None else group
            kwargs = self._kwargs(target, {**base, **changed}, flags=False)
            probe = torch.zeros(2, 2, requires_grad=True)
            try:
                target.factory([probe], **kwargs)
            except Exception as exc:
                where = f" for param group {index}" if len(groups) > 1 else ""
                keys = [k for k in plan.changes if k != plan.slot.prefix + cfg.OPTIMIZER]
                raise Rejected(
                    plan.slot.note(
                        f"{target.name} refuses these hyperparameters{where}: {exc}{self._provenance(keys, revision)}"
                    )
                ) from None

    def _provenance(self, keys: Iterable[str], revision: int) -> str:
        earlier = [(k, o) for k in keys if (o := self._from_earlier(k, revision)) is not None]
        if not earlier:
            return ""
        return (
            " ("
            + ", ".join(f"{k}={_show_value(self._received.get(k))} set in revision {o}" for k, o in earlier[:10])
            + ")"
        )

    @staticmethod
    def _kwargs(target: OptimizerChoice, group: Mapping[str, Any], *, flags: bool) -> dict[str, Any]:
        """The keyword arguments ``target``'s constructor takes from ``group`` (its hyperparameters, and with
        ``flags`` the implementation flags it accepts). A factory taking ``**kwargs`` gets none: the param
        groups carry the values."""
        if target.hyperparameters is None:
            return {}
        kwargs = {
            k: v
            for k, v in group.items()
            if k != "params" and (target.accepts(k) or (flags and k in IMPLEMENTATION_FLAGS and target.accepts_flag(k)))
        }
        return {
            k: (float(v.item()) if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in kwargs.items()
        }

    # ----------------------------------------------------------------- a switch of optimizer type

    def _switch(
        self,
        slot: _Slot,
        target: OptimizerChoice,
        groups: Sequence[Mapping[str, Any]],
        explicit: Mapping[int, Mapping[str, Any]],
        params: Sequence[Sequence[torch.Tensor]],
    ) -> _Switch:
        """Each new group: the old group's lr, implementation flags and ``maximize`` (where ``target`` takes
        them), the desired config's explicit keys, the old group's own keys (scheduler and user entries); the
        rest from ``target``'s defaults."""
        current = self._choice(slot)
        everywhere = self._everywhere(slot)
        specs: list[dict[str, Any]] = []
        carried: dict[str, Any] = {}
        dropped: set[str] = set()
        was: dict[str, Any] = {}
        for index, group in enumerate(groups):
            spec: dict[str, Any] = {}
            for key, value in group.items():
                if key == "params":
                    continue
                if key not in everywhere and key not in IMPLEMENTATION_FLAGS:
                    spec[key] = _clone(value)  # initial_lr, max_momentum, a user's tag...
                elif key == "lr" or (key in CARRIED_ON_SWITCH and target.accepts_flag(key)):
                    spec[key] = _clone(value)
                elif not target.accepts(key) or key in IMPLEMENTATION_FLAGS:
                    dropped.add(key)
            for key, value in explicit.get(index, {}).items():
                if key != "lr" and target.accepts(key):
                    spec[key] = value
            if index == 0:
                carried = {k: to_json(v) for k, v in spec.items() if k in everywhere or k in IMPLEMENTATION_FLAGS}
                was = {k: to_json(v) for k, v in group.items() if k != "params"}
            spec["params"] = params[index]
            specs.append(spec)
        defaulted = {
            k: to_json(v)
            for k, v in sorted(target.defaults.items())
            if k not in carried and (target.hyperparameters is None or k in target.hyperparameters)
        }
        notes = []
        if groups and "weight_decay" in carried and carried["weight_decay"]:
            before = decoupled_weight_decay(current, groups[0])
            after = decoupled_weight_decay(target, specs[0])
            if before != after:
                kinds = ("decoupled weight decay", "an L2 penalty added to the gradient")
                old_kind, new_kind = (kinds[0], kinds[1]) if before else (kinds[1], kinds[0])
                notes.append(
                    f"weight_decay={_fmt(carried['weight_decay'])} (set in the config) was {old_kind} in "
                    f"{current.name} and is {new_kind} in {target.name}: the same number regularises "
                    f"differently; send the weight_decay you want for {target.name}"
                )
        return _Switch(specs, carried, defaulted, sorted(dropped), was, notes)

    # ----------------------------------------------------------------- rehearsal

    def _rehearse(self, plan: _Plan) -> None:
        """Dry-run ``plan`` on throwaway copies; raise :class:`Rejected` naming what would fail."""
        if not plan.values and not plan.swap and plan.scale_factor == 1.0:
            return
        slot = plan.slot
        live = slot.optimizer
        current = self._choice(slot)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pairs = [_tiny_params(group) for group in live.param_groups]
                params = [[tiny for tiny, _ in group] for group in pairs]
                specs = [
                    {**{k: _clone(v) for k, v in group.items() if k != "params"}, "params": params[i]}
                    for i, group in enumerate(live.param_groups)
                ]
                twin = self._construct(current, specs)
            except Exception as exc:
                plan.notes.append(slot.note(f"not rehearsed: a throwaway {current.name} could not be built ({exc})"))
                return
            for group in pairs:  # the same state (Adam's moments, a missing momentum buffer...) as the live one
                for tiny, param in group:
                    state = _tiny_state(live.state[param]) if param in live.state else None
                    if state is not None:
                        twin.state[tiny] = state
            copies, skipped = copy_schedulers(slot.schedulers(), live, twin)
            if skipped:
                plan.notes.append(slot.note(f"not rehearsed with {', '.join(skipped)}"))
            new = None
            if plan.swap:
                assert plan.switch is not None
                switch = self._switch(slot, plan.target, twin.param_groups, plan.explicit, params)
                new = self._construct(plan.target, switch.specs)
            self._effects(plan, twin, copies, new)
            stepped = new if new is not None else twin
            name = plan.target.name
            for _ in range(2):
                for tinies in params:
                    for tiny in tinies:
                        tiny.grad = torch.full_like(tiny, 0.01)
                try:
                    stepped.step()
                except KeyError as exc:
                    raise Rejected(
                        slot.note(
                            f"{name} would fail its next step with these settings: its per-parameter state has no "
                            f"{exc} entry (torch creates it at the first step only when the setting is on); set it "
                            "when the optimizer is built, or together with a switch to another optimizer type; "
                            "nothing was changed"
                        )
                    ) from None
                except Exception as exc:
                    raise Rejected(
                        slot.note(
                            f"{name} would fail its next step with these settings: {type(exc).__name__}: {exc}; "
                            "nothing was changed"
                        )
                    ) from None
                for scheduler in copies:
                    try:
                        _step_scheduler(scheduler)
                    except Exception as exc:
                        raise Rejected(slot.note(self._scheduler_failure(scheduler, name, exc))) from None

    @staticmethod
    def _scheduler_failure(scheduler: Any, name: str, exc: Exception) -> str:
        kind = type(scheduler).__name__
        if getattr(scheduler, "cycle_momentum", False):
            advice = f"build {kind} with cycle_momentum=False, or keep an optimizer with momentum or betas"
        else:
            advice = f"keep the current optimizer, or rebuild {kind} for {name} in the training script"
        return (
            f"{kind} would fail at its next step after this change ({type(exc).__name__}: {exc}); {advice}; "
            "nothing was changed"
        )

    # ----------------------------------------------------------------- effects

    def _construct(self, target: OptimizerChoice, specs: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """A ``target`` optimizer over the param groups ``specs``."""
        kwargs = self._kwargs(target, specs[0], flags=True) if specs else {}
        try:
            return target.factory(specs, **kwargs)
        except Exception as exc:
            raise Rejected(f"could not build {target.name} over this model's parameters: {exc}") from None

    def _install(self, slot: _Slot, target: OptimizerChoice, new: torch.optim.Optimizer) -> None:
        old = slot.optimizer
        check_rebind(slot.schedulers(), old, new, target.name)
        rebind(slot.schedulers(), old, new)
        slot.install(new)
        slot.installed, slot.installed_name = new, target.name

    def _effects(
        self,
        plan: _Plan,
        optimizer: torch.optim.Optimizer,
        schedulers: Sequence[Any],
        new: torch.optim.Optimizer | None,
    ) -> list[str]:
        """Apply ``plan`` to ``optimizer`` and ``schedulers`` (live ones, or the rehearsal's copies), with ``new``
        the optimizer a switch installs: ``lr_scale`` first, then learning rates (rescaling the schedule), the
        other values, and the rebinding. Returns notes for the outcome."""
        groups = new.param_groups if new is not None else optimizer.param_groups
        lrs = [_as_float(g.get("lr", 0.0)) for g in groups]
        if plan.scale_factor != 1.0:
            scale_schedule(schedulers, groups, plan.scale_factor)
            lrs = [lr * plan.scale_factor for lr in lrs]
        lr_changes = {i: (lrs[i], float(changed["lr"])) for i, changed in plan.values.items() if "lr" in changed}
        notes = rescale_lrs(schedulers, groups, lr_changes) if lr_changes else []
        for index, changed in plan.values.items():
            group = groups[index]
            for name, value in changed.items():
                if name == "lr":
                    continue
                current = group.get(name)
                if isinstance(current, torch.Tensor) and current.numel() == 1 and not isinstance(value, tuple):
                    current.fill_(value)
                else:
                    group[name] = value
        if new is not None:
            check_rebind(schedulers, optimizer, new, plan.target.name)
            rebind(schedulers, optimizer, new)
        return notes

    def _commit(self, plan: _Plan) -> list[str]:
        slot = plan.slot
        notes = self._effects(plan, slot.optimizer, slot.schedulers(), plan.new_optimizer)
        if plan.swap:
            assert plan.new_optimizer is not None
            slot.install(plan.new_optimizer)
            slot.installed, slot.installed_name = plan.new_optimizer, plan.target.name
        return notes

    def _rollback(
        self,
        snapshots: Sequence[Snapshot],
        previous: tuple[int, dict[str, Any], list[tuple[torch.optim.Optimizer | None, str | None]]],
    ) -> None:
        """Put every optimizer, its schedulers and the applied state back as they were before this apply."""
        self.applied_revision, self.applied_config, installed = previous
        for slot, snapshot, (optimizer, name) in zip(self._slots, snapshots, installed, strict=True):
            slot.installed, slot.installed_name = optimizer, name
            if slot.optimizer is not snapshot.optimizer:
                slot.install(snapshot.optimizer)
            snapshot.restore()

    # ----------------------------------------------------------------- reporting

    def _applied_detail(self, plans: Sequence[_Plan], notes: Sequence[str]) -> dict[str, Any]:
        changes: dict[str, list[Any]] = {}
        left_behind: list[str] = []
        switches: dict[str, Any] = {}
        all_notes: list[str] = []
        for plan in plans:
            changes.update(plan.changes)
            left_behind.extend(plan.left_behind)
            all_notes.extend(plan.notes)
            if plan.switch is not None:
                switch = {
                    "carried": plan.switch.carried,
                    "defaulted": plan.switch.defaulted,
                    "dropped": plan.switch.dropped,
                }
                if plan.slot.name is None:
                    switches = switch
                else:
                    switches[plan.slot.name] = switch
                all_notes.extend(plan.slot.note(n) for n in plan.switch.notes)
        all_notes.extend(notes)
        detail: dict[str, Any] = {"changes": changes}
        set_in = {key: self._origin[key] for key in changes if key in self._origin}
        if set_in:
            detail["set_in"] = set_in
        if left_behind:
            detail["not_applicable"] = left_behind
        if switches:
            detail["switch"] = switches
        if all_notes:
            detail["notes"] = all_notes
        detail["optimizer"] = self.describe()
        return detail

    def _summary(
        self,
        revision: int,
        plans: Sequence[_Plan],
        handlers: Sequence[tuple[str, Handler, Any]],
        detail: Mapping[str, Any],
    ) -> str:
        parts = []
        for plan in plans:
            for key, (before, after) in plan.changes.items():
                origin = self._from_earlier(key, revision)
                where = f" (set in revision {origin})" if origin is not None else ""
                parts.append(f"{key} {_fmt(before)} -> {_fmt(after)}{where}")
            if plan.switch is not None:
                parts.append(plan.slot.note(self._switch_summary(plan)))
        if handlers:
            parts.append("handled " + ", ".join(key for key, _, _ in handlers))
        for plan in plans:
            if plan.left_behind:
                parts.append(f"{', '.join(plan.left_behind)} kept in the config but not used by {plan.target.name}")
        parts.extend(detail.get("notes", ()))
        return "; ".join(parts) if parts else "nothing to change: the config matches what is applied"

    @staticmethod
    def _switch_summary(plan: _Plan) -> str:
        switch = plan.switch
        assert switch is not None
        name = plan.target.name
        # Implementation flags and maximize are named only when on: all of them are in detail["switch"].
        carried = (
            ", ".join(
                sorted(k for k, v in switch.carried.items() if k not in CARRIED_ON_SWITCH or v not in (None, False))
            )
            or "nothing"
        )
        defaulted = []
        for key in sorted(switch.defaulted):
            before = switch.was.get(key)
            if key in switch.was and before != switch.defaulted[key]:
                defaulted.append(f"{key} {_fmt(before)} -> {_fmt(switch.defaulted[key])}")
            else:
                defaulted.append(key)
        text = f"carried {carried}; {name}'s defaults for {', '.join(defaulted) or 'nothing'}"
        if switch.dropped:
            text += f"; dropped {', '.join(switch.dropped)}"
        return text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "unset" if value is None else str(value)


class OwnKeys:
    """``on()`` for the integrations (:class:`~weavelet_torch.Attachment`, the Lightning and Trainer callbacks):
    keys of your own, registered on their :class:`Applier` (``self.applier``)."""

    applier: Applier

    @overload
    def on(self, key: str, handler: None = None, *, validate: Validator | None = None) -> Callable[[F], F]: ...

    @overload
    def on(self, key: str, handler: F, *, validate: Validator | None = None) -> F: ...

    def on(self, key: str, handler: F | None = None, *, validate: Validator | None = None) -> Any:
        """Register ``handler(value)`` for a key of your own, e.g. ``@live.on("grad_clip_val")``.

        It runs (on every rank) when a revision changes the key; raising rejects the revision. ``validate`` runs
        before anything is applied. See :meth:`Applier.on`.
        """
        return self.applier.on(key, handler, validate=validate)
