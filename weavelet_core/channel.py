"""The channel between a trainer and its weavelet sidecar: two queues, a version counter and a status slot.

Everything that crosses it is JSON bytes; nothing is pickled beyond the ``multiprocessing`` objects themselves.
Each process closes the pipe ends it does not use (:meth:`Channel.after_spawn`, :meth:`Channel.in_sidecar`),
so that the death of either side reads as end-of-file or a broken pipe on the other, never as a wait. This
relies on the ``_reader``/``_writer``/``_thread`` attributes of ``multiprocessing.queues.Queue`` (stable since
Python 3.4) and degrades to keeping the ends open where they are missing.

- ``to_trainer`` (sidecar -> trainer): ``{"t": "revision", "baseline": bool, "revision": {...}}`` messages, the
  revision as its protocol JSON object and ``baseline`` true for the revision that was newest when the
  incarnation claimed the run (its commands never act). After each
  put the sidecar increments ``version`` (a lock-free shared ``RawValue``; the sidecar is its only writer).
  The trainer compares it with the number of messages it has taken out, so its per-step check is one shared
  integer read and it touches the queue only when the counter moved.
- ``to_sidecar`` (trainer -> sidecar): outcomes (each with a sequence number), ``{"t": "status"}`` when the
  trainer wrote a new status snapshot (so the sidecar publishes a change at once and otherwise sleeps until its
  keepalive; at most :data:`MAX_STATUS_NOTES` of them wait unread, counted with ``status_taken``), and the stop
  request. The
  sidecar stores the sequence number of the last outcome it published in ``outcome_ack``, so that a trainer
  whose sidecar died can send the unpublished ones again to the next sidecar: outcomes are never dropped by a
  restart. ``{"t": "final", "state": ..., "message": ...}`` sets the final status the stop publishes.
- ``events`` (sidecar -> trainer's supervisor thread, a one-way pipe): ``claimed`` (with the revision to watch
  after and the baseline), ``connected``, ``disconnected``, ``failed`` with a message and the error's name.
  Rare and small.
- ``status``: a :class:`StatusSlot`, the trainer's latest status as JSON in shared memory (latest wins).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing.connection
import threading
from multiprocessing.context import SpawnContext
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Any

STATUS_SLOT_BYTES = 64 * 1024
"""Capacity of the status slot; a status that does not fit is sent without its metrics and optimizer."""
MAX_STATUS_NOTES = 8
"""Status notes (``{"t": "status"}``) that may wait unread in ``to_sidecar``: a stalled sidecar never makes the
trainer's queue grow. The sidecar reads the newest snapshot when it handles a note, so one is enough."""
STATUS_NOTE = b'{"t":"status"}'


class StatusSlot:
    """One JSON document in shared memory with a sequence lock: one writer, one reader, neither ever waits.

    The writer makes ``seq`` odd, copies the bytes, then makes it even again. The reader copies the bytes and
    keeps them only if ``seq`` was even and unchanged around the copy (otherwise it tries again, a bounded
    number of times). Memory is fixed: the slot never grows, whatever the writer does.
    """

    def __init__(self, ctx: SpawnContext, capacity: int = STATUS_SLOT_BYTES) -> None:
        self.capacity = capacity
        self._seq: Any = RawValue(ctypes.c_uint64, 0)
        self._length: Any = RawValue(ctypes.c_uint32, 0)
        self._data: Any = RawArray(ctypes.c_char, capacity)

    @property
    def seq(self) -> int:
        """Even when the slot is consistent; increases by 2 per write."""
        return int(self._seq.value)

    def write(self, data: bytes) -> bool:
        """Store ``data`` (replacing the previous document); return ``False`` if it does not fit."""
        if len(data) > self.capacity:
            return False
        seq = self._seq.value
        self._seq.value = seq + 1
        ctypes.memmove(self._data, data, len(data))
        self._length.value = len(data)
        self._seq.value = seq + 2
        return True

    def read(self, attempts: int = 100) -> tuple[int, bytes] | None:
        """``(seq, data)`` of a consistent snapshot, or ``None`` if no write ever happened or no consistent
        snapshot was seen within ``attempts`` tries (a writer that died mid-write)."""
        for _ in range(attempts):
            before = self._seq.value
            if before == 0:
                return None
            if before & 1:
                continue
            length = self._length.value
            data = ctypes.string_at(self._data, min(length, self.capacity))
            if self._seq.value == before:
                return before, data
        return None


