"""At-least-once delivery: no purge is lost to a stop, a crash, a rebalance or a slow cache.

A Kafka offset is committed only once every event up to it was purged on both layers (or
deliberately not purged). The unit tests pin the bookkeeping that guarantees it
(`PartitionTrack`, the frontend FIFO's coalescing); the others run the daemon against the
real broker and recording caches and stop it with real signals.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from purged.cache import CacheLayer
from purged.config import parse_address
from purged.pipeline import PartitionTrack, Pipeline, Purge
from purged.url import PurgeTarget
from tests.support.broker import Broker
from tests.support.faults import committed
from tests.support.pages import HOST, WAIT, produce_pages, received_all, wait_received
from tests.support.purged_proc import Daemons, wait_until
from tests.support.recorder import Recorder


def committed_events(broker: Broker, group: str, topic: str) -> int:
    """Events of ``topic`` (from offset 0) that ``group`` committed as done."""
    return sum(max(0, offset) for offset in committed(broker.bootstrap, group, topic))


# -- the bookkeeping -------------------------------------------------------------------------


def test_partition_track_commits_past_a_run_of_finished_messages_only() -> None:
    track = PartitionTrack("t", 0)
    tickets = [track.ticket(offset) for offset in range(10, 15)]
    tickets[2].finish()
    tickets[1].finish()
    assert track.committable is None  # 10 is unfinished: nothing may be committed
    tickets[0].finish()
    assert track.committable == 13  # 10, 11, 12 done: the next offset to read is 13
    tickets[4].finish()
    assert track.committable == 13
    assert track.unfinished == 2
    tickets[3].finish()
    assert (track.committable, track.unfinished) == (15, 0)


def test_partition_track_skipped_messages_wait_behind_unfinished_ones() -> None:
    track = PartitionTrack("t", 0)
    track.skip(0)  # nothing pending: committable at once
    assert track.committable == 1
    first = track.ticket(1)
    track.skip(2)  # malformed, but behind an unfinished purge
    assert track.committable == 1
    first.finish()
    assert track.committable == 3


@given(st.permutations(range(20)), st.sets(st.integers(0, 19)))
def test_partition_track_never_passes_an_unfinished_offset(
    order: list[int], skipped: set[int]
) -> None:
    track = PartitionTrack("t", 0)
    tickets = {}
    for offset in range(20):
        if offset in skipped:
            track.skip(offset)
        else:
            tickets[offset] = track.ticket(offset)
    done = set(skipped)
    for offset in order:
        if offset in tickets:
            tickets[offset].finish()
            done.add(offset)
        lowest_unfinished = min(set(range(20)) - done, default=20)
        assert track.committable == (lowest_unfinished or None)


def _layers(pipeline: Pipeline, delay: float) -> tuple[CacheLayer, CacheLayer]:
    address = parse_address("127.0.0.1:9", "-test")  # never connected: nothing is sent
    backend = CacheLayer(
        "backend",
        address,
        workers=1,
        depth=8,
        timeout=10,
        delay=0.0,
        on_done=pipeline.backend_done,
    )
    frontend = CacheLayer(
        "frontend",
        address,
        workers=1,
        depth=8,
        timeout=10,
        delay=delay,
        on_done=pipeline.frontend_done,
        on_superseded=pipeline.superseded,
    )
    pipeline.connect(backend, frontend)
    return backend, frontend


def _sent(layer: CacheLayer) -> Purge:
    """Take the next purge the layer would send (as a connection would)."""
    purge = layer.queue.popleft()
    if layer.waiting.get(purge.request) is purge:
        del layer.waiting[purge.request]
    return purge


def test_a_purge_superseded_in_the_frontend_fifo_hands_its_kafka_messages_on() -> None:
    async def scenario() -> None:
        pipeline = Pipeline(max_pending=100)
        backend, frontend = _layers(pipeline, delay=0.05)
        track = PartitionTrack("t", 0)
        first, second = track.ticket(0), track.ticket(1)
        page = PurgeTarget(HOST, "/wiki/Same")
        pipeline.submit(page, first)
        pipeline.backend_done(_sent(backend))  # now held in the frontend FIFO
        pipeline.submit(page, second)
        pipeline.backend_done(_sent(backend))  # the same URL again: supersedes the first
        assert not first.done and not second.done
        assert track.committable is None
        await asyncio.sleep(0.1)  # the delay passes
        live = [purge for purge in frontend.queue if not purge.dead]
        assert len(live) == 1  # one frontend PURGE for both events
        frontend.answered(_sent(frontend), 200)
        assert first.done and second.done
        assert track.committable == 2
        assert pipeline.pending == 0 and pipeline.idle.is_set()

    asyncio.run(scenario())


def test_a_url_purged_over_and_over_still_reaches_the_frontend_within_two_delays() -> None:
    delay = 0.2

    async def scenario() -> None:
        pipeline = Pipeline(max_pending=1000)
        backend, frontend = _layers(pipeline, delay=delay)
        track = PartitionTrack("t", 0)
        page = PurgeTarget(HOST, "/wiki/Hot_page")
        loop = asyncio.get_running_loop()
        start = loop.time()
        released_at = None
        offset = 0
        while loop.time() - start < 5 * delay:  # the same URL every 10 ms, for 5 delays
            pipeline.submit(page, track.ticket(offset))
            offset += 1
            pipeline.backend_done(_sent(backend))
            # Held for the delay: pending, but not in the layer's backlog (as in the original).
            assert frontend.backlog == len(frontend.queue)
            if released_at is None and frontend.queue:
                released_at = loop.time()
            await asyncio.sleep(0.01)
        assert released_at is not None, "superseded forever: never sent to the frontend"
        assert released_at - start <= 2 * delay + 0.15
        frontend.answered(_sent(frontend), 200)
        assert track.committable is not None and track.committable >= 1

    asyncio.run(scenario())


def test_a_purge_coalesced_in_the_backend_queue_carries_both_kafka_messages() -> None:
    async def scenario() -> None:
        pipeline = Pipeline(max_pending=100)
        backend, frontend = _layers(pipeline, delay=0.0)
        track = PartitionTrack("t", 0)
        tickets = [track.ticket(0), track.ticket(1)]
        page = PurgeTarget(HOST, "/wiki/Twice")
        for ticket in tickets:
            pipeline.submit(page, ticket)
        assert len(backend.queue) == 1 and pipeline.pending == 1
        backend.answered(_sent(backend), 404)
        assert not any(ticket.done for ticket in tickets)  # the frontend has not answered
        frontend.answered(_sent(frontend), 200)
        assert all(ticket.done for ticket in tickets) and track.committable == 2
        assert pipeline.pending == 0

    asyncio.run(scenario())


def test_purges_given_back_after_a_connection_loss_are_counted_once() -> None:
    async def scenario() -> None:
        pipeline = Pipeline(max_pending=100)
        backend, _ = _layers(pipeline, delay=0.0)
        for i in range(5):
            pipeline.submit(PurgeTarget(HOST, f"/wiki/{i}"))
        connection = backend.connections[0]
        connection.inflight.extend(_sent(backend) for _ in range(3))  # as if sent
        assert backend.backlog == 5
        backend._give_back(connection)  # the connection died unanswered
        assert backend.backlog == 5 and pipeline.pending == 5
        order = [purge.request.split(b" ")[1] for purge in backend.queue]
        assert order == [f"/wiki/{i}".encode() for i in range(5)]  # the given back go first

    asyncio.run(scenario())


# -- stop, crash, restart ----------------------------------------------------------------------


def test_sigterm_mid_stream_drains_commits_and_the_restart_purges_only_the_rest(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    total = 50_000
    topic, group = unique("sigterm"), unique("sigterm-group")
    paths = produce_pages(broker, topic, total)
    backend, frontend = recorder(), recorder()
    frontend.delay = 0.0005  # the slower layer: purges are pending whenever the signal comes
    config = broker.write_kafka_config(tmp_path / "kafka.json", group)
    # A bounded pipeline keeps most events in Kafka, and the frontend delay keeps purges in
    # the FIFO, at the moment of the signal.
    flags = dict(
        topics=[topic],
        kafka_config=config,
        backend=backend.address,
        frontend=frontend.address,
        frontend_delay_ms=200,
        extra=["-max_pending", "2000", "-shutdown_timeout", "10s"],
    )
    first = daemons.start(**flags)
    frontend.wait_for(5_000, WAIT)
    first.send(signal.SIGTERM)
    signalled = time.monotonic()
    assert first.wait(WAIT) == 0, first.tail()
    stopped_in = time.monotonic() - signalled
    assert stopped_in < 10, first.tail()  # within -shutdown_timeout
    assert "draining" in first.log()
    purged = set(frontend.targets())
    # The drain finished every purge, those held for the frontend delay included...
    assert purged == set(backend.targets())
    assert 5_000 <= len(purged) < total
    # ...and committed exactly them.
    assert committed_events(broker, group, topic) == len(purged)

    frontend.delay = 0
    restarted_at = frontend.count()
    daemons.start(**{**flags, "extra": []})  # the same group, unbounded: quicker
    wait_received(frontend, paths, WAIT)
    assert received_all(backend, paths)
    assert frontend.count() == backend.count() == total  # the restart re-purged nothing
    assert frontend.count() - restarted_at == total - len(purged)


def test_sigkill_mid_stream_loses_nothing_and_the_restart_resumes_at_the_commit(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    total = 50_000
    topic, group = unique("sigkill"), unique("sigkill-group")
    paths = produce_pages(broker, topic, total)
    backend, frontend = recorder(), recorder()
    config = broker.write_kafka_config(tmp_path / "kafka.json", group)
    flags = dict(
        topics=[topic],
        kafka_config=config,
        backend=backend.address,
        frontend=frontend.address,
        frontend_delay_ms=200,
        extra=["-max_pending", "5000"],
    )
    first = daemons.start(**flags)
    frontend.wait_for(1, WAIT)
    first_answer = time.monotonic()
    frontend.wait_for(15_000, WAIT)
    time.sleep(max(0.0, first_answer + 2.5 - time.monotonic()))  # a periodic commit or two
    first.send(signal.SIGKILL)
    assert first.wait(WAIT) == -signal.SIGKILL
    time.sleep(0.5)  # let the broker apply a commit that was on its way
    done = committed_events(broker, group, topic)
    assert 0 < done < total
    # Nothing unfinished was committed: every committed event reached the frontend.
    assert done <= len(set(frontend.targets()))

    restarted_at = frontend.count()
    daemons.start(**flags)
    wait_received(frontend, paths, WAIT)
    assert received_all(backend, paths)
    # The restart read on from the committed offsets: the rest, and nothing before.
    wait_until(lambda: frontend.count() - restarted_at >= total - done, WAIT, "the rest purged")
    time.sleep(0.5)
    assert frontend.count() - restarted_at == total - done


def test_the_drain_waits_for_the_purges_held_for_the_frontend_delay(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("drain-fifo"), unique("drain-fifo-group")
    paths = produce_pages(broker, topic, 2_000)
    backend, frontend = recorder(), recorder()
    daemon = daemons.consume(
        broker,
        topic,
        group,
        backend.address,
        frontend.address,
        frontend_delay_ms=3_000,
    )
    backend.wait_for(len(paths), WAIT)
    daemon.send(signal.SIGTERM)
    assert frontend.count() < len(paths)  # the FIFO holds them at the signal
    assert daemon.wait(WAIT) == 0, daemon.tail()
    assert set(frontend.targets()) == set(paths)
    assert committed_events(broker, group, topic) == len(paths)


def test_purges_unfinished_at_the_shutdown_timeout_are_not_committed(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("drain-timeout"), unique("drain-timeout-group")
    paths = produce_pages(broker, topic, 1_000)
    backend, frontend = recorder(), recorder()
    frontend.stall = True
    flags = dict(
        topics=[topic],
        kafka_config=broker.write_kafka_config(tmp_path / "kafka.json", group),
        backend=backend.address,
        frontend=frontend.address,
        extra=["-shutdown_timeout", "2s"],
    )
    daemon = daemons.start(**flags)
    backend.wait_for(len(paths), WAIT)
    daemon.send(signal.SIGTERM)
    signalled = time.monotonic()
    assert daemon.wait(WAIT) == 0, daemon.tail()
    assert time.monotonic() - signalled < 2 + 5  # -shutdown_timeout, and the final commit
    assert "did not finish; their offsets are not committed" in daemon.log()
    assert committed_events(broker, group, topic) == 0

    frontend.stall = False
    restarted_at = frontend.count()
    daemons.start(**flags)
    wait_received(frontend, paths, WAIT, since=restarted_at)


def test_a_second_signal_exits_at_once_and_commits_nothing_unfinished(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("second-signal"), unique("second-signal-group")
    paths = produce_pages(broker, topic, 1_000)
    backend, frontend = recorder(), recorder()
    frontend.stall = True
    daemon = daemons.consume(
        broker,
        topic,
        group,
        backend.address,
        frontend.address,
        extra=["-shutdown_timeout", "60s"],
    )
    backend.wait_for(len(paths), WAIT)
    daemon.send(signal.SIGTERM)
    daemon.wait_log("draining", WAIT)
    daemon.send(signal.SIGINT)
    signalled = time.monotonic()
    assert daemon.wait(WAIT) == 1, daemon.tail()
    assert time.monotonic() - signalled < 5
    assert "second SIGINT" in daemon.log()
    assert committed_events(broker, group, topic) == 0


# -- rebalance ---------------------------------------------------------------------------------


def test_a_daemon_joining_then_leaving_the_group_mid_stream_loses_nothing(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    total = 30_000
    topic, group = unique("rebalance"), unique("rebalance-group")
    paths = produce_pages(broker, topic, total)
    backend, frontend = recorder(), recorder()
    flags = dict(
        topics=[topic],
        kafka_config=broker.write_kafka_config(tmp_path / "kafka.json", group),
        backend=backend.address,
        frontend=frontend.address,
        frontend_delay_ms=300,  # a slow stream, so that the group changes mid-way
        extra=["-max_pending", "1000"],
    )
    first = daemons.start(**flags)
    frontend.wait_for(2_000, WAIT)
    second = daemons.start(**flags)
    second.wait_metric("purged_http_requests_total", lambda v: v > 0, WAIT, layer="frontend")
    assert frontend.count() < total, "the stream ended before the second daemon took part"
    second.send(signal.SIGTERM)
    assert second.wait(WAIT) == 0, second.tail()
    assert frontend.count() < total, "the stream ended before the second daemon left"

    wait_received(frontend, paths, 2 * WAIT, daemon=first)
    assert received_all(backend, paths)
    log = first.log()
    assert log.count("revoked") >= 2 and log.count("assigned") >= 3, log  # joined, left


# -- backpressure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "events",
    [
        pytest.param(200_000, id="200k"),
        pytest.param(1_000_000, id="1M"),  # issue 4's figure; ~40 s here
    ],
)
def test_a_slow_cache_pauses_consumption_and_memory_stays_bounded(
    events: int,
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("backpressure"), unique("backpressure-group")
    paths = produce_pages(broker, topic, events)
    backend, frontend = recorder(), recorder()
    frontend.delay = 0.01  # 100 answers a second
    max_pending = 100_000  # the default
    daemon = daemons.consume(broker, topic, group, backend.address, frontend.address)
    daemon.wait_metric("purged_kafka_paused", lambda v: v == 1, WAIT)
    for _ in range(10):  # while paused, the bound holds
        samples = daemon.scrape()
        assert daemon.metric("purged_pending", samples) <= max_pending
        assert daemon.metric("purged_kafka_paused", samples) == 1
        time.sleep(0.2)
    paused_rss = daemon.memory_kib()["VmRSS"]

    frontend.delay = 0
    started = time.monotonic()
    wait_received(frontend, paths, WAIT + events / 2_000, daemon=daemon)
    delivered_in = time.monotonic() - started
    assert received_all(backend, paths)
    peak = daemon.memory_kib()["VmHWM"]
    print(
        f"\n{events} events: RSS {paused_rss / 1024:.0f} MiB while paused, "
        f"peak {peak / 1024:.0f} MiB; delivered in {delivered_in:.1f} s after recovery"
    )
    assert peak < 200 * 1024, f"peak RSS {peak / 1024:.0f} MiB"


def test_a_long_pause_keeps_the_consumer_in_its_group(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("long-pause"), unique("long-pause-group")
    paths = produce_pages(broker, topic, 1_000)
    backend, frontend = recorder(), recorder()
    frontend.stall = True
    poll_interval = 4.0  # librdkafka leaves the group of a consumer silent this long
    config = broker.write_kafka_config(
        tmp_path / "kafka.json", group, **{"max.poll.interval.ms": int(poll_interval * 1000)}
    )
    daemon = daemons.start(
        topics=[topic],
        kafka_config=config,
        backend=backend.address,
        frontend=frontend.address,
        extra=["-max_pending", "100"],
    )
    daemon.wait_metric("purged_kafka_paused", lambda v: v == 1, WAIT)
    time.sleep(poll_interval * 1.5)
    frontend.stall = False
    wait_received(frontend, paths, WAIT, daemon=daemon)
    log = daemon.log()
    assert "maximum poll interval" not in log
    assert "lost" not in log and "revoked" not in log
    assert log.count("assigned") == 1
