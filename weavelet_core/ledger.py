"""The outcome ledger: outcomes the trainer reported, kept until a sidecar confirms it stored them.

Each outcome gets a sequence number. The sidecar stores the number of the last outcome it published in the
channel's ``outcome_ack``; :meth:`OutcomeLedger.ack` forgets everything up to it. What is still pending when a
sidecar dies is handed to the next one (:meth:`OutcomeLedger.pending`), so an outcome is never dropped by a
restart.

Bounds, so that a stalled sidecar (SIGSTOP) never grows the trainer's memory without limit:

- every outcome is made to fit the wire: its message is cut to
  :data:`~weavelet_core.protocol.MAX_MESSAGE_CHARS` characters with a marker, and a detail that still does not
  fit is replaced by ``{"dropped": "<why>"}`` (:func:`fit_outcome`);
- at most ``max_pending`` outcomes wait; beyond that the oldest is forgotten and counted in
  :attr:`OutcomeLedger.dropped`;
- at most ``window`` outcomes are in the channel's queue unacknowledged (:meth:`OutcomeLedger.take_unsent`): a
  ``multiprocessing`` queue whose reader stalls buffers without limit in the writer, so the rest wait here, in
  the bounded ledger, and are sent as the sidecar catches up.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading

from weavelet_core.errors import ProtocolError
from weavelet_core.protocol import MAX_MESSAGE_CHARS, Outcome, encode, to_dict, truncate

log = logging.getLogger(__name__)

MAX_PENDING = 4096
"""Default bound on outcomes waiting for a sidecar to publish them."""
SEND_WINDOW = 64
"""Default bound on outcomes handed to the channel's queue and not yet acknowledged by the sidecar."""


def fit_outcome(outcome: Outcome) -> Outcome:
    """``outcome`` cut so that it encodes within the payload cap: message truncated, detail dropped if needed."""
    message = outcome.message
    if message is not None and len(message) > MAX_MESSAGE_CHARS:
        outcome = dataclasses.replace(outcome, message=truncate(message))
    try:
        encode(outcome)
        return outcome
    except ProtocolError as exc:
        why = f"the detail did not fit the payload cap ({exc})"
        return dataclasses.replace(outcome, detail={"dropped": truncate(why, 300)})


class OutcomeLedger:
    """Sequence-numbered outcomes waiting to be published (thread-safe, bounded).

    :param max_pending: how many unpublished outcomes are kept at most (default :data:`MAX_PENDING`).
    """

    def __init__(self, max_pending: int = MAX_PENDING, window: int = SEND_WINDOW) -> None:
        self.max_pending = max_pending
        self.window = window
        self.dropped = 0
        self._seq = 0
        self._sent = 0  # the newest sequence number handed to the current channel's queue
        self._acked = 0  # the newest the current channel's sidecar acknowledged
        self._pending: collections.deque[tuple[int, bytes]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, outcome: Outcome) -> bytes:
        """Record ``outcome`` (fitted to the wire) and return the channel message that carries it.

        The message is not marked as sent: hand it over with :meth:`take_unsent`."""
        fitted = fit_outcome(outcome)
        with self._lock:
            self._seq += 1
            data = json.dumps({"t": "outcome", "seq": self._seq, "outcome": to_dict(fitted)}).encode()
            self._pending.append((self._seq, data))
            while len(self._pending) > self.max_pending:
                self._pending.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error(
                        "weavelet: %d outcome(s) dropped: no sidecar published them (more than %d waiting)",
                        self.dropped,
                        self.max_pending,
                    )
        return data

    def ack(self, seq: int) -> None:
        """Forget outcomes up to sequence number ``seq``: a sidecar has published them."""
        with self._lock:
            self._acked = max(self._acked, seq)
            while self._pending and self._pending[0][0] <= seq:
                self._pending.popleft()

    def pending(self) -> list[bytes]:
        """The channel messages of the outcomes not yet confirmed, oldest first."""
        with self._lock:
            return [data for _seq, data in self._pending]

    def restart_sending(self) -> None:
        """A new channel: nothing is in its queue yet, so every pending outcome is unsent again."""
        with self._lock:
            self._sent = self._acked = self._pending[0][0] - 1 if self._pending else self._seq

    def take_unsent(self, *, everything: bool = False) -> list[bytes]:
        """Messages not yet handed to the queue, as many as keep at most ``window`` sent and unacknowledged
        (acknowledged ones are gone from the ledger: call :meth:`ack` first), or all of them with
        ``everything`` (at a stop, when the sidecar is about to drain its queue); they count as sent from now on.
        """
        with self._lock:
            in_flight = self._sent - self._acked  # sequence numbers in the queue, also those dropped here since
            taken = []
            for seq, data in self._pending:
                if seq <= self._sent:
                    continue
                if in_flight >= self.window and not everything:
                    break
                taken.append(data)
                in_flight += 1
                self._sent = seq
            return taken

    @property
    def unsent(self) -> bool:
        """Whether some outcome waits to be handed to the queue (cheap: two integers compared)."""
        return self._sent < self._seq

    def __len__(self) -> int:
        return len(self._pending)


__all__ = ["MAX_PENDING", "OutcomeLedger", "fit_outcome"]
