"""Parsing a ``redis://`` / ``rediss://`` URL into driver settings, weavelet's options and the key layout.

URL forms (query parameters may be combined)::

    redis://HOST[:PORT][/DB]
    redis://[USER]:PASSWORD@HOST[:PORT][/DB]
    rediss://...                                  TLS; ?ssl_ca_certs=/path/ca.pem for a private CA
    redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]
                                                  the master of SERVICE (``mymaster``) as Redis Sentinel names it
                                                  (redis-py's ``Sentinel(...).master_for(SERVICE)``); the
                                                  credentials are the data servers', the hosts the sentinels'
    redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...][/0]
                                                  a Redis Cluster, from these startup nodes (redis-py's
                                                  ``RedisCluster``)
    rediss+sentinel://..., rediss+cluster://...   the same over TLS

weavelet's own options, as query parameters or keyword arguments of ``open_transport`` (keywords win):

``prefix``          key prefix (default ``weavelet:``), to share a server or database between deployments
``history``         revisions kept per run (``XADD MAXLEN ~``; default 1000) and outcomes kept per run
``status_history``  entries kept in each run's status stream (default 100)
``connect_timeout`` seconds allowed for the first connection and each reconnect attempt (default 5)
``block``           seconds one ``XREAD BLOCK`` of a watcher waits before asking again (default 15); a watcher
                    that waits sleeps in between, and closing the transport ends its read at once
``socket_timeout``  seconds to wait for any reply (default 5); blocking reads run on their own connections,
                    which wait ``block`` plus 1 s instead when that is longer
``wait_replicas``   a revision write counts once this many replicas have it (``WAIT``; default 0: the master's
                    acknowledgement is enough); not with ``redis+cluster://``
``wait_timeout``    seconds a write waits for those replicas (default 1) before it fails as unavailable

Query parameters passed on to redis-py: ``db``, ``ssl_ca_certs``, ``ssl_ca_path``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``, ``client_name``, ``health_check_interval``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from weavelet_core.plugins import mask_password
from weavelet_core.protocol import validate_run_id

SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")
DEFAULT_PREFIX = "weavelet:"
DEFAULT_HISTORY = 1000
DEFAULT_STATUS_HISTORY = 100
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_BLOCK = 15.0
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
    if any(ch.isspace() or ch in "{}" for ch in text) or len(text) > 200:
        raise ValueError(
            f"redis option {name}={value!r}: use up to 200 characters without spaces, '{{' or '}}' (braces would "
            "change the keys' hash tag)"
        )
    return text


def _count(name: str, value: object) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"redis option {name}={value!r}: expected a whole number >= 0") from None
    if number < 0:
        raise ValueError(f"redis option {name}={value!r}: expected a whole number >= 0")
    return number


_OPTIONS: Mapping[str, Callable[[str, object], Any]] = {
    "prefix": _prefix,
    "history": _positive_int,
    "status_history": _positive_int,
    "connect_timeout": _positive_float,
    "block": _positive_float,
    "socket_timeout": _positive_float,
    "wait_replicas": _count,
    "wait_timeout": _positive_float,
}


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """Where a run's data lives. Every key of one run carries the run id as its hash tag (``{RUN}``), so a run's
    keys share one Redis Cluster slot and one script may touch them all; the run index (a set of run ids) is
    a key of its own, never touched by a script. Run ids never contain ``:`` or braces, so keys of different runs
    cannot collide."""

    prefix: str = DEFAULT_PREFIX

    def runs(self) -> str:
        """Set of every run id with a revision or a status."""
        return f"{self.prefix}runs"

    def run(self, run: str) -> str:
        """Hash: ``revision`` (the newest number) and ``status`` (the latest status, JSON)."""
        return f"{self.prefix}run:{{{validate_run_id(run)}}}"

    def revisions(self, run: str) -> str:
        """Stream of revisions; each entry has ``revision`` (number) and ``data`` (JSON)."""
        return f"{self.run(run)}:revisions"

    def status_stream(self, run: str) -> str:
        """Stream of published statuses (``data`` field), capped at ``status_history``."""
        return f"{self.run(run)}:status"

    def outcomes(self, run: str) -> str:
        """Hash of outcomes (JSON): ``REVISION`` -> the newest outcome of a revision, ``REVISION:INCARNATION`` ->
        that incarnation's outcome of it, ``REVISION#`` -> the incarnations kept (JSON list of ``[at, id]``)."""
        return f"{self.run(run)}:outcomes"

    def outcome_index(self, run: str) -> str:
        """Sorted set of the revision numbers that have outcomes (to keep only the newest ``history``)."""
        return f"{self.run(run)}:outcomes:index"

    def outcome_stream(self, run: str) -> str:
        """Stream of outcome notices, one entry per outcome stored: ``revision`` (number) and ``data`` (the
        revision's newest outcome after it, JSON), capped at ``OUTCOME_STREAM_LENGTH`` entries; what a waiting
        weaver reads with ``XREAD BLOCK``."""
        return f"{self.run(run)}:outcomes:stream"


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """Everything the transport needs, resolved from a URL and keyword options."""

    driver_url: str = dataclasses.field(repr=False)
    """For ``redis://``: the URL handed to redis-py, weavelet's own query parameters removed."""
    display_url: str
    """The URL with any password masked, for messages."""
    prefix: str = DEFAULT_PREFIX
    history: int = DEFAULT_HISTORY
    status_history: int = DEFAULT_STATUS_HISTORY
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    block: float = DEFAULT_BLOCK
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT
    wait_replicas: int = 0
    wait_timeout: float = 1.0
    mode: str = "single"
    """``single`` (``redis://``), ``sentinel`` or ``cluster``."""
    nodes: tuple[tuple[str, int], ...] = ()
    """Sentinels (``sentinel``) or startup nodes (``cluster``)."""
    service: str = ""
    """The Sentinel service name (``mymaster``)."""
    connection: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), repr=False)
    """Keyword arguments for redis-py's connections (``sentinel`` and ``cluster``): credentials, db, TLS."""

    @property
    def keys(self) -> KeyLayout:
        return KeyLayout(self.prefix)

    @property
    def blocking_timeout(self) -> float:
        """Seconds a connection that runs ``XREAD BLOCK`` waits for a reply: ``block`` plus
        :data:`MIN_TIMEOUT_MARGIN`, or ``socket_timeout`` when that is longer."""
        return max(self.socket_timeout, self.block + MIN_TIMEOUT_MARGIN)


