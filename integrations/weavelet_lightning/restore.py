"""Rolling a Lightning fit back in place: finding, reading, checking and restoring its checkpoints.

Checkpoints are Lightning's own ``.ckpt`` files: those the ``checkpoint`` command saves and those of every
``ModelCheckpoint`` callback, in their directories. What is restored: the LightningModule's ``state_dict``,
``optimizer_states`` (every optimizer of the trainer, by position), ``lr_schedulers`` (by position), the
precision plugin's state (the AMP GradScaler) and the weavelet callback's own state. ``global_step``, the epoch
and the data loaders' position are not: the fit goes on forward.

Under multi-process training rank 0 chooses the file and broadcasts its path; every rank reads and checks it, and
the rollback goes ahead only when all of them can (one ``reduce_boolean_decision``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weavelet_torch.errors import Rejected
from weavelet_torch.rollback import (
    RestorePoint,
    Restorer,
    check_count,
    check_model,
    check_optimizer,
    cpu_copy,
    list_files,
    load_file,
    restore_optimizers,
)

if TYPE_CHECKING:
    from weavelet_lightning.host import LightningHost
    from weavelet_torch.applier import Applier


class LightningRestorer(Restorer):
    """The :class:`~weavelet_torch.rollback.Restorer` of a Lightning fit (see the module docstring).

    :param host: the callback's :class:`~weavelet_lightning.host.LightningHost` (its trainer and checkpoint
        directory).
    :param state_key: the weavelet callback's ``state_key`` in a checkpoint's ``callbacks``.
    """

    def __init__(self, host: LightningHost, state_key: str) -> None:
        self.host = host
        self.state_key = state_key

    @property
    def trainer(self) -> Any:
        if self.host.trainer is None:
            raise Rejected("rollback: the weavelet callback is not attached to a running fit")
        return self.host.trainer

    def checkpoints(self) -> list[str]:
        trainer = self.trainer
        directories: list[Any] = [self.host.checkpoint_directory()]
        directories += [getattr(c, "dirpath", None) for c in getattr(trainer, "checkpoint_callbacks", ())]
        return list_files(directories, (".ckpt",))

    def agree(self, to: str | int, found: str | None, problem: str | None) -> tuple[str | None, str | None]:
        trainer = self.trainer
        if trainer.world_size <= 1:
            return found, problem
        answer: tuple[str | None, str | None] = trainer.strategy.broadcast((found, problem), src=0)
        return answer

    def all_ok(self, problem: str | None) -> str | None:
        trainer = self.trainer
        if trainer.world_size <= 1:
            return problem
        if trainer.strategy.reduce_boolean_decision(problem is None, all=True):
            return None
        return problem or "another rank could not read or check the checkpoint (see its log); nothing was changed"

    def read(self, path: str) -> RestorePoint:
        loaded = load_file(path)
        model = loaded.get("state_dict")
        if not isinstance(model, dict):
            raise Rejected(
                f"rollback: {path} is not a Lightning checkpoint with weights (no 'state_dict'; was it saved with "
                "save_weights_only=True or by another tool?)"
            )
        optimizers = loaded.get("optimizer_states")
        if not isinstance(optimizers, list) or not optimizers:
            raise Rejected(
                f"rollback: {path} holds no optimizer state (saved with save_weights_only=True?); roll back to a "
                "full checkpoint"
            )
        callbacks = loaded.get("callbacks")
        weavelet = callbacks.get(self.state_key) if isinstance(callbacks, dict) else None
        scaler = loaded.get(type(self.trainer.precision_plugin).__qualname__)
        step = loaded.get("global_step")
        return RestorePoint(
            source=path,
            step=step if isinstance(step, int) else None,
            model=model,
            optimizers=optimizers,
            schedulers=list(loaded.get("lr_schedulers") or []),
            scaler=scaler if isinstance(scaler, dict) else None,
            weavelet=weavelet if isinstance(weavelet, dict) else None,
        )

    def check(self, point: RestorePoint) -> None:
        trainer = self.trainer
        assert point.model is not None
        check_model(trainer.lightning_module.state_dict(), point.model, point.source)
        optimizers = trainer.strategy.optimizers
        check_count("optimizer state(s)", point.optimizers, len(optimizers), point.source)
        for index, (optimizer, saved) in enumerate(zip(optimizers, point.optimizers, strict=True)):
            check_optimizer(optimizer, saved, f"optimizer {index}", point.source)
        check_count("scheduler state(s)", point.schedulers, len(trainer.strategy.lr_scheduler_configs), point.source)

    def restore(self, point: RestorePoint, applier: Applier) -> None:
        trainer = self.trainer
        strategy = trainer.strategy
        assert point.model is not None
        trainer.lightning_module.load_state_dict(point.model, strict=True)
        restore_optimizers(applier, strategy.optimizers, point)
        for optimizer, saved in zip(strategy.optimizers, point.optimizers, strict=True):
            optimizer.load_state_dict(dict(saved))
        for config, saved in zip(strategy.lr_scheduler_configs, point.schedulers, strict=True):
            config.scheduler.load_state_dict(saved)
        if point.scaler is not None:
            trainer.precision_plugin.load_state_dict(point.scaler)

    def capture(self, step: int, applier: Applier) -> RestorePoint:
        trainer = self.trainer
        strategy = trainer.strategy
        scaler = trainer.precision_plugin.state_dict()
        return RestorePoint(
            source="snapshot",
            step=step,
            model=cpu_copy(trainer.lightning_module.state_dict()),
            optimizers=[cpu_copy(o.state_dict()) for o in strategy.optimizers],
            schedulers=[cpu_copy(c.scheduler.state_dict()) for c in strategy.lr_scheduler_configs],
            scaler=cpu_copy(scaler) if scaler else None,
            weavelet=cpu_copy(applier.state_dict()),
        )


__all__ = ["LightningRestorer"]
