"""Faults survived: caches that refuse, reset, close mid-response, answer 5xx or stall, and a
broker that becomes unreachable or is replaced. The daemon keeps running (same process),
counts the errors, and delivers every purge once the fault is gone. A fatal Kafka error is
the one fault it exits for: non-zero, and without committing anything unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from purged import metrics
from purged.cache import CacheLayer
from purged.config import parse_address
from purged.pipeline import Purge
from purged.url import purge_request
from tests.support.broker import Broker
from tests.support.faults import (
    BreakingProxy,
    FencingBroker,
    SamePortBroker,
    committed,
)
from tests.support.pages import WAIT, produce_pages, wait_received
from tests.support.purged_proc import Daemons, Purged, wait_until
from tests.support.recorder import Recorder
from tests.test_race import scrape_race


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A broker for this test alone (it is stopped, frozen or replaced by the test)."""
    with Broker() as broker:
        yield broker


def wait_answered(
    layer: Recorder, paths: list[str], timeout: float, daemon: Purged | None = None
) -> None:
    """Wait until ``layer`` answered every path with a 2xx (a purge that took effect)."""
    wanted = set(paths)

    def done() -> bool:
        return wanted <= {r.target for r, status in layer.answered if status < 300}

    wait_until(done, timeout, "every page purged with success", daemon)


def tcp_errors(daemon: Purged, kind: str) -> float:
    return daemon.metric("purged_tcp_errors_total", type=kind)


# -- caches ------------------------------------------------------------------------------------


