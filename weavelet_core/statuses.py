"""A run's status and its schema: published apart, joined again on reading.

A trainer's status carries the schema of what it accepts (:attr:`~weavelet_core.protocol.Status.schema`): every
key with its kind and range, for every optimizer it could switch to. That is a few kilobytes, most of a status,
while the rest (state, step, metrics, heartbeat) is a few hundred bytes. The status is republished at every
heartbeat and read for every run by ``weavelet runs``; the schema changes rarely (a swap, a new param group) and
is read only to check a change before writing it. So, on a transport that can (one implementing
:meth:`~weavelet_core.Transport.publish_schema`):

- :class:`StatusPublisher` stores the schema apart, whenever its bytes change, *before* the status that names it
  by digest (:attr:`~weavelet_core.protocol.Status.schema_digest`); the stored status carries no schema;
- :func:`read_status` reads a status and, when it names a schema, the schema, and joins them if the digest
  matches. A reader that finds an older or newer schema than the status names (the trainer replaced it in
  between) reads both again, at most :data:`JOIN_ATTEMPTS` times, then returns the status without its schema;
- batched reads (:meth:`~weavelet_core.Transport.statuses`) return stored statuses as they are: without schemas.

A transport without :meth:`~weavelet_core.Transport.publish_schema`, or a trainer that may not write there (a
permission denied), keeps the schema inline in its status, as before; readers handle either.

On a transport that versions statuses (:meth:`~weavelet_core.Transport.replace_status`), the publisher keeps the
version of the status it stored last, and :meth:`StatusPublisher.publish_unless_replaced` stores the next one
only while that is still the stored one: a sidecar then needs no read before its keepalive to know that nobody
(a newer incarnation, a removal) wrote since.
"""

from __future__ import annotations

import dataclasses
import logging

from weavelet_core.errors import PermissionDenied, ProtocolError
from weavelet_core.protocol import Status, decode_schema, encode_schema, schema_digest
from weavelet_core.transport import SchemaApartUnsupported, StatusVersionsUnsupported, Transport

log = logging.getLogger(__name__)

JOIN_ATTEMPTS = 3
"""Reads of a status and its schema before :func:`read_status` gives up joining them (each mismatch means the
trainer replaced its schema in between)."""


class StatusPublisher:
    """Publishes one run's statuses, storing the schema apart while the transport can.

    Keeps the digest of the schema it last stored, so a schema is written again only when it changes.
    """

    def __init__(self) -> None:
        self.stored_digest: str | None = None
        """Digest of the schema this publisher last stored apart (``None``: none yet)."""
        self.inline = False
        """Whether schemas go inline in the status: the transport cannot store them apart, or this writer may not."""
        self.version: int | None = None
        """Version of the status this publisher stored last, where the transport versions statuses (else None)."""
        self._versioned = True  # until the transport says it does not version statuses

    async def publish_unless_replaced(self, transport: Transport, status: Status) -> bool:
        """Publish ``status`` only if the stored status is still the one this publisher stored last; return
        whether it did, in one round trip (:meth:`~weavelet_core.Transport.replace_status`).

        Returns False, storing nothing, when the stored status changed since (another writer, a removal), or
        when that cannot be known in one step: nothing stored yet, a transport that does not version statuses, a
        schema that changed (it goes apart first, which must wait until the caller has checked who owns the run).
        The caller then checks what is stored and calls :meth:`publish`. Raises what :meth:`publish` raises.
        """
        if self.version is None or not self._versioned:
            return False
        if status.schema is not None and not self.inline:
            digest = schema_digest(encode_schema(status.schema))
            if digest != self.stored_digest:
                return False
            status = dataclasses.replace(status, schema=None, schema_digest=digest)
        self.version = await transport.replace_status(status, self.version)
        return self.version is not None

    async def publish(self, transport: Transport, status: Status) -> None:
        """Publish ``status``; its schema, if any, goes apart (first, when new) unless :attr:`inline`.

        :raises TransportError: what :meth:`~weavelet_core.Transport.publish_status` and
            :meth:`~weavelet_core.Transport.publish_schema` raise, except that a schema the transport cannot
            store apart, or this writer may not, is sent inline from then on.
        :raises ProtocolError: for a schema that does not encode (see :func:`~weavelet_core.protocol.encode_schema`).
        """
        if status.schema is None or self.inline:
            await self._store(transport, status)
            return
        data = encode_schema(status.schema)
        digest = schema_digest(data)
        if digest != self.stored_digest:
            try:
                await transport.publish_schema(status.run, data)
            except SchemaApartUnsupported:
                self.inline = True
            except PermissionDenied as exc:
                self.inline = True
                log.warning(
                    "weavelet: run %r: the schema cannot be stored apart from the status (%s); it goes inline, so "
                    "every status carries it (grant the write to keep statuses small: docs/deploy.md)",
                    status.run,
                    exc,
                )
            if self.inline:
                await self._store(transport, status)
                return
            self.stored_digest = digest
        await self._store(transport, dataclasses.replace(status, schema=None, schema_digest=digest))

    async def _store(self, transport: Transport, status: Status) -> None:
        """Store ``status`` whatever is stored, keeping its version where the transport versions statuses."""
        self.version = None
        if self._versioned:
            try:
                self.version = await transport.replace_status(status, None)
                return
            except StatusVersionsUnsupported:
                self._versioned = False
        await transport.publish_status(status)


async def read_status(transport: Transport, run: str) -> Status | None:
    """The run's latest status with its schema, wherever the schema is stored (see the module docstring).

    A status whose schema cannot be joined (it is missing, unreadable, replaced on every try, or this reader may
    not read it) is returned without one, with ``schema_digest`` still set, so a reader can tell it from a trainer
    that publishes none. Raises what :meth:`~weavelet_core.Transport.status` raises.
    """
    status: Status | None = None
    for _attempt in range(JOIN_ATTEMPTS):
        status = await transport.status(run)
        if status is None or status.schema is not None or not status.schema_digest:
            return status
        try:
            data = await transport.read_schema(run)
        except PermissionDenied as exc:
            log.info("run %r: its schema cannot be read (%s); the status is shown without it", run, exc)
            return status
        if data is None:
            return status  # named but not stored (removed, or stored where this reader does not look)
        if schema_digest(data) == status.schema_digest:
            try:
                return dataclasses.replace(status, schema=decode_schema(data))
            except ProtocolError as exc:
                log.warning("run %r: its stored schema is unreadable (%s); the status is shown without it", run, exc)
                return status
        # another schema than the status names: the trainer replaced it in between; read both again
    return status
