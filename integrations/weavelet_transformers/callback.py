"""``WeaveletCallback``: change a running Hugging Face ``Trainer``'s optimizer and hyperparameters remotely."""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from weavelet_core.errors import RunOwned
from weavelet_core.plugins import get_registry
from weavelet_core.protocol import validate_run_id
from weavelet_torch import wrappers
from weavelet_torch.applier import Applier, OwnKeys, Verdict
from weavelet_torch.attach import KEPT_VERDICTS
from weavelet_torch.collective import Collective
from weavelet_torch.errors import Rejected
from weavelet_torch.link import Link, LinkedRun
from weavelet_torch.rollback import RestorePoint, Restorer
from weavelet_transformers._compat import callback_base
from weavelet_transformers.host import TrainerHost

if TYPE_CHECKING:
    from transformers import TrainerCallback as _CallbackBase
else:
    _CallbackBase = callback_base()

log = logging.getLogger("weavelet_transformers")

STATE_KEY = "weavelet"
"""The entry of ``TrainerState.stateful_callbacks`` (saved in each checkpoint's ``trainer_state.json``) that holds
the callback's state. It is not a callback class name, so the Trainer never rebuilds a callback from it."""

_FRAMES = 12
"""How many calling frames the callback looks through for the Trainer that calls it."""


