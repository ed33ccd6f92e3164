"""`purged send`: purging by hand through Kafka, HTCP multicast, or straight to the caches."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from tests.support.ats import TrafficServer
from tests.support.broker import Broker
from tests.support.ports import free_port
from tests.support.purged_proc import daemon_args
from tests.support.recorder import Recorder
from tests.support.tool_run import run_purged, running_daemon
from tests.support.varnish import Varnish

HOST = "en.wikipedia.org"
# ATS can lose a PURGE that lands within ~1 ms of the GET miss that filled the object.
FILL_SETTLE = 0.05


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def read_topic(broker: Broker, topic: str, count: int, timeout: float = 15.0) -> list[bytes]:
    """The first `count` messages of every partition of `topic` (no group join: assign)."""
    consumer = Consumer(broker.kafka_config(f"reader-{uuid.uuid4().hex[:8]}"))
    try:
        partitions = broker.partitions(topic)
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        values: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(values) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                values.append(message.value() or b"")
        return values
    finally:
        consumer.close()


# --- Kafka ---------------------------------------------------------------------------


def test_send_kafka_event_is_purged_by_the_daemon_on_both_layers(
    broker: Broker, recorder: Callable[..., Recorder], tmp_path: Path, unique: Callable[[str], str]
) -> None:
    topic = unique("send-kafka")
    broker.create_topic(topic)
    config = broker.write_kafka_config(tmp_path / "kafka.json", unique("group"))
    backend, frontend = recorder(), recorder()
    args = daemon_args(
        topics=[topic], kafka_config=config, backend=backend.address, frontend=frontend.address
    )
    urls = [f"https://{HOST}/wiki/Send_{i}" for i in range(3)]
    with running_daemon(args, tmp_path / "purged.log"):
        result = run_purged("send", "--kafka", "--topic", topic, "-kafkaConfig", str(config), *urls)
        assert result.code == 0, result
        frontend.wait_for(3, timeout=20)
    assert sorted(backend.targets()) == sorted(f"/wiki/Send_{i}" for i in range(3))
    assert sorted(frontend.targets()) == sorted(backend.targets())
    assert {r.host for r in frontend.requests} == {HOST}
    for url in urls:
        assert f"sent {url} to {topic}[" in result.stdout


def test_send_kafka_publishes_a_resource_change_event(
    broker: Broker, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    topic = unique("send-shape")
    broker.create_topic(topic, partitions=1)
    config = broker.write_kafka_config(tmp_path / "kafka.json", unique("group"))
    url = "https://de.wikipedia.org:443/wiki/%C3%84pfel?action=raw"
    before = datetime.now(UTC).timestamp()
    result = run_purged(
        "send", "--kafka", "--topic", topic, "--kafka-config", str(config), "--tag", "ops", url
    )
    assert result.code == 0, result
    [value] = read_topic(broker, topic, 1)
    event = json.loads(value)
    assert event["$schema"] == "/resource_change/1.0.0"
    assert event["meta"]["uri"] == url
    assert event["meta"]["stream"] == "resource-purge"
    assert event["meta"]["domain"] == "de.wikipedia.org"
    assert uuid.UUID(event["meta"]["id"])
    event_time = datetime.fromisoformat(event["meta"]["dt"]).timestamp()
    assert before - 1 <= event_time <= datetime.now(UTC).timestamp() + 1
    assert event["tags"] == ["ops"]


def test_send_kafka_default_tag_is_purged_send(
    broker: Broker, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    topic = unique("send-tag")
    broker.create_topic(topic, partitions=1)
    config = broker.write_kafka_config(tmp_path / "kafka.json", unique("group"))
    result = run_purged(
        "send", "--kafka", "--topic", topic, "-kafkaConfig", str(config), "https://a.org/"
    )
    assert result.code == 0, result
    [value] = read_topic(broker, topic, 1)
    assert json.loads(value)["tags"] == ["purged-send"]


def test_send_kafka_to_a_missing_topic_fails_and_creates_nothing(
    broker: Broker, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    topic = unique("send-missing")
    config = broker.write_kafka_config(tmp_path / "kafka.json", unique("group"))
    result = run_purged(
        "send", "--kafka", "--topic", topic, "-kafkaConfig", str(config), "https://a.org/"
    )
    assert result.code == 1, result
    assert f"topic {topic!r} does not exist" in result.stderr
    # Listing every topic (asking for this one by name would create it with this broker).
    assert topic not in broker.admin.list_topics(timeout=10).topics


def test_send_kafka_with_the_broker_down_fails(tmp_path: Path) -> None:
    config = tmp_path / "kafka.json"
    config.write_text(json.dumps({"bootstrap.servers": f"127.0.0.1:{free_port()}"}))
    result = run_purged(
        "send", "--kafka", "--topic", "t", "-kafkaConfig", str(config), "--timeout", "2",
        "https://a.org/",
    )  # fmt: skip
    assert result.code == 1, result
    assert "cannot reach the Kafka broker" in result.stderr
    assert "Connection refused" in result.stderr


# --- HTCP ----------------------------------------------------------------------------


def test_send_htcp_reaches_a_daemon_listening_on_the_group(
    recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    group, port = "239.128.0.119", free_udp_port()
    backend, frontend = recorder(), recorder()
    args = [
        "-mcast_addrs", group, "-mcast_port", str(port), "-mcast_iface", "127.0.0.1",
        "-backend_addr", backend.address, "-frontend_addr", frontend.address,
        "-frontend_delay", "0",
    ]  # fmt: skip
    urls = ["https://en.wikipedia.org/wiki/Htcp_1", "https://en.wikipedia.org/wiki/Htcp_%C3%A4"]
    with running_daemon(args, tmp_path / "purged.log"):
        result = run_purged(
            "send", "--htcp", group, "--mcast-port", str(port), "--mcast-iface", "127.0.0.1",
            *urls,
        )  # fmt: skip
        assert result.code == 0, result
        frontend.wait_for(2, timeout=20)
    assert sorted(backend.targets()) == ["/wiki/Htcp_%C3%A4", "/wiki/Htcp_1"]
    assert sorted(frontend.targets()) == sorted(backend.targets())
    assert f"sent HTCP CLR {urls[0]} to {group} port {port}" in result.stdout


# --- straight to the caches ------------------------------------------------------------


def test_send_cache_purges_real_traffic_server_and_varnish(
    varnish: Varnish, ats: TrafficServer, unique: Callable[[str], str]
) -> None:
    path = f"/wiki/{unique('send-cache')}"
    assert varnish.get(path, HOST) == (200, False)
    assert varnish.get(path, HOST) == (200, True)
    assert ats.get(path, HOST) == (200, True)
    time.sleep(FILL_SETTLE)
    assert varnish.socket_path is not None
    result = run_purged(
        "send", "--cache", ats.address, "--cache", varnish.socket_path, f"https://{HOST}{path}"
    )
    assert result.code == 0, result
    assert ats.get(path, HOST)[1] is False  # backend first, as the daemon does
    assert varnish.get(path, HOST)[1] is False
    assert f"PURGE https://{HOST}{path} at {ats.address}: 200" in result.stdout
    assert f"PURGE https://{HOST}{path} at {varnish.socket_path}: 200" in result.stdout


def test_send_cache_pipelines_every_url_on_one_connection(
    recorder: Callable[..., Recorder],
) -> None:
    cache = recorder()
    urls = [f"https://{HOST}/wiki/P{i}" for i in range(50)]
    result = run_purged("send", "--cache", cache.address, *urls)
    assert result.code == 0, result
    assert cache.targets() == [f"/wiki/P{i}" for i in range(50)]
    assert cache.connections_opened == 1
    assert result.stdout.count(": 200") == 50


def test_send_reads_urls_from_stdin_one_per_line(recorder: Callable[..., Recorder]) -> None:
    cache = recorder()
    stdin = f"https://{HOST}/wiki/A\n\n# a comment\n  https://{HOST}/wiki/B  \n"
    result = run_purged("send", "--cache", cache.address, stdin=stdin)
    assert result.code == 0, result
    assert cache.targets() == ["/wiki/A", "/wiki/B"]


def test_send_invalid_url_is_refused_before_anything_is_sent(
    recorder: Callable[..., Recorder],
) -> None:
    cache = recorder()
    result = run_purged(
        "send", "--cache", cache.address, f"https://{HOST}/wiki/Fine", "ftp://example.org/x"
    )
    assert result.code == 2, result
    assert "invalid URL 'ftp://example.org/x'" in result.stderr
    assert "nothing sent" in result.stderr
    time.sleep(0.2)
    assert cache.count() == 0


def test_send_cache_that_refuses_purge_fails(recorder: Callable[..., Recorder]) -> None:
    cache = recorder()
    cache.status = 405
    result = run_purged("send", "--cache", cache.address, f"https://{HOST}/wiki/X")
    assert result.code == 1, result
    assert "405" in result.stderr
    assert "does not allow PURGE" in result.stderr


def test_send_cache_down_fails(tmp_path: Path) -> None:
    result = run_purged("send", "--cache", f"127.0.0.1:{free_port()}", f"https://{HOST}/")
    assert result.code == 1, result
    assert "Connection refused" in result.stderr


def test_send_needs_exactly_one_transport() -> None:
    assert run_purged("send", f"https://{HOST}/").code == 2
    both = run_purged("send", "--kafka", "--htcp", "239.1.1.1", f"https://{HOST}/")
    assert both.code == 2
    assert "not allowed with" in both.stderr


def test_send_kafka_needs_a_topic() -> None:
    result = run_purged("send", "--kafka", f"https://{HOST}/")
    assert result.code == 2
    assert "--kafka needs --topic" in result.stderr


def test_send_without_urls_is_a_usage_error() -> None:
    result = run_purged("send", "--cache", "127.0.0.1:1", stdin="")
    assert result.code == 2
    assert "no URL given" in result.stderr


def test_send_help_exits_0() -> None:
    result = run_purged("send", "-h")
    assert result.code == 0
    assert "--kafka" in result.stdout and "--htcp" in result.stdout and "--cache" in result.stdout
