"""Rolling a live run back to a checkpoint in place: the ``rollback`` command.

A revision whose ``rollback`` token is new (``weavelet rollback RUN --to latest lr_scale=0.5``) makes the
applier, at that optimizer-step boundary:

1. **locate** the checkpoint (``to``: ``"latest"``, a step, a path, or ``"snapshot"``) and **read** it
   (``torch.load(weights_only=True)``: plain tensors and containers only, nothing is unpickled beyond that);
2. **check** it against the live model and optimizers (missing or unexpected keys, shapes, dtypes, param-group
   and parameter counts, optimizer state shapes, scheduler count). A mismatch rejects the command and nothing
   has changed; under multi-process training every rank checks and all must agree;
3. **restore** the model, every optimizer (recreated with the type the checkpoint recorded when it differs) and
   scheduler, the AMP GradScaler, and weavelet's own state (the applied config; the command tokens already
   carried out stay as they are, so no command acts twice);
4. **apply** the command's ``set`` changes on top, as a revision would, and hand the integration the config to
   write back as the run's desired config (the checkpoint's config plus the changes), so the value that caused
   the trouble does not return with the next revision.

The global step and the data position are *not* rolled back: training continues with the next batch, so the
batches seen since the checkpoint are skipped (as PaLM's restarts did). Schedulers do return to the checkpoint's
position.

The integration supplies a :class:`Restorer`: how to find, read, check and restore checkpoints of its loop (the
Lightning callback's ``LightningRestorer``, :func:`weavelet_torch.attach`'s ``LoopRestorer``).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from weavelet_core.schema import ROLLBACK
from weavelet_torch import config as cfg
from weavelet_torch.errors import Rejected

if TYPE_CHECKING:
    from weavelet_torch.applier import Applier, Verdict

LATEST = "latest"
SNAPSHOT = "snapshot"
MAX_LISTED = 5
"""A mismatch message names at most this many keys of each kind."""

_STEP = re.compile(r"step[=_-]?(\d+)")


@dataclasses.dataclass
class RestorePoint:
    """One state to roll back to, read and not yet applied.

    :param source: the checkpoint's path, or ``"snapshot"``.
    :param step: the global step it was taken at (``None`` when unknown).
    :param model: the model's ``state_dict`` (``None``: a ``load`` function restores it).
    :param optimizers: each optimizer's ``state_dict``, in the loop's order.
    :param schedulers: each scheduler's ``state_dict``, in the loop's order.
    :param scaler: the AMP GradScaler's (or precision plugin's) state, or ``None``.
    :param weavelet: the applier's :meth:`~weavelet_torch.Applier.state_dict` saved with it, or ``None``.
    """

    source: str
    step: int | None
    model: Mapping[str, Any] | None = None
    optimizers: Sequence[Mapping[str, Any]] = ()
    schedulers: Sequence[Mapping[str, Any]] = ()
    scaler: Mapping[str, Any] | None = None
    weavelet: Mapping[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Restorer(abc.ABC):
    """How a training loop finds, reads, checks and restores its checkpoints (and takes snapshots).

    Called by the applier only at an optimizer-step boundary, from the training thread, on every rank.
    """

    snapshots: SnapshotRing | None = None
    """In-memory snapshots (``snapshot_every``), or ``None``."""

    @abc.abstractmethod
    def checkpoints(self) -> list[str]:
        """Paths of this run's checkpoints on this machine (any order)."""

    def locate(self, to: str | int) -> str:
        """The path ``to`` names (``"latest"``, a step, a path) or ``"snapshot"``; raise :class:`Rejected` when
        there is none. Under multi-process training rank 0 decides and every rank gets its answer."""
        return locate(to, self.checkpoints(), has_snapshot=bool(self.snapshots and self.snapshots.newest()))

    @abc.abstractmethod
    def read(self, path: str) -> RestorePoint:
        """Read the checkpoint at ``path`` without changing anything; raise :class:`Rejected` when it cannot be
        read."""

    @abc.abstractmethod
    def check(self, point: RestorePoint) -> None:
        """Raise :class:`Rejected` unless ``point`` fits the live model and optimizers (nothing changes)."""

    @abc.abstractmethod
    def restore(self, point: RestorePoint, applier: Applier) -> None:
        """Put ``point`` into the live model, optimizers, schedulers and scaler (after :meth:`check` passed)."""

    @abc.abstractmethod
    def capture(self, step: int, applier: Applier) -> RestorePoint:
        """A copy of the live state on the CPU, for an in-memory snapshot."""

    def agree(self, to: str | int, found: str | None, problem: str | None) -> tuple[str | None, str | None]:
        """Rank 0's ``(path, problem)`` on every rank (single process: as given)."""
        return found, problem

    def all_ok(self, problem: str | None) -> str | None:
        """``None`` when every rank found nothing wrong, else a problem (this rank's or another's)."""
        return problem

    def prepare(self, to: str | int) -> RestorePoint:
        """Locate, read and check the target of ``to``; raise :class:`Rejected` (nothing changed) when it cannot be
        used on any rank."""
        found: str | None = None
        problem: str | None = None
        try:
            found = self.locate(to)
        except Rejected as exc:
            problem = str(exc)
        found, problem = self.agree(to, found, problem)
        if problem is not None or found is None:
            raise Rejected(problem or f"no checkpoint for --to {to}")
        point: RestorePoint | None = None
        try:
            if found == SNAPSHOT:
                ring = self.snapshots
                newest = ring.newest() if ring is not None else None
                if newest is None:
                    raise Rejected("there is no in-memory snapshot on this rank")
                # The live state must never share tensors with the snapshot: it would change under it.
                point = dataclasses.replace(
                    newest,
                    optimizers=cpu_copy(list(newest.optimizers)),
                    schedulers=cpu_copy(list(newest.schedulers)),
                    scaler=cpu_copy(newest.scaler),
                    weavelet=cpu_copy(newest.weavelet),
                )
            else:
                point = self.read(found)
            self.check(point)
        except Rejected as exc:
            problem = str(exc)
        except Exception as exc:  # a checkpoint nobody foresaw must not end the run
            problem = f"{found}: {type(exc).__name__}: {exc}"
        problem = self.all_ok(problem)
        if problem is not None or point is None:
            raise Rejected(problem or "another rank could not use the checkpoint")
        return point


