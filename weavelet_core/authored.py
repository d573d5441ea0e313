"""Revisions the trainer writes itself, through its sidecar: a rollback's rewrite of the desired config, and the
spike guard's commands.

A trainer never talks to the transport; it hands the sidecar a ``{"t": "write", ...}`` message (see
:meth:`weavelet_core.WeaveletProcess.write`) and the sidecar stores it as a new revision of the run, compare-and-set
on the newest one, with the trainer's ``author`` line. The revision comes back to the trainer like any other one,
so ``weavelet history`` shows it, every rank applies it at the same step, and an operator can revert it.

Two kinds of write:

- ``replace``: the revision's config is ``changes`` whole, with the newest revision's command tokens kept as they
  are (a rewrite never fires or revives a command);
- a merge: ``changes`` merged onto the newest config (the spike guard's ``rollback`` command).

Bounds: at most :data:`MAX_PENDING_WRITES` writes wait in the sidecar (older ones are dropped with an error in its
log), and each is tried :data:`WRITE_ATTEMPTS` times against concurrent writers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from weavelet_core.errors import CorruptEntry, RevisionConflict
from weavelet_core.protocol import Revision, truncate
from weavelet_core.transport import Transport

log = logging.getLogger("weavelet")

COMMAND_KEYS = ("stop", "checkpoint", "rollback")
MAX_PENDING_WRITES = 8
"""Writes the sidecar holds at most; a ninth drops the oldest."""
WRITE_ATTEMPTS = 20
"""Compare-and-set attempts per write before it is given up (logged)."""
MAX_AUTHOR_CHARS = 300
"""An authored revision's ``author`` line is cut to this many characters."""


def write_message(changes: Mapping[str, Any], author: str, *, replace: bool) -> dict[str, Any]:
    """The channel message asking the sidecar to write a revision (see the module docstring)."""
    return {"t": "write", "changes": dict(changes), "author": str(author)[:MAX_AUTHOR_CHARS], "replace": replace}


def _merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    from weavelet_core.weaver import merge_config

    return merge_config(base, changes, whole=COMMAND_KEYS)


async def write(
    transport: Transport,
    run: str,
    message: Mapping[str, Any],
    *,
    trusts: Callable[[Revision], bool] | None = None,
    remember: Callable[[Revision], None] | None = None,
) -> Revision | None:
    """Store ``message`` (from :func:`write_message`) as a new revision of ``run``; return it, or ``None`` when it
    could not be written in :data:`WRITE_ATTEMPTS` compare-and-set attempts (logged). Transport errors raise.

    ``trusts(revision)`` (a run that requires signed revisions) says whether the newest revision may be built on:
    when it may not, a ``replace`` write keeps none of its command tokens, and a merge is not written (logged):
    the trainer's own revision is trusted without a signature, so it must not carry a forger's config or token.
    ``remember(revision)`` is called before each try to store it: a watch may deliver it before the write returns.
    """
    changes = message.get("changes")
    author = message.get("author")
    if not isinstance(changes, Mapping) or not isinstance(author, str):
        log.error("weavelet: ignoring a malformed write from the trainer: %.200r", message)
        return None
    for _attempt in range(WRITE_ATTEMPTS):
        try:
            latest = await transport.latest(run)
        except CorruptEntry as exc:  # numbered on top of it; an unreadable config has nothing to merge
            latest, number, base = None, exc.revision, {}
        else:
            number = latest.revision if latest is not None else 0
            base = dict(latest.config) if latest is not None else {}
            if latest is not None and trusts is not None and not trusts(latest):
                if not message.get("replace"):
                    log.error(
                        "weavelet: run %r: the trainer's revision (%s) is not written: the newest revision %d is "
                        "not signed by a trusted key, and the trainer's own revision must not build on it",
                        run,
                        author,
                        number,
                    )
                    return None
                base = {}
        if message.get("replace"):
            config = {k: v for k, v in changes.items() if k not in COMMAND_KEYS}
            config.update({k: v for k, v in base.items() if k in COMMAND_KEYS})
        else:
            config = _merge(base, changes)
        revision = Revision(run=run, revision=number + 1, config=config, author=truncate(author, MAX_AUTHOR_CHARS))
        if remember is not None:
            remember(revision)
        try:
            await transport.put(revision)
        except RevisionConflict:
            await anyio.sleep(0.01)
            continue
        return revision
    log.error("weavelet: run %r: could not store the trainer's revision (%s) against concurrent writers", run, author)
    return None


__all__ = ["MAX_PENDING_WRITES", "WRITE_ATTEMPTS", "write", "write_message"]
