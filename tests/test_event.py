"""The resource_change event decoder, from bytes: what MediaWiki sends, and what it must survive."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from purged.event import Event, EventError, decode_event
from tests.support.broker import make_event

URI = "https://en.wikipedia.org/wiki/Main_Page"
# 2020-05-07T09:48:24.065Z as seconds since the epoch.
MAY_7 = datetime(2020, 5, 7, 9, 48, 24, 65000, tzinfo=UTC).timestamp()

# A real event as EventBus delivers it to *.resource-purge (field order and all).
PRODUCTION_EVENT = (
    b'{"$schema":"/resource_change/1.0.0","meta":{"uri":"https://en.wikipedia.org/wiki/'
    b'Main_Page","dt":"2020-05-07T09:48:24.065Z","stream":"resource-purge","domain":'
    b'"en.wikipedia.org","id":"7cd0a8b4-9044-11ea-9f5a-1866da993b7c","request_id":'
    b'"XrPZ-ApAICEAAFfX8mUAAAAJ"},"tags":["mediawiki"],"root_event":{"dt":'
    b'"2020-05-07T09:48:23.000Z","signature":"wiki:Main_Page"}}'
)


def event(meta: Any = None, **fields: Any) -> bytes:
    """An event with ``meta`` (default: just the URI) and any other top-level fields."""
    body: dict[str, Any] = {"$schema": "/resource_change/1.0.0", **fields}
    body["meta"] = {"uri": URI} if meta is None else meta
    return json.dumps(body).encode()


# --- good events ------------------------------------------------------------------------


def test_production_event_gives_uri_root_event_time_and_first_tag() -> None:
    decoded = decode_event(PRODUCTION_EVENT)
    assert decoded == Event(URI, MAY_7 - 1.065, "mediawiki", False)


def test_event_time_is_meta_dt_without_root_event() -> None:
    decoded = decode_event(make_event(URI, dt="2020-05-07T09:48:24.065Z"))
    assert decoded.uri == URI
    assert decoded.timestamp == pytest.approx(MAY_7)
    assert not decoded.bad_time


def test_root_event_dt_wins_over_meta_dt() -> None:
    now = datetime.now(UTC)
    root = now - timedelta(hours=3)
    decoded = decode_event(make_event(URI, dt=now, root_dt=root))
    assert decoded.timestamp == pytest.approx(root.timestamp(), abs=0.001)


def test_old_event_keeps_its_old_time() -> None:
    # Deciding that it is too old is the consumer's job (-purgeMaxAge); the decoder only
    # reports the time faithfully.
    old = datetime.now(UTC) - timedelta(days=3)
    decoded = decode_event(make_event(URI, dt=old))
    assert decoded.timestamp == pytest.approx(old.timestamp(), abs=0.001)


def test_time_with_an_offset_is_converted_to_utc() -> None:
    decoded = decode_event(make_event(URI, dt="2020-05-07T11:48:24.065+02:00"))
    assert decoded.timestamp == pytest.approx(MAY_7)


def test_first_tag_is_the_tag() -> None:
    assert decode_event(make_event(URI, tags=("purge", "mediawiki"))).tag == "purge"


def test_no_tags_give_an_empty_tag() -> None:
    assert decode_event(make_event(URI, tags=())).tag == ""
    assert decode_event(event()).tag == ""


def test_unknown_fields_are_ignored() -> None:
    decoded = decode_event(event(extra={"a": [1, 2]}, meta={"uri": URI, "x": None}))
    assert decoded.uri == URI


def test_event_without_any_time_has_no_timestamp_and_no_bad_time() -> None:
    assert decode_event(event()) == Event(URI, None, "", False)


def test_non_ascii_uri_is_decoded_from_utf8() -> None:
    uri = "https://de.wikipedia.org/wiki/Straße"
    assert decode_event(make_event(uri)).uri == uri


# --- bad times: logged and taken as now, never a discarded event -------------------------


@pytest.mark.parametrize(
    "dt",
    [
        "yesterday",
        "",
        "2020-05-07",  # a date is not a time
        "2020-05-07T09:48:24",  # RFC 3339 requires an offset
        "2020-13-07T09:48:24Z",
        "2020-05-07T25:48:24Z",
    ],
)
def test_unparsable_time_is_reported_as_bad_and_the_event_kept(dt: str) -> None:
    decoded = decode_event(make_event(URI, dt=dt))
    assert decoded.uri == URI
    assert decoded.timestamp is None
    assert decoded.bad_time


@pytest.mark.parametrize("dt", [1588844904, 1588844904.065, True, ["2020-05-07T09:48:24Z"], {}])
def test_time_of_the_wrong_type_is_reported_as_bad_and_the_event_kept(dt: Any) -> None:
    # The original panicked on a number where the time string belongs, in a crash loop.
    decoded = decode_event(event(meta={"uri": URI, "dt": dt}))
    assert decoded.uri == URI
    assert decoded.timestamp is None
    assert decoded.bad_time


def test_root_event_time_of_the_wrong_type_is_bad_not_meta_dt() -> None:
    decoded = decode_event(
        event(meta={"uri": URI, "dt": "2020-05-07T09:48:24.065Z"}, root_event={"dt": 5})
    )
    assert decoded.uri == URI
    assert decoded.timestamp is None
    assert decoded.bad_time


def test_null_times_count_as_absent() -> None:
    decoded = decode_event(event(meta={"uri": URI, "dt": None}, root_event={"dt": None}))
    assert decoded == Event(URI, None, "", False)


@pytest.mark.parametrize("tags", ["mediawiki", 5, {"a": 1}, [5, "mediawiki"], [None], [[]]])
def test_tags_of_the_wrong_type_give_an_empty_tag(tags: Any) -> None:
    decoded = decode_event(event(tags=tags))
    assert decoded.uri == URI
    assert decoded.tag == ""


def test_root_event_that_is_not_an_object_is_a_bad_time_not_a_discarded_event() -> None:
    decoded = decode_event(event(meta={"uri": URI, "dt": "2020-05-07T09:48:24.065Z"}, root_event=5))
    assert decoded.uri == URI
    assert decoded.timestamp is None and decoded.bad_time


# --- discarded messages -----------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"not json",
        b"{",
        b'{"meta":{"uri":"https://a/"}',  # truncated
        b'{"meta":{"uri":"https://a/"}} trailing',
        b"\xef\xbb\xbf{}",  # a byte order mark is not JSON
        b"null",
        b"[]",
        b'"https://en.wikipedia.org/"',
        b"42",
    ],
)
def test_message_that_is_not_a_json_object_is_an_event_error(message: bytes) -> None:
    with pytest.raises(EventError):
        decode_event(message)


@pytest.mark.parametrize(
    "message",
    [
        b"{}",
        event(meta={}),
        event(meta={"dt": "2020-05-07T09:48:24.065Z"}),
        event(meta={"uri": None}),
        event(meta={"uri": ""}),
        b'{"meta":null}',
        b'{"uri":"https://en.wikipedia.org/"}',  # at the top level, not in meta
    ],
)
def test_event_without_meta_uri_is_an_event_error(message: bytes) -> None:
    with pytest.raises(EventError, match=r"meta\.uri"):
        decode_event(message)


@pytest.mark.parametrize("uri", [5, 5.5, True, ["https://a/"], {"href": "https://a/"}])
def test_meta_uri_of_the_wrong_type_is_an_event_error(uri: Any) -> None:
    with pytest.raises(EventError, match=r"meta\.uri"):
        decode_event(event(meta={"uri": uri}))


@pytest.mark.parametrize("meta", ["https://a/", 5, ["https://a/"]])
def test_meta_that_is_not_an_object_is_an_event_error(meta: Any) -> None:
    with pytest.raises(EventError):
        decode_event(event(meta=meta))


def test_invalid_utf8_is_an_event_error() -> None:
    with pytest.raises(EventError):
        decode_event(b'{"meta":{"uri":"https://en.wikipedia.org/wiki/\xff\xfe"}}')


def test_lone_surrogate_escape_is_an_event_error() -> None:
    # JSON allows "\ud800", but no valid URL can come from it.
    with pytest.raises(EventError):
        decode_event(b'{"meta":{"uri":"https://en.wikipedia.org/wiki/\\ud800"}}')


# --- properties -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
# Events of plausible shape with any JSON value in any field the decoder reads.
shaped_events = st.fixed_dictionaries(
    {"meta": st.fixed_dictionaries({}, optional={"uri": json_values, "dt": json_values})},
    optional={
        "tags": json_values,
        "root_event": st.fixed_dictionaries({}, optional={"dt": json_values}) | json_values,
    },
).map(lambda d: json.dumps(d).encode())


def decodes_or_refuses(message: bytes) -> None:
    try:
        decoded = decode_event(message)
    except EventError:
        return
    assert isinstance(decoded, Event)
    assert isinstance(decoded.uri, str) and decoded.uri
    assert decoded.timestamp is None or isinstance(decoded.timestamp, float)
    assert isinstance(decoded.tag, str)
    assert isinstance(decoded.bad_time, bool)


@given(st.binary(max_size=600))
@settings(max_examples=1000)
def test_any_bytes_decode_to_an_event_or_an_event_error(message: bytes) -> None:
    decodes_or_refuses(message)


@given(shaped_events)
@settings(max_examples=1000)
def test_any_json_in_any_field_decodes_to_an_event_or_an_event_error(message: bytes) -> None:
    decodes_or_refuses(message)


@given(st.binary(min_size=1, max_size=4), st.integers(min_value=0))
def test_corrupted_production_events_decode_to_an_event_or_an_event_error(
    garbage: bytes, position: int
) -> None:
    at = position % len(PRODUCTION_EVENT)
    decodes_or_refuses(PRODUCTION_EVENT[:at] + garbage + PRODUCTION_EVENT[at + len(garbage) :])