# ----------------------------------------------------------------------------------------------- finding


def step_in_name(path: str) -> int | None:
    """The step a checkpoint's file name records (``...-step120.pt``, ``epoch=0-step=120.ckpt``), or ``None``."""
    found = _STEP.findall(os.path.basename(path))
    return int(found[-1]) if found else None


def list_files(directories: Iterable[str | os.PathLike[str] | None], suffixes: tuple[str, ...]) -> list[str]:
    """Files ending in ``suffixes`` directly in the existing ``directories`` (each listed once)."""
    seen: dict[str, None] = {}
    for directory in directories:
        if directory is None or not os.path.isdir(directory):
            continue
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(suffixes):
                seen[os.path.abspath(entry.path)] = None
    return list(seen)


def locate(to: str | int, candidates: Sequence[str], *, has_snapshot: bool) -> str:
    """Choose the checkpoint ``to`` names among ``candidates`` (see :meth:`Restorer.locate`).

    ``"latest"``: the one with the highest step in its name (the newest file among those without one when none
    has a step); a step: the highest step at or before it; a path: that file, if it exists.

    :raises Rejected: naming what was looked for and what exists.
    """
    if to == SNAPSHOT:
        if not has_snapshot:
            raise Rejected(
                "rollback --to snapshot: this run keeps no in-memory snapshots (yet); start it with "
                "snapshot_every=N, or roll back to a checkpoint (--to latest)"
            )
        return SNAPSHOT
    if isinstance(to, str) and to != LATEST:
        path = os.path.abspath(os.path.expanduser(to))
        if not os.path.isfile(path):
            raise Rejected(f"rollback: no checkpoint file {path} on the trainer's machine; give an existing path")
        return path
    stepped = [(s, p) for p in candidates if (s := step_in_name(p)) is not None]
    if isinstance(to, int):
        stepped = [(s, p) for s, p in stepped if s <= to]
        if not stepped:
            raise Rejected(
                f"rollback --to {to}: no checkpoint at or before step {to} among {len(candidates)} found; "
                "roll back to a later step or --to latest"
            )
    if stepped:
        return max(stepped, key=lambda sp: (sp[0], _mtime(sp[1])))[1]
    if not candidates:
        raise Rejected(
            "rollback --to latest: this run has no checkpoint yet; save one first (weavelet checkpoint RUN) or give "
            "a path"
        )
    return max(candidates, key=_mtime)


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def load_file(path: str) -> dict[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, numbers, strings and containers only.

    :raises Rejected: for an unreadable file or one holding other objects (the message says which).
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise Rejected(f"rollback: checkpoint {path} does not exist on the trainer's machine") from None
    except Exception as exc:
        text = " ".join(str(exc).split())[:300]
        raise Rejected(
            f"rollback: checkpoint {path} cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{text}); weavelet loads only tensors and plain containers: register trusted classes with "
            "torch.serialization.add_safe_globals in the training script, or save plain state"
        ) from None
    if not isinstance(loaded, dict):
        raise Rejected(f"rollback: checkpoint {path} holds a {type(loaded).__name__}, not a dict of state")
    return loaded


# ----------------------------------------------------------------------------------------------- checking


def _listed(keys: Iterable[str]) -> str:
    items = sorted(keys)
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def check_model(live: Mapping[str, Any], saved: Mapping[str, Any], source: str) -> None:
    """Raise :class:`Rejected` unless ``saved`` has exactly ``live``'s keys, each with its shape and dtype."""
    missing = set(live) - set(saved)
    unexpected = set(saved) - set(live)
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    wrong = []
    for key in sorted(set(live) & set(saved)):
        a, b = live[key], saved[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape:
                wrong.append(f"{key} {tuple(b.shape)} (the model has {tuple(a.shape)})")
            elif a.dtype != b.dtype:
                wrong.append(f"{key} {b.dtype} (the model has {a.dtype})")
    if wrong:
        problems.append(f"other shapes or dtypes: {'; '.join(wrong[:MAX_LISTED])}")
    if problems:
        raise Rejected(
            f"rollback: checkpoint {source} does not match the model ({'; '.join(problems)}); nothing was changed: "
            "roll back to a checkpoint of this model"
        )


def check_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], what: str, source: str) -> None:
    """Raise :class:`Rejected` unless ``saved`` (an optimizer ``state_dict``) fits ``optimizer``: as many param
    groups, each with as many parameters, and per-parameter state tensors of the parameters' shapes."""
    groups = saved.get("param_groups")
    state = saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, Mapping):
        raise Rejected(f"rollback: checkpoint {source}: the state of {what} is not an optimizer state_dict")
    live = optimizer.param_groups
    if len(groups) != len(live):
        raise Rejected(
            f"rollback: checkpoint {source}: {what} has {len(groups)} param group(s) there, {len(live)} here; "
            "nothing was changed"
        )
    params: dict[int, torch.Tensor] = {}
    for index, (group, here) in enumerate(zip(groups, live, strict=True)):
        ids = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(here["params"]):
            count = len(ids) if isinstance(ids, list) else "?"
            raise Rejected(
                f"rollback: checkpoint {source}: {what}'s param group {index} has {count} parameter(s) there, "
                f"{len(here['params'])} here; nothing was changed"
            )
        params.update(zip(ids, here["params"], strict=True))
    for pid, entry in state.items():
        param = params.get(pid)
        if param is None or not isinstance(entry, Mapping):
            raise Rejected(f"rollback: checkpoint {source}: {what} holds state for an unknown parameter {pid!r}")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise Rejected(
                    f"rollback: checkpoint {source}: {what}'s {name} has shape {tuple(value.shape)}, its parameter "
                    f"{tuple(param.shape)}; nothing was changed"
                )


