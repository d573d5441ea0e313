"""Applying one revision of a run's desired config to a live optimizer: all of it, or none of it.

The order of an apply, and what a failure at each point leaves behind:

1. **Validate** the whole config against the optimizer it asks for: key names (the allow-list, unknown keys
   with a suggestion), value types and ranges, param-group indexes, the optimizer name, whether this loop can
   switch optimizer types, user validators, and the values' combination (the target optimizer's own
   constructor checks them on a throwaway parameter). Nothing has changed when this fails.
2. **Build** the new optimizer, for a type switch, over the same param groups. Nothing live changed yet.
3. **Handlers** registered with :meth:`Applier.on` run for their changed keys. A handler that raises rejects
   the revision; handlers that already ran for it are not undone (give them a ``validate`` function to fail
   in step 1 instead).
4. **Commit**: param-group edits, scheduler rescaling and rebinding, installing the new optimizer; then a
   requested checkpoint is saved. If anything here fails, every optimizer and scheduler change is put back.
5. ``stop`` is requested last.

Only keys whose desired value differs from the last *applied* config are acted upon: a config is desired state,
so an unchanged ``lr`` that a scheduler has since decayed is left alone, and commands act once per new token
(see :data:`weavelet_torch.config.COMMANDS`). The whole config is still validated every time.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, overload

import torch

from weavelet_torch import config as cfg
from weavelet_torch.errors import Rejected
from weavelet_torch.host import OptimizerHost
from weavelet_torch.optimizers import (
    IMPLEMENTATION_FLAGS,
    OptimizerChoice,
    choice_for_class,
    known_optimizers,
    name_of,
    resolve,
)
from weavelet_torch.schedulers import Snapshot, rebind, rescale_lr
from weavelet_torch.values import check_value, to_json

Handler = Callable[[Any], None]
"""``handler(value)``: acts on a user key's new value; raising rejects the revision."""
Validator = Callable[[Any], None]
"""``validate(value)``: raises (any exception, its message is shown) if ``value`` is unacceptable."""
F = TypeVar("F", bound=Handler)

