"""Every error weavelet raises on purpose derives from :class:`WeaveletError`.

Messages are written for the person reading them: they name what is wrong and how to fix it.
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
