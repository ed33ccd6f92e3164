"""HTCP CLR packets (RFC 2756) ↔ bytes, sans-I/O: no sockets, no metrics, no logging.

A CLR is what MediaWiki multicasts to ask caches to forget a URL. The layout, big-endian:

    0-1   total length of the message (MediaWiki: 36 + len(URI) with HEAD and HTTP/1.0)
    2-3   protocol version, major and minor (0, 0)
    4-5   DATA length (from offset 4 to the end of the CLR's OP-DATA)
    6     opcode CLR = 4: MediaWiki and Squid put it in the low nibble (0x04), the RFC in
          the high nibble (0x4R, R the response code, meaningless in a request)
    7     reserved bits, F1 and RR (their positions differ between those layouts: ignored)
    8-11  transaction id
    12-13 CLR reserved bits and reason
    14-   four COUNTSTRs (u16 length, then that many bytes): METHOD, URI, VERSION, REQ-HDRS
    then  AUTH: u16 length (2 = no authentication), counting itself

Every length field is checked against the bytes actually received: a datagram that lies
about its lengths is refused with an `HtcpError`, never read past its end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_DATAGRAM = 4096  # receivers of the original and Squid cap HTCP datagrams at 4096 bytes
MIN_DATAGRAM = 20  # below this not even the fixed headers and the METHOD length fit

_CLR_LOW_NIBBLE = 0x04  # MediaWiki and Squid
_CLR_HIGH_NIBBLE = 0x40  # RFC 2756
# total length, (version skipped), DATA length, opcode byte, (flags skipped), transaction id,
# (CLR reserved/reason skipped): the 14 fixed bytes before the COUNTSTRs.
_HEADER = struct.Struct(">HxxHBxIxx")
_FIXED_DATA = 10  # DATA length, opcode and flags, transaction id, CLR reserved/reason
_U16 = struct.Struct(">H")
_unpack_u16 = _U16.unpack_from
_NO_AUTH = b"\x00\x02"


class HtcpError(ValueError):
    """The datagram is not a well-formed HTCP CLR; `reason` names the check that failed.

    Reasons: too_big, short, length, opcode, data_length, countstr, auth, uri_empty,
    uri_encoding. The message says more, for logs.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClrPacket:
    """One decoded CLR request: the URI to purge and what came with it."""

    transaction_id: int
    method: str
    uri: str
    version: str


def decode_clr(datagram: bytes | bytearray | memoryview) -> ClrPacket:
    """Decode one HTCP CLR datagram (either opcode layout), or raise HtcpError.

    Raises nothing but HtcpError, whatever the bytes. The URI is returned as sent; whether
    it is a URL we can purge is for the caller to decide.
    """
    size = len(datagram)
    if size > MAX_DATAGRAM:
        raise HtcpError("too_big", f"datagram of {size} bytes is over {MAX_DATAGRAM}")
    if size < MIN_DATAGRAM:
        raise HtcpError("short", f"datagram of {size} bytes is shorter than {MIN_DATAGRAM}")
    total, data_length, opcode, transaction_id = _HEADER.unpack_from(datagram)
    # Like Squid, a length that differs from the datagram is refused: a message is exactly
    # one datagram, and trailing or missing bytes mean it is not what the sender meant.
    if total != size:
        raise HtcpError("length", f"length field says {total} bytes, datagram has {size}")
    if opcode != _CLR_LOW_NIBBLE and opcode >> 4 != _CLR_HIGH_NIBBLE >> 4:
        raise HtcpError("opcode", f"opcode byte 0x{opcode:02x} is not CLR")
    data_end = 4 + data_length
    if data_length < _FIXED_DATA or data_end > size:
        raise HtcpError(
            "data_length", f"DATA length {data_length} does not fit a {size}-byte message"
        )
    method_end = _countstr_end(datagram, 14, data_end, "METHOD")
    uri_end = _countstr_end(datagram, method_end, data_end, "URI")
    version_end = _countstr_end(datagram, uri_end, data_end, "VERSION")
    _countstr_end(datagram, version_end, data_end, "REQ-HDRS")
    auth_bytes = size - data_end
    # AUTH is checked only for consistency (we do not authenticate); a sender that leaves
    # it out entirely is tolerated, as it costs nothing to be lenient there.
    if auth_bytes and (auth_bytes < 2 or _unpack_u16(datagram, data_end)[0] != auth_bytes):
        raise HtcpError("auth", f"AUTH length does not match the {auth_bytes} bytes after DATA")
    uri_start = method_end + 2
    if uri_start == uri_end:
        raise HtcpError("uri_empty", "URI is empty")
    # UTF-8, strictly: MediaWiki sends UTF-8, and latin-1 would silently turn a non-ASCII
    # URL into the wrong percent-encoding (a purge of a URL nobody cached); a URI that is
    # not UTF-8 cannot be purged correctly, so it is refused and counted instead.
    try:
        uri = str(datagram[uri_start:uri_end], "utf-8")
    except UnicodeDecodeError:
        raise HtcpError("uri_encoding", "URI is not valid UTF-8") from None
    # METHOD and VERSION are informational: latin-1 never fails, so they never cost a purge.
    return ClrPacket(
        transaction_id,
        str(datagram[16:method_end], "latin-1"),
        uri,
        str(datagram[uri_end + 2 : version_end], "latin-1"),
    )


