"""The wire protocol: revisions of a run's desired config, the run's status, and outcomes.

Every message is a JSON object with a ``"v"`` protocol-version field and a ``"kind"`` field. Nothing is ever
unpickled or evaluated. Decoding untrusted bytes raises only :class:`~weavelet_core.errors.ProtocolError`,
whose message and ``field`` name the offending field.

Run ids
    1 to 128 characters from ``A-Z a-z 0-9 _ . -``, starting with a letter or a digit, never containing
    ``..``. They are safe as file names, NATS subject tokens and Redis keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from weavelet_core.errors import InvalidRunId, ProtocolError

PROTOCOL_VERSION = 2
"""The version written. Version 2 added the outcome's ``revision_id`` and ``incarnation`` and the status's
``incarnation``, ``started_at``, ``keepalive``, ``last_outcome``, ``labels`` and ``schema``, and the revision's
``reverts``; its optional ``key_id`` and ``signature`` (left out when empty, ignored by older readers) and the
status's ``schema_digest`` (left out when empty) came later without a version change."""
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
"""Versions a reader accepts: fields a version-1 message lacks take their defaults."""
MAX_PAYLOAD_BYTES = 64 * 1024
"""Default cap on one encoded message. Larger payloads are refused on encode and on decode."""
DEFAULT_STALE_AFTER = 30.0
"""Seconds without a heartbeat after which a status that does not say its keepalive is stale."""
STALE_KEEPALIVES = 3
"""A status is stale after this many of its keepalives without a heartbeat (plus two seconds of slack)."""
FUTURE_SLACK = 60.0
"""A heartbeat more than this many seconds ahead of the reader's clock is not believed (see ``Status.stale``)."""
MAX_REVISION = 2**53
"""The largest revision number: exact in every JSON reader and in a Redis sorted-set score, and its 16 digits fit a
file name. A larger one (a hostile or corrupt entry) does not decode."""
MAX_MESSAGE_CHARS = 2000
"""Longest human-readable ``message`` an outcome or status carries; longer ones are cut by :func:`truncate`."""
TRUNCATION_MARKER = " ... [{hidden} more characters]"

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
RUN_ID_RULE = "1-128 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit, without '..'"

LifecycleState = Literal["created", "starting", "running", "stopping", "stopped", "failed"]
LIFECYCLE_STATES: tuple[str, ...] = ("created", "starting", "running", "stopping", "stopped", "failed")
OutcomeResult = Literal["applied", "rejected", "superseded"]
OUTCOME_RESULTS: tuple[str, ...] = ("applied", "rejected", "superseded")

JsonObject = dict[str, Any]


def validate_run_id(run: object) -> str:
    """Return ``run`` if it is a valid run id, else raise :class:`InvalidRunId` saying why."""
    if not isinstance(run, str):
        raise InvalidRunId(f"run id must be a string, got {type(run).__name__}")
    if not RUN_ID_PATTERN.fullmatch(run) or ".." in run:
        raise InvalidRunId(f"invalid run id {run!r}: use {RUN_ID_RULE} (for example 'resnet50-lr-sweep.3')")
    return run


