"""Reading the caches' answers to pipelined PURGEs, from bytes, however they are split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from purged.http import ProtocolError, ResponseReader

# What the caches really answer (headers trimmed to what matters for framing).
VARNISH_200 = (
    b"HTTP/1.1 200 Purged\r\nDate: Thu, 07 May 2020 09:48:24 GMT\r\nServer: Varnish\r\n"
    b"X-Varnish: 32770\r\nContent-Type: text/html; charset=utf-8\r\nRetry-After: 5\r\n"
    b"Content-Length: 240\r\nAccept-Ranges: bytes\r\nConnection: keep-alive\r\n\r\n" + b"x" * 240
)
ATS_404 = (
    b"HTTP/1.1 404 Not Found\r\nDate: Thu, 07 May 2020 09:48:24 GMT\r\n"
    b"Connection: keep-alive\r\nServer: ATS/9.2.9\r\nContent-Length: 0\r\n\r\n"
)
EMPTY_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
NO_CONTENT_204 = b"HTTP/1.1 204 No Content\r\n\r\n"
CHUNKED_200 = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\n"
)
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
CLOSE_200 = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"

PIPELINE = VARNISH_200 + ATS_404 + EMPTY_200 + NO_CONTENT_204 + CHUNKED_200 + CONTINUE_100 + ATS_404
PIPELINE_STATUSES = [200, 404, 200, 204, 200, 404]


def feed_all(chunks: list[bytes]) -> tuple[list[int], ResponseReader]:
    reader = ResponseReader()
    statuses: list[int] = []
    for chunk in chunks:
        statuses += reader.feed(chunk)
    return statuses, reader


# --- framing ----------------------------------------------------------------------------


def test_one_response_gives_its_status() -> None:
    assert feed_all([ATS_404])[0] == [404]


def test_response_body_is_read_by_content_length() -> None:
    statuses, reader = feed_all([VARNISH_200[:-1]])
    assert statuses == []  # one body byte still missing
    assert reader.feed(VARNISH_200[-1:]) == [200]


def test_204_has_no_body() -> None:
    assert feed_all([NO_CONTENT_204 + EMPTY_200])[0] == [204, 200]


def test_chunked_body_is_read_completely() -> None:
    statuses, reader = feed_all([CHUNKED_200[:-2]])
    assert statuses == []
    assert reader.feed(CHUNKED_200[-2:] + EMPTY_200) == [200, 200]


def test_interim_1xx_responses_are_not_answers() -> None:
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    assert feed_all([CONTINUE_100 + early_hints + ATS_404])[0] == [404]


def test_pipelined_responses_in_one_read_come_out_in_order() -> None:
    statuses, reader = feed_all([PIPELINE])
    assert statuses == PIPELINE_STATUSES
    assert not reader.closing


def test_pipelined_responses_split_at_every_byte_boundary() -> None:
    for cut in range(1, len(PIPELINE)):
        statuses, reader = feed_all([PIPELINE[:cut], PIPELINE[cut:]])
        assert statuses == PIPELINE_STATUSES, cut
        assert not reader.closing


def test_pipelined_responses_fed_one_byte_at_a_time() -> None:
    reader = ResponseReader()
    seen: list[int] = []
    for i in range(len(PIPELINE)):
        seen += reader.feed(PIPELINE[i : i + 1])
    assert seen == PIPELINE_STATUSES


def test_each_status_is_reported_by_the_read_that_completes_it() -> None:
    reader = ResponseReader()
    assert reader.feed(ATS_404 + EMPTY_200[:10]) == [404]
    assert reader.feed(EMPTY_200[10:]) == [200]


def test_empty_read_completes_nothing() -> None:
    assert ResponseReader().feed(b"") == []


# --- connection end ---------------------------------------------------------------------


def test_connection_close_ends_the_stream_after_that_response() -> None:
    statuses, reader = feed_all([EMPTY_200 + CLOSE_200 + ATS_404])
    assert statuses == [200, 200]  # the 404 after the close is never used
    assert reader.closing


def test_bytes_after_a_closing_response_are_ignored_even_garbage() -> None:
    statuses, reader = feed_all([CLOSE_200, b"garbage\r\n\r\n", ATS_404])
    assert statuses == [200]
    assert reader.closing


def test_connection_close_split_at_every_byte_boundary() -> None:
    stream = ATS_404 + CLOSE_200
    for cut in range(1, len(stream)):
        statuses, reader = feed_all([stream[:cut], stream[cut:]])
        assert statuses == [404, 200], cut
        assert reader.closing


def test_http_1_0_response_closes_the_connection() -> None:
    statuses, reader = feed_all([b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert statuses == [200]
    assert reader.closing


def test_http_1_0_keep_alive_keeps_the_connection() -> None:
    response = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    statuses, reader = feed_all([response])
    assert statuses == [200]
    assert not reader.closing


def test_close_delimited_body_is_answered_at_eof() -> None:
    statuses, reader = feed_all([b"HTTP/1.1 200 OK\r\n\r\nbody until ", b"the connection closes"])
    assert statuses == []
    assert reader.eof() == 200


def test_response_cut_short_in_its_body_counts_as_answered_at_eof() -> None:
    # The cache acted on the PURGE once it sent its status line and headers.
    statuses, reader = feed_all([VARNISH_200[:-10]])
    assert statuses == []
    assert reader.eof() == 200


def test_eof_after_complete_responses_answers_nothing_more() -> None:
    _, reader = feed_all([ATS_404])
    assert reader.eof() is None


def test_eof_in_the_middle_of_the_headers_answers_nothing() -> None:
    _, reader = feed_all([ATS_404[:20]])
    assert reader.eof() is None


# --- garbage ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"garbage\r\n\r\n",
        b"<html>Hello</html>",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\x00\x01\x02\x03",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    ],
)
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ResponseReader().feed(data)


def test_garbage_after_a_good_response_is_a_protocol_error() -> None:
    reader = ResponseReader()
    assert reader.feed(ATS_404) == [404]
    with pytest.raises(ProtocolError):
        reader.feed(b"garbage\r\n\r\n")


# --- properties -------------------------------------------------------------------------

responses = st.sampled_from(
    [
        (VARNISH_200, 200),
        (ATS_404, 404),
        (EMPTY_200, 200),
        (NO_CONTENT_204, 204),
        (CHUNKED_200, 200),
        (CONTINUE_100 + ATS_404, 404),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nbad", 503),
    ]
)


@given(st.lists(responses, min_size=1, max_size=8), st.data())
@settings(max_examples=500)
def test_any_pipeline_split_anywhere_gives_the_statuses_in_order(
    pipeline: list[tuple[bytes, int]], data: st.DataObject
) -> None:
    stream = b"".join(raw for raw, _ in pipeline)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    statuses, reader = feed_all(chunks)
    assert statuses == [status for _, status in pipeline]
    assert not reader.closing
    assert reader.eof() is None


@given(st.lists(st.binary(max_size=64), max_size=6))
@settings(max_examples=1000)
def test_any_bytes_give_statuses_or_a_protocol_error(chunks: list[bytes]) -> None:
    reader = ResponseReader()
    try:
        for chunk in chunks:
            for status in reader.feed(chunk):
                assert 200 <= status <= 999
    except ProtocolError:
        return
    status = reader.eof()
    assert status is None or 100 <= status <= 999


@given(st.lists(st.binary(max_size=16), max_size=4), st.integers(0, len(PIPELINE)))
def test_good_responses_then_any_bytes_give_statuses_or_a_protocol_error(
    tail: list[bytes], cut: int
) -> None:
    reader = ResponseReader()
    try:
        reader.feed(PIPELINE[:cut])
        for chunk in tail:
            reader.feed(chunk)
    except ProtocolError:
        pass
