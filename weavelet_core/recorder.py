"""The trainer's status: recorded on every report, written to the sidecar's status slot by one rule.

The rule (the only throttle on the trainer's side): a snapshot is written when it is *due* (``interval`` seconds
after the previous one) or *urgent* (the epoch, the optimizer or the newest outcome changed, or the caller forces
it: start, stop, an outcome). Between snapshots :meth:`StatusRecorder.record` only stores references, so a report
costs a few attribute writes. Metrics are cleaned once, when a snapshot is written (:func:`clean_metrics`).
A report that was not written because it came too soon is *pending*: :meth:`StatusRecorder.arm` says once per
pending period that someone must write it at :meth:`StatusRecorder.pending_deadline` if no report does first
(the trainer's supervisor thread does, so a loop that pauses right after a report still publishes it).

The sidecar publishes each new snapshot at once and the newest one with its keepalive; see
:mod:`weavelet_core.sidecar`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from weavelet_core.channel import StatusSlot
from weavelet_core.protocol import Outcome, truncate

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.5
"""Seconds between two status snapshots when nothing urgent happens."""


def clean_metrics(values: Mapping[str, Any] | None) -> dict[str, float]:
    """Scalar entries of ``values`` (numbers, one-element tensors or arrays) as finite floats keyed by strings.

    Anything else (a NaN loss, a tensor of many elements, an object that will not convert) is left out rather
    than breaking the heartbeat.
    """
    if not values:
        return {}
    found: dict[str, float] = {}
    for key, value in list(values.items()):
        try:
            numel = getattr(value, "numel", None)
            if numel is not None:
                if numel() != 1:
                    continue
                value = value.item()
            number = float(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            continue
        if math.isfinite(number):
            found[str(key)] = number
    return found


def outcome_summary(outcome: Outcome) -> dict[str, Any]:
    """The compact form of an outcome carried in ``Status.last_outcome``; ``signed_by`` names the trusted key that
    verified the revision, when one did (see :mod:`weavelet_core.signing`)."""
    summary: dict[str, Any] = {
        "revision": outcome.revision,
        "revision_id": outcome.revision_id,
        "result": outcome.result,
        "step": outcome.step,
        "message": truncate(outcome.message, 500) if outcome.message else outcome.message,
    }
    signature = outcome.detail.get("signature")
    if isinstance(signature, dict) and signature.get("verified") is True and isinstance(signature.get("key"), str):
        summary["signed_by"] = signature["key"]
    return summary


def _non_negative_int(value: object) -> int:
    try:
        number: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(0, number)


class StatusRecorder:
    """Latest step, epoch, metrics, optimizer and outcome of the trainer; writes snapshots to a status slot.

    :param interval: seconds between two snapshots when nothing urgent happens (>= 0).
    :param applied: the revision applied when the trainer started (a resume).
    :param gate: a :class:`~weavelet_core.process.StepGate` whose ``report_at`` is kept equal to the time of the next
        snapshot (``None``: none).
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL, applied: int = 0, gate: Any = None) -> None:
        self.interval = max(0.0, float(interval))
        self.step = 0
        self.epoch = 0
        self.applied = applied
        self.metrics: Mapping[str, Any] | None = None
        self.optimizer: dict[str, Any] | None = None
        self.last_outcome: dict[str, Any] | None = None
        self.schema: dict[str, Any] | None = None
        self.errors = 0
        self._gate = gate  # a StepGate whose report_at follows _next (see weavelet_core.process.StepGate)
        self._next = 0.0
        self._dirty = False
        self._armed = False
        self.written = 0
        """Snapshots written so far (by any thread)."""
        self._lock = threading.Lock()

    def due(self) -> bool:
        """Whether a snapshot is due now (lets callers skip gathering metrics)."""
        return time.monotonic() >= self._next

    def record(
        self,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        schema: dict[str, Any] | None = None,
    ) -> bool:
        """Store what changed (``None`` keeps a field); return whether a snapshot is now due or urgent."""
        urgent = False
        if schema is not None:
            urgent = schema is not self.schema
            self.schema = schema
        if step is not None:
            self.step = step
        if epoch is not None:
            urgent = epoch != self.epoch
            self.epoch = epoch
        if metrics is not None:
            self.metrics = metrics
        if optimizer is not None:
            try:
                urgent = urgent or optimizer != self.optimizer
            except Exception:  # values whose == is not a bool (arrays)
                urgent = True
            self.optimizer = optimizer
        self._dirty = True
        return urgent or time.monotonic() >= self._next

    def arm(self) -> bool:
        """Whether a pending report now needs a later write by someone else: ``True`` once per pending period
        (the first report that was not written since the last snapshot), ``False`` otherwise."""
        if not self._dirty or self._armed:
            return False
        self._armed = True
        return True

    def disarm(self) -> None:
        """Forget that a pending report needs a later write (it could not be written; the next report arms
        again)."""
        self._armed = False

    def pending_deadline(self) -> float | None:
        """``time.monotonic()`` time at which an armed pending report is due, or ``None`` if none is."""
        return self._next if self._dirty and self._armed else None

    def record_outcome(self, outcome: Outcome) -> None:
        """Store the newest outcome (and the applied revision and step it implies)."""
        if outcome.result == "applied" and outcome.revision > self.applied:
            self.applied = outcome.revision
        if outcome.step is not None and outcome.step > _non_negative_int(self.step):
            self.step = outcome.step
        self.last_outcome = outcome_summary(outcome)
        self._dirty = True

    def flush(self, slot: StatusSlot | None) -> bool:
        """Write a snapshot into ``slot`` now; never blocks (skips if another thread is writing).

        Returns whether a snapshot was written.
        """
        if slot is None or not self._lock.acquire(blocking=False):
            return False
        try:
            self._next = time.monotonic() + self.interval
            if self._gate is not None:
                self._gate.report_at = self._next
            self._dirty = self._armed = False
            self.written += 1
            fields: dict[str, Any] = {
                "step": _non_negative_int(self.step),
                "epoch": _non_negative_int(self.epoch),
                "applied_revision": self.applied,
                "metrics": clean_metrics(self.metrics),
                "optimizer": self.optimizer,
                "last_outcome": self.last_outcome,
                "schema": self.schema,
            }
            try:
                data = json.dumps(fields, allow_nan=False, default=str).encode()
            except (TypeError, ValueError):
                fields["optimizer"] = fields["schema"] = None
                data = json.dumps(fields, allow_nan=False, default=str).encode()
            if not slot.write(data):
                fields["metrics"], fields["optimizer"], fields["schema"] = {}, None, None
                slot.write(json.dumps(fields).encode())
            return True
        except Exception as exc:
            self.errors += 1
            log.debug("weavelet: status snapshot failed: %s", exc)
            return False
        finally:
            self._lock.release()


__all__ = ["DEFAULT_INTERVAL", "StatusRecorder", "clean_metrics", "outcome_summary"]
