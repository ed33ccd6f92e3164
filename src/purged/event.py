"""resource_change/1.0.0 event decoder (sans-I/O): Kafka message bytes → URL, time, tag."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import msgspec


class EventError(ValueError):
    """The message cannot be used as a purge event (it is discarded and counted)."""


class Event(NamedTuple):
    """What purged needs of one event."""

    uri: str
    timestamp: float | None  # seconds since the epoch; None when absent or unparsable
    tag: str  # first tag, or ""
    bad_time: bool  # a time field was present but could not be parsed


# Fields are typed `object` where senders have been seen to put the wrong type: a number
# where a time string belongs must not discard the event (and must never crash us).
class _Meta(msgspec.Struct):
    uri: object = None
    dt: object = None


class _ResourceChange(msgspec.Struct):
    meta: _Meta | None = None
    tags: object = None
    root_event: object = None  # a JSON object with "dt"; anything else means "no time"


_decoder = msgspec.json.Decoder(_ResourceChange)


def decode_event(message: bytes) -> Event:
    """Decode one resource_change event, or raise EventError.

    The URL is `meta.uri` (required). The time is `root_event.dt` when present, else
    `meta.dt`; an unparsable time gives `timestamp=None, bad_time=True` (taken as now).
    """
    try:
        event = _decoder.decode(message)
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise EventError(f"not a resource_change event: {error}") from None
    meta = event.meta
    if meta is None or not isinstance(meta.uri, str) or not meta.uri:
        raise EventError("event without meta.uri")
    root_event = event.root_event
    raw_time = root_event.get("dt") if isinstance(root_event, dict) else root_event
    if raw_time is None:
        raw_time = meta.dt
    timestamp = parse_time(raw_time) if raw_time is not None else None
    tags = event.tags
    tag = tags[0] if isinstance(tags, list) and tags and isinstance(tags[0], str) else ""
    return Event(meta.uri, timestamp, tag, raw_time is not None and timestamp is None)


def parse_time(value: object) -> float | None:
    """An RFC 3339 time as seconds since the epoch, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None  # RFC 3339 requires an offset; a naive time would be read as local time
    return moment.timestamp()
