"""How the read commands show a revision's signature: who verified it (the trainer, or the trusted keys given
here), or what was wrong with it."""

from __future__ import annotations

import argparse
from typing import Any

from weavelet_core.protocol import Outcome, Revision
from weavelet_core.signing import BAD_SIGNATURE, UNKNOWN_KEY, UNSIGNED, TrustedKeys, resolve_trusted_keys

PROBLEMS = {UNSIGNED: "UNSIGNED", UNKNOWN_KEY: "UNKNOWN KEY", BAD_SIGNATURE: "BAD SIGNATURE"}
"""How a signature problem the trainer found is shown after the author."""


def trusted_of(args: argparse.Namespace) -> TrustedKeys | None:
    """The keys of ``--trusted-keys``, else of ``WEAVELET_TRUSTED_KEYS``, else ``None`` (nothing verified here)."""
    given: list[str] = getattr(args, "trusted_keys", None) or []
    return resolve_trusted_keys(given or None)


def trainer_verdict(answers: list[Outcome]) -> dict[str, Any] | None:
    """The newest verdict on the revision's signature among its outcomes (``detail["signature"]``), if any."""
    for outcome in reversed(answers):
        found = outcome.detail.get("signature")
        if isinstance(found, dict):
            return found
    return None


def signature_of(revision: Revision, answers: list[Outcome], trusted: TrustedKeys | None) -> dict[str, Any]:
    """``{"signed", "key_id", "trainer", "here"}``: whether the revision is signed, by which key id, what its
    trainer found (the outcome's verdict) and what the trusted keys given here find (``None``: none given)."""
    here = trusted.verify(revision, who="the trusted keys given here").detail() if trusted is not None else None
    return {
        "signed": bool(revision.signature),
        "key_id": revision.key_id or None,
        "trainer": trainer_verdict(answers),
        "here": here,
    }


def author_text(revision: Revision, answers: list[Outcome], trusted: TrustedKeys | None = None) -> str:
    """The AUTHOR cell: ``key alice (ana@laptop)`` when the keys given here, or else the trainer, verified the
    signature (the key's name from the verifier's own trusted set), ``ana@laptop (BAD SIGNATURE)`` (``UNSIGNED``,
    ``UNKNOWN KEY``) when they found it wanting, ``ana@laptop (signed, unverified)`` for a signature nobody
    checked, else the free-text author."""
    author = revision.author or "?"
    found = signature_of(revision, answers, trusted)
    # The keys given here check the signature itself; the trainer's verdict is read from an outcome, which whoever
    # can write the store could have written: it counts only when nothing was checked here.
    verdict = found["here"] if found["here"] is not None else found["trainer"]
    if verdict is not None and verdict.get("verified") is True:
        return f"key {verdict.get('key')} ({author})"
    if verdict is not None:
        return f"{author} ({PROBLEMS.get(str(verdict.get('problem')), 'NOT VERIFIED')})"
    if revision.signature:
        return f"{author} (signed, unverified)"
    return author


__all__ = ["author_text", "signature_of", "trainer_verdict", "trusted_of"]
