"""Parsing a ``redis://`` / ``rediss://`` URL into driver settings, weavelet's options and the key layout.

URL forms (query parameters may be combined)::

    redis://HOST[:PORT][/DB]
    redis://[USER]:PASSWORD@HOST[:PORT][/DB]
    rediss://...                                  TLS; ?ssl_ca_certs=/path/ca.pem for a private CA

weavelet's own options, as query parameters or keyword arguments of ``open_transport`` (keywords win):

``prefix``          key prefix (default ``weavelet:``), to share a server or database between deployments
``history``         revisions kept per run (``XADD MAXLEN ~``; default 1000) and outcomes kept per run
``status_history``  entries kept in each run's status stream (default 100)
``connect_timeout`` seconds allowed for the first connection and each reconnect attempt (default 5)
``block``           seconds one ``XREAD BLOCK`` of a watcher waits before asking again (default 2)
``socket_timeout``  seconds to wait for any reply (default 5); must exceed ``block`` by at least 1 s

Query parameters passed on to redis-py: ``db``, ``ssl_ca_certs``, ``ssl_ca_path``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``, ``client_name``, ``health_check_interval``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from weavelet_core.plugins import mask_password
from weavelet_core.protocol import validate_run_id

SCHEMES = ("redis", "rediss")
DEFAULT_PREFIX = "weavelet:"
DEFAULT_HISTORY = 1000
DEFAULT_STATUS_HISTORY = 100
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_BLOCK = 2.0
DEFAULT_SOCKET_TIMEOUT = 5.0
MIN_TIMEOUT_MARGIN = 1.0

_DRIVER_PARAMETERS = frozenset(
    {
        "db",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "client_name",
        "health_check_interval",
    }
)


def _positive_int(name: str, value: object) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"redis option {name}={value!r}: expected a whole number >= 1") from None
    if number < 1:
        raise ValueError(f"redis option {name}={value!r}: expected a whole number >= 1")
    return number


def _positive_float(name: str, value: object) -> float:
    try:
        number = float(str(value))
    except ValueError:
        raise ValueError(f"redis option {name}={value!r}: expected a number of seconds > 0") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"redis option {name}={value!r}: expected a finite number of seconds > 0")
    return number


def _prefix(name: str, value: object) -> str:
    text = str(value)
    if any(ch.isspace() for ch in text) or len(text) > 200:
        raise ValueError(f"redis option {name}={value!r}: use up to 200 characters without spaces")
    return text


_OPTIONS: Mapping[str, Callable[[str, object], Any]] = {
    "prefix": _prefix,
    "history": _positive_int,
    "status_history": _positive_int,
    "connect_timeout": _positive_float,
    "block": _positive_float,
    "socket_timeout": _positive_float,
}


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """Where a run's data lives. Run ids never contain ``:``, so keys of different runs cannot collide."""

    prefix: str = DEFAULT_PREFIX

    def runs(self) -> str:
        """Set of every run id with a revision or a status."""
        return f"{self.prefix}runs"

    def run(self, run: str) -> str:
        """Hash: ``revision`` (the newest number) and ``status`` (the latest status, JSON)."""
        return f"{self.prefix}run:{validate_run_id(run)}"

    def revisions(self, run: str) -> str:
        """Stream of revisions; each entry has ``revision`` (number) and ``data`` (JSON)."""
        return f"{self.prefix}run:{validate_run_id(run)}:revisions"

    def status_stream(self, run: str) -> str:
        """Stream of published statuses (``data`` field), capped at ``status_history``."""
        return f"{self.prefix}run:{validate_run_id(run)}:status"

    def outcomes(self, run: str) -> str:
        """Hash of outcomes (JSON): ``REVISION`` -> the newest outcome of a revision, ``REVISION:INCARNATION`` ->
        that incarnation's outcome of it, ``REVISION#`` -> the incarnations kept (JSON list of ``[at, id]``)."""
        return f"{self.prefix}run:{validate_run_id(run)}:outcomes"

    def outcome_index(self, run: str) -> str:
        """Sorted set of the revision numbers that have outcomes (to keep only the newest ``history``)."""
        return f"{self.prefix}run:{validate_run_id(run)}:outcomes:index"


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """Everything the transport needs, resolved from a URL and keyword options."""

    driver_url: str
    """The URL handed to redis-py: weavelet's own query parameters removed."""
    display_url: str
    """The URL with any password masked, for messages."""
    prefix: str = DEFAULT_PREFIX
    history: int = DEFAULT_HISTORY
    status_history: int = DEFAULT_STATUS_HISTORY
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    block: float = DEFAULT_BLOCK
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT

    @property
    def keys(self) -> KeyLayout:
        return KeyLayout(self.prefix)


def parse_url(url: str, **options: Any) -> RedisSettings:
    """Resolve ``url`` and keyword ``options``; raise ``ValueError`` naming what is wrong and how to write it."""
    display = mask_password(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{display!r} is not a redis URL; write redis://HOST:PORT/DB or rediss://... for TLS")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"redis URL {display!r}: the port is not a number between 0 and 65535") from None
    if not parts.hostname:
        raise ValueError(f"redis URL {display!r} names no host; write it as redis://HOST:PORT/DB")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(
            f"redis URL {display!r}: the path must be a database number, as in redis://HOST:{port or 6379}/0"
        )

    driver_query: list[tuple[str, str]] = []
    ours: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OPTIONS:
            ours[name] = value
        elif name in _DRIVER_PARAMETERS:
            driver_query.append((name, value))
        else:
            known = ", ".join(sorted([*_OPTIONS, *_DRIVER_PARAMETERS]))
            raise ValueError(f"redis URL {display!r}: unknown query parameter {name!r}; known: {known}")
    for name, value in options.items():
        if name not in _OPTIONS:
            known = ", ".join(sorted(_OPTIONS))
            raise TypeError(f"unknown redis transport option {name!r}; known: {known}")
        ours[name] = value
    resolved = {name: _OPTIONS[name](name, value) for name, value in ours.items()}
    settings = RedisSettings(
        driver_url=urlunsplit((scheme, parts.netloc, parts.path, urlencode(driver_query), "")),
        display_url=display,
        **resolved,
    )
    if settings.socket_timeout < settings.block + MIN_TIMEOUT_MARGIN:
        raise ValueError(
            f"redis options: socket_timeout ({settings.socket_timeout:g}s) must exceed block "
            f"({settings.block:g}s) by at least {MIN_TIMEOUT_MARGIN:g}s, or a watcher's XREAD BLOCK times out "
            "on the client side; raise socket_timeout or lower block"
        )
    return settings


__all__ = ["DEFAULT_PREFIX", "SCHEMES", "KeyLayout", "RedisSettings", "parse_url"]
