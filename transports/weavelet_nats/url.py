"""Parsing ``nats://`` and ``tls://`` URLs into connection settings (standard library only).

Forms::

    nats://HOST[:PORT]                       one server (port 4222 by default)
    nats://USER:PASSWORD@HOST[:PORT]         user and password
    nats://TOKEN@HOST[:PORT]                 a token (a user part without a password)
    tls://HOST[:PORT]                        TLS, verified against the system's CAs (or ?tls_ca=)
    nats://HOST1:4222,HOST2:4222,HOST3       several servers of one cluster (each may repeat the scheme)
    nats://HOST?creds=/path/user.creds       a decentralised-auth credentials file (needs the nkeys package)

Query parameters (and factory keyword options of the same names, which take precedence):

==================  ======================================================================================
``creds``           path of a ``.creds`` file (JWT and seed)
``tls_ca``          PEM file of the CA(s) that signed the server certificate (implies TLS)
``tls_cert``        PEM client certificate, with ``tls_key`` (implies TLS)
``tls_key``         PEM private key of the client certificate
``tls_hostname``    name to verify the server certificate against, when it differs from the host
``connect_timeout`` seconds the first connect may take before it fails (default 5)
``request_timeout`` seconds one request to the server may take (default 5)
``ping_interval``   seconds between keep-alive pings (default 5: a dead server is noticed in ~15 s)
``reconnect_wait``  seconds between reconnect attempts to one server (default 0.5)
``prefix``          bucket name prefix (default ``weavelet``: buckets ``weavelet-desired``, ...)
``history``         revisions kept per run, 1 to 64 (default 64, the JetStream key-value maximum)
``name``            connection name shown in the server's monitoring (default ``weavelet``)
``inbox_prefix``    subject prefix of this client's reply subjects (default ``_INBOX``); give each user its own
                    (``_INBOX_trainer-a``) and allow it only that, so no user can read others' replies
``replicas``        copies of each bucket a JetStream cluster keeps when weavelet creates the buckets, 1 to 5
                    (default 1; use 3 on a 3-node cluster so a lost node loses no acknowledged write)
==================  ======================================================================================
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from weavelet_core.errors import WeaveletError

DEFAULT_PORT = 4222
MAX_HISTORY = 64
MAX_REPLICAS = 5
_PREFIX = re.compile(r"[A-Za-z0-9_\-]{1,32}")
_SCHEMES = ("nats", "tls")
_INBOX = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class InvalidNatsUrl(WeaveletError, ValueError):
    """A ``nats://`` URL or option that cannot be used; the message says what to write instead."""


@dataclasses.dataclass(frozen=True)
class NatsSettings:
    """Everything needed to connect, parsed from a URL and options. ``servers`` carry no credentials."""

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_hostname: str | None = None
    connect_timeout: float = 5.0
    request_timeout: float = 5.0
    ping_interval: float = 5.0
    reconnect_wait: float = 0.5
    prefix: str = "weavelet"
    history: int = MAX_HISTORY
    name: str = "weavelet"
    replicas: int = 1
    inbox_prefix: str = "_INBOX"

    @property
    def display(self) -> str:
        """The servers as one URL, without credentials, for messages."""
        scheme = "tls" if self.tls else "nats"
        return f"{scheme}://" + ",".join(s.split("://", 1)[1] for s in self.servers)


_FLOATS = ("connect_timeout", "request_timeout", "ping_interval", "reconnect_wait")
_STRINGS = ("creds", "tls_ca", "tls_cert", "tls_key", "tls_hostname", "prefix", "name", "inbox_prefix")
KNOWN_OPTIONS = (*_STRINGS, *_FLOATS, "history", "replicas")


