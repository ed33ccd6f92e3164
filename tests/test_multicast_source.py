"""The HTCP multicast source, with real multicast on loopback and a list for a pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from purged import multicast
from purged.htcp import HtcpError, decode_clr, encode_clr
from purged.logs import RateLimitedLog
from purged.metrics import REGISTRY
from purged.multicast import HtcpSource, open_socket, parse_groups
from purged.url import PurgeTarget, UrlError, parse_purge_url

GROUPS = ["239.128.0.112", "239.128.0.115"]


class ListSink:
    """A pipeline that keeps what it is given, and is full when the test says so."""

    def __init__(self) -> None:
        self.full = False
        self.targets: list[PurgeTarget] = []

    def submit(self, target: PurgeTarget, ticket: object | None = None) -> None:
        self.targets.append(target)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def counters() -> dict[str, float]:
    return {
        "good": sample("purged_htcp_packets_total", state="good"),
        "bad": sample("purged_htcp_packets_total", state="bad"),
        "bytes": sample("purged_udp_bytes_read_total"),
        "dropped": sample("purged_htcp_packets_dropped_total"),
    }


def increase(before: dict[str, float]) -> dict[str, float]:
    after = counters()
    return {name: after[name] - before[name] for name in before}


def loopback_sender() -> socket.socket:
    """A sender that joins nothing and multicasts out of lo, looping back to this host."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return sender


@contextlib.asynccontextmanager
async def running(source: HtcpSource) -> AsyncIterator[None]:
    """Run the source until the block ends; fail if it stops by itself."""
    task = asyncio.create_task(source.run())
    ready = asyncio.create_task(source.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what stopped it
        raise AssertionError("HtcpSource.run returned by itself")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def run(coroutine: Coroutine[Any, Any, None], use_uvloop: bool = False) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if use_uvloop else None) as runner:
        runner.run(asyncio.wait_for(coroutine, 30))


def urls(count: int, prefix: str = "wiki") -> list[str]:
    return [f"https://en.wikipedia.org/{prefix}/Page_{i}?action=purge" for i in range(count)]


# --- receiving ------------------------------------------------------------------------


async def every_url_arrives_from_both_groups() -> None:
    sink = ListSink()
    source = HtcpSource(sink, GROUPS, port=0, iface="127.0.0.1")
    sent = urls(100)
    before = counters()
    async with running(source):
        with loopback_sender() as sender:
            nbytes = 0
            for i, url in enumerate(sent):
                datagram = encode_clr(url, transaction_id=i, rfc_layout=i % 3 == 0)
                nbytes += sender.sendto(datagram, (GROUPS[i % 2], source.port))
        await wait_until(lambda: len(sink.targets) == len(sent))
    assert sink.targets == [parse_purge_url(url) for url in sent]
    assert increase(before) == {"good": 100, "bad": 0, "bytes": nbytes, "dropped": 0}


def test_every_url_sent_to_either_group_is_submitted() -> None:
    run(every_url_arrives_from_both_groups())


def test_every_url_sent_to_either_group_is_submitted_under_uvloop() -> None:
    run(every_url_arrives_from_both_groups(), use_uvloop=True)


MALFORMED = [
    b"",  # empty datagram
    b"\x00\x10" + b"\x00" * 14,  # shorter than 20 bytes
    encode_clr("https://en.wikipedia.org/x")[:-5],  # truncated: length field too large
    b"\xff\xff" + encode_clr("https://en.wikipedia.org/x")[2:],  # length field 65535
    b"\x00\x14\x00\x00\x00\x10\x04\x00" + b"\x00" * 6 + b"\xff\xff" + b"\x00" * 4,  # overrun
    bytes([*encode_clr("https://en.wikipedia.org/x")[:6], 0x02, 0]) + b"\x00" * 50,  # opcode
    encode_clr("https://en.wikipedia.org/" + "a" * 4000) + b"\x00" * 2000,  # over 4096 bytes
    encode_clr("ftp://en.wikipedia.org/x"),  # not an http(s) URL
    encode_clr("/wiki/Relative"),  # not absolute
    encode_clr("https://en.wikipedia.org/a b"),  # space in the URL
]


async def malformed_datagrams_do_not_stop_reading() -> None:
    sink = ListSink()
    source = HtcpSource(sink, GROUPS, port=0, iface="127.0.0.1")
    sent = urls(len(MALFORMED) + 1)
    before = counters()
    async with running(source):
        with loopback_sender() as sender:
            nbytes = 0
            for i, url in enumerate(sent):
                nbytes += sender.sendto(encode_clr(url), (GROUPS[i % 2], source.port))
                if i < len(MALFORMED):
                    nbytes += sender.sendto(MALFORMED[i], (GROUPS[i % 2], source.port))
        await wait_until(lambda: len(sink.targets) == len(sent))
        await wait_until(lambda: increase(before)["bad"] == len(MALFORMED))
    assert sink.targets == [parse_purge_url(url) for url in sent]
    assert increase(before) == {
        "good": len(sent),
        "bad": len(MALFORMED),
        "bytes": nbytes,
        "dropped": 0,
    }


