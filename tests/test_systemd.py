"""systemd: the unit file, and the notify protocol the daemon speaks over NOTIFY_SOCKET.

The daemon is run with NOTIFY_SOCKET pointing at a Unix datagram socket held by the test,
which plays systemd's part.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from purged.config import parse_flags
from tests.support.broker import Broker
from tests.support.purged_proc import PURGED, Purged, daemon_args
from tests.support.recorder import Recorder

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "purged.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: every datagram received, with its arrival time."""

    def __init__(self) -> None:
        # A short path: sun_path holds 108 bytes, pytest's tmp_path can be longer.
        self.dir = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))
        self.path = str(self.dir / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[str]:
        """Receive for `seconds`; every message received so far."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            self.received.append((time.monotonic(), data.decode()))
        return self.messages()

    def wait_for(self, message: str, timeout: float) -> float:
        """Wait until `message` arrives; the time it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for at, text in self.received:
                if message in text.splitlines():
                    return at
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {message} in {timeout} s; got {self.messages()}")
            self.collect(min(left, 0.1))

    def messages(self) -> list[str]:
        return [text for _, text in self.received]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A NOTIFY_SOCKET in the environment the daemon inherits."""
    listener = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield listener
    listener.close()


@pytest.fixture
def daemon_factory(
    broker: Broker, recorder: Callable[..., Recorder], tmp_path: Path, unique: Callable[[str], str]
) -> Iterator[Callable[[], tuple[Purged, Recorder]]]:
    """`make() -> (daemon, backend recorder)`: a daemon (not started) on a fresh topic."""
    made: list[Purged] = []

    def make() -> tuple[Purged, Recorder]:
        topic = unique("systemd")
        broker.create_topic(topic)
        config = broker.write_kafka_config(tmp_path / f"{topic}.json", unique("group"))
        backend, frontend = recorder(), recorder()
        args = daemon_args(
            topics=[topic], kafka_config=config, backend=backend.address, frontend=frontend.address
        )
        daemon = Purged(args, tmp_path / f"{topic}.log")
        made.append(daemon)
        return daemon, backend

    yield make
    for daemon in made:
        daemon.stop()


# --- the notify protocol ---------------------------------------------------------------


def test_ready_is_sent_only_once_consuming_and_both_caches_are_connected(
    notify: NotifySocket, daemon_factory: Callable[[], tuple[Purged, Recorder]]
) -> None:
    daemon, backend = daemon_factory()
    backend.refuse()  # the backend cache is down at start
    daemon.start()
    daemon.wait_log("assigned", timeout=30)  # consuming
    assert "READY=1" not in notify.collect(1.5)
    backend.accept()
    notify.wait_for("READY=1", timeout=20)
    assert "ready: consuming, and both caches connected" in daemon.log()
    assert "WATCHDOG=1" not in notify.messages()  # no WATCHDOG_USEC, no pings


def test_ready_waits_for_the_kafka_group_assignment(
    notify: NotifySocket, daemon_factory: Callable[[], tuple[Purged, Recorder]]
) -> None:
    # Both caches answer at once; joining the group takes about a second with this broker.
    daemon, _ = daemon_factory()
    daemon.start()
    notify.wait_for("READY=1", timeout=30)
    # The daemon logs the assignment before it can be ready: the line is already there.
    assert "assigned" in daemon.log()


def test_watchdog_is_pinged_at_half_the_interval(
    notify: NotifySocket,
    daemon_factory: Callable[[], tuple[Purged, Recorder]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    daemon, _ = daemon_factory()
    daemon.start()
    notify.wait_for("READY=1", timeout=30)
    notify.received.clear()
    notify.collect(3.0)
    pings = [at for at, text in notify.received if text == "WATCHDOG=1"]
    assert 3 <= len(pings) <= 8, notify.messages()
    # Every ping comes within the watchdog interval (1 s), none in a burst.
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.2 <= gap < 1.0 for gap in gaps), gaps


def test_stopping_is_sent_on_sigterm_and_the_daemon_exits_0(
    notify: NotifySocket, daemon_factory: Callable[[], tuple[Purged, Recorder]]
) -> None:
    daemon, _ = daemon_factory()
    daemon.start()
    notify.wait_for("READY=1", timeout=30)
    assert "STOPPING=1" not in notify.messages()
    daemon.send(signal.SIGTERM)
    notify.wait_for("STOPPING=1", timeout=10)
    assert daemon.wait(timeout=20) == 0


# --- journald ------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def first_log_line(recorder: Callable[..., Recorder], log_path: Path) -> str:
    backend, frontend = recorder(), recorder()
    args = [
        "-mcast_addrs", "239.128.0.123", "-mcast_port", str(free_udp_port()),
        "-mcast_iface", "127.0.0.1",
        "-backend_addr", backend.address, "-frontend_addr", frontend.address,
    ]  # fmt: skip
    daemon = Purged(args, log_path)
    try:
        daemon.start()
        daemon.wait_log("purged started", timeout=20)
    finally:
        daemon.stop()
    return next(line for line in daemon.log().splitlines() if "purged started" in line)


def test_under_journald_log_lines_carry_no_timestamp(
    recorder: Callable[..., Recorder], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:123456")
    assert first_log_line(recorder, tmp_path / "journal.log").startswith("INFO purged started")


def test_outside_journald_log_lines_start_with_a_timestamp(
    recorder: Callable[..., Recorder], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    line = first_log_line(recorder, tmp_path / "plain.log")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO purged started", line), line


# --- the unit file -------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """Every `Key=value` of the unit (continuation lines joined), by key."""
    text = UNIT.read_text().replace("\\\n", " ")
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_is_a_hardened_notify_service() -> None:
    settings = unit_settings()
    expected = {
        "Type": "notify",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "Restart": "on-failure",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    assert settings["WatchdogSec"] and settings["TimeoutStopSec"]


def test_unit_execstart_flags_are_the_daemons(tmp_path: Path) -> None:
    [exec_start] = unit_settings()["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/purged")
    # The config file is the host's: give the parser one that exists here.
    config = tmp_path / "purgedkafka.conf"
    config.write_text('{"bootstrap.servers": "kafka:9092", "group.id": "cp1001"}')
    args = [str(config) if a == "/etc/purgedkafka.conf" else a for a in argv[1:]]
    parsed = parse_flags(args)
    assert parsed.topics == ("eqiad.resource-purge", "codfw.resource-purge")
    assert parsed.frontend.path == "/run/varnish-privileged.socket"
    assert parsed.mcast_groups == ("239.128.0.112", "239.128.0.115")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point it at the one under test.
    unit = tmp_path / "purged.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/purged", PURGED))
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # verify exits 0 for settings it ignores; it complains on stderr.
    assert [line for line in result.stderr.splitlines() if "purged.service" in line] == []


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_exposure_is_low(tmp_path: Path) -> None:
    unit = tmp_path / "purged.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/purged", PURGED))
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for purged\.service: (\d+\.\d+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit offline: {result.stderr[:200]}")
    assert float(match.group(1)) <= 2.5, result.stdout
