"""Turning redis-py exceptions into weavelet's, with one-line messages that say what to do."""

from __future__ import annotations

import socket

from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    ClusterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from weavelet_core.errors import AuthenticationFailed, PermissionDenied, TransportError, TransportUnavailable

CREDENTIAL_ERRORS = (AuthenticationError, AuthenticationWrongNumberOfArgsError, AuthorizationError)


def _reason(exc: BaseException) -> str:
    """One line saying why ``exc`` happened, naming the usual causes plainly."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused: nothing listens on that port"
        if isinstance(seen, socket.gaierror):
            return f"cannot resolve the host name: {seen.strerror or seen}"
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.rstrip(".")


def acl_hint(prefix: str) -> str:
    """The ACL rule that gives a user what weavelet needs on keys under ``prefix``."""
    return (
        f"ACL SETUSER NAME on >PASSWORD resetkeys ~{prefix}* +@read +@write +@stream +@hash +@set +@sortedset "
        "+@scripting +@connection"
    )


def translate(
    exc: RedisError | RedisClusterException | OSError, url: str, action: str, prefix: str = "weavelet:"
) -> TransportError:
    """The weavelet error for ``exc``, raised while doing ``action`` (``"write run 'r1'"``) against ``url``.

    Credentials refused -> :class:`AuthenticationFailed` (final); credentials that lack a permission (``NOPERM``)
    -> :class:`PermissionDenied` (final); unreachable, timed out, loading, read-only replica ->
    :class:`TransportUnavailable` (retryable); anything else from the server -> ``TransportError``.
    """
    if isinstance(exc, CREDENTIAL_ERRORS):
        return AuthenticationFailed(
            f"redis at {url}: authentication failed ({_reason(exc)}); check the user name and password in the "
            "URL (redis://USER:PASSWORD@HOST:PORT/DB)"
        )
    if isinstance(exc, NoPermissionError):
        return PermissionDenied(
            f"redis at {url}: permission denied to {action} ({_reason(exc)}); the user needs the stream, hash, "
            f"set, sorted-set and scripting commands on the keys {prefix}*: {acl_hint(prefix)}"
        )
    if isinstance(exc, ReadOnlyError):
        return TransportUnavailable(
            f"redis at {url} is a read-only replica and cannot {action}; point the URL at the primary"
        )
    if isinstance(exc, (ClusterDownError, RedisClusterException)):
        return TransportUnavailable(
            f"cannot {action}: the Redis Cluster at {url} is not serving ({_reason(exc)}); check that its nodes are "
            "running and that CLUSTER INFO says cluster_state:ok"
        )
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
        return TransportUnavailable(
            f"cannot {action}: redis at {url} is unreachable ({_reason(exc)}); check that redis-server is "
            "running and that the URL's host and port are right"
        )
    if isinstance(exc, OutOfMemoryError):
        return TransportError(
            f"redis at {url} refused to {action}: out of memory ({_reason(exc)}); raise maxmemory or lower the "
            "transport's history option"
        )
    return TransportError(
        f"redis at {url} refused to {action}: {_reason(exc)}; if another application uses the same keys, "
        "give weavelet its own key prefix (?prefix=NAME:) or database number"
    )


__all__ = ["acl_hint", "translate"]