_TLS_PARAMETERS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


def _nodes(display: str, netloc: str, default_port: int) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``(user, password, [(host, port), ...])`` of ``[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]``."""
    userinfo, _, hosts = netloc.rpartition("@")
    user = password = None
    if userinfo:
        name, sep, secret = userinfo.partition(":")
        user = unquote(name) or None
        password = unquote(secret) if sep else None
    nodes = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep:
            host, port = port, str(default_port)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"redis URL {display!r}: {part!r} is not HOST:PORT; separate hosts with commas")
        nodes.append((host.strip("[]"), int(port)))
    return user, password, nodes


def _parse_multi(url: str, display: str, scheme: str) -> tuple[dict[str, Any], str]:
    """Settings of a ``redis+sentinel://`` or ``redis+cluster://`` URL, and its query string."""
    base, _, kind = scheme.partition("+")
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    user, password, nodes = _nodes(display, netloc, 26379 if kind == "sentinel" else 6379)
    segments = [segment for segment in path.split("/") if segment]
    connection: dict[str, Any] = {}
    settings: dict[str, Any] = {"mode": kind, "nodes": tuple(nodes)}
    if kind == "sentinel":
        if not segments:
            raise ValueError(
                f"redis URL {display!r} names no service; write redis+sentinel://HOST:26379,HOST2:26379/mymaster/0"
            )
        settings["service"] = unquote(segments[0])
        db = segments[1] if len(segments) > 1 else "0"
        if len(segments) > 2 or not db.isdigit():
            raise ValueError(
                f"redis URL {display!r}: after the service comes only a database number, as in /mymaster/0"
            )
        connection["db"] = int(db)
    elif segments not in ([], ["0"]):
        raise ValueError(f"redis URL {display!r}: a Redis Cluster has only database 0; leave the path out")
    if user:
        connection["username"] = user
    if password is not None:
        connection["password"] = password
    if base == "rediss":
        connection["ssl"] = True
    settings["connection"] = connection
    return settings, query


def parse_url(url: str, **options: Any) -> RedisSettings:
    """Resolve ``url`` and keyword ``options``; raise ``ValueError`` naming what is wrong and how to write it."""
    display = mask_password(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(
            f"{display!r} is not a redis URL; write redis://HOST:PORT/DB, rediss://... for TLS, "
            "redis+sentinel://HOST:26379,HOST2:26379/mymaster/0 or redis+cluster://HOST:PORT,HOST2:PORT"
        )
    multi: dict[str, Any] = {}
    if "+" in scheme:
        multi, query = _parse_multi(url, display, scheme)
        driver_url = ""
    else:
        parts = urlsplit(url)
        query = parts.query
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
    for name, value in parse_qsl(query, keep_blank_values=True):
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
    if multi:
        connection = dict(multi["connection"])
        for name, value in driver_query:
            if name == "db":
                raise ValueError(f"redis URL {display!r}: give the database in the path, not as ?db=")
            if name in ("health_check_interval",):
                connection[name] = int(value)
            elif name == "ssl_check_hostname":
                connection[name] = value.lower() in ("1", "true", "yes")
            else:
                connection[name] = value
        if any(name in connection for name in _TLS_PARAMETERS) and not connection.get("ssl"):
            raise ValueError(f"redis URL {display!r}: TLS options need the rediss+... scheme")
        multi["connection"] = tuple(sorted(connection.items()))
        if multi["mode"] == "cluster" and resolved.get("wait_replicas"):
            raise ValueError(
                f"redis URL {display!r}: wait_replicas is for a master with replicas (redis:// or "
                "redis+sentinel://); in a Redis Cluster a write's WAIT would go to another node"
            )
        driver_url = ""
    else:
        parts = urlsplit(url)
        driver_url = urlunsplit((scheme, parts.netloc, parts.path, urlencode(driver_query), ""))
    settings = RedisSettings(driver_url=driver_url, display_url=display, **resolved, **multi)
    return settings


__all__ = ["DEFAULT_PREFIX", "SCHEMES", "KeyLayout", "RedisSettings", "parse_url"]
