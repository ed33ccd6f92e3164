"""The HTCP CLR codec, from bytes: what MediaWiki and the RFC send, and what nobody should."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from purged.htcp import MAX_DATAGRAM, ClrPacket, HtcpError, decode_clr, encode_clr

URLS = [
    "https://en.wikipedia.org/wiki/Main_Page",
    "http://upload.wikimedia.org/wikipedia/commons/a/a9/Example.jpg",
    "https://en.m.wikipedia.org/w/index.php?title=Special:Search&search=x%20y",
    "https://de.wikipedia.org/wiki/Stra%C3%9Fe",
]
# The longest URL that still fits 4096 bytes: 36 bytes of HTCP around it.
LONGEST_URL = "https://en.wikipedia.org/" + "a" * (MAX_DATAGRAM - 36 - 25)


def clr(
    uri: bytes,
    *,
    method: bytes = b"HEAD",
    version: bytes = b"HTTP/1.0",
    headers: bytes = b"",
    opcode: int = 0x04,
    transaction_id: int = 0,
    auth: bytes = b"\x00\x02",
) -> bytes:
    """A CLR assembled field by field, with consistent lengths (break them afterwards)."""
    specifier = b"".join(
        struct.pack(">H", len(field)) + field for field in (method, uri, version, headers)
    )
    data = struct.pack(">BBIH", opcode, 0, transaction_id, 0) + specifier
    data = struct.pack(">H", 2 + len(data)) + data
    return struct.pack(">HBB", 4 + len(data) + len(auth), 0, 0) + data + auth


def reason_of(datagram: bytes) -> str:
    with pytest.raises(HtcpError) as caught:
        decode_clr(datagram)
    return caught.value.reason


# --- what MediaWiki sends -------------------------------------------------------------


def test_encode_matches_mediawiki_byte_for_byte() -> None:
    url = "https://en.wikipedia.org/wiki/Main_Page"
    length = len(url)
    by_hand = (
        (36 + length).to_bytes(2, "big")  # 0-1 total length
        + b"\x00\x00"  # 2-3 version 0.0
        + (30 + length).to_bytes(2, "big")  # 4-5 DATA length
        + b"\x04"  # 6 opcode CLR, low nibble (Squid's bit order)
        + b"\x00"  # 7 flags
        + (0x01020304).to_bytes(4, "big")  # 8-11 transaction id
        + b"\x00\x00"  # 12-13 CLR reserved/reason
        + b"\x00\x04HEAD"  # METHOD
        + length.to_bytes(2, "big")
        + url.encode()  # URI
        + b"\x00\x08HTTP/1.0"  # VERSION
        + b"\x00\x00"  # REQ-HDRS, empty
        + b"\x00\x02"  # AUTH: none
    )
    assert encode_clr(url, transaction_id=0x01020304) == by_hand
    assert len(by_hand) == 36 + length


@pytest.mark.parametrize("url", URLS)
def test_mediawiki_packets_decode_to_their_url(url: str) -> None:
    packet = decode_clr(clr(url.encode(), transaction_id=42))
    assert packet == ClrPacket(transaction_id=42, method="HEAD", uri=url, version="HTTP/1.0")


def test_non_ascii_url_decodes_from_utf8() -> None:
    url = "https://de.wikipedia.org/wiki/Straße_(Ägypten)"
    datagram = encode_clr(url)
    assert len(datagram) == 36 + len(url.encode("utf-8"))
    assert decode_clr(datagram).uri == url


def test_longest_url_that_fits_4096_bytes_decodes() -> None:
    datagram = encode_clr(LONGEST_URL)
    assert len(datagram) == MAX_DATAGRAM
    assert decode_clr(datagram).uri == LONGEST_URL


def test_encoding_a_url_one_byte_too_long_is_refused() -> None:
    with pytest.raises(HtcpError) as caught:
        encode_clr(LONGEST_URL + "a")
    assert caught.value.reason == "too_big"


def test_decoder_accepts_a_memoryview_of_a_receive_buffer() -> None:
    buffer = bytearray(MAX_DATAGRAM + 1)
    datagram = encode_clr(URLS[0])
    buffer[: len(datagram)] = datagram
    assert decode_clr(memoryview(buffer)[: len(datagram)]).uri == URLS[0]


def test_packet_without_auth_is_accepted() -> None:
    assert decode_clr(clr(URLS[0].encode(), auth=b"")).uri == URLS[0]


def test_request_headers_are_skipped() -> None:
    packet = clr(URLS[0].encode(), headers=b"Host: en.wikipedia.org\r\n")
    assert decode_clr(packet).uri == URLS[0]


# --- the RFC's layout -----------------------------------------------------------------


def test_rfc_layout_packet_decodes() -> None:
    packet = decode_clr(clr(URLS[1].encode(), opcode=0x40, transaction_id=7))
    assert packet == ClrPacket(7, "HEAD", URLS[1], "HTTP/1.0")


def test_rfc_layout_ignores_the_response_nibble_of_a_request() -> None:
    assert decode_clr(clr(URLS[1].encode(), opcode=0x43)).uri == URLS[1]


def test_encode_in_rfc_layout_puts_the_opcode_in_the_high_nibble() -> None:
    datagram = encode_clr(URLS[0], rfc_layout=True)
    assert datagram[6] == 0x40
    assert datagram[:6] + datagram[7:] == encode_clr(URLS[0])[:6] + encode_clr(URLS[0])[7:]


# --- malformed datagrams --------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 14, 19])
def test_shorter_than_20_bytes_is_refused(size: int) -> None:
    assert reason_of(encode_clr(URLS[0])[:size]) == "short"


@pytest.mark.parametrize("opcode", [0x00, 0x01, 0x02, 0x03, 0x05, 0x10, 0x30, 0x14, 0xF4])
def test_other_opcodes_are_refused(opcode: int) -> None:
    assert reason_of(clr(URLS[0].encode(), opcode=opcode)) == "opcode"


def test_uri_length_zero_is_refused() -> None:
    assert reason_of(clr(b"")) == "uri_empty"


def test_uri_length_running_past_the_end_is_refused() -> None:
    # The Go original crashed here: a COUNTSTR length larger than the bytes that follow.
    datagram = bytearray(encode_clr(URLS[0]))
    datagram[16 + 4 : 16 + 4 + 2] = (len(URLS[0]) + 100).to_bytes(2, "big")
    assert reason_of(bytes(datagram)) == "countstr"


def test_countstr_length_of_65535_is_refused() -> None:
    datagram = bytearray(encode_clr(URLS[0]))
    datagram[16 + 4 : 16 + 4 + 2] = b"\xff\xff"
    assert reason_of(bytes(datagram)) == "countstr"


def test_method_length_past_the_end_is_refused() -> None:
    datagram = bytearray(encode_clr(URLS[0]))
    datagram[14:16] = (len(datagram)).to_bytes(2, "big")
    with pytest.raises(HtcpError, match="METHOD") as caught:
        decode_clr(bytes(datagram))
    assert caught.value.reason == "countstr"


def test_missing_request_headers_field_is_refused() -> None:
    datagram = bytearray(encode_clr(URLS[0]))
    del datagram[-4:-2]  # drop REQ-HDRS, then make every length agree again
    datagram[0:2] = len(datagram).to_bytes(2, "big")
    datagram[4:6] = (len(datagram) - 6).to_bytes(2, "big")
    with pytest.raises(HtcpError, match="REQ-HDRS") as caught:
        decode_clr(bytes(datagram))
    assert caught.value.reason == "countstr"


def test_total_length_larger_than_the_datagram_is_refused() -> None:
    datagram = bytearray(encode_clr(URLS[0]))
    datagram[0:2] = (len(datagram) + 1).to_bytes(2, "big")
    assert reason_of(bytes(datagram)) == "length"


def test_total_length_smaller_than_the_datagram_is_refused() -> None:
    assert reason_of(encode_clr(URLS[0]) + b"stale bytes of an earlier datagram") == "length"


def test_every_truncation_of_a_packet_is_refused() -> None:
    # The original purged the fragment of a short datagram, padded with stale bytes.
    datagram = encode_clr(URLS[0])
    for size in range(len(datagram)):
        with pytest.raises(HtcpError):
            decode_clr(datagram[:size])


@pytest.mark.parametrize("data_length", [0, 9, 1000])
def test_data_length_that_does_not_fit_is_refused(data_length: int) -> None:
    datagram = bytearray(encode_clr(URLS[0]))
    datagram[4:6] = data_length.to_bytes(2, "big")
    assert reason_of(bytes(datagram)) == "data_length"


def test_data_length_cutting_into_the_uri_is_refused() -> None:
    datagram = bytearray(encode_clr(URLS[0]))
    datagram[4:6] = (20).to_bytes(2, "big")  # DATA ends inside the URI
    assert reason_of(bytes(datagram)) == "countstr"


@pytest.mark.parametrize("auth", [b"\x00", b"\x00\x05\x00", b"\x00\x00", b"\x00\x02\x00"])
def test_auth_length_that_does_not_match_is_refused(auth: bytes) -> None:
    assert reason_of(clr(URLS[0].encode(), auth=auth)) == "auth"


def test_datagram_over_4096_bytes_is_refused() -> None:
    assert reason_of(encode_clr(LONGEST_URL) + b"x") == "too_big"
    assert reason_of(b"\x00" * 65507) == "too_big"


def test_uri_that_is_not_utf8_is_refused() -> None:
    assert reason_of(clr(b"https://en.wikipedia.org/wiki/Stra\xdfe")) == "uri_encoding"


def test_method_and_version_of_any_bytes_still_decode() -> None:
    packet = decode_clr(clr(URLS[0].encode(), method=b"\xff", version=b""))
    assert (packet.method, packet.uri, packet.version) == ("\xff", URLS[0], "")


def test_encode_refuses_an_empty_uri_and_a_bad_transaction_id() -> None:
    with pytest.raises(HtcpError) as caught:
        encode_clr("")
    assert caught.value.reason == "uri_empty"
    with pytest.raises(ValueError):
        encode_clr(URLS[0], transaction_id=2**32)


# --- properties -----------------------------------------------------------------------

# Non-empty URIs whose UTF-8 form fits a datagram (surrogates cannot be encoded).
uris = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=300)
packets = st.builds(
    encode_clr,
    uris,
    transaction_id=st.integers(0, 2**32 - 1),
    rfc_layout=st.booleans(),
)


@given(st.binary(max_size=MAX_DATAGRAM + 10))
@settings(max_examples=2000)
def test_any_bytes_decode_to_a_packet_or_an_htcp_error(datagram: bytes) -> None:
    try:
        assert isinstance(decode_clr(datagram), ClrPacket)
    except HtcpError as error:
        assert error.reason


@given(
    uris,
    st.integers(0, 2**32 - 1),
    st.text(st.characters(max_codepoint=255), max_size=20),
    st.text(st.characters(max_codepoint=255), max_size=20),
    st.booleans(),
)
def test_encode_then_decode_round_trips(
    uri: str, transaction_id: int, method: str, version: str, rfc_layout: bool
) -> None:
    datagram = encode_clr(uri, transaction_id, method, version, rfc_layout)
    assert decode_clr(datagram) == ClrPacket(transaction_id, method, uri, version)


@given(packets, st.data())
@settings(max_examples=1000)
def test_mutated_packets_decode_to_a_packet_or_an_htcp_error(
    datagram: bytes, data: st.DataObject
) -> None:
    mutated = bytearray(datagram)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    try:
        assert isinstance(decode_clr(bytes(mutated)), ClrPacket)
    except HtcpError as error:
        assert error.reason


@given(packets, st.data())
def test_packets_with_a_mutated_length_field_never_read_past_the_end(
    datagram: bytes, data: st.DataObject
) -> None:
    # Offsets of every length field in a MediaWiki packet: total, DATA, the four COUNTSTRs.
    method_at = 14
    uri_at = method_at + 2 + int.from_bytes(datagram[method_at : method_at + 2], "big")
    version_at = uri_at + 2 + int.from_bytes(datagram[uri_at : uri_at + 2], "big")
    headers_at = version_at + 2 + int.from_bytes(datagram[version_at : version_at + 2], "big")
    position = data.draw(st.sampled_from([0, 4, method_at, uri_at, version_at, headers_at]))
    value = data.draw(st.integers(0, 0xFFFF))
    mutated = bytearray(datagram)
    mutated[position : position + 2] = value.to_bytes(2, "big")
    try:
        packet = decode_clr(bytes(mutated))
    except HtcpError:
        return
    assert packet.uri.encode("utf-8") in datagram  # never bytes from beyond the datagram