def test_malformed_datagrams_are_counted_bad_and_reading_goes_on() -> None:
    run(malformed_datagrams_do_not_stop_reading())


def test_bad_datagrams_are_logged_without_flooding_the_log(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh limiter: earlier tests may have used up the shared one's allowance.
    monkeypatch.setattr(multicast, "ratelimited", RateLimitedLog())

    async def scenario() -> None:
        sink = ListSink()
        source = HtcpSource(sink, GROUPS[:1], port=0, iface="127.0.0.1")
        before = counters()
        async with running(source):
            with loopback_sender() as sender:
                for _ in range(200):
                    sender.sendto(b"garbage that is not a CLR", (GROUPS[0], source.port))
            await wait_until(lambda: increase(before)["bad"] == 200)

    with caplog.at_level(logging.WARNING, logger="purged"):
        run(scenario())
    lines = [r for r in caplog.records if "bad datagram" in r.getMessage()]
    assert 1 <= len(lines) < 5
    assert "(length)" in lines[0].getMessage()


@given(st.binary(max_size=200) | st.builds(encode_clr, st.text(min_size=1, max_size=100)))
@settings(max_examples=500)
def test_any_datagram_is_either_good_or_bad_never_an_unexpected_error(datagram: bytes) -> None:
    # What the reader callback does with each datagram: only these two errors may come out.
    with contextlib.suppress(HtcpError, UrlError):
        parse_purge_url(decode_clr(datagram).uri)


# --- backpressure ---------------------------------------------------------------------


async def full_sink_drops_and_counts() -> None:
    sink = ListSink()
    sink.full = True
    source = HtcpSource(sink, GROUPS, port=0, iface="127.0.0.1")
    before = counters()
    async with running(source):
        with loopback_sender() as sender:
            for i, url in enumerate(urls(50, "dropped")):
                sender.sendto(encode_clr(url), (GROUPS[i % 2], source.port))
            await wait_until(lambda: increase(before)["good"] == 50)
            assert sink.targets == []
            assert increase(before)["dropped"] == 50
            sink.full = False
            for i, url in enumerate(urls(10, "kept")):
                sender.sendto(encode_clr(url), (GROUPS[i % 2], source.port))
            await wait_until(lambda: len(sink.targets) == 10)
    assert sink.targets == [parse_purge_url(url) for url in urls(10, "kept")]
    assert increase(before)["dropped"] == 50
    assert increase(before)["good"] == 60


def test_good_packets_are_dropped_and_counted_while_the_pipeline_is_full() -> None:
    run(full_sink_drops_and_counts())


def kernel_drops(port: int) -> int:
    """Datagrams the kernel dropped for the UDP socket bound to *:port (receive buffer full)."""
    with open("/proc/net/udp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"00000000:{port:04X}":
                return int(fields[-1])
    raise AssertionError(f"no UDP socket on port {port}")


class BoundedSink:
    """Full while `capacity` purges wait; the test's drain task empties it now and then."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.waiting = 0
        self.submitted = 0

    @property
    def full(self) -> bool:
        return self.waiting >= self.capacity

    def submit(self, target: PurgeTarget, ticket: object | None = None) -> None:
        assert not self.full
        self.waiting += 1
        self.submitted += 1


def test_burst_of_100000_packets_is_all_submitted_or_counted_dropped() -> None:
    count = 100_000
    datagrams = [encode_clr(url) for url in urls(count, "burst")]

    async def scenario() -> None:
        sink = BoundedSink(capacity=200)
        source = HtcpSource(sink, GROUPS, port=0, iface="127.0.0.1")
        before = counters()
        async with running(source):

            def send() -> None:
                with loopback_sender() as sender:
                    for i, datagram in enumerate(datagrams):
                        sender.sendto(datagram, (GROUPS[i % 2], source.port))

            async def drain() -> None:
                while True:
                    await asyncio.sleep(0.01)
                    sink.waiting = 0

            drainer = asyncio.create_task(drain())
            sending = threading.Thread(target=send)
            sending.start()
            await asyncio.to_thread(sending.join)
            await wait_until(
                lambda: increase(before)["good"] + kernel_drops(source.port) == count,
                timeout=20,
            )
            lost = kernel_drops(source.port)
            drainer.cancel()
        counted = increase(before)
        print(f"submitted {sink.submitted}, dropped {counted['dropped']:.0f}, kernel lost {lost}")
        assert counted["bad"] == 0
        assert sink.submitted + counted["dropped"] == counted["good"] == count - lost
        assert sink.submitted > 0 and counted["dropped"] > 0
        total_bytes = sum(len(d) for d in datagrams)
        assert counted["bytes"] == total_bytes if lost == 0 else counted["bytes"] < total_bytes

    run(scenario())


# --- the socket -----------------------------------------------------------------------


def test_cancelling_run_closes_the_socket() -> None:
    async def scenario() -> int:
        source = HtcpSource(ListSink(), GROUPS, port=0, iface="127.0.0.1")
        async with running(source):
            pass
        return source.port

    port = asyncio.run(scenario())
    # Without SO_REUSEADDR this bind fails while the source's socket is still open.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("0.0.0.0", port))


def test_run_raises_when_a_group_cannot_be_joined() -> None:
    async def scenario() -> None:
        # A documentation address (TEST-NET-1): no interface here has it.
        source = HtcpSource(ListSink(), GROUPS, port=0, iface="192.0.2.1")
        with pytest.raises(OSError, match=r"cannot join multicast group 239\.128\.0\.112"):
            await source.run()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (["10.0.0.1"], "not an IPv4 multicast group"),
        (["239.128.0.112:4827"], "not an IPv4 address"),
        (["ff02::1"], "not an IPv4 address"),
        ([], "no multicast group"),
    ],
)
def test_open_socket_refuses_what_is_not_a_multicast_group(groups: list[str], message: str) -> None:
    with pytest.raises(OSError, match=message):
        open_socket(groups, 0)


def test_open_socket_refuses_an_interface_that_is_not_an_ipv4_address() -> None:
    with pytest.raises(OSError, match="eth0"):
        open_socket(GROUPS, 0, iface="eth0")


def test_receive_buffer_is_set_and_its_size_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="purged"):
        sock = open_socket(GROUPS, 0, iface="127.0.0.1", bufsize=1 << 20)
    with sock:
        given_size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert sock.getblocking() is False
    assert given_size >= 1 << 20  # forced as root; Linux reports double what it was asked
    assert any(f"receive buffer is {given_size} bytes" in r.getMessage() for r in caplog.records)


def test_parse_groups_reads_the_flag() -> None:
    assert parse_groups("239.128.0.112,239.128.0.115") == GROUPS
    assert parse_groups(" 239.128.0.112 , 239.128.0.115, 239.128.0.112,") == GROUPS
    assert parse_groups("") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("239.128.0.112,10.0.0.1", "'10.0.0.1' is not an IPv4 multicast group"),
        ("239.128.0.300", "'239.128.0.300' is not an IPv4 address"),
        ("mcast.example.org", "'mcast.example.org' is not an IPv4 address"),
    ],
)
def test_parse_groups_names_the_bad_item(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_groups(text)


# --- INADDR_ANY, as production joins ----------------------------------------------------

RECEIVER = textwrap.dedent(
    """
    import asyncio, json, socket, sys
    from purged.htcp import encode_clr
    from purged.multicast import HtcpSource

    GROUPS = ["239.128.0.112", "239.128.0.115"]

    class Sink:
        full = False
        def __init__(self):
            self.targets = []
        def submit(self, target, ticket=None):
            self.targets.append(list(target))

    async def main():
        sink = Sink()
        source = HtcpSource(sink, GROUPS)  # port 4827, all interfaces: the defaults
        task = asyncio.create_task(source.run())
        await source.ready.wait()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i, group in enumerate(GROUPS):
                sender.sendto(encode_clr(f"http://en.wikipedia.org/{i}"), (group, 4827))
        while len(sink.targets) < len(GROUPS):
            await asyncio.sleep(0.01)
        task.cancel()
        print(json.dumps(sink.targets))

    asyncio.run(asyncio.wait_for(main(), 10))
    """
)


def test_joining_on_all_interfaces_works_in_a_private_network_namespace() -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"unshare --net is not permitted here: {probe.stderr.decode().strip()}")
    # Only lo exists in the namespace: route multicast there, as the default route would.
    script = 'ip link set lo up && ip route add 224.0.0.0/4 dev lo && exec "$0" -c "$1"'
    done = subprocess.run(
        [unshare, "--net", "sh", "-c", script, sys.executable, RECEIVER],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr.decode()
    received = json.loads(done.stdout.decode().splitlines()[-1])
    assert sorted(received) == [["en.wikipedia.org", "/0"], ["en.wikipedia.org", "/1"]]