def _plain_json(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is plain JSON made of exact built-in types, at most 32 levels deep, without NaN, infinities
    or lone surrogates: a quick check that builds no path and makes no call per leaf. ``False`` means
    :func:`_check_json_value` must look (it accepts a few more, such as tuples, and names the problem)."""
    if depth > 32:
        return False
    kind = type(value)
    if kind is dict or kind is list:
        if value and depth >= 32:
            return False  # its items would be deeper than 32 levels
        for key, item in value.items() if kind is dict else enumerate(value):
            if kind is dict and (type(key) is not str or not (key.isascii() or _encodes(key))):
                return False
            leaf = type(item)
            if leaf is str:
                if not (item.isascii() or _encodes(item)):
                    return False
            elif leaf is float:
                if not math.isfinite(item):
                    return False
            elif not (item is None or leaf is bool or leaf is int or _plain_json(item, depth + 1)):
                return False
        return True
    if kind is str:
        return value.isascii() or _encodes(value)
    if kind is float:
        return math.isfinite(value)
    return value is None or kind is bool or kind is int


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_json_value(value: Any, path: str, depth: int = 0) -> None:
    """Reject values that are not plain JSON (NaN, infinities, non-string keys, other types)."""
    if depth == 0 and _plain_json(value):
        return  # the common case, without a path per node (a trainer's status carries a schema of hundreds)
    if depth > 32:
        raise ProtocolError(f"{path}: nested more than 32 levels deep", field=path)
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str):
        _require_utf8(value, path)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"{path}: {value!r} is not valid JSON; send a finite number", field=path)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(item, f"{path}.{i}", depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"{path}: object keys must be strings, got {key!r}", field=path)
            _require_utf8(key, path)
            _check_json_value(item, f"{path}.{key}", depth + 1)
        return
    raise ProtocolError(
        f"{path}: {type(value).__name__} is not a JSON value (use numbers, strings, booleans, null, lists and objects)",
        field=path,
    )


def _require_utf8(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(
            f"{path}: string {text[:40]!r} contains a lone surrogate, which UTF-8 cannot carry", field=path
        ) from None


def _now() -> float:
    return time.time()


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` if it has at most ``limit`` characters, else its start with a marker saying how much was cut.

    The result never exceeds ``limit`` characters (``limit`` >= 40).
    """
    if len(text) <= limit:
        return text
    marker = TRUNCATION_MARKER.format(hidden=len(text) - limit)
    keep = max(0, limit - len(marker))
    marker = TRUNCATION_MARKER.format(hidden=len(text) - keep)
    return text[:keep] + marker


def new_id() -> str:
    """A fresh revision id: a random (version 4) UUID as 32 hex digits, made without building a ``uuid.UUID``
    (a fifth of the cost, on the path of every write)."""
    number = int.from_bytes(os.urandom(16), "big")
    number = (number & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
    return f"{number:032x}"


def new_incarnation() -> str:
    """A fresh incarnation id: 12 lowercase hex characters, unique per trainer start."""
    return uuid.uuid4().hex[:12]


@dataclasses.dataclass(frozen=True)
class Revision:
    """One revision of a run's desired config: the whole config, not a diff.

    ``revision`` starts at 1 and increases by exactly 1 per write (compare-and-set on the previous one).
    ``reverts`` is the revision this one undoes (its config, commands aside), or 0 for an ordinary write.
    ``key_id`` and ``signature`` are empty on an unsigned revision; a signed one carries the signer's key id
    (``SHA256:...``) and an Ed25519 signature over every other field (see :mod:`weavelet_core.signing`).
    """

    run: str
    revision: int
    config: JsonObject
    author: str = ""
    created_at: float = dataclasses.field(default_factory=_now)
    id: str = dataclasses.field(default_factory=new_id)
    reverts: int = 0
    key_id: str = ""
    signature: str = ""

    kind = "revision"

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        _require_int(self.revision, "revision.revision", minimum=1, maximum=MAX_REVISION)
        if not isinstance(self.config, dict):
            raise ProtocolError(
                f"revision.config: expected a JSON object, got {_json_type(self.config)}",
                field="revision.config",
            )
        _check_json_value(self.config, "revision.config")
        _require_str(self.author, "revision.author")
        _require_number(self.created_at, "revision.created_at")
        _require_str(self.id, "revision.id")
        _require_int(self.reverts, "revision.reverts", minimum=0)
        _require_str(self.key_id, "revision.key_id")
        _require_str(self.signature, "revision.signature")


@dataclasses.dataclass(frozen=True)
class Status:
    """What the trainer and its weavelet report about a run. Coalesced: only the newest matters.

    ``incarnation`` and ``started_at`` identify the trainer start that reports (empty and 0 from a version-1
    writer); ``keepalive`` is the longest time in seconds between two of its heartbeats while it lives (0:
    unknown), so a status older than a few keepalives is stale; ``last_outcome`` is the newest outcome this
    incarnation reported (``revision``, ``revision_id``, ``result``, ``step``, ``message``), so a rejected newest
    revision shows with its reason. ``labels`` are the ``key: value`` strings the trainer declared (for selecting
    runs: ``weavelet stop -l sweep=3``); ``schema`` is what the live run accepts (keys with kinds and ranges,
    optimizer names, handler keys, per optimizer), so a writer can check a change before writing it.

    ``schema_digest`` says the schema is stored apart from the status (see :mod:`weavelet_core.statuses`): it is
    the :func:`schema_digest` of the schema's bytes, and ``schema`` is then ``None`` in the stored status. A
    trainer's schema is a few kilobytes, most of a status; kept apart, a status stays a few hundred bytes and
    reading thousands of them (``weavelet runs``) reads no schema. :meth:`weavelet_core.AsyncWeaver.status` joins
    the two again; batched reads (``statuses``) leave the schema out.
    """

    run: str
    state: str = "created"
    step: int = 0
    epoch: int = 0
    applied_revision: int = 0
    optimizer: JsonObject | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    heartbeat: float = dataclasses.field(default_factory=_now)
    pid: int = dataclasses.field(default_factory=os.getpid)
    host: str = dataclasses.field(default_factory=socket.gethostname)
    message: str | None = None
    incarnation: str = ""
    started_at: float = 0.0
    keepalive: float = 0.0
    last_outcome: JsonObject | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    schema: JsonObject | None = None
    schema_digest: str = ""

    kind = "status"

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        if self.state not in LIFECYCLE_STATES:
            raise ProtocolError(
                f"status.state: {self.state!r} is not one of {', '.join(LIFECYCLE_STATES)}",
                field="status.state",
            )
        _require_int(self.step, "status.step", minimum=0)
        _require_int(self.epoch, "status.epoch", minimum=0)
        _require_int(self.applied_revision, "status.applied_revision", minimum=0, maximum=MAX_REVISION)
        if self.optimizer is not None:
            if not isinstance(self.optimizer, dict):
                raise ProtocolError("status.optimizer: expected an object or null", field="status.optimizer")
            _check_json_value(self.optimizer, "status.optimizer")
        if not isinstance(self.metrics, dict):
            raise ProtocolError("status.metrics: expected an object", field="status.metrics")
        for key, value in self.metrics.items():
            _require_number(value, f"status.metrics.{key}")
        _check_json_value(self.metrics, "status.metrics")
        _require_number(self.heartbeat, "status.heartbeat")
        _require_int(self.pid, "status.pid", minimum=0)
        _require_str(self.host, "status.host")
        if self.message is not None:
            _require_str(self.message, "status.message")
        _require_str(self.incarnation, "status.incarnation")
        _require_number(self.started_at, "status.started_at")
        _require_number(self.keepalive, "status.keepalive")
        if self.last_outcome is not None:
            if not isinstance(self.last_outcome, dict):
                raise ProtocolError("status.last_outcome: expected an object or null", field="status.last_outcome")
            _check_json_value(self.last_outcome, "status.last_outcome")
        if not isinstance(self.labels, dict):
            raise ProtocolError("status.labels: expected an object of strings", field="status.labels")
        for label, text in self.labels.items():
            _require_str(label, "status.labels")
            _require_str(text, f"status.labels.{label}")
        if self.schema is not None:
            if not isinstance(self.schema, dict):
                raise ProtocolError("status.schema: expected an object or null", field="status.schema")
            _check_json_value(self.schema, "status.schema")
        _require_str(self.schema_digest, "status.schema_digest")
        if self.schema_digest and not SCHEMA_DIGEST_PATTERN.fullmatch(self.schema_digest):
            raise ProtocolError(
                f"status.schema_digest: {self.schema_digest[:80]!r} is not {SCHEMA_DIGEST_CHARS} lowercase hex digits",
                field="status.schema_digest",
            )

    @property
    def live(self) -> bool:
        """Whether the reporting incarnation had not ended when it reported (``stopped``/``failed`` end it)."""
        return self.state not in ("stopped", "failed")

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat (negative when the writer's clock is ahead of this one)."""
        return (time.time() if now is None else now) - self.heartbeat

    def stale(self, now: float | None = None, *, after: float | None = None) -> bool:
        """Whether a live status has gone without a heartbeat for too long, so its trainer counts as gone.

        Too long is ``after`` seconds when given, else :data:`STALE_KEEPALIVES` of the status's own keepalive plus
        2 s, else :data:`DEFAULT_STALE_AFTER` (a version-1 writer says no keepalive). A heartbeat more than
        :data:`FUTURE_SLACK` seconds in the future is stale too: the clocks disagree, and a status must not stay
        fresh for ever because of it. An ended status (stopped, failed) is never stale.
        """
        if not self.live:
            return False
        if after is None:
            after = STALE_KEEPALIVES * self.keepalive + 2.0 if self.keepalive > 0 else DEFAULT_STALE_AFTER
        age = self.age(now)
        return age > after or age < -FUTURE_SLACK


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one revision: ``applied`` (at ``step``), ``rejected`` (with ``message``) or
    ``superseded`` (a newer revision arrived before this one could be applied).

    ``revision_id`` is the :attr:`Revision.id` of the write it answers (empty when the entry could not be read,
    or from a version-1 writer): a waiting writer matches on it, never on the number alone. ``incarnation`` is
    the trainer start that decided it; outcomes of different incarnations for one revision are all kept.
    """

    run: str
    revision: int
    result: str
    step: int | None = None
    message: str | None = None
    detail: JsonObject = dataclasses.field(default_factory=dict)
    at: float = dataclasses.field(default_factory=_now)
    revision_id: str = ""
    incarnation: str = ""

    kind = "outcome"

    def __post_init__(self) -> None:
        validate_run_id(self.run)
        _require_int(self.revision, "outcome.revision", minimum=1, maximum=MAX_REVISION)
        if self.result not in OUTCOME_RESULTS:
            raise ProtocolError(
                f"outcome.result: {self.result!r} is not one of {', '.join(OUTCOME_RESULTS)}",
                field="outcome.result",
            )
        if self.step is not None:
            _require_int(self.step, "outcome.step", minimum=0)
        if self.message is not None:
            _require_str(self.message, "outcome.message")
        if not isinstance(self.detail, dict):
            raise ProtocolError("outcome.detail: expected an object", field="outcome.detail")
        _check_json_value(self.detail, "outcome.detail")
        _require_number(self.at, "outcome.at")
        _require_str(self.revision_id, "outcome.revision_id")
        _require_str(self.incarnation, "outcome.incarnation")


Message = Revision | Status | Outcome
M = TypeVar("M", Revision, Status, Outcome)
_KINDS: dict[str, type[Revision] | type[Status] | type[Outcome]] = {
    "revision": Revision,
    "status": Status,
    "outcome": Outcome,
}


def _json_type(value: object) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }.get(type(value), "null" if value is None else type(value).__name__)


def _require_int(value: object, field: str, *, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{field}: expected an integer, got {_json_type(value)}", field=field)
    if minimum is not None and value < minimum:
        raise ProtocolError(f"{field}: must be >= {minimum}, got {value}", field=field)
    if maximum is not None and value > maximum:
        raise ProtocolError(f"{field}: must be <= {maximum}, got {str(value)[:40]}", field=field)


def lenient_revision_number(data: bytes | None) -> int | None:
    """The integer ``revision`` (1 to :data:`MAX_REVISION`) of an entry that does not decode as a revision, if it
    is at least a JSON object that has one; else ``None``. Transports number an unreadable entry with it."""
    try:
        obj = json.loads(data or b"")
    except (ValueError, RecursionError):
        return None
    number = obj.get("revision") if isinstance(obj, dict) else None
    if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= MAX_REVISION:
        return number
    return None


def _require_number(value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{field}: expected a number, got {_json_type(value)}", field=field)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond the range of a float
        finite = False
    if not finite:
        raise ProtocolError(f"{field}: expected a finite number, got {str(value)[:40]}", field=field)


def _require_str(value: object, field: str) -> None:
    if not isinstance(value, str):
        raise ProtocolError(f"{field}: expected a string, got {_json_type(value)}", field=field)
    _require_utf8(value, field)


_LAYOUTS: dict[type, tuple[dict[str, dataclasses.Field[Any]], tuple[str, ...]]] = {}


def _layout(kind: type[Message]) -> tuple[dict[str, dataclasses.Field[Any]], tuple[str, ...]]:
    """A message class's fields by name, and the names of those without a default (looked up once per class: this
    is on the path of every write and every read)."""
    found = _LAYOUTS.get(kind)
    if found is None:
        fields = {f.name: f for f in dataclasses.fields(kind)}
        required = tuple(
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        found = _LAYOUTS[kind] = (fields, required)
    return found


UNSIGNED_OMITTED = ("key_id", "signature")
"""Revision fields left out of the JSON when empty: an unsigned revision is written as before they existed."""
STATUS_OMITTED = ("schema_digest",)
"""Status fields left out of the JSON when empty: a status with its schema inline is written as before."""


def to_dict(message: Message) -> JsonObject:
    """The JSON object for ``message``, with ``v`` and ``kind`` (an unsigned revision without ``key_id`` and
    ``signature``). Its values are the message's own (every field is plain JSON, so nothing is converted or
    copied): do not modify them."""
    body = {name: getattr(message, name) for name in _layout(type(message))[0]}
    omitted = UNSIGNED_OMITTED if isinstance(message, Revision) else STATUS_OMITTED if message.kind == "status" else ()
    for name in omitted:
        if not body[name]:
            del body[name]
    return {"v": PROTOCOL_VERSION, "kind": message.kind, **body}


def encode(message: Message, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> bytes:
    """Encode ``message`` as compact UTF-8 JSON; raise :class:`ProtocolError` if it exceeds ``max_bytes``."""
    data = _ENCODER.encode(to_dict(message)).encode()
    if len(data) > max_bytes:
        raise ProtocolError(
            f"{message.kind}: encoded size {len(data)} bytes exceeds the {max_bytes}-byte cap; "
            "send a smaller config (large objects belong in files, referenced by path)",
            field=message.kind,
        )
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Made once: ``json.dumps``/``json.loads`` with options build a new encoder or decoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


SCHEMA_DIGEST_CHARS = 32
SCHEMA_DIGEST_PATTERN = re.compile(f"[0-9a-f]{{{SCHEMA_DIGEST_CHARS}}}")
_SCHEMA_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False, sort_keys=True)


def encode_schema(schema: JsonObject, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> bytes:
    """A run's schema (see :attr:`Status.schema`) as the bytes stored apart from its status: compact UTF-8 JSON
    with sorted keys, so that the same schema always gives the same bytes and :func:`schema_digest`.

    :raises ProtocolError: for a schema that is not a JSON object of plain JSON values, or over ``max_bytes``.
    """
    if not isinstance(schema, dict):
        raise ProtocolError("schema: expected an object", field="schema")
    _check_json_value(schema, "schema")
    data = _SCHEMA_ENCODER.encode(schema).encode()
    if len(data) > max_bytes:
        raise ProtocolError(f"schema: encoded size {len(data)} bytes exceeds the {max_bytes}-byte cap", field="schema")
    return data


def schema_digest(data: bytes) -> str:
    """The digest a status names its schema by: the first :data:`SCHEMA_DIGEST_CHARS` hex digits of the SHA-256
    of the schema's bytes (:func:`encode_schema`)."""
    return hashlib.sha256(data).hexdigest()[:SCHEMA_DIGEST_CHARS]


def decode_schema(data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> JsonObject:
    """Decode a schema stored apart from its status (untrusted bytes).

    :raises ProtocolError: for bytes over ``max_bytes``, that are not UTF-8 JSON, or not an object of plain JSON.
    """
    if len(data) > max_bytes:
        raise ProtocolError(f"schema: payload of {len(data)} bytes exceeds the {max_bytes}-byte cap", field="schema")
    try:
        obj = _DECODER.decode(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"schema: not valid JSON ({exc})", field="schema") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"schema: expected a JSON object, got {_json_type(obj)}", field="schema")
    _check_json_value(obj, "schema")
    return obj


def decode(data: bytes | str, expected: type[M], *, max_bytes: int = MAX_PAYLOAD_BYTES) -> M:
    """Decode untrusted ``data`` as a message of type ``expected``.

    Raises only :class:`ProtocolError`, naming the offending field, for anything that is not a valid
    message of that kind: bad UTF-8, malformed JSON, wrong or missing fields, a newer protocol version,
    a payload over ``max_bytes``.
    """
    kind = expected.kind
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{kind}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(f"{kind}: payload of {len(data)} bytes exceeds the {max_bytes}-byte cap", field=kind)
    try:
        text = bytes(data).decode("utf-8")
        if text.startswith("\ufeff"):
            raise ValueError("a byte order mark before the JSON")
        obj = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{kind}: not valid JSON ({exc})") from None
    return from_dict(obj, expected)


def from_dict(obj: object, expected: type[M]) -> M:
    """Build a message of type ``expected`` from a decoded JSON object; raise :class:`ProtocolError`."""
    kind = expected.kind
    if not isinstance(obj, dict):
        raise ProtocolError(f"{kind}: expected a JSON object, got {_json_type(obj)}")
    version = obj.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
        if isinstance(version, int) and not isinstance(version, bool) and version > PROTOCOL_VERSION:
            hint = "upgrade weavelet on this side"
        else:
            hint = f"expected one of {', '.join(map(str, READABLE_VERSIONS))}"
        raise ProtocolError(f"{kind}.v: unsupported protocol version {version!r}; {hint}", field=f"{kind}.v")
    if obj.get("kind") != kind:
        raise ProtocolError(f"{kind}.kind: expected {kind!r}, got {obj.get('kind')!r}", field=f"{kind}.kind")
    fields, required = _layout(expected)
    # "v" and "kind" are no fields; newer minor additions are ignored, not fatal
    kwargs = {name: value for name, value in obj.items() if name in fields}
    for name in required:
        if name not in kwargs:
            raise ProtocolError(f"{kind}.{name}: missing", field=f"{kind}.{name}")
    try:
        return expected(**kwargs)
    except ProtocolError:
        raise
    except InvalidRunId as exc:
        raise ProtocolError(f"{kind}.run: {exc}", field=f"{kind}.run") from None
    except (TypeError, ValueError) as exc:  # defensive: a field check we did not foresee
        raise ProtocolError(f"{kind}: {exc}") from None
