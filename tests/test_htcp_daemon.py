"""HTCP multicast into the running daemon: datagram → HtcpSource → pipeline → backend → frontend.

Every test runs the real `purged` as a subprocess. The sender joins nothing and multicasts
out of lo (``IP_MULTICAST_IF=127.0.0.1``, tests/support/mcast.py); the daemon joins on
127.0.0.1 (``-mcast_iface``), or on all interfaces inside a private network namespace. The
caches are recording servers, or the real Varnish → Traffic Server chain.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from purged.htcp import HtcpError, decode_clr, encode_clr
from purged.url import UrlError, parse_purge_url
from tests.support.ats import TrafficServer, via_hit
from tests.support.broker import Broker, make_event
from tests.support.mcast import send_htcp, sender_socket
from tests.support.origin import Origin
from tests.support.ports import Spawned, free_port, log_tail, spawn, stop_process_group
from tests.support.recorder import Recorder
from tests.support.varnish import Varnish

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("239.128.0.112", "239.128.0.115")  # Wikimedia's, as in production
HOST = "en.wikipedia.org"
# ATS can lose a PURGE that lands within ~1 ms of the GET miss that filled the object.
FILL_SETTLE = 0.02


def purged_command() -> str:
    """The `purged` console script of the environment running the tests."""
    beside = Path(sys.executable).with_name("purged")
    found = str(beside) if beside.exists() else shutil.which("purged")
    if found is None:
        pytest.fail("the purged command is not installed (./dev setup)")
    return found


def free_udp_port() -> int:
    """A UDP port nothing on this host was bound to a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:g} s: {what}")
        time.sleep(interval)


class Daemon:
    """One `purged` subprocess with its own metrics port and log file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        command = [purged_command(), *args, "-prometheus_addr", f"127.0.0.1:{self.metrics_port}"]
        with open(log_path, "wb") as log:  # the daemon writes to its own copy
            self.proc: Spawned = spawn(command, cwd=REPO, log=log)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until `text` appears in the log; fail at once if the daemon exits."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"purged exited ({self.proc.returncode}) before logging {text!r}:\n"
                    + log_tail(self.log_path)
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"purged did not log {text!r}:\n" + log_tail(self.log_path))
            time.sleep(0.02)

    def wait_ready(self) -> None:
        """Joined the groups (logged after the last join), and both caches connected."""
        self.wait_log("HTCP: listening on UDP port")
        self.wait_log("ready: consuming")

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """The value of one series (0 when it does not exist yet)."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def htcp_counts(self) -> dict[str, float]:
        """The HTCP counters, scraped together."""
        scraped = self.metrics()

        def value(name: str, **labels: str) -> float:
            return scraped.get((name, frozenset(labels.items())), 0.0)

        return {
            "good": value("purged_htcp_packets_total", state="good"),
            "bad": value("purged_htcp_packets_total", state="bad"),
            "dropped": value("purged_htcp_packets_dropped_total"),
            "bytes": value("purged_udp_bytes_read_total"),
            "pending": value("purged_pending"),
        }

    def stop(self) -> int:
        """SIGTERM, wait, and return the exit status (idempotent)."""
        stop_process_group(self.proc, timeout=15)
        return self.proc.returncode


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``start_daemon(args) -> Daemon``; every daemon is stopped at teardown."""
    started: list[Daemon] = []

    def start(args: list[str]) -> Daemon:
        daemon = Daemon(args, tmp_path / f"purged-{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def htcp_flags(port: int, backend: str, frontend: str, *extra: str) -> list[str]:
    """The daemon's flags for HTCP on loopback, with no frontend delay."""
    return [
        "-mcast_addrs",
        ",".join(GROUPS),
        "-mcast_port",
        str(port),
        "-mcast_iface",
        "127.0.0.1",
        "-backend_addr",
        backend,
        "-frontend_addr",
        frontend,
        "-frontend_delay",
        "0",
        *extra,
    ]


def purged_urls(recorder: Recorder) -> set[tuple[str, str]]:
    """(Host, request-target) of every PURGE the recorder received."""
    assert {r.method for r in recorder.requests} <= {"PURGE"}
    return {(r.host, r.target) for r in recorder.requests}


# --- every URL, from both groups, on both layers ---------------------------------------


