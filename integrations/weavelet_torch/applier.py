"""Applying one revision of a run's desired config to a live optimizer: all of it, or none of it.

The order of an apply, and what a failure at each point leaves behind:

1. **Commands** (``stop``, ``checkpoint``) are read first and kept apart from the config: a command whose token
   is new acts in this apply whatever becomes of the rest of the revision (the emergency brake), once. Its
   token is recorded in :attr:`Applier.acted_commands` (part of :meth:`Applier.state_dict`), not in the applied
   config, so fixing a rejected key later does not make it act again.
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
import difflib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import torch

from weavelet_torch import config as cfg
from weavelet_torch.errors import Rejected
from weavelet_torch.host import OptimizerHost
from weavelet_torch.optimizers import (
    CARRIED_ON_SWITCH,
    IMPLEMENTATION_FLAGS,
    OptimizerChoice,
    choice_for_class,
    decoupled_weight_decay,
    known_optimizers,
    name_of,
    resolve,
)
from weavelet_torch.schedulers import (
    Snapshot,
    check_rebind,
    copy_schedulers,
    rebind,
    rescale_lrs,
    scale_schedule,
)
from weavelet_torch.values import check_value, to_json

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


@dataclasses.dataclass
class _Plan:
    revision: int
    flat: dict[str, Any]
    target: OptimizerChoice
    swap: bool
    values: dict[int, dict[str, Any]]
    explicit: dict[int, dict[str, Any]]
    handlers: list[tuple[str, Handler, Any]]
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
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = f"the string {value!r}" if isinstance(value, str) else type(value).__name__
        raise Rejected(f"{key}: expected a number > 0 (1 = the schedule as built), got {shown}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise Rejected(f"{key}: {value!r} is not a finite number > 0; send for example {key}=0.5 (1 = as built)")
    return number


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
    """Validates and applies revisions to the optimizer of one training loop.

    :param host: the loop's side (:class:`~weavelet_torch.host.OptimizerHost`).
    :param allow: the keys a revision may set remotely; default: the optimizer's hyperparameters,
        ``optimizer``, ``lr_scale``, per-group overrides and the commands. Keys with a handler are always allowed.
    :param optimizers: the optimizers a revision may name; default: ``torch.optim`` plus plugins.

    Attributes the integration may set or read:

    - ``incarnation`` (str, default ``""``): the id of the trainer start this applier lives in. A command written
      as ``{"token": ..., "incarnation": ...}`` acts only when its incarnation equals this.
    - ``applied_revision``, ``applied_config``: the last applied revision and its flat config.
    - ``acted_commands``: the last token seen of each command (acted, ignored or failed).
    - ``last_checkpoint``: the path of the last checkpoint a ``checkpoint`` command saved.
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
        self._installed: torch.optim.Optimizer | None = None
        self._installed_name: str | None = None
        self._received: dict[str, Any] = {}
        self._origin: dict[str, int] = {}

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
        reserved = (cfg.OPTIMIZER, cfg.PARAM_GROUPS, cfg.LR_SCALE, *cfg.COMMANDS)
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
        """What a checkpoint must keep: the active optimizer's name, the last applied revision and config, and
        the command tokens already carried out (so a resume does not act on them again)."""
        try:
            name: str | None = self.current_choice().name
        except RuntimeError:  # the host has no optimizer (a callback not attached to a fit)
            name = None
        return {
            "format": STATE_FORMAT,
            "optimizer": name,
            "applied_revision": self.applied_revision,
            "applied_config": dict(self.applied_config),
            "acted_commands": dict(self.acted_commands),
            "last_checkpoint": self.last_checkpoint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> str | None:
        """Take back :meth:`state_dict`; return the optimizer name it recorded (see :meth:`recreate`).

        Reads formats 1 and 2 (format 1 kept command tokens in the applied config).

        :raises ValueError: for any other format.
        """
        if state.get("format") not in (1, STATE_FORMAT):
            raise ValueError(
                f"weavelet state has format {state.get('format')!r}, this version reads 1 and {STATE_FORMAT}; "
                "resume with the weavelet version that wrote the checkpoint"
            )
        self.applied_revision = int(state.get("applied_revision", 0))
        self.applied_config = dict(state.get("applied_config", {}))
        acted = state.get("acted_commands")
        if not isinstance(acted, Mapping):
            acted = {key: self.applied_config[key] for key in cfg.COMMANDS if key in self.applied_config}
        self.acted_commands = dict(acted)
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
        switch = self._switch(
            target, self.host.optimizer.param_groups, {}, [g["params"] for g in self.host.optimizer.param_groups]
        )
        new = self._construct(target, switch.specs)
        self._install(target, new)
        return True

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
            flat: dict[str, Any] | None = cfg.flatten(config)
        except Rejected as exc:
            flat = None
            problems.append(_Problem(None, str(exc)))
        source = flat if flat is not None else self._command_source(config)
        self._track_origins(revision, source)
        acting, command_problems, ignored = self._read_commands(source, baseline=baseline)
        problems.extend(command_problems)

        plan: _Plan | None = None
        if flat is not None:
            try:
                plan = self._plan(revision, flat, problems)
                if plan is not None and not problems:
                    self._rehearse(plan)
                    if plan.swap:
                        assert plan.switch is not None
                        plan.new_optimizer = self._construct(plan.target, plan.switch.specs)
            except Rejected as exc:
                problems.append(_Problem(getattr(exc, "key", None), str(exc)))
            except Exception as exc:  # a config shape nobody foresaw must not end the training run
                problems.append(_Problem(None, f"could not validate the config: {type(exc).__name__}: {exc}"))
        if problems or plan is None:
            return self._refuse(revision, step, self._render(problems, revision), acting, ignored, len(problems))

        for key, handler, value in plan.handlers:
            try:
                handler(value)
            except Exception as exc:
                text = f"{key}: its handler raised {type(exc).__name__}: {exc}"
                return self._refuse(revision, step, self._render([_Problem(key, text)], revision), acting, ignored)

        previous = (self.applied_revision, self.applied_config, self._installed, self._installed_name)
        snapshot = Snapshot(self.host.optimizer, self.host.schedulers())
        try:
            plan.notes.extend(self._commit(plan))
            self.applied_revision, self.applied_config = revision, plan.flat
        except Exception as exc:
            self._rollback(snapshot, previous)
            reason = str(exc) if isinstance(exc, Rejected) else f"{type(exc).__name__}: {exc}"
            return self._refuse(revision, step, f"could not apply, nothing was changed: {reason}", acting, ignored)

        commands = self._act(acting, revision, step)
        failed_checkpoint = commands.get(cfg.CHECKPOINT, "").startswith("failed:")
        if failed_checkpoint:
            # A checkpoint asked for together with changes must show them: without it, none of them stay.
            self._rollback(snapshot, previous)
            reason = f"could not apply, nothing was changed: checkpoint {commands[cfg.CHECKPOINT]}"
            return self._verdict(revision, "rejected", None, reason, {}, commands, ignored)

        detail = self._applied_detail(plan)
        return self._verdict(revision, "applied", step, self._summary(plan, detail), detail, commands, ignored)

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

    def _same_type(self, target: OptimizerChoice) -> bool:
        current = self.current_choice()
        return target.name == current.name or (target.cls is not None and target.cls is type(self.host.optimizer))

    def _allowed(self, key: str) -> bool:
        return self.allow is None or key in self.allow

    def _plan(self, revision: int, flat: dict[str, Any], problems: list[_Problem]) -> _Plan | None:
        """The changes ``flat`` asks for; append what is wrong with it to ``problems`` (then ``None``)."""
        old = self.applied_config
        optimizer = self.host.optimizer
        groups = optimizer.param_groups
        current = self.current_choice()

        target: OptimizerChoice | None = current
        swap = False
        if cfg.OPTIMIZER in flat:
            if not self._allowed(cfg.OPTIMIZER):
                problems.append(_Problem(cfg.OPTIMIZER, self._not_allowed(cfg.OPTIMIZER)))
            else:
                try:
                    target = resolve(flat[cfg.OPTIMIZER], self.known)
                except Rejected as exc:
                    problems.append(_Problem(cfg.OPTIMIZER, str(exc)))
                    target = None  # the other keys are checked against every known optimizer
                else:
                    swap = not self._same_type(target)
                    refusal = self.host.swap_refusal() if swap else None
                    if refusal is not None:
                        problems.append(
                            _Problem(
                                cfg.OPTIMIZER,
                                f"optimizer: cannot switch {current.name} to {target.name}: {refusal}; "
                                "hyperparameter edits (lr, weight_decay, ...) still apply",
                            )
                        )
        checked = target if target is not None else current

        hyper: dict[str, Any] = {}
        per_group: dict[int, dict[str, Any]] = {}
        handlers: list[tuple[str, Handler, Any]] = []
        left_behind: list[str] = []
        scale = _scale_of(old.get(cfg.LR_SCALE))
        for key, value in flat.items():
            if key == cfg.OPTIMIZER or key in cfg.COMMANDS:
                continue
            if swap and self._left_behind(key, value, old, checked):
                left_behind.append(key)
                continue
            try:
                if key == cfg.LR_SCALE:
                    if not self._allowed(key):
                        raise Rejected(self._not_allowed(key))
                    scale = _check_scale(key, value)
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
                    if name == cfg.LR_SCALE:
                        raise Rejected(
                            f"{key}: lr_scale scales every param group's schedule; send lr_scale=<factor>, or "
                            f"param_groups.{index}.lr for this group's learning rate"
                        )
                    if index >= len(groups):
                        raise Rejected(
                            f"{key}: the optimizer has {len(groups)} param group"
                            f"{'s' if len(groups) != 1 else ''} (indexes 0 to {len(groups) - 1})"
                        )
                    self._check_hyper_key(key, name, target)
                    per_group.setdefault(index, {})[name] = check_value(
                        key, name, value, self._reference(groups[index], name, checked, swap)
                    )
                else:
                    self._check_hyper_key(key, key, target)
                    hyper[key] = check_value(key, key, value, self._reference(groups[0], key, checked, swap))
            except _Unknown as exc:
                problems.append(_Problem(key, exc.text, exc.hint))
            except Rejected as exc:
                problems.append(_Problem(key, str(exc)))
        if problems or target is None:
            return None

        values: dict[int, dict[str, Any]] = {}
        explicit: dict[int, dict[str, Any]] = {}
        changes: dict[str, list[Any]] = {cfg.OPTIMIZER: [current.name, target.name]} if swap else {}
        old_scale = _scale_of(old.get(cfg.LR_SCALE))
        if scale != old_scale:
            changes[cfg.LR_SCALE] = [old_scale, scale]
        for index, group in enumerate(groups):
            wanted = {**hyper, **per_group.get(index, {})}
            explicit[index] = dict(wanted)
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
        notes = self._kept_own(flat, old, hyper, per_group, len(groups))
        plan = _Plan(
            revision=revision,
            flat=flat,
            target=target,
            swap=swap,
            values=values,
            explicit=explicit,
            handlers=handlers,
            changes=changes,
            scale_factor=scale / old_scale,
            left_behind=left_behind,
            notes=notes,
        )
        if swap:
            plan.switch = self._switch(target, groups, explicit, [g["params"] for g in groups])
        self._check_combination(plan, revision)
        return plan

    @staticmethod
    def _kept_own(
        flat: Mapping[str, Any],
        old: Mapping[str, Any],
        hyper: Mapping[str, Any],
        per_group: Mapping[int, Mapping[str, Any]],
        count: int,
    ) -> list[str]:
        """Say which groups keep their own value of an all-groups key changed in this revision."""
        notes = []
        for name in hyper:
            if name in old and _same(old[name], flat[name]):
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

    def _left_behind(self, key: str, value: Any, old: Mapping[str, Any], target: OptimizerChoice) -> bool:
        """Whether ``key`` is an unchanged hyperparameter of the previous optimizer that ``target`` does not
        take (``momentum`` after ``optimizer=adam``): it stays in the desired config for a later swap back,
        and is not an error. A key changed in this revision is still checked, and refused if it does not
        apply."""
        parsed = cfg.group_key(key)
        name = parsed[1] if parsed is not None else key
        if (
            key in cfg.COMMANDS
            or key == cfg.LR_SCALE
            or key in self._handlers
            or name in IMPLEMENTATION_FLAGS
            or target.accepts(name)
        ):
            return False
        return key in old and _same(old[key], value)

    def _everywhere(self) -> set[str]:
        """Every hyperparameter name of every known optimizer (and of the active one)."""
        names: set[str] = set().union(*(c.hyperparameters or () for c in self.known.values()))
        return names | set(self.current_choice().hyperparameters or ())

    def _check_hyper_key(self, key: str, name: str, target: OptimizerChoice | None) -> None:
        """Raise unless ``name`` may be set for ``target`` (``None``: the optimizer name was bad; then any known
        optimizer's hyperparameter passes)."""
        everywhere = self._everywhere()
        if target.accepts(name) if target is not None else name in everywhere and name not in IMPLEMENTATION_FLAGS:
            if not self._allowed(name):
                raise Rejected(self._not_allowed(key))
            return
        assert target is not None
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
            {*(target.hyperparameters or ()), cfg.OPTIMIZER, cfg.LR_SCALE, *cfg.COMMANDS, *self._handlers}
            if self.allow is None
            else {*self.allow, *self._handlers}
        )
        alias = KEY_ALIASES.get(name.lower())
        close = [alias] if alias in candidates else difflib.get_close_matches(name, candidates, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise _Unknown(
            f"unknown key {key!r}; {hint}a key of your own needs a handler (callback.on({name!r}))",
            f"known keys: {', '.join(candidates)}",
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

    def _check_combination(self, plan: _Plan, revision: int) -> None:
        """Let the target's own constructor judge each group's resulting hyperparameters."""
        groups = self.host.optimizer.param_groups
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
                keys = [k for k in plan.changes if k != cfg.OPTIMIZER]
                raise Rejected(
                    f"{target.name} refuses these hyperparameters{where}: {exc}{self._provenance(keys, revision)}"
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
        target: OptimizerChoice,
        groups: Sequence[Mapping[str, Any]],
        explicit: Mapping[int, Mapping[str, Any]],
        params: Sequence[Sequence[torch.Tensor]],
    ) -> _Switch:
        """Each new group: the old group's lr, implementation flags and ``maximize`` (where ``target`` takes
        them), the desired config's explicit keys, the old group's own keys (scheduler and user entries); the
        rest from ``target``'s defaults."""
        current = self.current_choice()
        everywhere = self._everywhere()
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
        live = self.host.optimizer
        current = self.current_choice()
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
                plan.notes.append(f"not rehearsed: a throwaway {current.name} could not be built ({exc})")
                return
            for group in pairs:  # the same state (Adam's moments, a missing momentum buffer...) as the live one
                for tiny, param in group:
                    state = _tiny_state(live.state[param]) if param in live.state else None
                    if state is not None:
                        twin.state[tiny] = state
            copies, skipped = copy_schedulers(self.host.schedulers(), live, twin)
            if skipped:
                plan.notes.append(f"not rehearsed with {', '.join(skipped)}")
            new = None
            if plan.swap:
                assert plan.switch is not None
                switch = self._switch(plan.target, twin.param_groups, plan.explicit, params)
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
                        f"{name} would fail its next step with these settings: its per-parameter state has no "
                        f"{exc} entry (torch creates it at the first step only when the setting is on); set it "
                        "when the optimizer is built, or together with a switch to another optimizer type; nothing "
                        "was changed"
                    ) from None
                except Exception as exc:
                    raise Rejected(
                        f"{name} would fail its next step with these settings: {type(exc).__name__}: {exc}; "
                        "nothing was changed"
                    ) from None
                for scheduler in copies:
                    try:
                        _step_scheduler(scheduler)
                    except Exception as exc:
                        raise Rejected(self._scheduler_failure(scheduler, name, exc)) from None

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

    def _install(self, target: OptimizerChoice, new: torch.optim.Optimizer) -> None:
        old = self.host.optimizer
        check_rebind(self.host.schedulers(), old, new, target.name)
        rebind(self.host.schedulers(), old, new)
        self.host.install(new)
        self._installed, self._installed_name = new, target.name

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
        notes = self._effects(plan, self.host.optimizer, self.host.schedulers(), plan.new_optimizer)
        if plan.swap:
            assert plan.new_optimizer is not None
            self.host.install(plan.new_optimizer)
            self._installed, self._installed_name = plan.new_optimizer, plan.target.name
        return notes

    def _rollback(
        self, snapshot: Snapshot, previous: tuple[int, dict[str, Any], torch.optim.Optimizer | None, str | None]
    ) -> None:
        self.applied_revision, self.applied_config, self._installed, self._installed_name = previous
        if self.host.optimizer is not snapshot.optimizer:
            self.host.install(snapshot.optimizer)
        snapshot.restore()

    # ----------------------------------------------------------------- reporting

    def _applied_detail(self, plan: _Plan) -> dict[str, Any]:
        detail: dict[str, Any] = {"changes": plan.changes}
        set_in = {key: self._origin[key] for key in plan.changes if key in self._origin}
        if set_in:
            detail["set_in"] = set_in
        if plan.left_behind:
            detail["not_applicable"] = plan.left_behind
        if plan.switch is not None:
            detail["switch"] = {
                "carried": plan.switch.carried,
                "defaulted": plan.switch.defaulted,
                "dropped": plan.switch.dropped,
            }
            plan.notes.extend(plan.switch.notes)
        if plan.notes:
            detail["notes"] = list(plan.notes)
        detail["optimizer"] = self.describe()
        return detail

    def _summary(self, plan: _Plan, detail: Mapping[str, Any]) -> str:
        parts = []
        for key, (before, after) in plan.changes.items():
            origin = self._from_earlier(key, plan.revision)
            where = f" (set in revision {origin})" if origin is not None else ""
            parts.append(f"{key} {_fmt(before)} -> {_fmt(after)}{where}")
        if plan.switch is not None:
            parts.append(self._switch_summary(plan))
        if plan.handlers:
            parts.append("handled " + ", ".join(key for key, _, _ in plan.handlers))
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