STATE_FORMAT = 1
Result = Literal["applied", "rejected", "superseded"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What became of one revision: the outcome to report.

    ``stop`` is true when the revision asked the loop to stop (already requested from the host).
    """

    revision: int
    result: Result
    step: int | None
    message: str
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    stop: bool = False


@dataclasses.dataclass
class _Plan:
    revision: int
    flat: dict[str, Any]
    target: OptimizerChoice
    swap: bool
    values: dict[int, dict[str, Any]]
    handlers: list[tuple[str, Handler, Any]]
    checkpoint: bool
    stop: bool
    changes: dict[str, list[Any]]
    new_optimizer: torch.optim.Optimizer | None = None
    left_behind: list[str] = dataclasses.field(default_factory=list)


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


class Applier:
    """Validates and applies revisions to the optimizer of one training loop.

    :param host: the loop's side (:class:`~weavelet_torch.host.OptimizerHost`).
    :param allow: the keys a revision may set remotely; default: the optimizer's hyperparameters,
        ``optimizer``, per-group overrides and the commands. Keys with a handler are always allowed.
    :param optimizers: the optimizers a revision may name; default: ``torch.optim`` plus plugins.
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
        self.applied_revision = 0
        self.applied_config: dict[str, Any] = {}
        self.last_checkpoint: str | None = None
        self._installed: torch.optim.Optimizer | None = None
        self._installed_name: str | None = None

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
        """
        reserved = (cfg.OPTIMIZER, cfg.PARAM_GROUPS, *cfg.COMMANDS)
        if not isinstance(key, str) or not key or key in reserved or key.startswith(cfg.PARAM_GROUPS + "."):
            raise ValueError(f"cannot register a handler for {key!r}: it is empty or a key weavelet handles itself")

        def register(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"handler for {key!r} must be callable, got {type(fn).__name__}")
            self._handlers[key] = (fn, validate)
            return fn

        if handler is not None:
            return register(handler)
        return register

    # ----------------------------------------------------------------- state

    def current_choice(self) -> OptimizerChoice:
        """The optimizer type the loop steps now."""
        optimizer = self.host.optimizer
        if optimizer is self._installed and self._installed_name in self.known:
            return self.known[self._installed_name]
        name = name_of(optimizer, self.known)
        choice = self.known.get(name)
        if choice is not None and (choice.cls is None or choice.cls is type(optimizer)):
            return choice
        return choice_for_class(type(optimizer), name)

    def describe(self) -> dict[str, Any]:
        """The active optimizer as a JSON object for status reports: name and group 0's hyperparameters."""
        choice = self.current_choice()
        groups = self.host.optimizer.param_groups
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

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep: the active optimizer's name and the last applied revision."""
        try:
            name: str | None = self.current_choice().name
        except RuntimeError:  # the host has no optimizer (a callback not attached to a fit)
            name = None
        return {
            "format": STATE_FORMAT,
            "optimizer": name,
            "applied_revision": self.applied_revision,
            "applied_config": dict(self.applied_config),
            "last_checkpoint": self.last_checkpoint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> str | None:
        """Take back :meth:`state_dict`; return the optimizer name it recorded (see :meth:`recreate`)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"weavelet state has format {state.get('format')!r}, this version reads {STATE_FORMAT}; "
                "resume with the weavelet version that wrote the checkpoint"
            )
        self.applied_revision = int(state.get("applied_revision", 0))
        self.applied_config = dict(state.get("applied_config", {}))
        self.last_checkpoint = state.get("last_checkpoint")
        name = state.get("optimizer")
        return name if isinstance(name, str) else None

    def recreate(self, name: str) -> bool:
        """Make the loop's optimizer an optimizer of type ``name`` (when resuming), over the same groups.

        Returns whether a new optimizer was installed (``False`` when it already has that type). Used before
        the optimizer's saved state is loaded, so the saved state lands in an optimizer of the right type.
        """
        try:
            target = resolve(name, self.known)
        except Rejected as exc:
            raise Rejected(f"cannot resume with the optimizer the checkpoint was written with: {exc}") from None
        if self._same_type(target):
            return False
        new = self._build(target, {})
        self._install(target, new)
        return True

    # ----------------------------------------------------------------- apply

    def apply(self, revision: int, config: Mapping[str, Any], *, step: int) -> Verdict:
        """Validate and apply ``config`` (revision number ``revision``) at global step ``step``."""
        if revision <= self.applied_revision:
            return Verdict(
                revision,
                "superseded",
                None,
                f"revision {revision} is not newer than the applied revision {self.applied_revision}",
            )
        try:
            plan = self._plan(revision, config)
            if plan.swap:
                plan.new_optimizer = self._build(plan.target, plan.values)
        except Rejected as exc:
            return Verdict(revision, "rejected", None, str(exc))
        except Exception as exc:  # a config shape nobody foresaw must not end the training run
            return Verdict(revision, "rejected", None, f"could not validate the config: {type(exc).__name__}: {exc}")

        for key, handler, value in plan.handlers:
            try:
                handler(value)
            except Exception as exc:
                return Verdict(revision, "rejected", None, f"{key}: its handler raised {type(exc).__name__}: {exc}")

        previous = (self.applied_revision, self.applied_config, self._installed, self._installed_name)
        snapshot = Snapshot(self.host.optimizer, self.host.schedulers())
        detail: dict[str, Any] = {"changes": plan.changes}
        if plan.left_behind:
            detail["not_applicable"] = plan.left_behind
        try:
            self._commit(plan)
            self.applied_revision, self.applied_config = revision, plan.flat
            if plan.checkpoint:
                name = f"weavelet-r{revision}-step{step}"
                self.last_checkpoint = self.host.save_checkpoint(name)
                detail["checkpoint"] = self.last_checkpoint
        except Exception as exc:
            self._rollback(snapshot, previous)
            reason = str(exc) if isinstance(exc, Rejected) else f"{type(exc).__name__}: {exc}"
            return Verdict(revision, "rejected", None, f"could not apply, nothing was changed: {reason}")

        if plan.stop:
            self.host.request_stop()
        detail["optimizer"] = self.describe()
        return Verdict(revision, "applied", step, self._summary(plan, detail), detail, stop=plan.stop)

    # ----------------------------------------------------------------- validation

    def _same_type(self, target: OptimizerChoice) -> bool:
        current = self.current_choice()
        return target.name == current.name or (target.cls is not None and target.cls is type(self.host.optimizer))

    def _allowed(self, key: str) -> bool:
        return self.allow is None or key in self.allow

    def _plan(self, revision: int, config: Mapping[str, Any]) -> _Plan:
        flat = cfg.flatten(config)
        old = self.applied_config
        problems: list[str] = []
        optimizer = self.host.optimizer
        groups = optimizer.param_groups
        current = self.current_choice()

        target, swap = current, False
        if cfg.OPTIMIZER in flat:
            if not self._allowed(cfg.OPTIMIZER):
                problems.append(self._not_allowed(cfg.OPTIMIZER))
            else:
                target = resolve(flat[cfg.OPTIMIZER], self.known)
                swap = not self._same_type(target)
                if swap:
                    refusal = self.host.swap_refusal()
                    if refusal is not None:
                        problems.append(
                            f"optimizer: cannot switch {current.name} to {target.name}: {refusal}; "
                            "hyperparameter edits (lr, weight_decay, ...) still apply"
                        )

        hyper: dict[str, Any] = {}
        per_group: dict[int, dict[str, Any]] = {}
        handlers: list[tuple[str, Handler, Any]] = []
        commands: dict[str, Any] = {}
        left_behind: list[str] = []
        for key, value in flat.items():
            if key == cfg.OPTIMIZER:
                continue
            if swap and self._left_behind(key, value, old, target):
                left_behind.append(key)
                continue
            try:
                if key in cfg.COMMANDS:
                    if not self._allowed(key):
                        raise Rejected(self._not_allowed(key))
                    cfg.check_command(key, value)
                    commands[key] = value
                elif key in self._handlers:
                    handler, validate = self._handlers[key]
                    if validate is not None:
                        try:
                            validate(value)
                        except Exception as exc:
                            raise Rejected(f"{key}: {exc}") from None
                    if key not in old or not _same(old[key], value):
                        handlers.append((key, handler, value))
                elif (parsed := cfg.group_key(key)) is not None:
                    index, name = parsed
                    if index >= len(groups):
                        raise Rejected(
                            f"{key}: the optimizer has {len(groups)} param group"
                            f"{'s' if len(groups) != 1 else ''} (indexes 0 to {len(groups) - 1})"
                        )
                    self._check_hyper_key(key, name, target)
                    per_group.setdefault(index, {})[name] = check_value(
                        key, name, value, self._reference(groups[index], name, target, swap)
                    )
                else:
                    self._check_hyper_key(key, key, target)
                    hyper[key] = check_value(key, key, value, self._reference(groups[0], key, target, swap))
            except Rejected as exc:
                problems.append(str(exc))
        if problems:
            raise Rejected(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))

        values: dict[int, dict[str, Any]] = {}
        changes: dict[str, list[Any]] = {cfg.OPTIMIZER: [current.name, target.name]} if swap else {}
        for index, group in enumerate(groups):
            wanted = {**hyper, **per_group.get(index, {})}
            for name, value in wanted.items():
                key = f"{cfg.PARAM_GROUPS}.{index}.{name}"
                raw_new = flat.get(key, flat.get(name))
                raw_old = old.get(key, old.get(name))
                unchanged = (key in old or name in old) and _same(raw_old, raw_new)
                # On a swap, an unchanged desired value the old optimizer had no slot for (momentum when
                # going from Adam back to SGD) is still the desired state of the new one.
                if unchanged and not (swap and name not in group):
                    continue
                values.setdefault(index, {})[name] = value
                shown = key if key in flat else name
                changes.setdefault(shown, [to_json(group.get(name)), to_json(value)])
        self._check_combination(target, swap, values)

        fires = {key: cfg.command_fires(value, old.get(key)) for key, value in commands.items()}
        for key, fired in fires.items():
            if fired:
                changes[key] = [old.get(key), commands[key]]
        return _Plan(
            revision=revision,
            flat=flat,
            target=target,
            swap=swap,
            values=values,
            handlers=handlers,
            checkpoint=fires.get(cfg.CHECKPOINT, False),
            stop=fires.get(cfg.STOP, False),
            changes=changes,
            left_behind=left_behind,
        )

    def _left_behind(self, key: str, value: Any, old: Mapping[str, Any], target: OptimizerChoice) -> bool:
        """Whether ``key`` is an unchanged hyperparameter of the previous optimizer that ``target`` does not
        take (``momentum`` after ``optimizer=adam``): it stays in the desired config for a later swap back,
        and is not an error. A key changed in this revision is still checked, and refused if it does not
        apply."""
        parsed = cfg.group_key(key)
        name = parsed[1] if parsed is not None else key
        if key in cfg.COMMANDS or key in self._handlers or name in IMPLEMENTATION_FLAGS or target.accepts(name):
            return False
        return key in old and _same(old[key], value)

    def _check_hyper_key(self, key: str, name: str, target: OptimizerChoice) -> None:
        if target.accepts(name):
            if not self._allowed(name):
                raise Rejected(self._not_allowed(key))
            return
        everywhere = set().union(*(c.hyperparameters or () for c in self.known.values()))
        if (
            name in everywhere
            or name in IMPLEMENTATION_FLAGS
            or any(name in g for g in self.host.optimizer.param_groups)
        ):
            why = (
                "it selects a kernel, not a hyperparameter, and is never set remotely"
                if name in IMPLEMENTATION_FLAGS
                else f"{target.name}'s hyperparameters are {target.describe_keys()}"
            )
            raise Rejected(f"{key}: not a hyperparameter of {target.name} ({why}); remove it with {key}=null")
        candidates = sorted(
            {*(target.hyperparameters or ()), cfg.OPTIMIZER, *cfg.COMMANDS, *self._handlers}
            if self.allow is None
            else {*self.allow, *self._handlers}
        )
        close = difflib.get_close_matches(name, candidates, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise Rejected(
            f"unknown key {key!r}; {hint}known keys: {', '.join(candidates)}. A key of your own needs a handler "
            f"(callback.on({name!r}))"
        )

    def _not_allowed(self, key: str) -> str:
        allowed = sorted({*(self.allow or ()), *self._handlers})
        return (
            f"{key}: not in this run's allow-list of remotely settable keys "
            f"({', '.join(allowed) if allowed else 'none'}); the training script decides which keys are allowed"
        )

    @staticmethod
    def _reference(group: Mapping[str, Any], name: str, target: OptimizerChoice, swap: bool) -> Any:
        if swap and name in target.defaults:
            return target.defaults[name]
        if name in group:
            return group[name]
        return target.defaults.get(name)

    def _check_combination(self, target: OptimizerChoice, swap: bool, values: Mapping[int, Mapping[str, Any]]) -> None:
        """Let ``target``'s own constructor judge each group's resulting hyperparameters."""
        groups = self.host.optimizer.param_groups
        for index, group in enumerate(groups):
            changed = values.get(index, {})
            if not changed and not swap:
                continue
            kwargs = self._group_values(group, target, changed, swap)
            probe = torch.zeros(2, 2, requires_grad=True)
            try:
                target.factory([probe], **kwargs)
            except Exception as exc:
                where = f" for param group {index}" if len(groups) > 1 else ""
                raise Rejected(f"{target.name} refuses these hyperparameters{where}: {exc}") from None

    def _carried(self, group: Mapping[str, Any], target: OptimizerChoice) -> dict[str, Any]:
        """``group``'s entries that still apply under ``target`` (user extras and scheduler keys included)."""
        everywhere = set().union(*(c.hyperparameters or () for c in self.known.values()))
        everywhere |= set(self.current_choice().hyperparameters or ())
        return {
            k: v
            for k, v in group.items()
            if k != "params" and k not in IMPLEMENTATION_FLAGS and (target.accepts(k) or k not in everywhere)
        }

    def _group_values(
        self, group: Mapping[str, Any], target: OptimizerChoice, changed: Mapping[str, Any], swap: bool
    ) -> dict[str, Any]:
        """The keyword hyperparameters ``target``'s constructor would take for ``group`` after ``changed``."""
        if target.hyperparameters is None:
            merged: dict[str, Any] = dict(changed)
        else:
            base = self._carried(group, target) if swap else dict(group)
            merged = {k: v for k, v in {**base, **changed}.items() if k != "params" and target.accepts(k)}
        return {
            k: (float(v.item()) if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in merged.items()
        }

    # ----------------------------------------------------------------- effects

    def _build(self, target: OptimizerChoice, values: Mapping[int, Mapping[str, Any]]) -> torch.optim.Optimizer:
        """A ``target`` optimizer over the current optimizer's parameters and groups."""
        groups = self.host.optimizer.param_groups
        specs = [
            {**self._carried(group, target), **values.get(index, {}), "params": group["params"]}
            for index, group in enumerate(groups)
        ]
        defaults = self._group_values(specs[0], target, {}, False) if specs else {}
        try:
            return target.factory(specs, **defaults)
        except Exception as exc:
            raise Rejected(f"could not build {target.name} over this model's parameters: {exc}") from None

    def _install(self, target: OptimizerChoice, new: torch.optim.Optimizer) -> None:
        old = self.host.optimizer
        rebind(self.host.schedulers(), old, new)
        self.host.install(new)
        self._installed, self._installed_name = new, target.name

    def _commit(self, plan: _Plan) -> None:
        old_groups = self.host.optimizer.param_groups
        schedulers = self.host.schedulers()
        if plan.swap:
            assert plan.new_optimizer is not None
            for index, changed in plan.values.items():
                if "lr" in changed:
                    self._rescale(schedulers, plan.new_optimizer.param_groups[index], index, old_groups[index], changed)
            self._install(plan.target, plan.new_optimizer)
            return
        for index, changed in plan.values.items():
            group = old_groups[index]
            if "lr" in changed:
                self._rescale(schedulers, group, index, group, changed)
            for name, value in changed.items():
                current = group.get(name)
                if isinstance(current, torch.Tensor) and current.numel() == 1 and not isinstance(value, tuple):
                    current.fill_(value)
                else:
                    group[name] = value

    @staticmethod
    def _rescale(
        schedulers: Any, group: dict[str, Any], index: int, before: Mapping[str, Any], changed: Mapping[str, Any]
    ) -> None:
        old_lr = before.get("lr", 0.0)
        old = float(old_lr.item()) if isinstance(old_lr, torch.Tensor) else float(old_lr)
        rescale_lr(schedulers, group, index, old, float(changed["lr"]))

    def _rollback(
        self, snapshot: Snapshot, previous: tuple[int, dict[str, Any], torch.optim.Optimizer | None, str | None]
    ) -> None:
        self.applied_revision, self.applied_config, self._installed, self._installed_name = previous
        if self.host.optimizer is not snapshot.optimizer:
            rebind(self.host.schedulers(), self.host.optimizer, snapshot.optimizer)
            self.host.install(snapshot.optimizer)
        snapshot.restore()

    @staticmethod
    def _summary(plan: _Plan, detail: Mapping[str, Any]) -> str:
        parts = []
        for key, (before, after) in plan.changes.items():
            if key in cfg.COMMANDS:
                continue
            parts.append(f"{key} {_fmt(before)} -> {_fmt(after)}")
        if plan.handlers:
            parts.append("handled " + ", ".join(key for key, _, _ in plan.handlers))
        if plan.left_behind:
            parts.append(f"{', '.join(plan.left_behind)} kept in the config but not used by {plan.target.name}")
        if "checkpoint" in detail:
            parts.append(f"checkpoint saved to {detail['checkpoint']}")
        if plan.stop:
            parts.append("stopping at the end of this step")
        return "; ".join(parts) if parts else "nothing to change: the config matches what is applied"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "unset" if value is None else str(value)