class Channel:
    """The multiprocessing objects shared by one trainer and one sidecar incarnation.

    Built by the trainer from a ``spawn`` context and handed to the sidecar as a ``Process`` argument. A
    sidecar that died (possibly inside a queue operation) leaves its channel unusable: the trainer builds a
    fresh channel for the next sidecar and only carries the unpublished outcomes over.
    """

    def __init__(self, ctx: SpawnContext) -> None:
        self.to_trainer: Queue[bytes] = ctx.Queue()
        self.to_sidecar: Queue[bytes] = ctx.Queue()
        self.version: Any = RawValue(ctypes.c_uint64, 0)
        self.outcome_ack: Any = RawValue(ctypes.c_uint64, 0)
        self.status_taken: Any = RawValue(ctypes.c_uint64, 0)  # status notes the sidecar has read
        self._status_sent = 0  # status notes this trainer sent (trainer side only)
        for queue in (self.to_trainer, self.to_sidecar):
            # A feeder whose reader is gone ends quietly instead of printing a BrokenPipeError per message.
            queue._ignore_epipe = True  # type: ignore[attr-defined]
        self.status = StatusSlot(ctx)
        reader, writer = ctx.Pipe(duplex=False)
        self.events_reader: multiprocessing.connection.Connection = reader
        self.events_writer: multiprocessing.connection.Connection = writer

    # -- trainer side ----------------------------------------------------------------------------------
    def after_spawn(self) -> None:
        """In the trainer, once the sidecar has started: close the ends only the sidecar uses.

        Then a sidecar that dies leaves no writer on ``to_trainer`` and ``events`` (a half-written message
        reads as end-of-file instead of blocking ``poll``) and no reader on ``to_sidecar`` (the trainer's
        feeder thread ends instead of blocking on a full pipe).
        """
        _close_quietly(_end(self.to_trainer, "_writer"), _end(self.to_sidecar, "_reader"), self.events_writer)

    def status_written(self) -> None:
        """In the trainer, after writing a snapshot into ``status``: tell the sidecar, unless
        :data:`MAX_STATUS_NOTES` notes already wait unread (the sidecar reads the newest snapshot anyway).
        Never blocks or raises."""
        if self._status_sent - int(self.status_taken.value) >= MAX_STATUS_NOTES:
            return
        self._status_sent += 1
        with contextlib.suppress(Exception):
            self.to_sidecar.put(STATUS_NOTE)

    def close(self, feeder_timeout: float = 1.0) -> None:
        """Release the trainer's ends, once the sidecar has exited.

        The trainer's queue feeder thread is joined within ``feeder_timeout`` seconds: with the sidecar gone
        its pipe has no reader left, so the feeder ends at once. Should it not, it is abandoned (and not
        waited for at interpreter exit) rather than blocking the trainer.
        """
        for queue in (self.to_sidecar, self.to_trainer):
            with contextlib.suppress(Exception):
                queue.close()
            feeder: threading.Thread | None = getattr(queue, "_thread", None)
            if feeder is not None:
                feeder.join(feeder_timeout)
                if feeder.is_alive():
                    queue.cancel_join_thread()
                    continue
            _close_quietly(_end(queue, "_reader"), _end(queue, "_writer"))
        _close_quietly(self.events_reader, self.events_writer)

    # -- sidecar side ----------------------------------------------------------------------------------
    def in_sidecar(self) -> None:
        """In the sidecar, first thing: close the ends only the trainer uses, so that the trainer's death
        reads as end-of-file on ``to_sidecar`` and a write to ``to_trainer`` fails instead of blocking."""
        _close_quietly(_end(self.to_trainer, "_reader"), _end(self.to_sidecar, "_writer"), self.events_reader)

    def forward(self, data: bytes) -> None:
        """In the sidecar: hand one encoded revision to the trainer, then bump the version counter."""
        self.to_trainer.put(data)
        self.version.value += 1

    def send_event(self, event: str, message: str | None = None, **fields: object) -> None:
        """In the sidecar: tell the trainer's supervisor about a connection change (plain JSON ``fields``)."""
        with contextlib.suppress(OSError, ValueError, TypeError):
            self.events_writer.send_bytes(json.dumps({**fields, "event": event, "message": message}).encode())


def _end(queue: Queue[bytes], name: str) -> multiprocessing.connection.Connection | None:
    """One end (``_reader`` or ``_writer``) of a queue's pipe; ``None`` if this Python keeps it elsewhere."""
    end = getattr(queue, name, None)
    return end if isinstance(end, multiprocessing.connection.Connection) else None


def _close_quietly(*connections: multiprocessing.connection.Connection | None) -> None:
    for conn in connections:
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()


def reader_fileno(queue: Queue[bytes]) -> int:
    """The file descriptor that becomes readable when ``queue`` has data (for ``anyio.wait_readable``)."""
    reader: multiprocessing.connection.Connection = queue._reader  # type: ignore[attr-defined]
    return reader.fileno()


__all__ = ["MAX_STATUS_NOTES", "STATUS_NOTE", "STATUS_SLOT_BYTES", "Channel", "StatusSlot", "reader_fileno"]