def test_every_url_multicast_to_either_group_is_purged_on_both_layers(
    start_daemon: Callable[..., Daemon],
    recorder: Callable[..., Recorder],
    unique: Callable[[str], str],
) -> None:
    backend, frontend = recorder(), recorder()
    port = free_udp_port()
    daemon = start_daemon(htcp_flags(port, backend.address, frontend.address))
    daemon.wait_ready()
    name = unique("both-groups")
    # Distinct URLs per group: each group must deliver on its own.
    first = [f"https://{HOST}/wiki/{name}_a{i}?action=purge" for i in range(20)]
    second = [f"http://{HOST}/wiki/{name}_b{i}" for i in range(19)]
    second.append(f"https://de.wikipedia.org/wiki/Stra\u00dfe_{name}")  # non-ASCII, as UTF-8
    expected = {(HOST, f"/wiki/{name}_a{i}?action=purge") for i in range(20)}
    expected |= {(HOST, f"/wiki/{name}_b{i}") for i in range(19)}
    expected.add(("de.wikipedia.org", f"/wiki/Stra%C3%9Fe_{name}"))
    # MediaWiki's layout (opcode in the low nibble) and the RFC's (high nibble).
    first_packets = [encode_clr(url, transaction_id=i) for i, url in enumerate(first)]
    second_packets = [encode_clr(url, rfc_layout=True) for url in second]

    sent = send_htcp(first_packets, GROUPS[0], port) + send_htcp(second_packets, GROUPS[1], port)

    backend.wait_for(len(expected), timeout=30)
    frontend.wait_for(len(expected), timeout=30)
    assert purged_urls(backend) == expected
    assert purged_urls(frontend) == expected
    counts = daemon.htcp_counts()
    assert (counts["good"], counts["bad"], counts["dropped"]) == (sent, 0, 0)
    assert counts["bytes"] == sum(map(len, first_packets + second_packets))
    assert daemon.stop() == 0


def test_a_page_cached_in_varnish_and_ats_misses_after_an_htcp_purge(
    start_daemon: Callable[..., Daemon],
    varnish: Varnish,
    ats: TrafficServer,
    origin: Origin,
    unique: Callable[[str], str],
) -> None:
    port = free_udp_port()
    daemon = start_daemon(
        htcp_flags(port, ats.address, f"127.0.0.1:{varnish.port}", "-frontend_delay", "50")
    )
    path = f"/wiki/{unique('htcp-chain')}"
    assert varnish.get(path, HOST) == (200, False)
    assert varnish.get(path, HOST) == (200, True)
    assert ats.get(path, HOST) == (200, True)
    time.sleep(FILL_SETTLE)
    daemon.wait_ready()

    send_htcp([encode_clr(f"https://{HOST}{path}")], GROUPS[1], port)

    wait_until(
        lambda: daemon.metric("purged_http_requests_total", status="200", layer="frontend") == 1,
        timeout=30,
        what="Varnish answered the PURGE",
    )
    assert daemon.metric("purged_http_requests_total", status="200", layer="backend") == 1
    after = varnish.fetch(path, HOST)
    assert (after.status, after.hit) == (200, False)
    assert not via_hit(after.header("Via")), "Traffic Server must have missed too"
    assert origin.hits(path) == 2


# --- malformed datagrams ----------------------------------------------------------------


def field_by_field(uri: bytes, method: bytes = b"HEAD") -> bytes:
    """A CLR with consistent lengths, built without the codec (it refuses an empty URI)."""
    specifier = b"".join(
        struct.pack(">H", len(field)) + field for field in (method, uri, b"HTTP/1.0", b"")
    )
    data = struct.pack(">BBIH", 0x04, 0, 0, 0) + specifier
    data = struct.pack(">H", 2 + len(data)) + data
    return struct.pack(">HBB", 4 + len(data) + 2, 0, 0) + data + b"\x00\x02"


def with_u16(datagram: bytes, offset: int, value: int) -> bytes:
    return datagram[:offset] + struct.pack(">H", value) + datagram[offset + 2 :]