class WeaveletCallback(_CallbackBase, OwnKeys, LinkedRun):
    """Makes a Hugging Face ``Trainer`` remotely reconfigurable through its weavelet.

    ::

        trainer = Trainer(model, args, train_dataset=data, callbacks=[WeaveletCallback(run="gpt-3")])
        trainer.train()
        # elsewhere: weavelet set gpt-3 optimizer=adam lr_scale=0.5

    The weavelet sidecar starts when training begins (``on_train_begin``) and stops when it ends. After each
    optimizer step (``on_step_end``: after the optimizer, the scheduler and ``zero_grad``, never inside a
    gradient-accumulation window) the callback applies the newest waiting revision (see
    :mod:`weavelet_torch.applier`) and reports its outcome with the global step it took effect at, plus step,
    epoch, the Trainer's last logged values and the active optimizer in the run's status.

    - A switch of optimizer type puts the new optimizer inside accelerate's ``AcceleratedOptimizer`` that
      ``trainer.optimizer`` is, and rebinds ``trainer.lr_scheduler`` (the ``LambdaLR`` of transformers' linear,
      cosine and other schedules included) with its progress kept.
    - ``lr`` sets the current learning rate (the schedule continues relative to it); ``lr_scale`` scales the whole
      schedule.
    - ``stop`` sets ``control.should_training_stop``: the Trainer ends after this step (``on_train_end`` runs).
    - ``checkpoint`` sets ``control.should_save``: the Trainer saves ``<output_dir>/checkpoint-<step>`` at the end
      of this step, and the revision's outcome, reported once that checkpoint is saved, gives its path.
    - ``rollback`` is not supported with the Trainer (rejected); resume from a checkpoint instead.

    Checkpoints: the callback's state (the active optimizer type, the last applied revision, the commands already
    carried out) is saved in each checkpoint's ``trainer_state.json`` (``stateful_callbacks["weavelet"]``).
    ``trainer.train(resume_from_checkpoint=...)`` recreates the optimizer type that was live before the Trainer
    loads ``optimizer.pt`` into it (the Trainer would otherwise build the type ``TrainingArguments`` names), so
    its saved state and hyperparameters land in an optimizer of the right type; then revisions newer than the
    checkpoint's apply before the first step. This needs the callback to know its Trainer: it finds the Trainer
    that is being built with it (``Trainer(callbacks=[...])``); for a callback added later with
    ``trainer.add_callback``, call :meth:`bind`.

    Multi-process training (``torchrun``, DDP): every rank has the callback; only global rank 0 runs a weavelet;
    each revision is broadcast (:class:`~weavelet_torch.collective.Collective`, JSON only) and every rank applies it
    at the same global step.

    :param run: run id; default ``WEAVELET_RUN``, else a generated one (printed when training starts).
    :param url: transport URL; default ``WEAVELET_URL``, else the per-user ``file://`` directory.
    :param allow: keys a revision may set (default: the optimizer's hyperparameters, ``optimizer``,
        ``lr_scale``, ``param_groups.<i>.<key>``, ``stop``, ``checkpoint``); keys with a handler are always allowed.
    :param check_every_n_steps: look for revisions every this many optimizer steps (default 1). Under multi-process
        training each look is one broadcast from rank 0.
    :param report_interval: shortest time in seconds between two status reports (default 1.0).
    :param start_timeout: how long the start of training waits for the sidecar to connect, in seconds (default
        10.0; it keeps trying afterwards).
    :param fresh: what a fresh start (not resumed from a checkpoint) does with a desired config an earlier
        incarnation of the run left: ``"reset"`` (default: clear it with a new, empty revision) or ``"adopt"``
        (apply its hyperparameters). Commands stored before training started never act.
    :param takeover: take the run over from another live trainer instead of failing the start of training with
        :class:`~weavelet_core.RunOwned`.
    :param process_options: more keyword arguments for :class:`~weavelet_core.WeaveletProcess`.
    :param labels: ``key: value`` strings published in the run's status (default none).
    :raises ValueError: for a bad ``fresh``, ``check_every_n_steps`` or run id;
        :class:`~weavelet_core.UnknownTransport` for a URL no transport handles.

    A ``trainer.train()`` that raises ends the run ``failed`` with the exception in its status (Ctrl-C: ``stopped``),
    when the callback knows its Trainer; otherwise the sidecar notices the process ending.
    """

    def __init__(
        self,
        run: str | None = None,
        url: str | None = None,
        *,
        allow: Iterable[str] | None = None,
        check_every_n_steps: int = 1,
        report_interval: float = 1.0,
        start_timeout: float = 10.0,
        fresh: str = "reset",
        takeover: bool = False,
        process_options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if fresh not in ("reset", "adopt"):
            raise ValueError(f"fresh must be 'reset' or 'adopt', got {fresh!r}")
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be an integer >= 1, got {check_every_n_steps!r}")
        if run is not None:
            validate_run_id(run)
        if url is not None:
            get_registry().resolve(url)
        self._run, self._url = run, url
        self._report_interval = report_interval
        self._start_timeout = start_timeout
        self._fresh, self._takeover = fresh, bool(takeover)
        self._process_options = dict(process_options or {})
        self._labels = dict(labels or {})
        self.check_every_n_steps = check_every_n_steps
        self.host = TrainerHost()
        self.applier = Applier(self.host, allow=allow)
        self.applier.restorer = _NoRollback()
        self.link: Link | None = None
        self.collective: Collective | None = None
        #: The newest verdicts, at most ``KEPT_VERDICTS`` (older ones are in the run's history).
        self.verdicts: collections.deque[Verdict] = collections.deque(maxlen=KEPT_VERDICTS)
        self._pending: list[Verdict] = []  # verdicts whose checkpoint the Trainer saves at the end of the step
        self._metrics: dict[str, Any] = {}
        self._loaded = False  # the checkpoint's state was loaded while the Trainer built its optimizer
        self._active = False

    # ----------------------------------------------------------------- public API

    @property
    def trainer(self) -> Any:
        """The Trainer this callback is bound to (see :meth:`bind`), or ``None``."""
        return self.host.trainer

    def bind(self, trainer: Any) -> None:
        """Tie this callback to ``trainer`` (done by itself when the Trainer is built with it).

        Binding lets a resume recreate the optimizer type a checkpoint was saved with before the Trainer loads its
        state (it wraps ``trainer.create_optimizer``), and a ``trainer.train()`` that raises end the run
        ``failed`` (it wraps ``trainer.train``). Idempotent.

        :raises ValueError: when ``trainer`` already has another ``WeaveletCallback``.
        """
        for other in getattr(getattr(trainer, "callback_handler", None), "callbacks", ()):
            if other is not self and isinstance(other, WeaveletCallback):
                raise ValueError(
                    "two WeaveletCallbacks in one Trainer: one callback steers the Trainer's optimizer; remove one"
                )
        self.host.trainer = trainer
        if getattr(trainer.create_optimizer, "_weavelet", None) is not self:
            trainer.create_optimizer = self._wrap_create_optimizer(trainer.create_optimizer)
        if getattr(trainer.train, "_weavelet", None) is not self:
            trainer.train = self._wrap_train(trainer.train)

    def state_dict(self) -> dict[str, Any]:
        """The state saved in checkpoints (see the class docstring): :meth:`weavelet_torch.Applier.state_dict`."""
        return self.applier.state_dict()

    # ----------------------------------------------------------------- binding to the Trainer

    def _wrap_create_optimizer(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def create_optimizer(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            trainer = self.host.trainer
            saved = _saved_state(getattr(trainer, "state", None))
            if saved is None:  # not resuming from a checkpoint written with weavelet
                return result
            self.host.wrapped, self.host.scheduler = None, getattr(trainer, "lr_scheduler", None)
            self._load(saved)
            return trainer.optimizer

        create_optimizer._weavelet = self  # type: ignore[attr-defined]
        return create_optimizer

    def _wrap_train(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def train(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except BaseException as exc:
                self._finish(error=exc)
                raise

        train._weavelet = self  # type: ignore[attr-defined]
        return train

    def _load(self, saved: Mapping[str, Any]) -> None:
        """Take the checkpoint's state and recreate its optimizer type (before the Trainer loads its state)."""
        self.applier.load_state_dict(saved)
        self._loaded = True
        refusal = self.host.swap_refusal()
        if refusal is not None and self.applier.saved_differs():
            log.warning(
                "weavelet: cannot recreate optimizer %r from the checkpoint: %s", self.applier.saved_optimizers, refusal
            )
            return
        for _ in self.applier.recreate_saved():
            log.info(
                "weavelet: recreated optimizer %r from the checkpoint before loading its state",
                self.applier.saved_optimizers.get(""),
            )

    def _find_trainer(self) -> Any:
        """The Trainer whose callback handler is calling this callback, found among the calling frames."""
        from transformers import Trainer

        frame = sys._getframe(1)
        for _ in range(_FRAMES):
            candidate = frame.f_locals.get("self")
            handler = getattr(candidate, "callback_handler", None)
            if isinstance(candidate, Trainer) and any(c is self for c in getattr(handler, "callbacks", ())):
                return candidate
            if frame.f_back is None:
                break
            frame = frame.f_back
        return None

    # ----------------------------------------------------------------- Trainer events

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        trainer = self._find_trainer()
        if trainer is not None:
            self.bind(trainer)
        return control

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.host.trainer is None:
            trainer = self._find_trainer()
            if trainer is not None:
                self.host.trainer = trainer  # too late to wrap train(); enough to find its objects
        host = self.host
        host.args, host.state = args, state
        host.wrapped = kwargs.get("optimizer") or getattr(host.trainer, "optimizer", None)
        host.scheduler = kwargs.get("lr_scheduler") or getattr(host.trainer, "lr_scheduler", None)
        host.save_requested = host.stop_requested = False
        if host.wrapped is None:
            raise RuntimeError("weavelet: the Trainer started training without an optimizer; nothing to steer")
        # transformers builds its scheduler over accelerate's wrapper: bind it to the optimizer inside.
        wrappers.bind_to_inner(host.schedulers(), host.wrapped)
        saved = _saved_state(state)
        resumed = saved is not None
        if saved is not None and not self._loaded:
            self._load_late(saved, args, state)
        self._loaded = False
        self._metrics = {}
        self._pending = []
        self.collective = Collective.current() if int(getattr(args, "world_size", 1)) > 1 else None
        self._active = True
        refusal: str | None = None
        incarnation = ""
        if self.collective is None or self.collective.is_leader:
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
            try:
                process = self.link.start(after=self.applier.applied_revision, resume=resumed)
            except RunOwned as exc:
                refusal = str(exc)
            else:
                incarnation = process.incarnation
        if self.collective is not None:  # every rank learns the incarnation, and fails together if refused
            shared = self.collective.share({"incarnation": incarnation, "refusal": refusal})
            incarnation, refusal = str(shared["incarnation"]), shared["refusal"]
        self.applier.incarnation = incarnation
        if refusal is not None:
            self._active = False
            raise RunOwned(refusal)
        self._publish(state)
        self._report(state, force=True)
        # Optimizer state is restored by now: reconcile with the newest desired revision before the first step.
        self._check(state, control)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not self._active:
            return control
        if state.global_step % self.check_every_n_steps == 0:
            self._check(state, control)
        host = self.host
        if host.save_requested:
            host.save_requested = False
            control.should_save = True
        if host.stop_requested:
            control.should_training_stop = True
        link = self.link
        if link is not None and link.report_due():
            self._report(state)
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        if logs:
            self._metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._pending:
            saved = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
            pending, self._pending = self._pending, []
            for verdict in pending:
                self._settle(_saved_at(verdict, saved))
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._finish()
        return control

    # ----------------------------------------------------------------- internals

    def _load_late(self, saved: Mapping[str, Any], args: Any, state: Any) -> None:
        """The Trainer already loaded the checkpoint's optimizer state (the callback did not know its Trainer in
        time): when the checkpoint's optimizer type differs, recreate that type and load the checkpoint's
        ``optimizer.pt`` into it again, from ``<output_dir>/checkpoint-<global_step>`` when that is the checkpoint,
        else by moving what the Trainer loaded (whose param groups the wrong type may have changed)."""
        self.applier.load_state_dict(saved)
        if not self.applier.saved_differs():
            return
        refusal = self.host.swap_refusal()
        if refusal is not None:
            log.warning("weavelet: cannot recreate optimizer %r: %s", self.applier.saved_optimizers, refusal)
            return
        wrong = type(self.host.optimizer).__name__
        loaded = self.host.optimizer.state_dict()
        self.applier.recreate_saved()
        found = _checkpoint_optimizer_state(args, state, saved)
        self.host.optimizer.load_state_dict(found if found is not None else loaded)
        log.warning(
            "weavelet: recreated optimizer %r from the checkpoint after the Trainer had loaded its state into a %s "
            "(%s); build the Trainer with callbacks=[WeaveletCallback(...)], or call callback.bind(trainer), so that "
            "it is recreated before",
            self.applier.saved_optimizers.get(""),
            wrong,
            "reloaded optimizer.pt"
            if found is not None
            else "moved that state: hyperparameters a type sets by itself may differ from the checkpoint's",
        )

    def _publish(self, state: Any) -> None:
        """Put the callback's state where the Trainer's next checkpoint saves it."""
        callbacks = getattr(state, "stateful_callbacks", None)
        if isinstance(callbacks, dict):
            callbacks[STATE_KEY] = self.applier.state_dict()

    def _check(self, state: Any, control: Any) -> None:
        collective = self.collective
        payload: list[Any] | None = None
        if self.link is not None:
            revision = self.link.poll()
            if revision is not None:
                payload = [revision.revision, revision.config, self.link.is_baseline(revision)]
        if collective is not None:
            payload = collective.share(payload)
        if payload is None:
            return
        number, config, baseline = payload
        verdict = self.applier.apply(int(number), config, step=state.global_step, baseline=bool(baseline))
        if collective is not None:
            applied = verdict.result == "applied"
            everywhere, nowhere = collective.all_true(applied), collective.all_true(not applied)
            if not (everywhere or nowhere):
                log.error(
                    "weavelet: revision %d was %s on rank %d but not on every rank: the ranks may now differ",
                    verdict.revision,
                    verdict.result,
                    collective.rank,
                )
                verdict.detail["ranks_agree"] = False
        self.verdicts.append(verdict)
        self._publish(state)
        self.applier.rewrite = None
        if self.host.stop_requested:
            control.should_training_stop = True
        if self.host.save_requested:
            self._pending.append(verdict)  # its outcome goes out once the Trainer saved the checkpoint
        else:
            self._settle(verdict)

    def _settle(self, verdict: Verdict) -> None:
        if self.link is not None:
            self.link.settle(verdict, self.applier)

    def _report(self, state: Any, *, force: bool = False) -> None:
        link = self.link
        if link is None:
            return
        epoch = getattr(state, "epoch", None)
        link.report(
            step=int(state.global_step),
            epoch=math.floor(epoch) if isinstance(epoch, (int, float)) else None,
            metrics=self._metrics,
            optimizer=self.applier.describe(),
            schema=self.applier.schema(),
            force=force,
        )

    def _finish(self, error: BaseException | None = None) -> None:
        was_active, self._active = self._active, False
        link = self.link
        if not was_active or link is None:
            return
        pending, self._pending = self._pending, []
        for verdict in pending:  # training ended before the requested save
            self._settle(verdict)
        try:
            if self.host.state is not None:
                self._report(self.host.state, force=True)
        except Exception as exc:
            log.debug("weavelet: final status report failed: %s", exc)
        link.stop(error=error)


class _NoRollback(Restorer):
    """Refuses every ``rollback`` (on every rank alike, before anything changes): the Trainer restores its
    checkpoints only through ``train(resume_from_checkpoint=...)``."""

    REASON = (
        "rollback: not supported with the Hugging Face Trainer; stop the run and resume it with "
        "trainer.train(resume_from_checkpoint=...) from a checkpoint (the checkpoint command saves one); "
        "nothing was changed"
    )

    def checkpoints(self) -> list[str]:
        return []

    def prepare(self, to: str | int) -> RestorePoint:
        raise Rejected(self.REASON)

    def read(self, path: str) -> RestorePoint:
        raise Rejected(self.REASON)

    def check(self, point: RestorePoint) -> None:
        raise Rejected(self.REASON)

    def restore(self, point: RestorePoint, applier: Applier) -> None:
        raise Rejected(self.REASON)

    def capture(self, step: int, applier: Applier) -> RestorePoint:
        raise Rejected(self.REASON)


def _saved_state(state: Any) -> Mapping[str, Any] | None:
    """The callback's state in a ``TrainerState`` loaded from a checkpoint, or ``None``."""
    callbacks = getattr(state, "stateful_callbacks", None)
    saved = callbacks.get(STATE_KEY) if isinstance(callbacks, dict) else None
    return saved if isinstance(saved, Mapping) else None


def _checkpoint_optimizer_state(args: Any, state: Any, saved: Mapping[str, Any]) -> dict[str, Any] | None:
    """``optimizer.pt`` of ``<output_dir>/checkpoint-<global_step>`` when that checkpoint holds ``saved`` (the
    callback state being resumed), else ``None``."""
    import json

    import torch

    folder = os.path.join(str(getattr(args, "output_dir", "")), f"checkpoint-{getattr(state, 'global_step', -1)}")
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as file:
            there = _saved_state(_Stateful(json.load(file).get("stateful_callbacks")))
        if there is None or dict(there) != dict(saved):
            return None
        loaded = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        log.debug("weavelet: no optimizer.pt to reload in %s: %s", folder, exc)
        return None
    return loaded if isinstance(loaded, dict) else None


class _Stateful:
    def __init__(self, callbacks: Any) -> None:
        self.stateful_callbacks = callbacks


def _saved_at(verdict: Verdict, path: str) -> Verdict:
    """``verdict`` with the checkpoint path the Trainer actually saved to (the step may have moved on)."""
    told = verdict.commands.get("checkpoint")
    if not isinstance(told, str) or told == path or told.startswith("failed:"):
        return verdict
    commands = {**verdict.commands, "checkpoint": path}
    detail = {**verdict.detail}
    if detail.get("checkpoint") == told:
        detail["checkpoint"] = path
    return dataclasses.replace(verdict, commands=commands, detail=detail, message=verdict.message.replace(told, path))


__all__ = ["STATE_KEY", "WeaveletCallback"]
