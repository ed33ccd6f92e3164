"""Coalescing (issue 5): a URL already waiting in a layer is not queued there a second time.

Duplicates merge only into a purge that has not been sent yet; one that arrives after the
earlier purge was sent is sent again (MediaWiki's deliberate "rebound" purges). The counts
must add up, the last purge of a URL is never dropped or sent early, and merging must not
break at-least-once offset commits.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.support.broker import Broker, make_event
from tests.support.purged_proc import Daemons, Purged
from tests.support.recorder import Recorder

HOST = "en.wikipedia.org"
WAIT = 60.0  # seconds: bound of every wait for the daemon (2 noisy cores)

StartDaemon = Callable[..., Purged]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    started = Daemons(tmp_path)
    yield started
    started.stop_all()
    for daemon in started.started:
        assert "Traceback" not in daemon.log(), daemon.tail()
        assert daemon.returncode == 0, daemon.tail()


@pytest.fixture
def start_daemon(
    broker: Broker, tmp_path: Path, daemons: Daemons, unique: Callable[[str], str]
) -> StartDaemon:
    """``start_daemon(topic, backend, frontend, *flags, group=None, delay_ms=0)``."""

    def start(
        topic: str,
        backend: Recorder,
        frontend: Recorder,
        *flags: str,
        group: str | None = None,
        delay_ms: int = 0,
    ) -> Purged:
        group = group or unique("coalescing-group")
        config = broker.write_kafka_config(tmp_path / f"{group}.json", group)
        return daemons.start(
            topics=[topic],
            kafka_config=config,
            backend=backend.address,
            frontend=frontend.address,
            frontend_delay_ms=delay_ms,
            extra=flags,
        )

    return start


@pytest.fixture
def topic(broker: Broker, unique: Callable[[str], str]) -> str:
    """A fresh topic with one partition (offsets follow the order of production)."""
    name = unique("coalescing-topic")
    broker.create_topic(name, partitions=1)
    return name


def url(path: str) -> str:
    return f"https://{HOST}{path}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def wait_idle(daemon: Purged, events: int) -> None:
    """Until `events` events were accepted and no purge is pending (gauge: every 0.25 s)."""
    daemon.wait_metric("purged_events_received_total", lambda v: v >= events, WAIT, status="ok")
    time.sleep(0.3)
    daemon.wait_metric("purged_pending", lambda v: v == 0, WAIT)


def coalesced(daemon: Purged, layer: str) -> int:
    return int(daemon.metric("purged_coalesced_total", layer=layer))


def answered(daemon: Purged, layer: str) -> int:
    return int(daemon.metric("purged_http_requests_total", layer=layer))


def assert_counts_add_up(daemon: Purged, events: int) -> None:
    """Every accepted event was either sent or merged, per layer."""
    assert daemon.metric("purged_events_received_total", status="ok") == events
    backend = answered(daemon, "backend")
    assert events == backend + coalesced(daemon, "backend")
    # The frontend gets every purge the backend finished.
    assert backend == answered(daemon, "frontend") + coalesced(daemon, "frontend")


def committed_offset(broker: Broker, group: str, topic: str) -> int:
    consumer = Consumer(broker.kafka_config(group))
    try:
        (partition,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()
    return int(partition.offset)


def test_burst_of_duplicates_waiting_for_a_slow_cache_collapses(
    broker: Broker,
    topic: str,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    prefix = "/" + unique("burst")
    paths = [f"{prefix}/{i}" for i in range(20)]
    backend, frontend = recorder(), recorder()
    backend.delay = 0.05  # one connection, one request at a time: a queue builds up
    daemon = start_daemon(topic, backend, frontend, "-backend_workers", "1", "-pipeline_depth", "1")
    events = paths * 10
    broker.produce(topic, [make_event(url(path)) for path in events])
    wait_idle(daemon, len(events))

    assert coalesced(daemon, "backend") > len(events) // 2
    assert len(backend.requests) < len(events) // 2
    assert_counts_add_up(daemon, len(events))
    assert answered(daemon, "backend") == len(backend.requests)
    assert answered(daemon, "frontend") == len(frontend.requests)
    # The last purge of every URL went to both layers, the frontend after the backend.
    assert set(backend.targets()) == set(frontend.targets()) == set(paths)
    last_backend = {r.target: r.time for r in backend.requests}
    last_frontend = {r.target: r.time for r in frontend.requests}
    assert all(last_frontend[path] >= last_backend[path] for path in paths)


def test_duplicate_of_a_purge_already_sent_is_sent_again(
    broker: Broker,
    topic: str,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    path = "/" + unique("rebound")
    backend, frontend = recorder(), recorder()
    backend.delay = 0.5  # the first purge is still unanswered when the duplicate comes
    daemon = start_daemon(topic, backend, frontend, "-backend_workers", "1")
    broker.produce(topic, [make_event(url(path))])
    backend.wait_for(1, WAIT)
    broker.produce(topic, [make_event(url(path))])  # in flight: not merged
    backend.wait_for(2, WAIT)
    frontend.wait_for(2, WAIT)
    wait_idle(daemon, 2)
    broker.produce(topic, [make_event(url(path))])  # after completion: sent again
    frontend.wait_for(3, WAIT)
    wait_idle(daemon, 3)

    assert backend.targets() == frontend.targets() == [path] * 3
    assert coalesced(daemon, "backend") == coalesced(daemon, "frontend") == 0
    assert_counts_add_up(daemon, 3)


def test_rebound_waiting_for_the_frontend_delay_replaces_the_earlier_purge(
    broker: Broker,
    topic: str,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    # Both backend purges are answered within the frontend delay: the frontend purges once,
    # a full delay after the second backend purge (never earlier: the backend might have
    # been refilled from the origin's stale copy in between).
    path = "/" + unique("frontend-merge")
    backend, frontend = recorder(), recorder()
    daemon = start_daemon(topic, backend, frontend, delay_ms=1000)
    broker.produce(topic, [make_event(url(path))])
    backend.wait_for(1, WAIT)
    time.sleep(0.2)
    broker.produce(topic, [make_event(url(path))])
    backend.wait_for(2, WAIT)
    frontend.wait_for(1, WAIT)
    wait_idle(daemon, 2)

    assert frontend.targets() == [path]
    assert coalesced(daemon, "frontend") == 1
    assert coalesced(daemon, "backend") == 0
    assert frontend.requests[0].time - backend.requests[1].time >= 0.95
    assert_counts_add_up(daemon, 2)


def test_coalesced_purges_are_all_committed_by_a_clean_stop(
    broker: Broker,
    topic: str,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    # Merged purges carry every event they stand for: once they are done, every offset is
    # committed, and a restarted daemon has nothing left to purge.
    group = unique("coalescing-group")
    prefix = "/" + unique("commit")
    paths = [f"{prefix}/{i}" for i in range(20)]
    backend, frontend = recorder(), recorder()
    backend.delay = 0.01
    flags = ("-backend_workers", "1", "-pipeline_depth", "1")
    daemon = start_daemon(topic, backend, frontend, *flags, group=group, delay_ms=300)
    first = paths * 5
    broker.produce(topic, [make_event(url(path)) for path in first])
    backend.wait_for(len(paths), WAIT)
    second = paths * 2  # rebounds, while the first purges wait for the frontend delay
    broker.produce(topic, [make_event(url(path)) for path in second])
    total = len(first) + len(second)
    wait_idle(daemon, total)
    assert coalesced(daemon, "backend") > 0
    assert_counts_add_up(daemon, total)
    daemon.send(signal.SIGTERM)
    assert daemon.wait(WAIT) == 0

    assert committed_offset(broker, group, topic) == total
    received = (len(backend.requests), len(frontend.requests))
    again = start_daemon(topic, backend, frontend, *flags, group=group)
    time.sleep(1.5)
    assert again.metric("purged_events_received_total") == 0
    assert (len(backend.requests), len(frontend.requests)) == received


def test_stop_in_the_middle_of_a_burst_commits_only_purged_events(
    broker: Broker,
    topic: str,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    # A slow backend and a short drain: the stop leaves purges unfinished. Every committed
    # offset must belong to an event whose URL reached the frontend; the rest is read again
    # by the next daemon of the group and purged then.
    group = unique("coalescing-group")
    prefix = "/" + unique("midway")
    paths = [f"{prefix}/{i}" for i in range(30)]
    events = paths * 4  # offset k is paths[k % 30]
    backend, frontend = recorder(), recorder()
    backend.delay = 0.1
    daemon = start_daemon(
        topic,
        backend,
        frontend,
        *("-backend_workers", "1", "-pipeline_depth", "1", "-shutdown_timeout", "300ms"),
        group=group,
    )
    broker.produce(topic, [make_event(url(path)) for path in events])
    frontend.wait_for(5, WAIT)
    daemon.send(signal.SIGTERM)
    assert daemon.wait(WAIT) == 0
    purged_before_stop = set(frontend.targets())
    assert len(purged_before_stop) < len(paths), "the burst finished before the stop"

    committed = committed_offset(broker, group, topic)
    assert all(events[k] in purged_before_stop for k in range(committed))
    again = start_daemon(topic, backend, frontend, group=group)
    wait_idle(again, len(events) - committed)
    assert again.metric("purged_events_received_total") == len(events) - committed
    assert set(frontend.targets()) == set(paths)