def malformed_datagrams(count_each: int) -> dict[str, list[bytes]]:
    """Each kind of datagram the daemon must refuse, `count_each` of each."""
    good = encode_clr(f"https://{HOST}/wiki/Not_this_one")
    uri_length_at = 14 + 2 + 4  # after the METHOD COUNTSTR "HEAD"
    rng = random.Random(4827)
    kinds = {
        "short": [good[:19]],
        "wrong opcode": [good[:6] + b"\x02" + good[7:], good[:6] + b"\x30" + good[7:]],
        "zero URI length": [field_by_field(b"")],
        "URI count past the end": [with_u16(good, uri_length_at, 0xFFFF)],
        "METHOD count past the end": [with_u16(good, 14, 0xFFFF)],
        "over 4096 bytes": [with_u16(good + b"\x00" * 4100, 0, len(good) + 4100)],
        "not an http URI": [encode_clr("ftp://en.wikipedia.org/x"), encode_clr("/wiki/Relative")],
        "random garbage": [rng.randbytes(rng.randrange(1, 600)) for _ in range(count_each)],
    }
    return {
        kind: [examples[i % len(examples)] for i in range(count_each)]
        for kind, examples in kinds.items()
    }


def test_malformed_datagrams_are_counted_bad_logged_sparingly_and_purging_goes_on(
    start_daemon: Callable[..., Daemon],
    recorder: Callable[..., Recorder],
    unique: Callable[[str], str],
) -> None:
    malformed = malformed_datagrams(count_each=50)
    for datagram in (d for datagrams in malformed.values() for d in datagrams):
        with pytest.raises((HtcpError, UrlError)):  # the test's premise: none is purgeable
            parse_purge_url(decode_clr(datagram).uri)
    burst = [d for datagrams in zip(*malformed.values(), strict=True) for d in datagrams]
    backend, frontend = recorder(), recorder()
    port = free_udp_port()
    daemon = start_daemon(htcp_flags(port, backend.address, frontend.address))
    daemon.wait_ready()

    with sender_socket() as sender:
        for i, datagram in enumerate(burst):
            sender.sendto(datagram, (GROUPS[i % 2], port))
    wait_until(
        lambda: daemon.htcp_counts()["bad"] == len(burst),
        timeout=30,
        what=f"{len(burst)} bad datagrams counted",
    )
    assert daemon.proc.poll() is None, log_tail(daemon.log_path)

    name = unique("after-garbage")
    urls = [f"https://{HOST}/wiki/{name}_{i}" for i in range(10)]
    good = [encode_clr(url) for url in urls]
    send_htcp(good, GROUPS, port)  # each to both groups: 20 good datagrams
    expected = {(HOST, f"/wiki/{name}_{i}") for i in range(10)}
    wait_until(lambda: purged_urls(frontend) == expected, 30, "all purged after the garbage")
    assert purged_urls(backend) == expected
    counts = daemon.htcp_counts()
    assert (counts["good"], counts["bad"], counts["dropped"]) == (20, len(burst), 0)
    assert counts["bytes"] == sum(map(len, burst)) + 2 * sum(map(len, good))
    # One line per kind of fault at most (rate-limited per reason), not one per datagram.
    lines = [line for line in daemon.log_text().splitlines() if "HTCP: bad" in line]
    assert 1 <= len(lines) <= len(malformed), "\n".join(lines)
    assert any("(countstr)" in line for line in lines), "\n".join(lines)
    assert daemon.stop() == 0


# --- a burst of 100,000 packets: every one accounted for ---------------------------------


