"""URL → PURGE request (sans-I/O): split a URL into Host and request-target, safely.

Hand-written rather than `urllib.parse` because we need exactly three things it does not
give cheaply on the hot path: keep existing percent-encoding byte for byte, percent-encode
non-ASCII as UTF-8, and refuse anything that could break out of the request line or a
header (controls, spaces). It runs once per URL, so it is kept to a few string operations.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Controls (C0, DEL, C1) and space: never allowed anywhere in a URL we forward.
_UNSAFE = re.compile(r"[\x00-\x20\x7f-\x9f]")
# Characters of a host[:port] (reg-name, IPv4, [IPv6]); percent-encoded hosts are refused.
_HOST = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")
_USER_AGENT = b"purged"
# Longer URLs are refused: Varnish resets the connection without an answer when a request
# head exceeds its http_req_size (32 KiB), so such a purge would be re-sent forever.
MAX_URL_LENGTH = 8192


class UrlError(ValueError):
    """The URL cannot be purged; the message says why (it is logged, rate-limited)."""


class PurgeTarget(NamedTuple):
    """Where a PURGE goes: the Host header value and the request-target."""

    host: str
    target: str


def parse_purge_url(uri: str) -> PurgeTarget:
    """Split an absolute http(s) URL into its Host and its path?query, or raise UrlError.

    The fragment is dropped; an empty path becomes "/"; userinfo is dropped; non-ASCII is
    percent-encoded as UTF-8 and existing percent-encoding is kept as sent.
    """
    if len(uri) > MAX_URL_LENGTH:
        raise UrlError(f"URL longer than {MAX_URL_LENGTH} characters")
    if _UNSAFE.search(uri):
        raise UrlError("control character or space in URL")
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise UrlError("not an absolute http(s) URL")
    end = len(rest)
    for stop in ("/", "?", "#"):
        index = rest.find(stop)
        if 0 <= index < end:
            end = index
    authority, target = rest[:end], rest[end:]
    host = authority.rpartition("@")[2]
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise UrlError("host is not a valid internationalised name") from None
    if not host or not _HOST.fullmatch(host) or host.startswith(":"):
        raise UrlError("missing or invalid host")
    target = target.partition("#")[0]
    if not target.startswith("/"):
        target = "/" + target
    if not target.isascii():
        target = _percent_encode_non_ascii(target)
        if len(target) > MAX_URL_LENGTH:
            raise UrlError(f"URL longer than {MAX_URL_LENGTH} bytes once percent-encoded")
    return PurgeTarget(host, target)


def _percent_encode_non_ascii(text: str) -> str:
    out = []
    for char in text:
        if char.isascii():
            out.append(char)
        else:
            try:
                encoded = char.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a broken decoder
                raise UrlError("URL is not valid Unicode") from None
            out.extend(f"%{byte:02X}" for byte in encoded)
    return "".join(out)


def encode_purge(target: PurgeTarget) -> bytes:
    """The complete PURGE request for a target (both layers send the same bytes)."""
    return b"".join(
        (
            b"PURGE ",
            target.target.encode("ascii"),
            b" HTTP/1.1\r\nHost: ",
            target.host.encode("ascii"),
            b"\r\nUser-Agent: ",
            _USER_AGENT,
            b"\r\n\r\n",
        )
    )


def purge_request(uri: str) -> tuple[str, bytes]:
    """Host and complete PURGE request for a URL, or raise UrlError."""
    target = parse_purge_url(uri)
    return target.host, encode_purge(target)