def test_a_backend_refusing_connections_for_20_s_at_start_gets_everything_once_up(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("backend-down"), unique("backend-down-group")
    paths = produce_pages(broker, topic, 2_000)
    backend, frontend = recorder(), recorder()
    backend.refuse()
    daemon = daemons.consume(
        broker,
        topic,
        group,
        backend.address,
        frontend.address,
        ready=False,
    )
    daemon.wait_log("assigned", WAIT)
    pid = daemon.pid
    time.sleep(20)
    assert daemon.alive(), daemon.tail()
    assert backend.count() == frontend.count() == 0
    assert "ready:" not in daemon.log()  # not ready while a cache is unreachable
    refused = tcp_errors(daemon, "connect")
    assert refused > 0

    backend.accept()
    wait_received(frontend, paths, WAIT, daemon)
    assert set(backend.targets()) == set(paths)
    assert daemon.alive() and daemon.pid == pid
    daemon.wait_log("ready:", WAIT)
    # Capped back-off: about one attempt a second per connection at most, not a busy loop.
    assert refused <= 4 * 20, refused


def test_a_frontend_stopped_for_5_s_mid_stream_loses_nothing(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("frontend-down"), unique("frontend-down-group")
    paths = produce_pages(broker, topic, 20_000)
    backend, frontend = recorder(), recorder()
    daemon = daemons.consume(
        broker,
        topic,
        group,
        backend.address,
        frontend.address,
        frontend_delay_ms=100,
        extra=["-max_pending", "2000"],  # keeps most of the stream in Kafka meanwhile
    )
    frontend.wait_for(2_000, WAIT)
    frontend.refuse(close_connections=True)
    time.sleep(5)
    assert daemon.alive(), daemon.tail()
    assert len(set(frontend.targets())) < len(paths)
    frontend.accept()
    wait_received(frontend, paths, WAIT, daemon)
    assert set(backend.targets()) == set(paths)
    assert tcp_errors(daemon, "connect") > 0


@pytest.mark.parametrize(
    ("fault", "layer", "error"),
    [
        ("close", "backend", "closed"),
        ("reset", "frontend", "reset"),
    ],
    ids=["backend-closes-mid-response", "frontend-resets"],
)
def test_a_cache_breaking_its_connections_for_a_while_loses_nothing(
    fault: str,
    layer: str,
    error: str,
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique(f"break-{fault}"), unique(f"break-{fault}-group")
    paths = produce_pages(broker, topic, 10_000)
    caches = {"backend": recorder(), "frontend": recorder()}
    proxy = BreakingProxy(("127.0.0.1", caches[layer].port))
    try:
        addresses = {name: cache.address for name, cache in caches.items()}
        addresses[layer] = proxy.address
        daemon = daemons.consume(
            broker,
            topic,
            group,
            addresses["backend"],
            addresses["frontend"],
            frontend_delay_ms=100,
            extra=["-max_pending", "1000"],
        )
        caches[layer].wait_for(1_000, WAIT)
        proxy.mode = fault
        time.sleep(2)
        proxy.mode = None
        assert daemon.alive(), daemon.tail()
        assert proxy.broken > 0
        wait_received(caches["frontend"], paths, WAIT, daemon)
        assert set(caches["backend"].targets()) == set(paths)
        samples = daemon.scrape()
        assert daemon.metric("purged_tcp_errors_total", samples, type=error) > 0
        assert daemon.metric("purged_purges_resent_total", samples, layer=layer) > 0
    finally:
        proxy.stop()


def test_a_reset_counts_as_an_error_even_between_responses_an_idle_close_does_not() -> None:
    """A cache that answers every PURGE and then drops the connection: a reset (RST) is
    counted even when nothing was awaited; a close (FIN) of an idle keep-alive connection is
    the cache's right and is not. In-process, over real loopback sockets."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def errors(kind: str) -> float:
        value = metrics.REGISTRY.get_sample_value("purged_tcp_errors_total", {"type": kind})
        return value or 0.0

    async def scenario(reset: bool) -> tuple[float, float, int]:
        connections: list[asyncio.StreamWriter] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(writer)
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while head := await reader.readuntil(b"\r\n\r\n"):
                    writer.write(answer * head.count(b"PURGE "))

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        done: list[Purge] = []
        layer = CacheLayer(
            "backend",
            parse_address(f"127.0.0.1:{port}", "-test"),
            workers=1,
            depth=8,
            timeout=10,
            delay=0.0,
            on_done=done.append,
        )
        before = errors("reset"), errors("closed")
        runner = asyncio.create_task(layer.run())
        try:
            layer.enqueue(Purge(purge_request("http://example.org/a")[1], []))
            while not done:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # idle: nothing in flight
            (writer,) = connections
            if reset:  # linger 0: closing sends RST
                linger = struct.pack("ii", 1, 0)
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, linger
                )
            writer.close()
            while len(connections) < 2:  # the layer re-connects
                await asyncio.sleep(0.01)
            layer.enqueue(Purge(purge_request("http://example.org/b")[1], []))
            while len(done) < 2:
                await asyncio.sleep(0.01)
        finally:
            runner.cancel()
            server.close()
        return errors("reset") - before[0], errors("closed") - before[1], len(done)

    assert asyncio.run(asyncio.wait_for(scenario(reset=True), 20)) == (1, 0, 2)
    assert asyncio.run(asyncio.wait_for(scenario(reset=False), 20)) == (0, 0, 2)


def test_a_cache_answering_5xx_for_a_while_gets_every_purge_once_healthy(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("5xx"), unique("5xx-group")
    paths = produce_pages(broker, topic, 3_000)
    backend, frontend = recorder(), recorder()
    frontend.status = 503
    daemon = daemons.consume(broker, topic, group, backend.address, frontend.address)
    frontend.wait_for(len(paths), WAIT)
    time.sleep(3)
    frontend.status = 200
    wait_answered(frontend, paths, WAIT, daemon)
    samples = daemon.scrape()
    assert daemon.metric("purged_http_requests_total", samples, status="503") >= len(paths)
    wait_until(
        lambda: sum(committed(broker.bootstrap, group, topic)) == len(paths),
        WAIT,
        "every event committed",
    )


def test_a_cache_stalling_past_the_cache_timeout_is_reconnected_and_gets_everything(
    broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("stall"), unique("stall-group")
    paths = produce_pages(broker, topic, 3_000)
    backend, frontend = recorder(), recorder()
    backend.stall = True
    daemon = daemons.consume(
        broker,
        topic,
        group,
        backend.address,
        frontend.address,
        extra=["-cache_timeout", "1s"],
    )
    daemon.wait_metric("purged_tcp_errors_total", lambda v: v > 0, WAIT, type="timeout")
    assert frontend.count() == 0
    backend.stall = False
    wait_received(frontend, paths, WAIT, daemon)
    assert set(backend.targets()) == set(paths)
    assert daemon.metric("purged_purges_resent_total", layer="backend") > 0


def test_scraping_metrics_at_full_speed_while_the_caches_fail_raises_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    """The seed's race test, with the frontend going away and the backend answering 503."""
    seen: dict[str, float] = {}

    def faults(daemon: Purged, backend: Recorder, frontend: Recorder) -> None:
        frontend.wait_for(1_000, WAIT)
        frontend.refuse(close_connections=True)
        backend.status = 503
        time.sleep(1.5)
        frontend.accept()
        backend.status = 200
        samples = daemon.scrape()
        seen["503"] = daemon.metric("purged_http_requests_total", samples, status="503")
        seen["tcp"] = daemon.metric("purged_tcp_errors_total", samples)

    result = scrape_race(broker, tmp_path, events=30_000, scrapers=4, during=faults)
    assert result.scrapes >= 4 * 2
    assert seen["503"] > 0 and seen["tcp"] > 0, seen


# -- the broker --------------------------------------------------------------------------------


def test_an_unreachable_broker_coming_back_is_consumed_from_again(
    own_broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("frozen-broker"), unique("frozen-broker-group")
    before = produce_pages(own_broker, topic, 300, "before-")
    backend, frontend = recorder(), recorder()
    daemon = daemons.consume(own_broker, topic, group, backend.address, frontend.address)
    wait_received(frontend, before, WAIT, daemon)
    assert own_broker._proc is not None
    os.killpg(own_broker._proc.pid, signal.SIGSTOP)  # up, but answering nothing
    try:
        time.sleep(6)  # past the session timeout: the group membership is lost
        assert daemon.alive(), daemon.tail()
    finally:
        os.killpg(own_broker._proc.pid, signal.SIGCONT)
    after = produce_pages(own_broker, topic, 300, "after-", create=False)
    wait_received(frontend, after, WAIT, daemon)
    assert set(before + after) <= set(backend.targets())


def test_a_broker_replaced_by_an_empty_one_is_consumed_from_again(
    own_broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    unique: Callable[[str], str],
) -> None:
    # Tansu keeps everything in memory: the new broker on the same port has no topic, no
    # message and no committed offset, like a cluster rebuilt from scratch.
    topic, group = unique("new-broker"), unique("new-broker-group")
    before = produce_pages(own_broker, topic, 600, "before-")
    backend, frontend = recorder(), recorder()
    daemon = daemons.consume(own_broker, topic, group, backend.address, frontend.address)
    wait_received(frontend, before, WAIT, daemon)
    own_broker.stop()
    time.sleep(3)
    assert daemon.alive(), daemon.tail()
    with SamePortBroker(own_broker.port) as replacement:
        after = produce_pages(replacement, topic, 90, "after-")
        wait_received(frontend, after, WAIT, daemon)
    assert daemon.metric("purged_kafka_errors_total") > 0


def test_stopping_while_the_broker_is_unreachable_does_not_hang(
    own_broker: Broker,
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    topic, group = unique("stop-frozen"), unique("stop-frozen-group")
    produce_pages(own_broker, topic, 100)
    backend, frontend = recorder(), recorder()
    # librdkafka waits for the coordinator up to the session timeout: make it long.
    config = own_broker.write_kafka_config(
        tmp_path / "kafka.json", group, **{"session.timeout.ms": 12_000}
    )
    daemon = daemons.start(
        topics=[topic],
        kafka_config=config,
        backend=backend.address,
        frontend=frontend.address,
        extra=["-shutdown_timeout", "1s"],
    )
    frontend.wait_for(100, WAIT)
    frontend.stall = True
    pending = produce_pages(own_broker, topic, 100, "pending-", create=False)
    backend.wait_for(200, WAIT)
    assert own_broker._proc is not None
    os.killpg(own_broker._proc.pid, signal.SIGSTOP)
    try:
        daemon.send(signal.SIGTERM)
        signalled = time.monotonic()
        frontend.stall = False  # the drain finishes: there is an offset to commit
        assert daemon.wait(WAIT) == 0, daemon.tail()
        stopped_in = time.monotonic() - signalled
    finally:
        os.killpg(own_broker._proc.pid, signal.SIGCONT)
    assert set(pending) <= set(frontend.targets())
    # -shutdown_timeout, plus at most 5 s for the final commit: not the session timeout.
    assert stopped_in < 1 + 5 + 3, daemon.tail()
    assert "commit and close did not finish" in daemon.log()


def test_a_fatal_kafka_error_exits_non_zero_without_committing_unfinished_purges(
    recorder: Callable[..., Recorder],
    daemons: Daemons,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    # A static group member (group.instance.id) that the broker fences because another
    # consumer took its id: librdkafka reports a fatal error and the consumer is dead.
    topic, group = unique("fatal"), unique("fatal-group")
    backend, frontend = recorder(), recorder()
    with FencingBroker() as broker:
        assert broker.proxy is not None
        done = produce_pages(broker, topic, 300, "done-")
        config = broker.write_kafka_config(
            tmp_path / "kafka.json", group, **{"group.instance.id": "cache-host-1"}
        )
        daemon = daemons.start(
            topics=[topic], kafka_config=config, backend=backend.address, frontend=frontend.address
        )
        wait_received(frontend, done, WAIT, daemon)
        wait_until(
            lambda: sum(committed(broker.bootstrap, group, topic)) == len(done),
            WAIT,
            "the finished purges committed",
        )
        frontend.stall = True
        unfinished = produce_pages(broker, topic, 300, "unfinished-", create=False)
        wait_received(backend, unfinished, WAIT, daemon)

        broker.proxy.fence()
        fenced = time.monotonic()
        assert daemon.wait(WAIT) == 1, daemon.tail()
        assert time.monotonic() - fenced < 10
        assert "fatal error" in daemon.log()
        assert sum(committed(broker.bootstrap, group, topic)) == len(done)
