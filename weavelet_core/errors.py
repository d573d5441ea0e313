"""Every error weavelet raises on purpose derives from :class:`WeaveletError`.

Messages are written for the person reading them: they name what is wrong and how to fix it. The hierarchy::

    WeaveletError
    +-- ProtocolError (ValueError)           a payload breaks the wire protocol
    +-- InvalidRunId (ValueError)            a run id outside the safe character set
    +-- RevisionConflict                     a compare-and-set write lost; re-read and write again
    +-- StaleRevision (ValueError)           not newer than what is stored or applied
    +-- PluginError                          a plugin is broken, missing or in conflict
    |   +-- UnknownTransport (ValueError)
    |   +-- MissingDriver (ImportError)
    |   +-- DuplicateScheme
    +-- TransportError                       the transport could not do what was asked
    |   +-- TransportUnavailable (ConnectionError)   retry later
    |   +-- AuthenticationFailed (PermissionError)   final: credentials refused
    |   +-- PermissionDenied (PermissionError)       final: credentials lack a permission
    |   +-- CorruptEntry                             the newest stored revision cannot be read
    +-- RunOwned                             another trainer owns the run
    +-- RunEnded                             the run's incarnation ended; nothing will answer
    +-- WaitTimeout (TimeoutError)           a bounded wait ran out
    +-- SigningError (ValueError)            a key file is missing, malformed or unprotected
    +-- UntrustedRevision                    a signing weaver will not build on a revision it cannot verify

Which are final: ``AuthenticationFailed`` and ``PermissionDenied`` (same credentials, same answer),
``ProtocolError``, ``InvalidRunId``, ``PluginError``. ``TransportUnavailable`` and ``RevisionConflict`` may
succeed when retried.
"""

from __future__ import annotations


class WeaveletError(Exception):
    """Base class of all weavelet errors."""


class ProtocolError(WeaveletError, ValueError):
    """A payload (from the network, a file, or a caller) does not follow the wire protocol.

    This is the only exception that decoding untrusted bytes raises. ``field`` names the offending
    field as a dotted path (``"revision.config"``), or ``None`` when the payload as a whole is bad.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidRunId(WeaveletError, ValueError):
    """A run id outside the documented safe character set."""


class RevisionConflict(WeaveletError):
    """A compare-and-set write lost: the run's current revision is not the one the writer expected.

    ``current`` is the revision number found in the store (0 when the run has none yet).
    """

    def __init__(self, run: str, expected: int, current: int) -> None:
        super().__init__(
            f"run {run!r}: expected current revision {expected}, found {current}; "
            "re-read the run and write again on top of the newer revision"
        )
        self.run = run
        self.expected = expected
        self.current = current


class StaleRevision(WeaveletError, ValueError):
    """A revision that is not newer than the one already stored or applied."""


class PluginError(WeaveletError):
    """A plugin is broken, missing, or in conflict with another plugin."""


class UnknownTransport(PluginError, ValueError):
    """No installed plugin provides the URL scheme asked for."""


class MissingDriver(PluginError, ImportError):
    """The transport exists but its client library is not installed; the message gives the pip command."""


class DuplicateScheme(PluginError):
    """Two plugins claim the same URL scheme."""


class TransportError(WeaveletError):
    """A transport could not do what was asked."""


class TransportUnavailable(TransportError, ConnectionError):
    """The transport's server or directory cannot be reached now; retrying later may succeed."""


class AuthenticationFailed(TransportError, PermissionError):
    """The server refused the credentials. Final: retrying with the same credentials will not help."""


class WaitTimeout(WeaveletError, TimeoutError):
    """A bounded wait ran out (for example waiting for a revision's outcome)."""


class PermissionDenied(TransportError, PermissionError):
    """The server accepted the credentials but they lack a permission this operation needs. Final.

    The message names the subject or key and the permission needed.
    """


class CorruptEntry(TransportError):
    """The newest stored revision of a run cannot be decoded (corrupt bytes, a newer protocol version).

    It is never mistaken for "no revision". ``revision`` is the number the entry holds: the number the store
    records for it, or, when even that is unreadable, one more than the newest readable revision before it.
    Writers number on top of it: :meth:`weavelet_core.AsyncWeaver.set` with ``replace=True`` writes
    ``revision + 1``; a merge (``replace=False``) refuses, since there is no config to merge onto.

    Transports return instances (not raised) from ``watch`` and ``history`` in place of the unreadable entry.
    """

    def __init__(self, run: str, revision: int, reason: str) -> None:
        super().__init__(
            f"revision {revision} of run {run!r} cannot be read ({reason}); write a whole new config on top of it: "
            f"weavelet set {run} --replace KEY=VALUE ... (Weaver.set(run, config, replace=True))"
        )
        self.run = run
        self.revision = revision
        self.reason = reason

    def __reduce__(self) -> tuple[type[CorruptEntry], tuple[str, int, str]]:
        return (type(self), (self.run, self.revision, self.reason))


class RunOwned(WeaveletError):
    """Another live trainer owns the run: a second one is refused unless it takes over explicitly.

    ``status`` is the owner's last :class:`~weavelet_core.protocol.Status`.
    """

    def __init__(self, message: str, status: object = None) -> None:
        super().__init__(message)
        self.status = status


class RunEnded(WeaveletError):
    """The run has no live incarnation (its trainer stopped or failed): waiting for an outcome is pointless."""


class SigningError(WeaveletError, ValueError):
    """Signing or verifying cannot be set up: a key file is missing, malformed, of another type, readable or
    writable by others, or two trusted keys clash. Final; the message names the file and the fix."""


class UntrustedRevision(WeaveletError):
    """A weaver that signs refuses to merge its change onto a stored revision it cannot verify (unsigned, signed
    by a key it does not trust, or badly signed): its signature would vouch for a config someone else chose.

    ``run`` and ``revision`` name the revision; ``problem`` says what is wrong with it.
    """

    def __init__(self, message: str, *, run: str = "", revision: int = 0, problem: str = "") -> None:
        super().__init__(message)
        self.run = run
        self.revision = revision
        self.problem = problem