def udp_socket_drops(port: int) -> int:
    """Datagrams the kernel dropped for the UDP socket bound to 0.0.0.0:port (buffer full)."""
    with open("/proc/net/udp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"00000000:{port:04X}":
                return int(fields[-1])
    raise AssertionError(f"no UDP socket bound to port {port}")


def softnet_drops() -> int:
    """Packets dropped host-wide before reaching any socket (backlog queue full)."""
    with open("/proc/net/softnet_stat") as table:
        return sum(int(line.split()[1], 16) for line in table)


BURST = 100_000


@pytest.mark.parametrize(
    ("extra_flags", "backend_delay", "forced_drops"),
    [
        pytest.param([], 0.0, False, id="pipeline-keeps-up"),
        pytest.param(["-max_pending", "200"], 0.002, True, id="pipeline-full-drops"),
    ],
)
def test_a_burst_of_100000_packets_is_all_purged_dropped_or_lost_in_the_kernel_and_counted(
    start_daemon: Callable[..., Daemon],
    recorder: Callable[..., Recorder],
    unique: Callable[[str], str],
    extra_flags: list[str],
    backend_delay: float,
    forced_drops: bool,
) -> None:
    backend, frontend = recorder(), recorder()
    backend.delay = backend_delay  # per answer, in order per connection: a slow cache
    port = free_udp_port()
    daemon = start_daemon(htcp_flags(port, backend.address, frontend.address, *extra_flags))
    name = unique("burst")
    # Same-length URLs, so that the bytes read say how many datagrams the daemon read.
    datagrams = [encode_clr(f"https://{HOST}/wiki/{name}_{i:06d}") for i in range(BURST)]
    size = len(datagrams[0])
    assert {len(d) for d in datagrams} == {size}
    daemon.wait_ready()
    kernel_before, softnet_before = udp_socket_drops(port), softnet_drops()

    with sender_socket() as sender:
        for i, datagram in enumerate(datagrams):
            sender.sendto(datagram, (GROUPS[i % 2], port))

    def received() -> bool:
        counts = daemon.htcp_counts()
        return counts["good"] + counts["bad"] + udp_socket_drops(port) - kernel_before == BURST

    try:
        wait_until(received, 60, "every datagram read or dropped by the kernel", interval=0.1)
    except AssertionError as error:
        lost = softnet_drops() - softnet_before
        raise AssertionError(f"{error}; {daemon.htcp_counts()}, softnet drops {lost}") from None
    kernel = udp_socket_drops(port) - kernel_before
    counts = daemon.htcp_counts()  # final: every datagram is accounted for
    accepted = counts["good"] - counts["dropped"]

    def distinct(recorder: Recorder) -> int:
        return len({target for _, target in purged_urls(recorder)})

    # Counting is cheap (the recorders share this process); distinct URLs are checked after.
    wait_until(
        lambda: backend.count() >= accepted and frontend.count() >= accepted,
        timeout=90,
        what=f"{accepted:.0f} accepted purges reached both layers",
        interval=0.1,
    )
    wait_until(lambda: daemon.htcp_counts()["pending"] == 0, 10, "no purge left pending")
    purged = distinct(backend)
    print(
        f"sent {BURST}: good {counts['good']:.0f}, bad {counts['bad']:.0f}, kernel-dropped "
        f"{kernel}; purged {purged}, dropped (pipeline full) {counts['dropped']:.0f}"
    )
    assert counts["bad"] == 0
    assert counts["good"] + counts["bad"] + kernel == BURST
    assert counts["good"] == purged + counts["dropped"]
    assert counts["bytes"] == size * (BURST - kernel)
    # The kernel's own drops are not unseen: the daemon reads and exports them.
    wait_until(
        lambda: daemon.metric("purged_udp_kernel_drops_total") == kernel,
        5,
        f"purged_udp_kernel_drops_total == {kernel}",
    )
    assert {target for _, target in purged_urls(frontend)} == {t for _, t in purged_urls(backend)}
    if forced_drops:
        assert counts["dropped"] > 0 and purged > 0
    assert daemon.stop() == 0


# --- HTCP and Kafka together ------------------------------------------------------------


def test_kafka_events_and_htcp_packets_feed_one_pipeline(
    start_daemon: Callable[..., Daemon],
    recorder: Callable[..., Recorder],
    broker: Broker,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    topic = unique("htcp-and-kafka")
    broker.create_topic(topic, partitions=1)
    config = broker.write_kafka_config(tmp_path / "kafka.json", unique("htcp-and-kafka-group"))
    backend, frontend = recorder(), recorder()
    port = free_udp_port()
    daemon = start_daemon(
        [
            *htcp_flags(port, backend.address, frontend.address),
            "-topics",
            topic,
            "-kafkaConfig",
            str(config),
        ]
    )
    daemon.wait_ready()
    # Ready means every source is consuming: Kafka's partitions are assigned too.
    assert "assigned" in daemon.log_text()
    name = unique("one-pipeline")

    broker.produce(topic, [make_event(f"https://{HOST}/wiki/{name}_from_kafka")])
    send_htcp([encode_clr(f"https://{HOST}/wiki/{name}_from_htcp")], GROUPS[0], port)

    expected = {(HOST, f"/wiki/{name}_from_kafka"), (HOST, f"/wiki/{name}_from_htcp")}
    wait_until(lambda: purged_urls(frontend) == expected, 30, "both purged on the frontend")
    assert purged_urls(backend) == expected
    assert (
        daemon.metric("purged_events_received_total", tag="mediawiki", status="ok", topic=topic)
        == 1
    )
    assert daemon.metric("purged_htcp_packets_total", state="good") == 1
    assert daemon.stop() == 0


# --- bad multicast flags ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-mcast_addrs", "10.0.0.1"], "-mcast_addrs: '10.0.0.1' is not an IPv4 multicast group"),
        (
            ["-mcast_addrs", "239.128.0.112,mcast.example.org"],
            "-mcast_addrs: multicast group 'mcast.example.org' is not an IPv4 address",
        ),
        (["-mcast_addrs", "239.128.0.300"], "'239.128.0.300' is not an IPv4 address"),
        (["-mcast_addrs", "239.128.0.112", "-mcast_port", "70000"], "-mcast_port: 70000"),
        (
            ["-mcast_addrs", "239.128.0.112", "-mcast_iface", "eth0"],
            "-mcast_iface: 'eth0' is not an IPv4 interface address",
        ),
        # Well-formed, but no interface here has it (TEST-NET-1): found when joining.
        (
            ["-mcast_addrs", "239.128.0.112", "-mcast_iface", "192.0.2.1"],
            "cannot join multicast group 239.128.0.112 on interface 192.0.2.1",
        ),
    ],
    ids=["not-multicast", "not-an-address", "bad-octet", "bad-port", "iface-name", "iface-absent"],
)
def test_a_bad_multicast_flag_exits_2_with_a_clear_message(flags: list[str], message: str) -> None:
    command = [
        purged_command(),
        *flags,
        "-backend_addr",
        f"127.0.0.1:{free_port()}",
        "-frontend_addr",
        f"127.0.0.1:{free_port()}",
        "-prometheus_addr",
        f"127.0.0.1:{free_port()}",
    ]
    if "-mcast_port" not in flags:
        command += ["-mcast_port", str(free_udp_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


# --- joined on all interfaces, as production does -----------------------------------------

# Runs inside a private network namespace where lo is the only interface and multicast is
# routed to it: the daemon (default port 4827, no -mcast_iface), its caches and the sender.
NAMESPACE_DRIVER = textwrap.dedent(
    """
    import json, signal, socket, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from purged.htcp import encode_clr
    from tests.support.ports import free_port
    from tests.support.recorder import Recorder

    purged, log_path = sys.argv[2], sys.argv[3]
    groups = ["239.128.0.112", "239.128.0.115"]
    backend, frontend = Recorder(), Recorder()
    log = open(log_path, "wb")
    daemon = subprocess.Popen(
        [purged, "-mcast_addrs", ",".join(groups), "-backend_addr", backend.address,
         "-frontend_addr", frontend.address, "-frontend_delay", "0",
         "-prometheus_addr", f"127.0.0.1:{free_port()}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    result = {}
    try:
        deadline = time.monotonic() + 30
        def logged(text):
            with open(log_path) as f:
                return text in f.read()
        while not (logged("HTCP: listening") and logged("ready: consuming")):
            assert daemon.poll() is None and time.monotonic() < deadline, "daemon not ready"
            time.sleep(0.02)
        # A plain sender: it joins nothing and follows the route (224.0.0.0/4 dev lo).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i, group in enumerate(groups):
                sender.sendto(encode_clr(f"https://en.wikipedia.org/wiki/ns_{i}"), (group, 4827))
        backend.wait_for(2, timeout=20)
        frontend.wait_for(2, timeout=20)
        result["backend"] = sorted(backend.targets())
        result["frontend"] = sorted(frontend.targets())
    finally:
        daemon.send_signal(signal.SIGTERM)
        result["exit"] = daemon.wait(timeout=15)
        backend.stop()
        frontend.stop()
    print(json.dumps(result))
    """
)


def test_a_daemon_joined_on_all_interfaces_receives_multicast_in_a_private_namespace(
    tmp_path: Path,
) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"unshare --net is not permitted here: {probe.stderr.decode().strip()}")
    driver = tmp_path / "driver.py"
    driver.write_text(NAMESPACE_DRIVER)
    log_path = tmp_path / "purged.log"
    script = 'ip link set lo up && ip route add 224.0.0.0/4 dev lo && exec "$@"'
    command = [sys.executable, str(driver), str(REPO), purged_command(), str(log_path)]
    proc = subprocess.Popen(
        [unshare, "--net", "sh", "-c", script, "sh", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        # The driver, the daemon and the namespace go with the process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    detail = err.decode() + (log_tail(log_path) if log_path.exists() else "")
    assert proc.returncode == 0, detail
    result = json.loads(out.decode().splitlines()[-1])
    assert result["backend"] == result["frontend"] == ["/wiki/ns_0", "/wiki/ns_1"], detail
    assert result["exit"] == 0, detail
