"""Rolling a plain loop (:func:`weavelet_torch.attach`) back in place.

Given ``model=``, the checkpoints are those the ``checkpoint`` command wrote (``torch.save`` of ``{"step",
"model", "optimizer" or "optimizers", "schedulers", "scaler", "weavelet"}`` under ``checkpoint_dir``), read with
``torch.load(weights_only=True)``, checked against the model and optimizers, then restored. Given ``load=``, that
function restores a checkpoint the script's own way (see :data:`~weavelet_torch.rollback.LoadFn`); checkpoints are
then found in ``checkpoint_dir`` and among the paths the ``checkpoint`` command returned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from weavelet_torch.errors import Rejected
from weavelet_torch.rollback import (
    LoadFn,
    RestorePoint,
    Restorer,
    check_count,
    check_model,
    check_optimizer,
    cpu_copy,
    list_files,
    load_file,
    restore_optimizers,
    step_in_name,
)

if TYPE_CHECKING:
    from weavelet_torch.applier import Applier
    from weavelet_torch.attach import LoopHost

SUFFIXES = (".pt", ".pth", ".ckpt")


class LoopRestorer(Restorer):
    """The :class:`~weavelet_torch.rollback.Restorer` of a plain loop (see the module docstring).

    :param host: the loop's optimizers and schedulers.
    :param model: the model (with it, weavelet reads, checks and restores checkpoints itself).
    :param load: restores a checkpoint the script's own way instead.
    :param directory: returns where checkpoints are looked for.
    :param scaler: the AMP GradScaler, restored when the checkpoint holds its state.
    :param saved: returns the path the ``checkpoint`` command saved last.
    """

    def __init__(
        self,
        host: LoopHost,
        *,
        model: torch.nn.Module | None,
        load: LoadFn | None,
        directory: Callable[[], Path],
        scaler: Any = None,
        saved: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.host, self.model, self.load, self.directory, self.scaler = host, model, load, directory, scaler
        self.saved = saved
        """Returns the path the ``checkpoint`` command saved last (a candidate for ``--to latest``)."""

    def checkpoints(self) -> list[str]:
        found = list_files([self.directory()], SUFFIXES)
        last = self.saved()
        if last is not None and os.path.abspath(last) not in found and os.path.isfile(last):
            found.append(os.path.abspath(last))
        return found

    def read(self, path: str) -> RestorePoint:
        if self.model is None:
            return RestorePoint(source=path, step=step_in_name(path), extra={"load": True})
        loaded = load_file(path)
        model = loaded.get("model")
        if not isinstance(model, dict):
            raise Rejected(
                f"rollback: {path} holds no 'model' state dict; roll back to a checkpoint the checkpoint command "
                "saved, or give attach() a load= function that reads your format"
            )
        names = self.host.optimizer_names()
        if names:
            saved = loaded.get("optimizers")
            states = [saved.get(n) for n in names] if isinstance(saved, Mapping) else []
        else:
            states = [loaded.get("optimizer")]
        optimizers = [s for s in states if isinstance(s, dict)]
        if not states or len(optimizers) != len(states):
            raise Rejected(
                f"rollback: {path} holds no state for this loop's optimizer(s) ({', '.join(names) or 'one'})"
            )
        step = loaded.get("step")
        weavelet = loaded.get("weavelet")
        scaler = loaded.get("scaler")
        return RestorePoint(
            source=path,
            step=step if isinstance(step, int) else step_in_name(path),
            model=model,
            optimizers=optimizers,
            schedulers=list(loaded.get("schedulers") or []),
            scaler=scaler if isinstance(scaler, dict) else None,
            weavelet=weavelet if isinstance(weavelet, dict) else None,
        )

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        names = self.host.optimizer_names()
        return [self.host.optimizer_of(n) for n in names] if names else [self.host.optimizer]

    def check(self, point: RestorePoint) -> None:
        if point.extra.get("load") or self.model is None:
            return  # the load function checks (and raises before changing anything)
        assert point.model is not None
        check_model(self.model.state_dict(), point.model, point.source)
        optimizers = self._optimizers()
        check_count("optimizer state(s)", point.optimizers, len(optimizers), point.source)
        for index, (optimizer, saved) in enumerate(zip(optimizers, point.optimizers, strict=True)):
            check_optimizer(optimizer, saved, f"optimizer {index}", point.source)
        check_count("scheduler state(s)", point.schedulers, len(self.host.schedulers()), point.source)

    def restore(self, point: RestorePoint, applier: Applier) -> None:
        if point.extra.get("load") or self.model is None:
            assert self.load is not None
            state = self.load(point.source)
            point.weavelet = state if isinstance(state, Mapping) else None
            return
        assert point.model is not None
        self.model.load_state_dict(point.model, strict=True)
        restore_optimizers(applier, self._optimizers(), point)
        for optimizer, saved in zip(self._optimizers(), point.optimizers, strict=True):
            optimizer.load_state_dict(dict(saved))
        for scheduler, saved in zip(self.host.schedulers(), point.schedulers, strict=True):
            scheduler.load_state_dict(saved)
        if point.scaler is not None and self.scaler is not None:
            self.scaler.load_state_dict(point.scaler)

    def capture(self, step: int, applier: Applier) -> RestorePoint:
        if self.model is None:
            raise Rejected("in-memory snapshots need attach(model=...)")
        return RestorePoint(
            source="snapshot",
            step=step,
            model=cpu_copy(self.model.state_dict()),
            optimizers=[cpu_copy(o.state_dict()) for o in self._optimizers()],
            schedulers=[cpu_copy(s.state_dict()) for s in self.host.schedulers()],
            scaler=cpu_copy(self.scaler.state_dict()) if self.scaler is not None else None,
            weavelet=cpu_copy(applier.state_dict()),
        )


__all__ = ["LoopRestorer"]
