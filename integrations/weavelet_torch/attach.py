"""``attach()``: live reconfiguration for a hand-written PyTorch training loop.

::

    with weavelet_torch.attach(optimizer, run="mnist-1", schedulers=[scheduler], model=model) as live:
        for step, (x, y) in enumerate(loader):
            loss = loss_fn(model(x), y)
            loss.backward()
            live.optimizer.step()            # always step live.optimizer: it changes after a swap
            live.optimizer.zero_grad()
            scheduler.step()
            live.poll(step + 1, loss=loss)   # at the optimizer-step boundary
            if live.should_stop:
                break

``poll`` applies a waiting revision (hyperparameters, an optimizer swap, ``checkpoint``, ``stop``) and reports
the outcome; with nothing waiting it costs one shared-integer read plus a clock read.

Under ``torch.distributed`` (``torchrun``, DDP, FSDP2): call ``attach()`` on every rank after
``init_process_group()``. Only global rank 0 starts the weavelet sidecar and talks to the transport; at each check
(every ``check_every`` steps) rank 0 broadcasts what it polled (see :class:`~weavelet_torch.collective.Collective`)
and every rank applies the same revision at the same step, so ``live.optimizer``, its hyperparameters and
``live.should_stop`` change together everywhere. By default checks are spaced about 0.1 s apart (see
``check_every``), so that the broadcast's cost on the other ranks stays small however short the steps are.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import torch

from weavelet_core.errors import RunOwned
from weavelet_core.process import StepGate
from weavelet_core.schema import check_optimizer_names
from weavelet_torch import wrappers
from weavelet_torch.applier import Applier, OwnKeys, Verdict
from weavelet_torch.collective import Collective
from weavelet_torch.errors import Rejected
from weavelet_torch.guard import SpikeGuard
from weavelet_torch.host import OptimizerHost
from weavelet_torch.link import Link
from weavelet_torch.loop_restore import LoopRestorer
from weavelet_torch.rollback import LoadFn, RestorePoint, Restorer, SnapshotRing
from weavelet_torch.schedulers import walk
from weavelet_torch.watch import StepWatch

log = logging.getLogger("weavelet_torch")

AUTO_CHECK_SECONDS = 0.1
"""With ``check_every=None`` under ``torch.distributed``: the time rank 0 aims to leave between two checks."""

MAX_AUTO_INTERVAL = 1000
"""With ``check_every=None`` under ``torch.distributed``: at most this many steps between two checks."""

_monotonic = time.monotonic  # poll() reads the StepGate inline: a method call costs ~650 instructions

KEPT_VERDICTS = 64
"""How many verdicts :attr:`Attachment.verdicts` keeps (memory stays flat however many revisions arrive)."""

CheckpointFn = Callable[[str], str]
"""``save(name) -> path``: save a checkpoint now (``name`` is unique per revision) and return its path."""


Optimizers = torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer]
"""One optimizer, or several by name (``{"generator": opt_g, "discriminator": opt_d}``)."""

Schedulers = Iterable[Any] | Mapping[str, Iterable[Any]]
"""Schedulers: a flat list (each bound to the optimizer it drives, by identity) or lists by optimizer name."""


class LoopHost(OptimizerHost):
    """An :class:`~weavelet_torch.host.OptimizerHost` for a plain loop: holds the optimizers and schedulers.

    :param optimizer: the optimizer, or several by name (``{"generator": opt_g, "discriminator": opt_d}``:
        a revision then nests each one's keys under its name).
    :param schedulers: the schedulers driving them: a list, or with several optimizers also a mapping from
        optimizer name to its list. Each scheduler in a list follows the optimizer it drives (by identity).
    :param save_checkpoint: ``save(name) -> path`` used by the ``checkpoint`` command.
    :raises TypeError: for something that is not a ``torch.optim.Optimizer``.
    :raises ValueError: with several optimizers: an empty mapping, bad names, the same optimizer twice, a
        scheduler listed under a name whose optimizer it does not drive, or one that drives none of them.
    """

    def __init__(
        self,
        optimizer: Optimizers,
        schedulers: Schedulers = (),
        *,
        save_checkpoint: CheckpointFn | None = None,
    ) -> None:
        if isinstance(optimizer, Mapping):
            if not optimizer:
                raise ValueError("attach() got an empty mapping of optimizers; give at least one")
            names = check_optimizer_names(optimizer)
            self._names: tuple[str, ...] = names
            given = {name: _optimizer(optimizer[name], f"optimizer {name!r}") for name in names}
            if len({id(wrappers.unwrap(o)) for o in given.values()}) != len(names):
                raise ValueError("attach() got the same optimizer object under two names; give each one once")
        else:
            self._names = ()
            given = {"": _optimizer(optimizer, "optimizer")}
        # accelerate's and Fabric's wrappers: the applier works on the optimizer inside, a switch puts the new one
        # inside the same wrapper (see weavelet_torch.wrappers), and the loop keeps stepping the wrapper.
        self._wrappers = {name: o for name, o in given.items() if wrappers.kind_of(o) is not None}
        self._optimizers = {name: wrappers.unwrap(o) for name, o in given.items()}
        schedulers = self._unwrap_schedulers(schedulers)
        self._schedulers = self._bind(schedulers)
        self._save = save_checkpoint
        self.stop_requested = False

    def _unwrap_schedulers(self, schedulers: Schedulers) -> Schedulers:
        """Schedulers with accelerate's ``AcceleratedScheduler`` unwrapped, bound to the optimizers inside the
        wrappers (a scheduler built over a wrapper drives the same param groups)."""
        if isinstance(schedulers, Mapping):
            unwrapped: Schedulers = {k: [wrappers.unwrap_scheduler(s) for s in v] for k, v in schedulers.items()}
            flat = [s for items in unwrapped.values() for s in items]  # type: ignore[union-attr]
        else:
            unwrapped = flat = [wrappers.unwrap_scheduler(s) for s in schedulers]
        for wrapper in self._wrappers.values():
            wrappers.bind_to_inner(flat, wrapper)
        return unwrapped

    def stepped(self, name: str = "") -> torch.optim.Optimizer:
        """What the loop steps for the optimizer called ``name`` (``""``: the only one): the wrapper it was given
        (accelerate, Fabric), which stays the same object across switches, else the optimizer itself."""
        wrapper = self._wrappers.get(name)
        return wrapper if wrapper is not None else self._optimizers[name]

    def accumulating(self) -> bool:
        """Whether an accelerate-wrapped optimizer is inside a gradient-accumulation window (not a step boundary)."""
        return any(wrappers.accumulating(w) for w in self._wrappers.values())

    def _bind(self, schedulers: Schedulers) -> list[Any]:
        if isinstance(schedulers, Mapping):
            if not self._names:
                raise ValueError(
                    "schedulers by optimizer name need several optimizers by name; with one optimizer give a list"
                )
            flat: list[Any] = []
            for name, items in schedulers.items():
                if name not in self._optimizers:
                    raise ValueError(
                        f"schedulers for {name!r}: no optimizer of that name; the optimizers are "
                        f"{', '.join(self._names)}"
                    )
                for scheduler in items:
                    if not _drives(scheduler, self._optimizers[name]):
                        raise ValueError(
                            f"{type(scheduler).__name__} is listed under {name!r} but does not drive that optimizer; "
                            "build it over that optimizer or list it under the one it drives"
                        )
                    flat.append(scheduler)
            return flat
        flat = list(schedulers)
        if self._names:
            for scheduler in flat:
                if not any(_drives(scheduler, o) for o in self._optimizers.values()):
                    raise ValueError(
                        f"{type(scheduler).__name__} drives none of the optimizers given to attach() "
                        f"({', '.join(self._names)}); build it over one of them"
                    )
        return flat

    def optimizer_names(self) -> Sequence[str]:
        return self._names

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._names:
            raise RuntimeError(
                f"this loop steers several optimizers ({', '.join(self._names)}): use live.optimizers[name] "
                f"(for example live.optimizers[{self._names[0]!r}])"
            )
        return self._optimizers[""]

    @property
    def optimizers(self) -> Mapping[str, torch.optim.Optimizer]:
        """The optimizers by name (with one optimizer: ``{"": optimizer}``)."""
        return self._optimizers

    def optimizer_of(self, name: str) -> torch.optim.Optimizer:
        return self._optimizers[name]

    def schedulers(self) -> Sequence[Any]:
        return self._schedulers

    def schedulers_of(self, name: str) -> Sequence[Any]:
        optimizer = self._optimizers[name]
        return [s for s in self._schedulers if _drives(s, optimizer)]

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        self.install_of("", optimizer)

    def install_of(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        wrapper = self._wrappers.get(name)
        if wrapper is not None:
            wrappers.rewrap(wrapper, optimizer)
        self._optimizers[name] = optimizer

    def save_checkpoint(self, name: str) -> str:
        if self._save is None:
            return super().save_checkpoint(name)
        return self._save(name)

    def request_stop(self) -> None:
        self.stop_requested = True


def _optimizer(value: object, what: str) -> torch.optim.Optimizer:
    if not isinstance(value, torch.optim.Optimizer):
        raise TypeError(f"{what}: expected a torch.optim.Optimizer, got {type(value).__name__}")
    return value


def _drives(scheduler: Any, optimizer: torch.optim.Optimizer) -> bool:
    return any(getattr(s, "optimizer", None) is optimizer for s in walk([scheduler]))


class _NoRollback(Restorer):
    """The restorer of a multi-rank :class:`Attachment`: every ``rollback`` is refused (on every rank alike, before
    anything changes), since restoring one rank's state in place is not supported under ``torch.distributed``."""

    def __init__(self, world_size: int) -> None:
        self.reason = (
            f"rollback: not supported by attach() under torch.distributed ({world_size} ranks); to go back, stop the "
            "run and restart every rank from a checkpoint (the checkpoint command saves one); nothing was changed"
        )

    def checkpoints(self) -> list[str]:
        return []

    def prepare(self, to: str | int) -> RestorePoint:
        raise Rejected(self.reason)

    def read(self, path: str) -> RestorePoint:
        raise Rejected(self.reason)

    def check(self, point: RestorePoint) -> None:
        raise Rejected(self.reason)

    def restore(self, point: RestorePoint, applier: Applier) -> None:
        raise Rejected(self.reason)

    def capture(self, step: int, applier: Applier) -> RestorePoint:
        raise Rejected(self.reason)


class Attachment(OwnKeys):
    """A plain loop's live link to its weavelet; build it with :func:`attach`.

    Use it as a context manager (or call :meth:`start` and :meth:`close`): the weavelet sidecar runs while
    the block runs and is stopped on every way out of it.
    """

    def __init__(
        self,
        optimizer: Optimizers,
        *,
        run: str | None = None,
        url: str | None = None,
        schedulers: Schedulers = (),
        allow: Iterable[str] | None = None,
        model: torch.nn.Module | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        save_checkpoint: CheckpointFn | None = None,
        state: Mapping[str, Any] | None = None,
        report_interval: float = 1.0,
        start_timeout: float = 10.0,
        fresh: str = "reset",
        takeover: bool = False,
        process_options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        load: LoadFn | None = None,
        scaler: Any = None,
        snapshot_every: int | None = None,
        snapshot_keep: int = 2,
        spike_guard: SpikeGuard | None = None,
        check_every: int | None = None,
        group: Any = None,
    ) -> None:
        if check_every is not None and (
            isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
        ):
            raise ValueError(
                f"check_every must be None (automatic) or a whole number of steps >= 1, not {check_every!r}"
            )
        self.check_every = check_every
        self._next_check = 0  # automatic checks under torch.distributed: the step of the next one, on every rank
        self._checked_at = 0  # ... and the step of the last one
        self._last_check: tuple[int, float] | None = None  # rank 0: (step, time) of the last check
        #: Rank 0's decisions shared with every rank, or ``None`` when not distributed (or a world of one).
        self.collective = Collective.current(group)
        if self.collective is not None and (snapshot_every is not None or spike_guard is not None):
            raise ValueError(
                "snapshot_every and spike_guard roll back in place, which attach() does not support under "
                "torch.distributed; leave them out (the checkpoint command still saves checkpoints)"
            )
        self.link = Link(
            run,
            url,
            report_interval=report_interval,
            start_timeout=start_timeout,
            fresh=fresh,
            takeover=takeover,
            process_options=process_options,
            labels=labels,
        )
        self._model = model
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        save = save_checkpoint
        if save is None and model is not None:
            save = self._save_default if self.collective is None else self._save_distributed
        self.host = LoopHost(optimizer, schedulers, save_checkpoint=save)
        self.applier = Applier(self.host, allow=allow)
        self._scaler = scaler
        self.restorer: LoopRestorer | None = None
        if model is not None or load is not None:
            self.restorer = LoopRestorer(
                self.host,
                model=model,
                load=load,
                directory=self._directory,
                scaler=scaler,
                saved=lambda: self.applier.last_checkpoint,
            )
            if snapshot_every is not None:
                self.restorer.snapshots = SnapshotRing(snapshot_every, snapshot_keep)
        elif snapshot_every is not None:
            raise ValueError("snapshot_every needs attach(model=...): a snapshot copies the model's state")
        self.applier.restorer = self.restorer
        if self.collective is not None:  # refused the same way on every rank, before anything changes
            self.restorer = None
            self.applier.restorer = _NoRollback(self.collective.world_size)
        self._watch = (
            StepWatch(self.applier, lambda: self.link, spike_guard)
            if spike_guard is not None or snapshot_every is not None
            else None
        )
        self._step = 0
        self._gate: StepGate | None = None  # set once the sidecar runs, where poll() may take the fast path
        self._resume = state is not None
        #: The newest verdicts, at most :data:`KEPT_VERDICTS` (older ones are in the run's history).
        self.verdicts: collections.deque[Verdict] = collections.deque(maxlen=KEPT_VERDICTS)
        if state is not None:
            self.applier.load_state_dict(state)
            self.applier.recreate_saved()

    # ----------------------------------------------------------------- public API

    @property
    def run(self) -> str:
        return self.link.run

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer to step now; a revision switching optimizer type replaces it. An accelerate or Fabric
        wrapper given to :func:`attach` stays the same object (the new optimizer goes inside it).

        :raises RuntimeError: when the loop steers several optimizers (use :attr:`optimizers`).
        """
        self.host.optimizer  # noqa: B018  (raises for several optimizers)
        return self.host.stepped()

    @property
    def optimizers(self) -> Mapping[str, torch.optim.Optimizer]:
        """The optimizers to step now, by the names given to :func:`attach` (a read-only view; with one
        optimizer, ``{"": optimizer}``); a revision switching one's type replaces that entry (a wrapper stays)."""
        return MappingProxyType({name: self.host.stepped(name) for name in self.host.optimizers})

    @property
    def should_stop(self) -> bool:
        """Whether a ``stop`` command arrived: end the loop (and save what you need) when true."""
        return self.host.stop_requested

    @property
    def process(self) -> Any:
        """The :class:`~weavelet_core.WeaveletProcess`, once started."""
        return self.link.process

    @property
    def is_leader(self) -> bool:
        """Whether this process runs the weavelet sidecar: true single-process and on global rank 0."""
        return self.collective is None or self.collective.is_leader

    def start(self) -> Attachment:
        """Start this incarnation's weavelet sidecar (bounded by ``start_timeout``; an outage never blocks the
        loop). Raises :class:`~weavelet_core.RunOwned` when another live trainer owns the run.

        Under ``torch.distributed`` every rank must call it (it is collective): rank 0 starts the sidecar, the
        other ranks learn the run id and incarnation from it, and when rank 0 cannot start every rank raises
        (``RunOwned`` where rank 0 got it, else ``RuntimeError`` naming rank 0's error).
        """
        collective = self.collective
        if collective is None:
            self._start_sidecar()
            return self
        failure: BaseException | None = None
        shared: dict[str, Any] | None = None
        if collective.is_leader:
            try:
                self._start_sidecar()
            except Exception as exc:
                failure = exc
            shared = {
                "run": self.link.run,
                "incarnation": self.applier.incarnation,
                "error": None if failure is None else f"{type(failure).__name__}: {failure}",
                "owned": isinstance(failure, RunOwned),
            }
        shared = collective.share(shared)
        assert shared is not None
        if failure is not None:
            raise failure
        if not collective.is_leader:
            self.link.run = str(shared["run"])
            self.applier.incarnation = str(shared["incarnation"])
            if shared["error"] is not None:
                if shared["owned"]:
                    raise RunOwned(str(shared["error"]).removeprefix("RunOwned: "))
                raise RuntimeError(
                    f"weavelet: rank 0 could not start the weavelet of run {self.link.run!r} ({shared['error']}); "
                    "see rank 0's error and fix it there"
                )
        return self

    def _start_sidecar(self) -> None:
        process = self.link.start(after=self.applier.applied_revision, resume=self._resume)
        self.applier.incarnation = process.incarnation
        # One process, nothing to run at every step: poll() may skip everything while the gate says idle.
        if self.collective is None and self._watch is None:
            self._gate = process.gate
        self.link.report(step=self._step, optimizer=self.applier.describe(), schema=self.applier.schema(), force=True)

    def close(self, error: BaseException | None = None) -> None:
        """Stop the sidecar; idempotent, bounded, never raises. With ``error`` (the exception that ended the
        loop) the run's final state is ``failed`` with the exception's type and message."""
        self.link.report(step=self._step, optimizer=self.applier.describe(), force=True)
        self.link.stop(error=error)

    def poll(
        self, step: int, *, epoch: int | None = None, loss: Any = None, metrics: Mapping[str, Any] | None = None
    ) -> Verdict | None:
        """Call at every optimizer-step boundary (after ``optimizer.step()`` and any scaler update).

        ``step`` is the number of optimizer steps taken so far. Applies the newest waiting revision, reports
        its outcome and returns the :class:`~weavelet_torch.applier.Verdict` (``None`` when nothing waited, or
        at a step that is not checked: see ``check_every`` of :func:`attach`). ``loss`` and ``metrics`` go into
        the status at most once per ``report_interval``.

        Under ``torch.distributed`` every rank must call it with the same ``step`` (it is collective at the steps
        it checks): rank 0 broadcasts the revision it polled, every rank applies it, and when the verdicts differ
        between ranks rank 0's verdict says so (``detail["ranks_agree"] = False``, and an error is logged).
        """
        gate = self._gate
        if gate is not None and gate.version.value == gate.seen and _monotonic() < gate.report_at:
            self._step = step
            return None  # no revision arrived, no report due: all the full path below would find (see StepGate)
        if self.host.accumulating():  # accelerate inside a gradient-accumulation window: not a step boundary
            return None
        self._step = step
        verdict = None
        if self._due(step):
            verdict = self._check(step)
        if self._watch is not None:  # snapshots, spike guard: off unless asked for
            self._watch(step, loss)
        if self.link.report_due():
            values = dict(metrics or {})
            if loss is not None:
                values.setdefault("loss", loss)
            self.link.report(step=step, epoch=epoch, metrics=values, optimizer=self.applier.describe())
        return verdict

    def report(
        self, *, step: int | None = None, epoch: int | None = None, metrics: Mapping[str, Any] | None = None
    ) -> None:
        """Report status now (the heartbeat carries it), whether or not a report is due."""
        if step is not None:
            self._step = step
        self.link.report(step=step, epoch=epoch, metrics=metrics, optimizer=self.applier.describe(), force=True)

    def state_dict(self) -> dict[str, Any]:
        """Save this beside the optimizer's state; pass it back as ``attach(..., state=...)`` on resume."""
        return self.applier.state_dict()

    # ----------------------------------------------------------------- internals

    def _due(self, step: int) -> bool:
        """Whether ``step`` is checked; the same answer on every rank given the same steps."""
        if self.check_every is not None:
            return step % self.check_every == 0
        # a step number below the last check's (a loop counting steps per epoch) starts the spacing over
        return self.collective is None or step >= self._next_check or step < self._checked_at

    def _interval(self, step: int) -> int:
        """Rank 0, automatic mode: how many steps until the next check, so that checks are about
        :data:`AUTO_CHECK_SECONDS` apart at the pace of the steps since the last one."""
        now = time.monotonic()
        last, self._last_check = self._last_check, (step, now)
        if last is None or step <= last[0]:
            return 1
        per_step = (now - last[1]) / (step - last[0])
        if per_step <= 0:
            return MAX_AUTO_INTERVAL
        return max(1, min(MAX_AUTO_INTERVAL, int(AUTO_CHECK_SECONDS / per_step)))

    def _check(self, step: int) -> Verdict | None:
        collective = self.collective
        if collective is None:
            revision = self.link.poll()
            if revision is None:
                return None
            verdict = self.applier.apply(
                revision.revision, revision.config, step=step, baseline=self.link.is_baseline(revision)
            )
            self.verdicts.append(verdict)
            self.link.settle(verdict, self.applier)
            return verdict
        payload: list[Any] | None = None
        interval = 0
        if collective.is_leader:
            revision = self.link.poll()
            if revision is not None:
                payload = [revision.revision, revision.config, self.link.is_baseline(revision)]
            if self.check_every is None:
                interval = self._interval(step)
        payload, interval = collective.share_with(payload, interval)
        self._checked_at, self._next_check = step, step + max(1, interval)
        if payload is None:
            return None
        number, config, baseline = payload
        verdict = self.applier.apply(int(number), config, step=step, baseline=bool(baseline))
        if not collective.all_same(verdict.result == "applied"):
            log.error(
                "weavelet: run %r revision %d was %s on rank %d but not on every rank: the ranks may now differ",
                self.link.run,
                verdict.revision,
                verdict.result,
                collective.rank,
            )
            verdict.detail["ranks_agree"] = False
        self.verdicts.append(verdict)
        self.link.settle(verdict, self.applier)  # rank 0 only: the other ranks have no sidecar
        self.applier.rewrite = None
        return verdict

    def _directory(self) -> Path:
        return self._checkpoint_dir or Path.cwd() / "weavelet-checkpoints" / self.run

    def _save_default(self, name: str) -> str:
        directory = self._directory()
        directory.mkdir(parents=True, exist_ok=True)
        # The run id is in the name: two runs saving into one directory never overwrite each other.
        path = directory / f"{name if name.startswith(self.run) else f'{self.run}-{name}'}.pt"
        assert self._model is not None
        payload = {
            "step": self._step,
            "model": self._model.state_dict(),
            "optimizer": self.optimizer.state_dict() if not self.host.optimizer_names() else None,
            "schedulers": [s.state_dict() for s in self.host.schedulers()],
            "weavelet": self.state_dict(),
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
        }
        if self.host.optimizer_names():
            payload["optimizers"] = {name: o.state_dict() for name, o in self.host.optimizers.items()}
        tmp = path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return str(path)

    def _save_distributed(self, name: str) -> str:
        """The ``checkpoint`` command under ``torch.distributed``: one ``torch.distributed.checkpoint`` (DCP)
        directory, written by every rank together (DCP is collective; every rank runs this at the same step)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import save

        assert self._model is not None
        directory = self._directory()
        path = directory / (name if name.startswith(self.run) else f"{self.run}-{name}")
        model_state, optimizer_state = get_state_dict(self._model, list(self.host.optimizers.values()))
        state = {
            "step": self._step,
            "model": model_state,
            "optimizer": optimizer_state,
            "schedulers": [s.state_dict() for s in self.host.schedulers()],
            "weavelet": self.state_dict(),
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
        }
        save(state, checkpoint_id=str(path))
        return str(path)

    def __enter__(self) -> Attachment:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(error=exc)


def attach(
    optimizer: Optimizers,
    *,
    run: str | None = None,
    url: str | None = None,
    schedulers: Schedulers = (),
    allow: Iterable[str] | None = None,
    model: torch.nn.Module | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    save_checkpoint: CheckpointFn | None = None,
    state: Mapping[str, Any] | None = None,
    report_interval: float = 1.0,
    start_timeout: float = 10.0,
    fresh: str = "reset",
    takeover: bool = False,
    process_options: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    load: LoadFn | None = None,
    scaler: Any = None,
    snapshot_every: int | None = None,
    snapshot_keep: int = 2,
    spike_guard: SpikeGuard | None = None,
    check_every: int | None = None,
    group: Any = None,
) -> Attachment:
    """Make a plain training loop remotely reconfigurable; use the result as a context manager.

    :param optimizer: the optimizer the loop steps. After a revision switches its type, step
        ``attachment.optimizer`` instead (the same parameters, a new object). An optimizer prepared by accelerate
        (``accelerator.prepare``) or set up by Lightning Fabric (``fabric.setup``) is steered through its wrapper:
        a switch puts the new optimizer inside the same wrapper, so the loop can keep stepping the object it has;
        with accelerate, :meth:`Attachment.poll` does nothing while ``accelerator.sync_gradients`` is false
        (inside ``accelerator.accumulate`` before the window's last micro-batch). Or several by name
        (``{"generator": opt_g, "discriminator": opt_d}``): each one's keys are then nested under its name in a
        revision (``generator.lr``), a revision applies to all of them or to none, and the loop steps
        ``attachment.optimizers[name]``.
    :param run: run id; default ``WEAVELET_RUN``, else a generated one (printed at start).
    :param url: transport URL; default ``WEAVELET_URL``, else the per-user ``file://`` directory.
    :param schedulers: learning-rate schedulers driving ``optimizer``: remote ``lr`` changes rescale their
        schedule, and a swap rebinds them to the new optimizer with their progress kept. With several
        optimizers, a list (each scheduler follows the optimizer it drives) or lists by optimizer name.
    :param allow: keys a revision may set (default: the optimizer's hyperparameters, ``optimizer``,
        ``param_groups.<i>.<key>``, ``stop``, ``checkpoint``); keys with a handler are always allowed.
    :param model: enables the ``checkpoint`` command: model, optimizer, schedulers and weavelet state are saved
        with ``torch.save`` under ``checkpoint_dir`` (default ``./weavelet-checkpoints/<run>``), as
        ``<run>-weavelet-r<revision>-step<step>.pt``.
    :param save_checkpoint: ``save(name) -> path``, to save checkpoints your own way instead.
    :param state: what :meth:`Attachment.state_dict` returned before, to resume: the optimizer is recreated with
        the type that was active (load its saved state into ``attachment.optimizer`` afterwards), and
        revisions already applied are not applied again.
    :param report_interval: shortest time in seconds between two status reports from :meth:`Attachment.poll`.
    :param start_timeout: how long starting waits for the sidecar to connect (it keeps trying afterwards).
    :param fresh: what a fresh start (no ``state``) does with a desired config an earlier incarnation of the run
        left: ``"reset"`` (default: clear it with a new, empty revision) or ``"adopt"`` (apply its
        hyperparameters). Commands stored before the start never act. One line on stderr says what happened.
    :param takeover: take the run over from another live trainer instead of raising
        :class:`~weavelet_core.RunOwned` (a stale one is taken over anyway, with a warning).
    :param process_options: more keyword arguments for :class:`~weavelet_core.WeaveletProcess`.
    :param labels: ``key: value`` strings published in the run's status, for choosing runs
        (``weavelet stop -l sweep=3``); default none. Keys and values are non-empty strings of at most 64
        characters (else ``ValueError`` at start).

    :param load: ``load(path) -> weavelet state or None``: restores a checkpoint your own way for the ``rollback``
        command (raise before changing anything when it does not fit). Without it, ``model`` enables rollback to
        the checkpoints the ``checkpoint`` command saved (read with ``torch.load(weights_only=True)``, checked
        against the model and optimizers, then restored).
    :param scaler: the AMP ``GradScaler``: saved with checkpoints and restored by a rollback.
    :param snapshot_every: keep an in-memory snapshot every this many steps for ``rollback --to snapshot``
        (needs ``model``; default ``None``: none); ``snapshot_keep`` (default 2) of them. Memory: see
        :class:`~weavelet_torch.rollback.SnapshotRing`.
    :param spike_guard: a :class:`~weavelet_torch.SpikeGuard` that rolls back by itself on a loss spike (it reads
        the ``loss`` given to :meth:`Attachment.poll`); default ``None``: off.

    :param check_every: look for a revision every this many steps: :meth:`Attachment.poll` checks when
        ``step % check_every == 0``. Default ``None``, automatic: every step in a single process (a check costs one
        shared-integer read); under ``torch.distributed``, where each check is a broadcast on every rank (0.6-1.2 ms
        on gloo over loopback, see docs/benchmarks.md), rank 0 spaces checks about :data:`AUTO_CHECK_SECONDS`
        (0.1 s) apart at the pace of the recent steps (every step when steps are slower, at most
        :data:`MAX_AUTO_INTERVAL` steps apart) and tells every rank the step of the next one with each check.
    :param group: the ``torch.distributed`` process group whose ranks decide together (default: the world group
        when one is initialised). With a group of more than one rank, call ``attach()``, ``start()`` (or enter the
        ``with`` block) and :meth:`Attachment.poll` on every rank with the same steps: only global rank 0 runs the
        sidecar, every rank applies rank 0's revision at the same step. The ``checkpoint`` command then saves
        with ``torch.distributed.checkpoint`` on every rank (with ``model``), or calls your ``save_checkpoint`` on
        every rank at the same step (it may be collective); ``rollback`` is refused.

    Leaving the ``with`` block by an exception ends the run ``failed``, with the exception in its status.

    :raises TypeError: for an optimizer that is not a ``torch.optim.Optimizer``.
    :raises ValueError: for bad optimizer names or schedulers that drive none of the optimizers (see
        :class:`LoopHost`), ``snapshot_every`` without ``model``, ``check_every`` below 1, or ``snapshot_every`` or
        ``spike_guard`` under ``torch.distributed``.
    """
    return Attachment(
        optimizer,
        run=run,
        url=url,
        schedulers=schedulers,
        allow=allow,
        model=model,
        checkpoint_dir=checkpoint_dir,
        save_checkpoint=save_checkpoint,
        state=state,
        report_interval=report_interval,
        start_timeout=start_timeout,
        fresh=fresh,
        takeover=takeover,
        process_options=process_options,
        labels=labels,
        load=load,
        scaler=scaler,
        snapshot_every=snapshot_every,
        snapshot_keep=snapshot_keep,
        spike_guard=spike_guard,
        check_every=check_every,
        group=group,
    )