def _countstr_end(
    datagram: bytes | bytearray | memoryview, offset: int, data_end: int, name: str
) -> int:
    """Offset just past the COUNTSTR at `offset`, checked to end within DATA."""
    if offset + 2 > data_end:
        raise HtcpError("countstr", f"{name} length field runs past the end of DATA")
    end: int = offset + 2 + _unpack_u16(datagram, offset)[0]
    if end > data_end:
        raise HtcpError("countstr", f"{name} length runs past the end of DATA")
    return end


def encode_clr(
    uri: str,
    transaction_id: int = 0,
    method: str = "HEAD",
    version: str = "HTTP/1.0",
    rfc_layout: bool = False,
) -> bytes:
    """Build a CLR request for `uri`, byte for byte as MediaWiki sends it.

    With `rfc_layout=True` the opcode goes in the high nibble of byte 6, as RFC 2756 says.
    The URI is encoded as UTF-8, METHOD and VERSION as latin-1. Raises HtcpError
    (uri_empty, too_big) for what no receiver would accept, ValueError for a transaction
    id outside 0..2**32-1 or text that cannot be encoded.
    """
    uri_bytes = uri.encode("utf-8")
    if not uri_bytes:
        raise HtcpError("uri_empty", "URI is empty")
    method_bytes = method.encode("latin-1")
    version_bytes = version.encode("latin-1")
    if not 0 <= transaction_id <= 0xFFFFFFFF:
        raise ValueError(f"transaction id {transaction_id} is not a 32-bit unsigned integer")
    # Four COUNTSTR length fields, the strings, and REQ-HDRS empty.
    specifier_length = 8 + len(method_bytes) + len(uri_bytes) + len(version_bytes)
    data_length = _FIXED_DATA + specifier_length
    total = 4 + data_length + len(_NO_AUTH)
    if total > MAX_DATAGRAM:
        raise HtcpError("too_big", f"CLR of {total} bytes is over {MAX_DATAGRAM}")
    opcode = _CLR_HIGH_NIBBLE if rfc_layout else _CLR_LOW_NIBBLE
    return b"".join(
        (
            _HEADER.pack(total, data_length, opcode, transaction_id),
            _U16.pack(len(method_bytes)),
            method_bytes,
            _U16.pack(len(uri_bytes)),
            uri_bytes,
            _U16.pack(len(version_bytes)),
            version_bytes,
            b"\x00\x00",  # REQ-HDRS: none
            _NO_AUTH,
        )
    )
