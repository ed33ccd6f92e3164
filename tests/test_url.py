"""URL → PURGE request: the Host and request-target a cache receives, and what is refused."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from purged.url import PurgeTarget, UrlError, encode_purge, parse_purge_url, purge_request

# --- Host and request-target --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "target"),
    [
        ("https://en.wikipedia.org/wiki/Main_Page", "en.wikipedia.org", "/wiki/Main_Page"),
        ("http://en.wikipedia.org/wiki/Main_Page", "en.wikipedia.org", "/wiki/Main_Page"),
        (
            "https://en.m.wikipedia.org/w/index.php?title=Special:Search&search=x",
            "en.m.wikipedia.org",
            "/w/index.php?title=Special:Search&search=x",
        ),
        ("https://upload.wikimedia.org/a/b.jpg", "upload.wikimedia.org", "/a/b.jpg"),
        ("HTTPS://en.wikipedia.org/x", "en.wikipedia.org", "/x"),
    ],
)
def test_host_and_path_with_query(url: str, host: str, target: str) -> None:
    assert parse_purge_url(url) == PurgeTarget(host, target)


def test_empty_path_becomes_slash() -> None:
    assert parse_purge_url("https://en.wikipedia.org") == PurgeTarget("en.wikipedia.org", "/")


def test_query_without_path_gets_a_slash() -> None:
    assert parse_purge_url("https://h.example?action=raw").target == "/?action=raw"


def test_empty_query_is_kept() -> None:
    assert parse_purge_url("https://h.example/p?").target == "/p?"


def test_existing_percent_encoding_is_kept_byte_for_byte() -> None:
    url = "https://de.wikipedia.org/wiki/Stra%C3%9Fe?x=%2f%2F%20&y=a%2Bb"
    assert parse_purge_url(url).target == "/wiki/Stra%C3%9Fe?x=%2f%2F%20&y=a%2Bb"


def test_malformed_percent_encoding_is_kept_as_sent() -> None:
    assert parse_purge_url("https://h.example/100%25_%ZZ%").target == "/100%25_%ZZ%"


def test_encoded_cr_lf_stay_encoded() -> None:
    # %0D%0A is harmless as three characters each; only raw CR LF could inject a header.
    assert parse_purge_url("https://h.example/a%0D%0AX:%20y").target == "/a%0D%0AX:%20y"


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("https://de.wikipedia.org/wiki/Straße", "/wiki/Stra%C3%9Fe"),
        ("https://ja.wikipedia.org/wiki/日本", "/wiki/%E6%97%A5%E6%9C%AC"),
        ("https://en.wikipedia.org/wiki/😀", "/wiki/%F0%9F%98%80"),
        ("https://h.example/p?q=ü&r=%C3%BC", "/p?q=%C3%BC&r=%C3%BC"),
        ("https://h.example/\u2028", "/%E2%80%A8"),  # a Unicode line separator is no CR/LF
    ],
)
def test_non_ascii_is_percent_encoded_as_utf8(url: str, target: str) -> None:
    assert parse_purge_url(url).target == target


def test_non_ascii_host_is_sent_in_punycode() -> None:
    assert parse_purge_url("https://bücher.example/x").host == "xn--bcher-kva.example"


def test_fragment_is_dropped() -> None:
    assert parse_purge_url("https://h.example/p?q=1#section").target == "/p?q=1"
    assert parse_purge_url("https://h.example/p#a?b").target == "/p"
    assert parse_purge_url("https://h.example#top") == PurgeTarget("h.example", "/")


def test_non_ascii_fragment_is_dropped_before_encoding() -> None:
    assert parse_purge_url("https://h.example/p#ü") == PurgeTarget("h.example", "/p")


def test_userinfo_is_dropped() -> None:
    assert parse_purge_url("https://user:secret@h.example/p") == PurgeTarget("h.example", "/p")
    assert parse_purge_url("https://a@b@h.example/p").host == "h.example"


def test_port_is_kept_in_host() -> None:
    assert parse_purge_url("http://h.example:8080/p") == PurgeTarget("h.example:8080", "/p")


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://[::1]/p", "[::1]"),
        ("http://[::1]:8080/p", "[::1]:8080"),
        ("http://[2001:db8::7]/p", "[2001:db8::7]"),
        ("http://[::ffff:127.0.0.1]:80/p", "[::ffff:127.0.0.1]:80"),
    ],
)
def test_ipv6_host_keeps_its_brackets(url: str, host: str) -> None:
    assert parse_purge_url(url) == PurgeTarget(host, "/p")


def test_ipv4_host() -> None:
    assert parse_purge_url("http://127.0.0.1:3128/p") == PurgeTarget("127.0.0.1:3128", "/p")


# --- refused URLs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://h.example/a b",
        "https://h.example/a\tb",
        "https://h.example/a\r\nX-Injected: 1",
        "https://h.example/a\nb",
        "https://h.example/a\rb",
        "https://h.example/a\x00",
        "https://h.example/a\x7f",
        "https://h.example/a\x85",  # C1 control (NEL)
        "https://h.example/a\x9b",  # C1 control (CSI)
        "https://h.example/p?q=1 HTTP/1.1\r\nHost: evil",
        "https://h.example\r\n/p",
        " https://h.example/p",
        "https://h.example/p ",
        "https://h.example/p#frag ment",
    ],
)
def test_control_characters_and_spaces_are_refused(url: str) -> None:
    with pytest.raises(UrlError, match="control character or space"):
        parse_purge_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https:///p",
        "https://",
        "https://?q",
        "https://#f",
        "https://user@/p",
        "https://:80/p",
        "https://[::1/p",
        "https://::1/p",  # IPv6 without brackets
        "https://h%2eexample/p",  # percent-encoded host
        "https://h\\evil.example/p",
        'https://h"x/p',
        "https://h<x>/p",
    ],
)
def test_missing_or_invalid_host_is_refused(url: str) -> None:
    with pytest.raises(UrlError, match="host"):
        parse_purge_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "/wiki/Main_Page",
        "//en.wikipedia.org/wiki/Main_Page",
        "en.wikipedia.org/wiki/Main_Page",
        "ftp://h.example/p",
        "file:///etc/passwd",
        "https:/h.example/p",
        "mailto:a@h.example",
    ],
)
def test_anything_but_an_absolute_http_url_is_refused(url: str) -> None:
    with pytest.raises(UrlError, match="http"):
        parse_purge_url(url)


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(UrlError):
        parse_purge_url("https://h.example/\ud800")


# --- the PURGE request -------------------------------------------------------------------


def test_purge_request_bytes_exactly() -> None:
    assert (
        encode_purge(PurgeTarget("h", "/p?q"))
        == b"PURGE /p?q HTTP/1.1\r\nHost: h\r\nUser-Agent: purged\r\n\r\n"
    )


def test_purge_request_of_a_url() -> None:
    host, request = purge_request("https://de.wikipedia.org/wiki/Straße?a=1#x")
    assert host == "de.wikipedia.org"
    assert request == (
        b"PURGE /wiki/Stra%C3%9Fe?a=1 HTTP/1.1\r\n"
        b"Host: de.wikipedia.org\r\n"
        b"User-Agent: purged\r\n"
        b"\r\n"
    )


def test_purge_request_of_an_unsafe_url_is_refused() -> None:
    with pytest.raises(UrlError):
        purge_request("https://h.example/a\r\nHost: evil")


# --- properties --------------------------------------------------------------------------

# Controls, space and DEL; none of them may reach the request line or the Host header.
FORBIDDEN = re.compile(r"[\x00-\x20\x7f-\x9f]")
HOST_CHARS = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:\[\]-]+")
REQUEST = re.compile(
    rb"PURGE (/[\x21-\x7e]*) HTTP/1\.1\r\nHost: ([\x21-\x7e]+)\r\nUser-Agent: purged\r\n\r\n"
)

any_text = st.text(max_size=200)
# URL-shaped text: a scheme, then an authority and path from a mix of URL characters,
# non-ASCII, controls and the characters that matter to the parser.
url_chars = st.sampled_from(
    list("/?#@:[]%.-_~!$&'()*+,;=aZ09 \t\r\n\x00\x7f\x85üß日😀\u2028\ud800")
)
url_text = st.builds(
    lambda scheme, rest: scheme + "".join(rest),
    st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "", "https:/"]),
    st.lists(url_chars | st.characters(), max_size=60),
)


def check_parse(url: str) -> None:
    try:
        target = parse_purge_url(url)
    except UrlError:
        return
    assert isinstance(target, PurgeTarget)
    for part in target:
        assert part.isascii()
        assert not FORBIDDEN.search(part)
    assert HOST_CHARS.fullmatch(target.host)
    assert target.target.startswith("/")
    assert "#" not in target.target
    # The encoded request is exactly one request line and two headers, whatever the URL.
    request = encode_purge(target)
    match = REQUEST.fullmatch(request)
    assert match is not None, request
    assert match.groups() == (target.target.encode(), target.host.encode())


@given(any_text)
@settings(max_examples=1000)
@example("https://h.example/\r\nHost: evil")
@example("https://h.example/\x85")
def test_any_text_gives_a_safe_target_or_a_url_error(url: str) -> None:
    check_parse(url)


@given(url_text)
@settings(max_examples=3000)
def test_url_shaped_text_gives_a_safe_target_or_a_url_error(url: str) -> None:
    check_parse(url)


@given(
    st.sampled_from(["http", "https"]),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    st.text(
        st.characters(exclude_categories=["Cs", "Cc", "Zs"], exclude_characters="#"), max_size=80
    ),
)
def test_urls_without_controls_or_spaces_are_accepted_and_keep_their_ascii(
    scheme: str, host: str, path: str
) -> None:
    target = parse_purge_url(f"{scheme}://{host}/{path}")
    assert target.host == host
    # ASCII is kept as sent; the rest is percent-encoded UTF-8.
    expected = "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in path)
    assert target.target == "/" + expected