def check_count(what: str, saved: Sequence[Any], live: int, source: str) -> None:
    if len(saved) != live:
        raise Rejected(
            f"rollback: checkpoint {source} holds {len(saved)} {what}, this run has {live}; nothing was changed"
        )


# ----------------------------------------------------------------------------------------------- copying


def cpu_copy(value: Any) -> Any:
    """A deep copy of ``value`` with every tensor detached and copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [cpu_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(cpu_copy(v) for v in value)
    return copy.deepcopy(value)


def nbytes(value: Any) -> int:
    """Bytes held by the tensors in ``value``."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class SnapshotRing:
    """The newest ``keep`` in-memory snapshots, one every ``every`` optimizer steps.

    Memory: ``keep`` x (model + optimizer state) bytes in CPU memory, e.g. for Adam about ``3 x keep x`` the
    model's parameter bytes. :attr:`bytes` says what is held now. Taking one costs a copy of that state to the CPU
    (a device-to-host copy on a GPU).

    :raises ValueError: for ``every`` or ``keep`` below 1.
    """

    def __init__(self, every: int, keep: int = 2) -> None:
        for name, value in (("snapshot_every", every), ("snapshot_keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.every, self.keep = every, keep
        self._points: list[RestorePoint] = []

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0 and not (self._points and self._points[-1].step == step)

    def add(self, point: RestorePoint) -> None:
        self._points = [*self._points, point][-self.keep :]

    def newest(self) -> RestorePoint | None:
        return self._points[-1] if self._points else None

    @property
    def bytes(self) -> int:
        """Bytes of tensor data the snapshots hold now."""
        return sum(nbytes(dataclasses.astuple(p)) for p in self._points)


# ----------------------------------------------------------------------------------------------- the command


def target_of(value: object) -> tuple[str | int, dict[str, Any]]:
    """``(to, changes)`` of a checked ``rollback`` command value (a plain token means ``--to latest``)."""
    if isinstance(value, Mapping):
        to = value.get("to", LATEST)
        changes = value.get("set") or {}
        return (to if isinstance(to, (str, int)) else LATEST), dict(changes)
    return LATEST, {}


def perform(
    applier: Applier,
    revision: int,
    acting: Mapping[str, Any],
    ignored: Mapping[str, str],
    step: int,
) -> Verdict:
    """Carry out the ``rollback`` command in ``acting`` (and the other commands there); see the module docstring.

    The rest of the revision's config is replaced by the checkpoint's config plus the command's changes.
    """
    to, changes = target_of(acting[ROLLBACK])
    others = {k: v for k, v in acting.items() if k != ROLLBACK}
    restorer = applier.restorer
    try:
        if restorer is None:
            raise Rejected(
                "rollback: this training loop cannot roll back; give attach() a model= or load= function (the "
                "Lightning callback always can)"
            )
        flat_changes = cfg.flatten(changes, applier.names)
        point = restorer.prepare(to)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, Rejected) else f"{type(exc).__name__}: {exc}"
        commands = applier._act(others, revision, step)
        commands[ROLLBACK] = f"failed: {reason}; send a new rollback to try again"
        return applier._verdict(
            revision, "rejected", None, "not rolled back, training goes on untouched", {}, commands, ignored
        )

    acted = dict(applier.acted_commands)
    try:
        restorer.restore(point, applier)
    except Exception as exc:  # a load function that raised: it must not have changed anything
        reason = str(exc) if isinstance(exc, Rejected) else f"{type(exc).__name__}: {exc}"
        commands = applier._act(others, revision, step)
        commands[ROLLBACK] = f"failed: restoring {point.source} raised {reason}; send a new rollback to try again"
        return applier._verdict(
            revision,
            "rejected",
            None,
            f"not rolled back: restoring {point.source} raised {reason}",
            {},
            commands,
            ignored,
        )
    saved = point.weavelet if isinstance(point.weavelet, Mapping) else None
    base = {k: v for k, v in (saved or {}).get("applied_config", {}).items() if k not in cfg.COMMANDS}
    applier.acted_commands = acted  # tokens move forward: none acts twice
    applier.applied_config = dict(base)
    applier.applied_revision = revision - 1
    merged = {k: v for k, v in {**base, **flat_changes}.items() if v is not None}
    inner = applier.apply(revision, merged, step=step)
    if inner.result != "applied":  # the restore stands (the emergency brake); the changes do not
        applier.applied_revision, applier.applied_config = revision, dict(base)
        merged = dict(base)
    applier.rewrite = merged
    where = f"{point.source} (step {point.step})" if point.step is not None else point.source
    info = {"checkpoint": point.source, "checkpoint_step": point.step, "step": step, "to": to}
    commands = applier._act(others, revision, step)
    commands = {ROLLBACK: f"restored {where} at step {step}", **commands}
    detail = dict(inner.detail)
    detail.pop("commands", None)
    detail["rollback"] = info
    lead = f"rolled back to {where} at step {step}"
    if inner.result == "applied":
        message = lead if inner.message.startswith("nothing to change") else f"{lead}; then {inner.message}"
        return applier._verdict(revision, "applied", step, message, detail, commands, ignored)
    message = f"{lead}; the changes given with it were rejected: {inner.message}"
    return applier._verdict(revision, "rejected", None, message, detail, commands, ignored)


def restore_optimizers(
    applier: Applier, optimizers: Sequence[torch.optim.Optimizer], point: RestorePoint
) -> Sequence[torch.optim.Optimizer]:
    """Recreate the steered optimizers with the types ``point``'s weavelet state recorded (when they differ),
    then return them for loading; the caller loads ``point.optimizers`` into the returned objects."""
    saved = point.weavelet
    if isinstance(saved, Mapping):
        types = saved.get("optimizers")
        if isinstance(types, Mapping):
            for name, kind in types.items():
                if isinstance(kind, str) and name in applier.names:
                    applier.recreate(kind, name)
        elif isinstance(saved.get("optimizer"), str) and not applier.names:
            applier.recreate(saved["optimizer"])
    return optimizers


LoadFn = Callable[[str], "Mapping[str, Any] | None"]
"""``load(path) -> weavelet state or None``: restore model, optimizers and schedulers from ``path`` yourself,
raising (before changing anything) when it does not fit; return what ``live.state_dict()`` gave when the checkpoint
was saved, if you kept it."""


def default_dir(run: str) -> Path:
    return Path.cwd() / "weavelet-checkpoints" / run


__all__ = [
    "LATEST",
    "SNAPSHOT",
    "LoadFn",
    "RestorePoint",
    "Restorer",
    "SnapshotRing",
    "check_model",
    "check_optimizer",
    "cpu_copy",
    "load_file",
    "locate",
    "perform",
    "step_in_name",
]
