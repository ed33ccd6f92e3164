"""Hostile input never crashes the daemon, never reaches a cache, and is counted and logged at
a bounded rate: 1 MB messages, invalid UTF-8, JSON of the wrong shape, URLs that try to
smuggle a header or a second request, non-http URLs, and a flood of garbage datagrams.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Producer

from purged.htcp import encode_clr
from tests.support.broker import Broker, make_event
from tests.support.faults import resource_changes
from tests.support.mcast import sender_socket
from tests.support.purged_proc import Daemons, Purged, wait_until
from tests.support.recorder import Recorder

WAIT = 60.0  # seconds: bound of every wait for the daemon (2 noisy cores)
HOST = "en.wikipedia.org"
REPEAT = 200  # copies of each hostile message: enough to show that logging is rate-limited
# A PURGE that, if the URL reached the wire unchecked, would smuggle a header and a request.
SMUGGLER = f"https://{HOST}/wiki/A HTTP/1.1\r\nHost: {HOST}\r\n\r\nPURGE /smuggled HTTP/1.1\r\nX: y"

# Messages that are not resource_change events at all: discarded.
UNDECODABLE = [
    b"x" * 1_048_576,  # 1 MiB of nothing
    b'{"meta": {"uri": "https://' + HOST.encode() + b'/wiki/\xff\xfe"}}',  # invalid UTF-8
    b"\xc3\x28\xa0\xa1",
    b"",
    b"null",
    b"42",
    b"[]",
    b'"https://en.wikipedia.org/wiki/Just_a_string"',
    b'{"meta": "https://en.wikipedia.org/wiki/A"}',
    b'{"meta": {"uri": 42}}',
    b'{"meta": {"uri": ["https://en.wikipedia.org/wiki/A"]}}',
    b'{"meta": {}}',
    b'{"meta": {"uri": "https://en.wikipedia.org/wiki/A"',  # cut short
    b'{"meta": {"uri": ""}}',
]
# Events whose URL must never become a PURGE: discarded, and counted as invalid URLs.
BAD_URLS = [
    f"https://{HOST}/wiki/" + "A" * 1_048_576,  # a 1 MiB event: caches reset such requests
    f"https://{HOST}/wiki/A\r\nX-Injected: 1",
    f"https://{HOST}/wiki/A\nX-Injected: 1",
    SMUGGLER,
    f"https://{HOST}/wiki/A B",
    f"https://{HOST}\r\n/wiki/A",
    "ftp://en.wikipedia.org/wiki/A",
    "javascript:alert(1)",
    "file:///etc/passwd",
    "/wiki/Relative",
    "https://",
    "https:///wiki/No_host",
]


def bad_url_event(uri: str) -> bytes:
    return json.dumps({"meta": {"uri": uri, "dt": "2024-01-01T00:00:00Z"}}).encode()


def warnings(daemon: Purged) -> list[str]:
    return [line for line in daemon.log().splitlines() if " WARNING " in line]


def assert_only_purged(layer: Recorder, paths: list[str]) -> None:
    """``layer`` received exactly the PURGEs of ``paths``, each a well-formed request."""
    requests = layer.requests
    assert layer.errors == []
    assert {r.target for r in requests} == set(paths)
    assert {(r.method, r.host) for r in requests} == {("PURGE", HOST)}


def test_hostile_kafka_messages_are_counted_logged_sparingly_and_never_reach_a_cache(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("hostile"), unique("hostile-group")
    broker.create_topic(topic, partitions=3)
    good = [f"/wiki/{topic}/good-{i}" for i in range(REPEAT)]
    good_events = list(resource_changes(f"https://{HOST}{p}" for p in good))
    bad_events = [bad_url_event(uri) for uri in BAD_URLS]
    # Interleaved: each round, one good event then every kind of hostile one.
    messages: list[bytes] = []
    for i in range(REPEAT):
        messages.append(good_events[i])
        big = i == 0  # the 1 MiB messages once only: 200 MiB of them would only be slow
        messages += [m for m in UNDECODABLE if big or len(m) < 4096]
        messages += [m for m in bad_events if big or len(m) < 4096]
    undecodable = REPEAT * (len(UNDECODABLE) - 1) + 1
    bad_urls = REPEAT * (len(BAD_URLS) - 1) + 1
    assert len(messages) == len(good) + undecodable + bad_urls

    producer = Producer({"bootstrap.servers": broker.bootstrap, "message.max.bytes": 4_000_000})
    for i, message in enumerate(messages):
        producer.produce(topic, message, partition=i % 3)
        producer.poll(0)
    assert producer.flush(30) == 0

    backend, frontend = recorder(), recorder()
    daemon = daemons.consume(broker, topic, group, backend.address, frontend.address)
    daemon.wait_metric(
        "purged_events_received_total", lambda v: v == len(messages), WAIT, topic=topic
    )
    frontend.wait_for(len(good), WAIT)
    assert daemon.alive(), daemon.tail()

    samples = daemon.scrape()
    assert daemon.metric("purged_events_received_total", samples, status="ok") == len(good)
    discarded = daemon.metric("purged_events_received_total", samples, status="discarded")
    assert discarded == undecodable + bad_urls
    assert daemon.metric("purged_urls_skipped_total", samples, reason="invalid_url") == bad_urls
    for layer in (backend, frontend):
        assert_only_purged(layer, good)  # nothing smuggled, nothing else
    # Thousands of bad messages, a handful of log lines (rate-limited per kind of fault).
    lines = warnings(daemon)
    assert 1 <= len(lines) <= 6, "\n".join(lines)
    assert all(len(line) < 2_000 for line in lines)  # a 1 MiB URL is not logged whole
    # Committed like any finished event: a restart does not read the poison again.
    wait_until(
        lambda: daemon.metric("purged_kafka_commits_total", result="ok") > 0,
        WAIT,
        "offsets committed",
        daemon,
    )


def test_a_flood_of_garbage_datagrams_is_counted_logged_sparingly_and_purging_goes_on(
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    rng = random.Random(4827)
    group = f"239.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    backend, frontend = recorder(), recorder()
    daemon = Purged(
        [
            *("-mcast_addrs", group, "-mcast_port", str(port), "-mcast_iface", "127.0.0.1"),
            *("-backend_addr", backend.address, "-frontend_addr", frontend.address),
            *("-frontend_delay", "0"),
        ],
        tmp_path / "purged.log",
    ).start()
    daemons.started.append(daemon)
    daemon.wait_ready(WAIT)

    # Random bytes, and well-formed CLRs of URLs that must never be purged.
    garbage = [rng.randbytes(rng.randrange(0, 1400)) for _ in range(20_000)]
    garbage += [encode_clr(uri) for uri in BAD_URLS if len(uri) < 4000] * 100
    good = [f"/wiki/{unique('htcp')}-{i}" for i in range(100)]
    with sender_socket() as sender:
        for datagram in garbage:
            sender.sendto(datagram, (group, port))
        for path in good:
            sender.sendto(encode_clr(f"https://{HOST}{path}"), (group, port))

    wait_until(lambda: set(good) <= set(frontend.targets()), WAIT, "good ones purged", daemon)
    samples = daemon.scrape()
    bad = daemon.metric("purged_htcp_packets_total", samples, state="bad")
    # UDP may lose datagrams of a burst in the kernel; those that arrived are all counted.
    assert 0.9 * len(garbage) <= bad <= len(garbage)
    assert daemon.metric("purged_htcp_packets_total", samples, state="good") == len(good)
    for layer in (backend, frontend):
        assert_only_purged(layer, good)
    lines = warnings(daemon)
    assert 1 <= len(lines) <= 12, "\n".join(lines)


def test_events_with_many_distinct_or_huge_tags_keep_the_metrics_small(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("tags"), unique("tags-group")
    broker.create_topic(topic, partitions=3)
    tags = [f"tag-{i}" for i in range(100)] + ["T" * 100_000]
    paths = [f"/wiki/{topic}/{i}" for i in range(len(tags))]
    broker.produce(
        topic,
        (
            make_event(f"https://{HOST}{path}", tags=[tag])
            for path, tag in zip(paths, tags, strict=True)
        ),
    )
    backend, frontend = recorder(), recorder()
    daemon = daemons.consume(broker, topic, group, backend.address, frontend.address)
    wait_until(lambda: set(paths) <= set(frontend.targets()), WAIT, "all purged", daemon)
    samples = daemon.scrape()
    assert daemon.metric("purged_events_received_total", samples, status="ok") == len(tags)
    labels = {
        dict(labels)["tag"]
        for (name, labels), _ in samples.items()
        if name == "purged_events_received_total"
    }
    assert "other" in labels and len(labels) <= 64 + 1
    assert max(map(len, labels)) <= 64