def parse_url(url: str, options: Mapping[str, Any] | None = None) -> NatsSettings:
    """Parse ``url`` (see the module docstring) and apply ``options``; raise :class:`InvalidNatsUrl`."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidNatsUrl(f"{url!r} is not a NATS URL; write nats://HOST:PORT, for example nats://127.0.0.1:4222")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in _SCHEMES:
        raise InvalidNatsUrl(f"NATS URLs start with nats:// or tls://, not {scheme}://")
    body = url.split("://", 1)[1]
    body, _, query = body.partition("?")
    body, _, fragment = body.partition("#")
    if fragment:
        raise InvalidNatsUrl("a NATS URL has no #fragment; remove it")

    if not body.strip():
        raise InvalidNatsUrl(f"{scheme}:// URL has no host; write {scheme}://HOST:PORT")
    servers: list[str] = []
    userinfo: str | None = None
    tls = scheme == "tls"
    for index, part in enumerate(body.split(",")):
        part = part.strip()
        if not part:
            raise InvalidNatsUrl("empty server in the list; separate servers with single commas")
        part_scheme = scheme
        if "://" in part:
            part_scheme, _, part = part.partition("://")
            part_scheme = part_scheme.lower()
            if part_scheme not in _SCHEMES:
                raise InvalidNatsUrl(f"server {index + 1}: scheme {part_scheme}:// is not nats:// or tls://")
        tls = tls or part_scheme == "tls"
        if "@" in part:
            info, _, part = part.rpartition("@")
            if userinfo is not None and info != userinfo:
                raise InvalidNatsUrl("servers of one URL must share their credentials; give them once")
            userinfo = info
        try:
            split = urlsplit(f"//{part}")
            host, port = split.hostname, split.port
        except ValueError as exc:
            raise InvalidNatsUrl(f"server {part!r}: {exc}; write HOST:PORT") from None
        if split.path not in ("", "/"):
            raise InvalidNatsUrl(f"server {part!r}: a NATS URL has no path; write HOST:PORT")
        if not host:
            raise InvalidNatsUrl(f"server {index + 1} has no host; write nats://HOST:PORT")
        shown = f"[{host}]" if ":" in host else host
        servers.append(f"nats://{shown}:{port or DEFAULT_PORT}")

    values: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        values[key] = value
    for key, value in (options or {}).items():
        if value is not None:
            values[key] = value
    unknown = sorted(set(values) - set(KNOWN_OPTIONS))
    if unknown:
        raise InvalidNatsUrl(f"unknown NATS option(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_OPTIONS))}")

    user = password = token = None
    if userinfo is not None:
        name_part, sep, secret = userinfo.partition(":")
        if sep:
            user, password = unquote(name_part), unquote(secret)
            if not user:
                raise InvalidNatsUrl("the URL has a password but no user; write nats://USER:PASSWORD@HOST")
        else:
            token = unquote(name_part)
        if not (user or token):
            raise InvalidNatsUrl("empty credentials before '@'; write nats://USER:PASSWORD@HOST or nats://TOKEN@HOST")

    settings: dict[str, Any] = {"servers": tuple(servers), "user": user, "password": password, "token": token}
    for key in _STRINGS:
        if key in values:
            value = str(values[key])
            if not value:
                raise InvalidNatsUrl(f"option {key} is empty; give a value or leave it out")
            settings[key] = value
    for key in _FLOATS:
        if key in values:
            settings[key] = _positive_float(key, values[key])
    if "history" in values:
        settings["history"] = _history(values["history"])
    if "replicas" in values:
        settings["replicas"] = _replicas(values["replicas"])
    if not _PREFIX.fullmatch(settings.get("prefix", "weavelet")):
        raise InvalidNatsUrl(
            f"prefix {settings['prefix']!r}: use 1-32 letters, digits, '-' or '_' (it names JetStream buckets)"
        )
    if not _INBOX.fullmatch(settings.get("inbox_prefix", "_INBOX")):
        raise InvalidNatsUrl(
            f"inbox_prefix {settings['inbox_prefix']!r}: use letters, digits, '-' or '_' (one subject token), "
            "for example _INBOX_trainer-a"
        )
    if ("tls_cert" in settings) != ("tls_key" in settings):
        raise InvalidNatsUrl("give tls_cert and tls_key together (the client certificate and its key)")
    if token is not None and "creds" in settings:
        raise InvalidNatsUrl("give either a token or a creds file, not both")
    settings["tls"] = tls or any(k in settings for k in ("tls_ca", "tls_cert"))
    if settings["tls"]:
        settings["servers"] = tuple(f"tls://{s.split('://', 1)[1]}" for s in servers)
    return NatsSettings(**settings)


def _positive_float(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidNatsUrl(f"option {key}={value!r}: expected a number of seconds") from None
    if not math.isfinite(number) or number <= 0:
        raise InvalidNatsUrl(f"option {key}={value!r}: expected a positive number of seconds")
    return number


def _history(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidNatsUrl(f"option history={value!r}: expected a whole number from 1 to {MAX_HISTORY}") from None
    if not 1 <= number <= MAX_HISTORY:
        raise InvalidNatsUrl(
            f"option history={number}: JetStream key-value buckets keep 1 to {MAX_HISTORY} revisions per key"
        )
    return number


def _replicas(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidNatsUrl(f"option replicas={value!r}: expected a whole number from 1 to {MAX_REPLICAS}") from None
    if not 1 <= number <= MAX_REPLICAS:
        raise InvalidNatsUrl(
            f"option replicas={number}: JetStream keeps 1 to {MAX_REPLICAS} replicas of a stream; use at most the "
            "number of servers in the cluster"
        )
    return number


__all__ = [
    "DEFAULT_PORT",
    "KNOWN_OPTIONS",
    "MAX_HISTORY",
    "MAX_REPLICAS",
    "InvalidNatsUrl",
    "NatsSettings",
    "parse_url",
]
