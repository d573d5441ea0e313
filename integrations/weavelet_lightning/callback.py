"""``WeaveletCallback``: change a running Lightning fit's optimizer and hyperparameters remotely."""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from weavelet_core.errors import RunOwned
from weavelet_core.plugins import get_registry
from weavelet_core.process import StepGate
from weavelet_core.protocol import validate_run_id
from weavelet_core.schema import check_optimizer_names
from weavelet_lightning import _compat
from weavelet_lightning.host import LightningHost
from weavelet_lightning.restore import LightningRestorer
from weavelet_torch.applier import Applier, OwnKeys, Verdict
from weavelet_torch.attach import KEPT_VERDICTS
from weavelet_torch.guard import SpikeGuard
from weavelet_torch.link import RUN_ENV, Link, LinkedRun
from weavelet_torch.rollback import SnapshotRing
from weavelet_torch.watch import StepWatch

if TYPE_CHECKING:
    from pytorch_lightning import Callback as _CallbackBase
else:
    _CallbackBase = _compat.callback_base()

log = logging.getLogger("weavelet_lightning")
_monotonic = time.monotonic  # the step hook reads the StepGate inline: a method call costs ~650 instructions


class WeaveletCallback(_CallbackBase, OwnKeys, LinkedRun):
    """Makes a Lightning fit remotely reconfigurable through its weavelet.

    ::

        trainer = Trainer(callbacks=[WeaveletCallback(run="resnet-3")])
        trainer.fit(model)
        # elsewhere: weavelet set resnet-3 optimizer=adam lr=0.001

    The weavelet sidecar starts when the fit starts and stops when it ends, fails or is interrupted. After each
    optimizer step the callback applies the newest waiting revision (see :mod:`weavelet_torch.applier`) and
    reports its outcome with the global step it took effect at, plus step, epoch, logged metrics and the active
    optimizer in the run's status.

    :param run: run id; default ``WEAVELET_RUN``, else a generated one (printed when the fit starts).
    :param url: transport URL; default ``WEAVELET_URL``, else the per-user ``file://`` directory.
    :param allow: keys a revision may set (default: the optimizer's hyperparameters, ``optimizer``,
        ``param_groups.<i>.<key>``, ``stop``, ``checkpoint``); keys with a handler are always allowed.
    :param optimizer_index: which optimizer revisions act on, when ``configure_optimizers`` returns several
        and only one is steered (default 0).
    :param optimizers: steer several of the trainer's optimizers, by name: ``{"generator": 0, "discriminator":
        1}`` (names to indexes in ``trainer.optimizers``). Each one's keys are then nested under its name in a
        revision (``weavelet set gan generator.lr=1e-4 discriminator.optimizer=sgd``); commands and handler keys
        stay top-level; a revision applies to all of them or to none.
    :param checkpoint_dir: where the ``checkpoint`` command saves (default: the ``ModelCheckpoint``
        directory, else ``<default_root_dir>/checkpoints``), as ``<run>-weavelet-r<revision>-step<step>.ckpt``.
    :param check_every_n_steps: look for revisions every this many optimizer steps (1: every step). Under
        multi-process training each look is one broadcast from rank 0.
    :param report_interval: shortest time in seconds between two status reports.
    :param start_timeout: how long the fit start waits for the sidecar to connect (it keeps trying afterwards).
    :param fresh: what a fresh fit (not resumed from a checkpoint) does with a desired config an earlier
        incarnation of the run left: ``"reset"`` (default: clear it with a new, empty revision) or ``"adopt"``
        (apply its hyperparameters). Commands stored before the fit started never act. One line on stderr says
        what happened.
    :param takeover: take the run over from another live trainer instead of failing the fit start with
        :class:`~weavelet_core.RunOwned` (a stale one is taken over anyway, with a warning).
    :param process_options: more keyword arguments for :class:`~weavelet_core.WeaveletProcess`.
    :param labels: ``key: value`` strings published in the run's status, for choosing runs
        (``weavelet stop -l sweep=3``); default none. Keys and values are non-empty strings of at most 64
        characters (else ``ValueError`` when the fit starts).
    :param snapshot_every: keep an in-memory snapshot of model, optimizers, schedulers and scaler every this many
        optimizer steps, for ``weavelet rollback RUN --to snapshot`` (default ``None``: none). Memory: see
        :class:`~weavelet_torch.rollback.SnapshotRing`.
    :param snapshot_keep: how many snapshots are kept (default 2; the newest is used).
    :param spike_guard: a :class:`~weavelet_torch.SpikeGuard` that rolls back by itself on a loss spike (default
        ``None``: off). It reads the loss the training step returns.
    :raises ValueError: for a bad ``fresh``, ``check_every_n_steps``, run id, ``optimizers`` (names must be
        identifiers, indexes distinct integers >= 0), both ``optimizers`` and ``optimizer_index``, or
        ``snapshot_every``/``snapshot_keep`` below 1;
        :class:`~weavelet_core.UnknownTransport` for a URL no transport handles.

    Two callbacks in one Trainer work when they steer different optimizers and report to different runs; two
    that would steer the same optimizer, or share a run, are refused when the fit starts (at ``setup``), and
    two with the same optimizer selection already when the Trainer is built (Lightning's "more than one
    stateful callback"): steer several optimizers with one callback and ``optimizers={...}`` instead.

    Each fit is a new incarnation of the run. A fit that raises ends the run ``failed``, with the exception's
    type and message in its status; Ctrl-C ends it ``stopped``.

    Multi-process training: only global rank 0 runs a weavelet; each revision is broadcast and every rank applies
    it at the same global step. Checkpoints keep the active optimizer type and the last applied revision, so a
    resumed fit recreates that optimizer before Lightning loads its state, and applies only newer revisions.
    """

    def __init__(
        self,
        run: str | None = None,
        url: str | None = None,
        *,
        allow: Iterable[str] | None = None,
        optimizer_index: int = 0,
        optimizers: Mapping[str, int] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        check_every_n_steps: int = 1,
        report_interval: float = 1.0,
        start_timeout: float = 10.0,
        fresh: str = "reset",
        takeover: bool = False,
        process_options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        snapshot_every: int | None = None,
        snapshot_keep: int = 2,
        spike_guard: SpikeGuard | None = None,
    ) -> None:
        super().__init__()
        if fresh not in ("reset", "adopt"):
            raise ValueError(f"fresh must be 'reset' or 'adopt', got {fresh!r}")
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be an integer >= 1, got {check_every_n_steps!r}")
        if run is not None:
            validate_run_id(run)  # a bad run id or URL fails here, not minutes later at fit start
        if url is not None:
            get_registry().resolve(url)
        self._run, self._url = run, url
        self._report_interval = report_interval
        self._start_timeout = start_timeout
        self._process_options = dict(process_options or {})
        self._labels = dict(labels or {})
        self._fresh, self._takeover = fresh, bool(takeover)
        self._resumed = False
        self.check_every_n_steps = check_every_n_steps
        indexes = _check_optimizers(optimizers, optimizer_index)
        self.host = LightningHost(optimizer_index, checkpoint_dir, indexes=indexes)
        self.applier = Applier(self.host, allow=allow)
        self.applier.restorer = restorer = LightningRestorer(self.host, self.state_key)
        if snapshot_every is not None:
            restorer.snapshots = SnapshotRing(snapshot_every, snapshot_keep)
        self.spike_guard = spike_guard
        self._watch = (
            StepWatch(self.applier, lambda: self.link, spike_guard)
            if spike_guard is not None or snapshot_every is not None
            else None
        )
        self.link: Link | None = None
        #: The newest verdicts, at most ``KEPT_VERDICTS`` (older ones are in the run's history).
        self.verdicts: collections.deque[Verdict] = collections.deque(maxlen=KEPT_VERDICTS)
        self._restore_pending = False
        self._last_step = -1
        self._steps: Any = None  # Lightning's optimizer-step counter, read directly at each step (see _compat)
        self._gate: StepGate | None = None  # set once the sidecar runs, where the step hook may take the fast path
        self._active = False

    # ----------------------------------------------------------------- public API

    @property
    def state_key(self) -> str:
        # The usual callback keeps the key its checkpoints have always had; others are named by what they steer,
        # so that callbacks steering different optimizers can share a Trainer and each finds its own state.
        if self.host.indexes:
            steers = ",".join(f"{name}={index}" for name, index in self.host.indexes.items())
            return f"WeaveletCallback[optimizers={steers}]"
        if self.host.index != 0:
            return f"WeaveletCallback[optimizer_index={self.host.index}]"
        return "WeaveletCallback"

    def steered_indexes(self) -> frozenset[int]:
        """The indexes in ``trainer.optimizers`` this callback steers."""
        return frozenset(self.host.indexes.values()) if self.host.indexes else frozenset({self.host.index})

    # ----------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return self.applier.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before the strategy builds the optimizers (on_fit_start recreates the recorded type then), or,
        # for strategies restoring after setup, after on_fit_start: then recreate at once. Either way it is
        # before Lightning loads the optimizer state (restore_training_state).
        self.applier.load_state_dict(state_dict)
        self._restore_pending = True
        self._resumed = True
        if self._active:
            self._recreate()

    def _recreate(self) -> None:
        pending, self._restore_pending = self._restore_pending, False
        if not pending or not self.applier.saved_optimizers:
            return
        refusal = self.host.swap_refusal()
        if refusal is not None and self.applier.saved_differs():
            log.warning(
                "weavelet: cannot recreate optimizers %r from the checkpoint: %s",
                self.applier.saved_optimizers,
                refusal,
            )
            return
        for name in self.applier.recreate_saved():
            log.info(
                "weavelet: recreated optimizer %s%r from the checkpoint before loading its state",
                f"{name}=" if name else "",
                self.applier.saved_optimizers[name],
            )

    # ----------------------------------------------------------------- lifecycle hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._refuse_overlap(trainer)
            self.host.trainer = trainer

    def _refuse_overlap(self, trainer: Any) -> None:
        """Two weavelet callbacks in one Trainer must steer different optimizers and report to different runs."""
        for other in getattr(trainer, "callbacks", ()):
            if other is self or not isinstance(other, WeaveletCallback):
                continue
            shared = sorted(self.steered_indexes() & other.steered_indexes())
            mine = self._run or os.environ.get(RUN_ENV) or None
            theirs = other._run or os.environ.get(RUN_ENV) or None
            same_run = mine is not None and mine == theirs
            if shared or same_run:
                why = f"both steer optimizer index {shared[0]}" if shared else f"both report to run {mine!r}"
                raise ValueError(
                    f"two WeaveletCallbacks in one Trainer: {why}; steer several optimizers with one callback, "
                    'WeaveletCallback(optimizers={"generator": 0, "discriminator": 1}), or give each its own '
                    "optimizer_index and run"
                )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.host.trainer = trainer
        self._active = True
        self._last_step = -1
        self._recreate()
        refusal: str | None = None
        if trainer.is_global_zero:
            self.link = Link(
                self._run,
                self._url,
                report_interval=self._report_interval,
                start_timeout=self._start_timeout,
                fresh=self._fresh,
                takeover=self._takeover,
                process_options=self._process_options,
                labels=self._labels,
            )
            self.host.run = self.link.run
            resume = self._resumed or getattr(trainer, "ckpt_path", None) is not None
            try:
                process = self.link.start(after=self.applier.applied_revision, resume=resume)
            except RunOwned as exc:
                refusal = str(exc)
            else:
                self.applier.incarnation = process.incarnation
                self._report(trainer, force=True)
                # One process, nothing to run at every step: the step hook may return while the gate says idle.
                self._gate = process.gate if trainer.world_size == 1 and self._watch is None else None
        if trainer.world_size > 1:  # every rank learns the incarnation, and fails together if refused
            self.applier.incarnation, refusal = trainer.strategy.broadcast((self.applier.incarnation, refusal), src=0)
        if refusal is not None:
            self._active = False
            raise RunOwned(refusal)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Optimizer state is restored by now: reconcile with the newest desired revision before the first step.
        self._last_step = trainer.global_step
        self._steps = _compat.step_counter(trainer)
        self._check(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The boundary: this hook runs after the batch's optimizer step is complete (backward, the AMP
        # scaler's step and update, step-interval schedulers). global_step advances only when an optimizer
        # step ran, so a batch inside a gradient-accumulation window (no step yet) is skipped, and the last,
        # shorter window of an epoch is caught. on_before_optimizer_step would be too early: gradients not yet
        # applied and the scaler not yet updated.
        steps = self._steps
        step = steps.completed if steps is not None else trainer.global_step
        if step == self._last_step:
            if steps is None or step == trainer.global_step:
                return
            step = self._stale_counter(trainer)  # the counter stopped following Lightning's: read it as Lightning does
        self._last_step = step
        gate = self._gate
        if gate is not None and gate.version.value == gate.seen and _monotonic() < gate.report_at:
            return  # no revision arrived, no report due: all the full path below would find (see StepGate)
        if step % self.check_every_n_steps == 0:
            self._check(trainer)
        if self._watch is not None:  # snapshots, spike guard: off unless asked for
            self._watch(step, outputs)
        link = self.link
        if link is not None and link.report_due():
            self._report(trainer, outputs=outputs)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(trainer, error=exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._finish(trainer)

    # ----------------------------------------------------------------- internals

    def _check(self, trainer: Any) -> None:
        distributed = trainer.world_size > 1
        payload: tuple[int, dict[str, Any], bool] | None = None
        if self.link is not None:
            revision = self.link.poll()
            if revision is not None:
                payload = (revision.revision, revision.config, self.link.is_baseline(revision))
        if distributed:
            payload = trainer.strategy.broadcast(payload, src=0)
        if payload is None:
            return
        number, config, baseline = payload
        verdict = self.applier.apply(number, config, step=trainer.global_step, baseline=baseline)
        if distributed:
            agreed = trainer.strategy.reduce_boolean_decision(verdict.result == "applied", all=True)
            if verdict.result == "applied" and not agreed:
                log.error("weavelet: revision %d was applied on rank 0 but rejected on another rank", number)
                verdict.detail["ranks_agree"] = False
        self.verdicts.append(verdict)
        if self.link is not None:
            self.link.settle(verdict, self.applier)
        self.applier.rewrite = None  # rank 0's link wrote it; the other ranks have nothing to write

    def _stale_counter(self, trainer: Any) -> int:
        """Stop reading the counter found at the fit's start (it no longer holds ``trainer.global_step``: the
        module switched ``automatic_optimization``, or the loop's progress was replaced); return the global step."""
        self._steps = None
        log.debug("weavelet: the step hook reads trainer.global_step from now on (its progress counter went stale)")
        return int(trainer.global_step)

    def _report(self, trainer: Any, *, outputs: Any = None, force: bool = False) -> None:
        link = self.link
        if link is None:
            return
        steps = self._steps
        if steps is not None and steps.completed != trainer.global_step:
            self._stale_counter(trainer)
        metrics: dict[str, Any] = dict(trainer.callback_metrics)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None and hasattr(loss, "numel") and "loss" not in metrics:
            metrics["loss"] = loss.detach()
        ready = bool(trainer.strategy.optimizers)
        link.report(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            metrics=metrics,
            optimizer=self.applier.describe() if ready else None,
            schema=self.applier.schema() if ready else None,
            force=force,
        )

    def _finish(self, trainer: Any, error: BaseException | None = None) -> None:
        was_active, self._active = self._active, False
        link = self.link
        if link is None or not was_active:
            return
        try:
            self._report(trainer, force=True)
        except Exception as exc:
            log.debug("weavelet: final status report failed: %s", exc)
        link.stop(error=error)


def _check_optimizers(optimizers: Mapping[str, int] | None, optimizer_index: int) -> dict[str, int]:
    """``optimizers`` checked (see :class:`WeaveletCallback`); empty when not given."""
    if optimizers is None:
        return {}
    if optimizer_index != 0:
        raise ValueError(
            "give either optimizer_index (one optimizer) or optimizers={name: index, ...} (several), not both"
        )
    if not isinstance(optimizers, Mapping) or not optimizers:
        raise ValueError('optimizers must be a non-empty mapping of names to indexes, like {"generator": 0}')
    names = check_optimizer_names(optimizers)
    indexes: dict[str, int] = {}
    for name in names:
        index = optimizers[name]
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"optimizers[{name!r}] must be an index >= 0 into trainer.optimizers, got {index!r}")
        if index in indexes.values():
            raise ValueError(f"optimizers: index {index} is given twice; each name steers its own optimizer")
        indexes[name] = index
    return indexes
