"""The optional per-step work of a run: in-memory snapshots and the spike guard.

The integrations call a :class:`StepWatch` once per optimizer step only when one of them is configured; without
either, the per-step path holds one ``is None`` test more.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from weavelet_torch.applier import Applier
from weavelet_torch.guard import SpikeGuard, loss_value
from weavelet_torch.link import Link
from weavelet_torch.rollback import Restorer, SnapshotRing

log = logging.getLogger("weavelet_torch")


class StepWatch:
    """Takes a snapshot when one is due and hands the loss to the spike guard (on the rank that has a link).

    :param applier: the run's applier (its restorer captures snapshots; its config gives the current ``lr_scale``).
    :param link: returns the run's :class:`~weavelet_torch.link.Link` (``None`` on ranks other than 0).
    :param guard: the spike guard, or ``None``.
    """

    def __init__(self, applier: Applier, link: Callable[[], Link | None], guard: SpikeGuard | None) -> None:
        self.applier, self.link, self.guard = applier, link, guard

    @property
    def ring(self) -> SnapshotRing | None:
        restorer: Restorer | None = self.applier.restorer
        return restorer.snapshots if restorer is not None else None

    def __call__(self, step: int, loss: Any) -> None:
        ring = self.ring
        restorer = self.applier.restorer
        if ring is not None and restorer is not None and ring.due(step):
            try:
                ring.add(restorer.capture(step, self.applier))
            except Exception as exc:  # a snapshot that cannot be taken must not end the run
                log.warning("weavelet: could not take an in-memory snapshot at step %d: %s", step, exc)
        guard = self.guard
        link = self.link() if guard is not None else None
        if guard is None or link is None:
            return
        value = loss_value(loss)
        if value is None:
            return
        scale = self.applier.applied_config.get("lr_scale", 1.0)
        action = guard.observe(step, value, scale if isinstance(scale, (int, float)) else 1.0)
        if action is None:
            return
        name = action.kind
        command = {**action.changes[name], "token": secrets.token_hex(8), "incarnation": self.applier.incarnation}
        log.warning("weavelet: %s", action.author)
        link.write({name: command}, action.author)


__all__ = ["StepWatch"]
