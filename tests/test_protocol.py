"""The wire protocol: round trips, garbage rejection, bad input with messages naming the field, run ids."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weavelet_core.errors import InvalidRunId, ProtocolError
from weavelet_core.protocol import (
    LIFECYCLE_STATES,
    MAX_PAYLOAD_BYTES,
    OUTCOME_RESULTS,
    PROTOCOL_VERSION,
    Outcome,
    Revision,
    Status,
    decode,
    encode,
    to_dict,
    validate_run_id,
)

KINDS: list[type[Revision] | type[Status] | type[Outcome]] = [Revision, Status, Outcome]
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies --------------------------------------------------------------------------------------------

run_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,40}", fullmatch=True).filter(lambda r: ".." not in r)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | finite | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
timestamps = st.floats(min_value=0, max_value=4e9, allow_nan=False)
counts = st.integers(min_value=0, max_value=2**40)

revisions = st.builds(
    Revision,
    run=run_ids,
    revision=st.integers(min_value=1, max_value=2**40),
    config=json_objects,
    author=st.text(max_size=30),
    created_at=timestamps,
    id=st.text(min_size=1, max_size=32),
)
statuses = st.builds(
    Status,
    run=run_ids,
    state=st.sampled_from(LIFECYCLE_STATES),
    step=counts,
    epoch=counts,
    applied_revision=counts,
    optimizer=st.none() | json_objects,
    metrics=st.dictionaries(st.text(max_size=10), finite, max_size=5),
    heartbeat=timestamps,
    pid=st.integers(min_value=0, max_value=2**22),
    host=st.text(max_size=30),
    message=st.none() | st.text(max_size=50),
)
outcomes = st.builds(
    Outcome,
    run=run_ids,
    revision=st.integers(min_value=1, max_value=2**40),
    result=st.sampled_from(OUTCOME_RESULTS),
    step=st.none() | counts,
    message=st.none() | st.text(max_size=50),
    detail=json_objects,
    at=timestamps,
)
messages = revisions | statuses | outcomes


# -- properties --------------------------------------------------------------------------------------------


@PROPERTY
@given(messages)
def test_encode_decode_round_trip(message: Revision | Status | Outcome) -> None:
    kind: Any = type(message)
    data = encode(message)
    assert len(data) <= MAX_PAYLOAD_BYTES
    assert decode(data, kind) == message
    assert decode(data.decode(), kind) == message
    body = json.loads(data)
    assert body["v"] == PROTOCOL_VERSION
    assert body["kind"] == message.kind


def _decode(data: bytes | str, kind: type[Any]) -> object:
    """The decoded message, or the ProtocolError raised; any other exception propagates (and fails)."""
    try:
        return decode(data, kind)
    except ProtocolError as exc:
        return exc


@PROPERTY
@given(st.binary(max_size=300), st.sampled_from(KINDS))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes, kind: type[Any]) -> None:
    result = _decode(data, kind)
    assert isinstance(result, (ProtocolError, kind))


@PROPERTY
@given(json_values, st.sampled_from(KINDS))
def test_arbitrary_json_raises_only_protocol_error(value: Any, kind: type[Any]) -> None:
    with pytest.raises(ProtocolError):
        decode(json.dumps(value), kind)


@PROPERTY
@given(messages, st.data())
def test_one_bad_field_is_refused_naming_that_field(message: Revision | Status | Outcome, data: st.DataObject) -> None:
    body = to_dict(message)
    name = data.draw(st.sampled_from(sorted(body)))
    body[name] = data.draw(json_values | st.integers(min_value=2**1100, max_value=2**1200))
    result = _decode(json.dumps(body), type(message))
    if isinstance(result, ProtocolError):
        assert name in str(result)
        assert result.field is None or result.field.startswith(message.kind)
    else:
        assert isinstance(result, type(message))
        assert to_dict(result)[name] == body[name]


@PROPERTY
@given(st.text(max_size=40))
def test_run_ids_are_safe_path_components_or_refused(run: str) -> None:
    try:
        validate_run_id(run)
        error = ""
    except InvalidRunId as exc:
        error = str(exc)
    if error:
        assert repr(run) in error
    else:
        assert "/" not in run
        assert "\\" not in run
        assert ".." not in run
        assert run not in (".", "")
        assert not run.startswith(("-", "."))
        assert run.isascii()
        assert not any(c.isspace() for c in run)


# -- bad input, each with the message a person needs --------------------------------------------------------


def _revision_body(**changes: Any) -> dict[str, Any]:
    body = to_dict(Revision(run="demo", revision=3, config={"lr": 0.1}, author="a", created_at=1.0, id="x"))
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        (b'{"v":1,"kind":"revision",', None, "revision: not valid JSON"),
        (b"\xff\xfe{}", None, "revision: not valid JSON"),
        (b"[1,2]", None, "revision: expected a JSON object, got array"),
        (json.dumps(_revision_body(config=[1, 2])), "revision.config", "expected a JSON object, got array"),
        (json.dumps(_revision_body(config="lr=0.1")), "revision.config", "expected a JSON object, got string"),
        (json.dumps(_revision_body(revision="3")), "revision.revision", "expected an integer, got string"),
        (json.dumps(_revision_body(revision=True)), "revision.revision", "expected an integer, got boolean"),
        (json.dumps(_revision_body(revision=0)), "revision.revision", "must be >= 1, got 0"),
        (json.dumps(_revision_body(author=5)), "revision.author", "expected a string, got integer"),
        (json.dumps(_revision_body(created_at=10**400)), "revision.created_at", "expected a finite number"),
        (json.dumps(_revision_body(run="a/b")), "revision.run", "invalid run id 'a/b'"),
        (json.dumps(_revision_body(v=3)), "revision.v", "unsupported protocol version 3; upgrade weavelet"),
        (json.dumps(_revision_body(v=0)), "revision.v", "unsupported protocol version 0; expected one of 1, 2"),
        (json.dumps(_revision_body(v="1")), "revision.v", "unsupported protocol version '1'"),
        (json.dumps(_revision_body(kind="status")), "revision.kind", "expected 'revision', got 'status'"),
        (b'{"v":1,"kind":"revision","run":"demo","config":{}}', "revision.revision", "revision.revision: missing"),
        (b'{"v":1,"kind":"revision","run":"d","revision":1,"config":{"x":NaN}}', None, "NaN is not valid JSON"),
        (
            b'{"v":1,"kind":"revision","run":"d","revision":1,"config":{"x":"\\ud800"}}',
            "revision.config.x",
            "lone surrogate",
        ),
        (b'{"v":1,"kind":"revision","run":"d","revision":1,"config":' + b"[" * 5000 + b"]" * 5000 + b"}", None, ""),
    ],
)
def test_malformed_revisions_name_the_problem(data: bytes | str, field: str | None, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data, Revision)
    assert message in str(info.value)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"state": "paused"}, "status.state", "'paused' is not one of created, starting, running"),
        ({"step": -1}, "status.step", "must be >= 0"),
        ({"metrics": {"loss": "low"}}, "status.metrics.loss", "expected a number, got string"),
        ({"metrics": [1]}, "status.metrics", "expected an object"),
        ({"optimizer": "adam"}, "status.optimizer", "expected an object or null"),
        ({"heartbeat": None}, "status.heartbeat", "expected a number, got null"),
    ],
)
def test_malformed_status_names_the_field(changes: dict[str, Any], field: str, message: str) -> None:
    body = to_dict(Status(run="demo", heartbeat=1.0, pid=1, host="h"))
    body.update(changes)
    with pytest.raises(ProtocolError) as info:
        decode(json.dumps(body), Status)
    assert info.value.field == field
    assert message in str(info.value)


def test_malformed_outcome_names_the_field() -> None:
    body = to_dict(Outcome(run="demo", revision=1, result="applied", step=3, at=1.0))
    body["result"] = "done"
    with pytest.raises(ProtocolError, match=r"outcome.result: 'done' is not one of applied, rejected, superseded"):
        decode(json.dumps(body), Outcome)


def test_payload_over_the_cap_is_refused_both_ways() -> None:
    big = Revision(run="demo", revision=1, config={"notes": "x" * MAX_PAYLOAD_BYTES})
    with pytest.raises(ProtocolError) as info:
        encode(big)
    assert f"exceeds the {MAX_PAYLOAD_BYTES}-byte cap" in str(info.value)
    assert "send a smaller config" in str(info.value)
    data = encode(big, max_bytes=2 * MAX_PAYLOAD_BYTES)
    with pytest.raises(ProtocolError, match=rf"payload of {len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte"):
        decode(data, Revision)
    assert decode(data, Revision, max_bytes=2 * MAX_PAYLOAD_BYTES) == big


@pytest.mark.parametrize(
    ("config", "field", "message"),
    [
        ({"lr": math.nan}, "revision.config.lr", "nan is not valid JSON; send a finite number"),
        ({"lr": math.inf}, "revision.config.lr", "inf is not valid JSON"),
        ({1: "x"}, "revision.config", "object keys must be strings, got 1"),
        ({"f": {1, 2}}, "revision.config.f", "set is not a JSON value"),
        ({"s": "\udcff"}, "revision.config.s", "lone surrogate"),
    ],
)
def test_configs_that_are_not_json_are_refused_when_built(config: dict[Any, Any], field: str, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        Revision(run="demo", revision=1, config=config)
    assert info.value.field == field
    assert message in str(info.value)


def test_unknown_fields_from_newer_peers_are_ignored() -> None:
    body = _revision_body(added_later={"x": 1})
    assert decode(json.dumps(body), Revision).config == {"lr": 0.1}


@pytest.mark.parametrize("run", ["a/b", "..", "a..b", "has space", "", "-lead", ".hidden", "x" * 129, "ü", "a\nb"])
def test_unsafe_run_ids_are_refused_with_the_rule(run: str) -> None:
    with pytest.raises(InvalidRunId) as info:
        validate_run_id(run)
    assert "use 1-128 characters from A-Z a-z 0-9 _ . -" in str(info.value)


def test_run_id_must_be_a_string() -> None:
    with pytest.raises(InvalidRunId, match="run id must be a string, got int"):
        validate_run_id(5)


@pytest.mark.parametrize("run", ["demo", "resnet50-lr-sweep.3", "A_1", "x" * 128, "0"])
def test_safe_run_ids_are_accepted(run: str) -> None:
    assert validate_run_id(run) == run


def test_status_age_counts_from_the_heartbeat() -> None:
    assert Status(run="demo", heartbeat=100.0).age(now=160.5) == 60.5


def test_version_1_messages_are_still_read_with_the_new_fields_defaulted() -> None:
    outcome = decode(b'{"v":1,"kind":"outcome","run":"r","revision":3,"result":"applied","step":7}', Outcome)
    assert (outcome.revision_id, outcome.incarnation, outcome.step) == ("", "", 7)
    status = decode(b'{"v":1,"kind":"status","run":"r","state":"running"}', Status)
    assert (status.incarnation, status.started_at, status.keepalive, status.last_outcome) == ("", 0.0, 0.0, None)
    assert json.loads(encode(outcome))["v"] == PROTOCOL_VERSION == 2


# -- the quick JSON check agrees with the full one ----------------------------------------------------------

odd_scalars = (
    json_scalars
    | st.floats()  # NaN and infinities
    | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
    | st.builds(tuple, st.lists(st.integers(), max_size=2))
    | st.sets(st.integers(), max_size=2)
)
odd_values = st.recursive(
    odd_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=4) | st.integers() | st.just("\udcff"), inner, max_size=3)
    ),
    max_leaves=12,
)


def _nested(levels: int, leaf: Any = 1) -> Any:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


def _full_check(value: Any, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """What the path-naming check alone says of ``value`` (``None``: accepted)."""
    from weavelet_core import protocol

    with monkeypatch.context() as patched:
        patched.setattr(protocol, "_plain_json", lambda value, depth=0: False)
        try:
            protocol._check_json_value(value, "p")
        except ProtocolError as exc:
            return str(exc)
    return None


@PROPERTY
@given(value=odd_values | st.integers(28, 36).map(_nested) | st.integers(28, 36).map(lambda n: _nested(n, [])))
def test_the_quick_check_accepts_only_what_the_full_check_accepts(value: Any) -> None:
    from weavelet_core import protocol

    with pytest.MonkeyPatch.context() as monkeypatch:
        expected = _full_check(value, monkeypatch)
    try:
        protocol._check_json_value(value, "p")
        got = None
    except ProtocolError as exc:
        got = str(exc)
    assert got == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (_nested(32), None),
        (_nested(31, {}), None),
        (_nested(32, []), None),
        (_nested(33), "nested more than 32 levels deep"),
        (_nested(32, [1]), "nested more than 32 levels deep"),
        ({"a": [1.5, math.inf]}, "is not valid JSON"),
        ({"\udcff": 1}, "lone surrogate"),
        ({"a": ["ok", "\udcff"]}, "lone surrogate"),
        ({1: "a"}, "object keys must be strings"),
        ({"t": (1, 2), "b": True, "n": None}, None),
        ({"s": {1, 2}}, "set is not a JSON value"),
    ],
)
def test_json_values_the_quick_check_decides(value: Any, problem: str | None) -> None:
    from weavelet_core import protocol

    if problem is None:
        protocol._check_json_value(value, "p")
        return
    with pytest.raises(ProtocolError, match=problem):
        protocol._check_json_value(value, "p")
    with pytest.raises(ProtocolError, match=problem):
        Status(run="r", state="running", schema={"v": value})


def test_revision_ids_are_distinct_version_4_uuids() -> None:
    import uuid as uuid_module

    from weavelet_core.protocol import new_id

    ids = {Revision(run="r", revision=1, config={}).id for _ in range(2000)} | {new_id() for _ in range(2000)}
    assert len(ids) == 4000
    for text in list(ids)[:200]:
        parsed = uuid_module.UUID(text)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid_module.RFC_4122, text)
