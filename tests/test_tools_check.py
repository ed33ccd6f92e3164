"""`purged check [daemon flags...]`: one line per check, exit 0 only when all is well."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.ats import TrafficServer
from tests.support.broker import Broker
from tests.support.ports import free_port
from tests.support.recorder import Recorder
from tests.support.tool_run import Result, run_purged
from tests.support.varnish import Varnish

GROUPS = "239.128.0.112,239.128.0.115"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def lines(result: Result) -> dict[str, str]:
    """Check name → its result ("ok (...)" or "FAIL: ...")."""
    out = {}
    for line in result.stdout.splitlines():
        name, _, verdict = line.partition(": ")
        out[name] = verdict
    return out


@pytest.fixture
def kafka(broker: Broker, tmp_path: Path, unique: Callable[[str], str]) -> tuple[str, Path]:
    """A topic that exists, and a Kafka config file for the broker."""
    topic = unique("check")
    broker.create_topic(topic)
    return topic, broker.write_kafka_config(tmp_path / "kafka.json", unique("group"))


def test_check_passes_with_real_caches_broker_and_multicast(
    kafka: tuple[str, Path], ats: TrafficServer, varnish: Varnish, broker: Broker
) -> None:
    topic, config = kafka
    assert varnish.socket_path is not None
    port = free_udp_port()
    result = run_purged(
        "check", "-topics", topic, "-kafkaConfig", str(config),
        "-backend_addr", ats.address, "-frontend_addr", varnish.socket_path,
        "-mcast_addrs", GROUPS, "-mcast_port", str(port), "-mcast_iface", "127.0.0.1",
    )  # fmt: skip
    assert result.code == 0, result
    checks = lines(result)
    assert list(checks) == [
        "flags",
        f"kafka config {config}",
        f"backend cache {ats.address}",
        f"frontend cache {varnish.socket_path}",
        f"kafka broker {broker.bootstrap}",
        f"kafka topic {topic}",
        f"multicast groups {GROUPS} port {port}",
    ]
    assert all(verdict.startswith("ok") for verdict in checks.values()), result
    # ATS answers 404 for an object it does not have, Varnish 200.
    assert "PURGE answered 404" in checks[f"backend cache {ats.address}"]
    assert "PURGE answered 200" in checks[f"frontend cache {varnish.socket_path}"]


def test_check_cache_down_fails_naming_the_cache(
    kafka: tuple[str, Path], recorder: Callable[..., Recorder]
) -> None:
    topic, config = kafka
    frontend = recorder()
    down = f"127.0.0.1:{free_port()}"
    result = run_purged(
        "check", "-topics", topic, "-kafkaConfig", str(config),
        "-backend_addr", down, "-frontend_addr", frontend.address,
    )  # fmt: skip
    assert result.code == 1, result
    checks = lines(result)
    assert checks[f"backend cache {down}"] == "FAIL: cannot connect: Connection refused"
    assert checks[f"frontend cache {frontend.address}"].startswith("ok")


def test_check_unix_socket_cache_missing_fails(
    kafka: tuple[str, Path], recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    topic, config = kafka
    backend = recorder()
    missing = str(tmp_path / "varnish.sock")
    result = run_purged(
        "check", "-topics", topic, "-kafkaConfig", str(config),
        "-backend_addr", backend.address, "-frontend_addr", missing,
    )  # fmt: skip
    assert result.code == 1, result
    assert lines(result)[f"frontend cache {missing}"] == (
        "FAIL: cannot connect: No such file or directory"
    )


def test_check_cache_refusing_purge_fails(
    kafka: tuple[str, Path], recorder: Callable[..., Recorder]
) -> None:
    topic, config = kafka
    backend, frontend = recorder(), recorder()
    frontend.status = 405
    result = run_purged(
        "check", "-topics", topic, "-kafkaConfig", str(config),
        "-backend_addr", backend.address, "-frontend_addr", frontend.address,
    )  # fmt: skip
    assert result.code == 1, result
    assert lines(result)[f"frontend cache {frontend.address}"].startswith(
        "FAIL: PURGE refused with 405"
    )
    assert frontend.targets() == ["/purged-check"]
    assert frontend.requests[0].host == "purged-check.invalid"


def test_check_broker_down_fails(recorder: Callable[..., Recorder], tmp_path: Path) -> None:
    backend, frontend = recorder(), recorder()
    down = f"127.0.0.1:{free_port()}"
    config = tmp_path / "kafka.json"
    config.write_text(json.dumps({"bootstrap.servers": down, "group.id": "g"}))
    result = run_purged(
        "check", "-topics", "t", "-kafkaConfig", str(config), "-cache_timeout", "2s",
        "-backend_addr", backend.address, "-frontend_addr", frontend.address,
    )  # fmt: skip
    assert result.code == 1, result
    verdict = lines(result)[f"kafka broker {down}"]
    assert verdict.startswith("FAIL: no answer in 2 s"), result
    assert "Connection refused" in verdict


def test_check_missing_topic_fails(
    kafka: tuple[str, Path], recorder: Callable[..., Recorder], unique: Callable[[str], str]
) -> None:
    topic, config = kafka
    backend, frontend = recorder(), recorder()
    missing = unique("missing")
    result = run_purged(
        "check", "-topics", f"{topic},{missing}", "-kafkaConfig", str(config),
        "-backend_addr", backend.address, "-frontend_addr", frontend.address,
    )  # fmt: skip
    assert result.code == 1, result
    checks = lines(result)
    assert checks[f"kafka topic {topic}"].startswith("ok")
    assert checks[f"kafka topic {missing}"] == "FAIL: does not exist on the broker"


def test_check_multicast_group_that_cannot_be_joined_fails(
    recorder: Callable[..., Recorder],
) -> None:
    backend, frontend = recorder(), recorder()
    result = run_purged(
        "check", "-mcast_addrs", "239.128.0.112", "-mcast_port", str(free_udp_port()),
        "-mcast_iface", "192.0.2.1",  # TEST-NET-1: never an address of this host
        "-backend_addr", backend.address, "-frontend_addr", frontend.address,
    )  # fmt: skip
    assert result.code == 1, result
    [verdict] = [v for name, v in lines(result).items() if name.startswith("multicast")]
    assert verdict.startswith(
        "FAIL: cannot join multicast group 239.128.0.112 on interface 192.0.2.1"
    )


def test_check_bad_config_file_fails_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "kafka.json"
    config.write_text('{"bootstrap.servers": "127.0.0.1:9092",')
    result = run_purged("check", "-topics", "t", "-kafkaConfig", str(config))
    assert result.code == 2, result
    assert lines(result)["flags"].startswith(f"FAIL: -kafkaConfig: {config}: not valid JSON")


def test_check_unknown_kafka_property_fails_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "kafka.json"
    config.write_text(json.dumps({"bootstrap.servers": "127.0.0.1:9092", "no.such.key": 1}))
    result = run_purged("check", "-topics", "t", "-kafkaConfig", str(config))
    assert result.code == 2, result
    assert lines(result)[f"kafka config {config}"] == (
        'FAIL: No such configuration property: "no.such.key"'
    )


def test_check_bad_flags_fail_with_exit_2() -> None:
    result = run_purged("check", "-mcast_addrs", "239.1.1.1", "-backend_workers", "lots")
    assert result.code == 2, result
    assert lines(result)["flags"] == "FAIL: -backend_workers: 'lots' is not a whole number"


def test_check_help_exits_0() -> None:
    result = run_purged("check", "-h")
    assert result.code == 0
    assert "usage: purged check" in result.stdout
