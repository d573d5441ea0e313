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
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, overload

import torch

from weavelet_torch.applier import Applier, F, Validator, Verdict
from weavelet_torch.host import OptimizerHost
from weavelet_torch.link import Link

KEPT_VERDICTS = 64
"""How many verdicts :attr:`Attachment.verdicts` keeps (memory stays flat however many revisions arrive)."""

CheckpointFn = Callable[[str], str]
"""``save(name) -> path``: save a checkpoint now (``name`` is unique per revision) and return its path."""


class LoopHost(OptimizerHost):
    """An :class:`~weavelet_torch.host.OptimizerHost` for a plain loop: holds the optimizer and schedulers.

    :param save_checkpoint: ``save(name) -> path`` used by the ``checkpoint`` command.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedulers: Iterable[Any] = (),
        *,
        save_checkpoint: CheckpointFn | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizer = optimizer
        self._schedulers = list(schedulers)
        self._save = save_checkpoint
        self.stop_requested = False

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def schedulers(self) -> Sequence[Any]:
        return self._schedulers

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    def save_checkpoint(self, name: str) -> str:
        if self._save is None:
            return super().save_checkpoint(name)
        return self._save(name)

    def request_stop(self) -> None:
        self.stop_requested = True


class Attachment:
    """A plain loop's live link to its weavelet; build it with :func:`attach`.

    Use it as a context manager (or call :meth:`start` and :meth:`close`): the weavelet sidecar runs while
    the block runs and is stopped on every way out of it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        run: str | None = None,
        url: str | None = None,
        schedulers: Iterable[Any] = (),
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
    ) -> None:
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
            save = self._save_default
        self.host = LoopHost(optimizer, schedulers, save_checkpoint=save)
        self.applier = Applier(self.host, allow=allow)
        self._step = 0
        self._resume = state is not None
        #: The newest verdicts, at most :data:`KEPT_VERDICTS` (older ones are in the run's history).
        self.verdicts: collections.deque[Verdict] = collections.deque(maxlen=KEPT_VERDICTS)
        if state is not None:
            name = self.applier.load_state_dict(state)
            if name is not None:
                self.applier.recreate(name)

    # ----------------------------------------------------------------- public API

    @property
    def run(self) -> str:
        return self.link.run

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer to step now; a revision switching optimizer type replaces it."""
        return self.host.optimizer

    @property
    def should_stop(self) -> bool:
        """Whether a ``stop`` command arrived: end the loop (and save what you need) when true."""
        return self.host.stop_requested

    @property
    def process(self) -> Any:
        """The :class:`~weavelet_core.WeaveletProcess`, once started."""
        return self.link.process

    @overload
    def on(self, key: str, handler: None = None, *, validate: Validator | None = None) -> Callable[[F], F]: ...

    @overload
    def on(self, key: str, handler: F, *, validate: Validator | None = None) -> F: ...

    def on(self, key: str, handler: F | None = None, *, validate: Validator | None = None) -> Any:
        """Register a handler for a key of your own; see :meth:`weavelet_torch.Applier.on`."""
        return self.applier.on(key, handler, validate=validate)

    def start(self) -> Attachment:
        """Start this incarnation's weavelet sidecar (bounded by ``start_timeout``; an outage never blocks the
        loop). Raises :class:`~weavelet_core.RunOwned` when another live trainer owns the run."""
        process = self.link.start(after=self.applier.applied_revision, resume=self._resume)
        self.applier.incarnation = process.incarnation
        self.link.report(step=self._step, optimizer=self.applier.describe(), force=True)
        return self

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
        its outcome and returns the :class:`~weavelet_torch.applier.Verdict` (``None`` when nothing waited).
        ``loss`` and ``metrics`` go into the status at most once per ``report_interval``.
        """
        self._step = step
        verdict = None
        revision = self.link.poll()
        if revision is not None:
            verdict = self.applier.apply(
                revision.revision, revision.config, step=step, baseline=self.link.is_baseline(revision)
            )
            self.verdicts.append(verdict)
            self.link.settle(verdict, self.applier)
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

    def _save_default(self, name: str) -> str:
        directory = self._checkpoint_dir or Path.cwd() / "weavelet-checkpoints" / self.run
        directory.mkdir(parents=True, exist_ok=True)
        # The run id is in the name: two runs saving into one directory never overwrite each other.
        path = directory / f"{name if name.startswith(self.run) else f'{self.run}-{name}'}.pt"
        assert self._model is not None
        payload = {
            "step": self._step,
            "model": self._model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.host.schedulers()],
            "weavelet": self.state_dict(),
        }
        tmp = path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return str(path)

    def __enter__(self) -> Attachment:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(error=exc)


def attach(
    optimizer: torch.optim.Optimizer,
    *,
    run: str | None = None,
    url: str | None = None,
    schedulers: Iterable[Any] = (),
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
) -> Attachment:
    """Make a plain training loop remotely reconfigurable; use the result as a context manager.

    :param optimizer: the optimizer the loop steps. After a revision switches its type, step
        ``attachment.optimizer`` instead (the same parameters, a new object).
    :param run: run id; default ``WEAVELET_RUN``, else a generated one (printed at start).
    :param url: transport URL; default ``WEAVELET_URL``, else the per-user ``file://`` directory.
    :param schedulers: learning-rate schedulers driving ``optimizer``: remote ``lr`` changes rescale their
        schedule, and a swap rebinds them to the new optimizer with their progress kept.
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

    Leaving the ``with`` block by an exception ends the run ``failed``, with the exception in its status.
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
    )
