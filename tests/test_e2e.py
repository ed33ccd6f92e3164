"""End to end: Kafka events in, PURGE out to a real Traffic Server and Varnish.

The chain is client → Varnish → Traffic Server → origin, with ``purged`` between the broker
and the two caches, as on a CDN cache host. Pages are filled through Varnish, an event for a
page's URL is produced, and the test checks what a user would: both caches miss afterwards
and the origin is asked again. Timing details are checked against recording servers.
"""

from __future__ import annotations

import http.client
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.ats import TrafficServer, via_hit
from tests.support.broker import Broker, make_event
from tests.support.origin import Origin
from tests.support.purged_proc import Purged, daemon_args
from tests.support.recorder import Recorder
from tests.support.varnish import Varnish

HOST = "en.wikipedia.org"
# ATS can lose a PURGE that lands within ~1 ms of the GET miss that filled the object.
FILL_SETTLE = 0.05
WAIT = 30.0  # seconds: bound of every wait for the daemon (2 noisy cores)

StartDaemon = Callable[..., Purged]


@pytest.fixture
def start_daemon(
    broker: Broker, tmp_path: Path, unique: Callable[[str], str]
) -> Iterator[StartDaemon]:
    """``start_daemon(topics, backend, frontend, delay_ms=0, extra=(), group=None)``: a
    ready purged reading ``topics`` (its own consumer group unless ``group`` is given);
    all are stopped at teardown."""
    started: list[Purged] = []

    def start(
        topics: list[str],
        backend: str,
        frontend: str,
        delay_ms: int = 0,
        extra: tuple[str, ...] = (),
        group: str | None = None,
    ) -> Purged:
        group = group or unique("e2e-group")
        config = broker.write_kafka_config(tmp_path / f"{group}.json", group)
        args = daemon_args(
            topics=topics,
            kafka_config=config,
            backend=backend,
            frontend=frontend,
            frontend_delay_ms=delay_ms,
            extra=extra,
        )
        daemon = Purged(args, tmp_path / f"{group}.log").start()
        started.append(daemon)
        daemon.wait_ready(WAIT)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
    for daemon in started:
        # Whatever the test did, nothing may have raised, and SIGTERM stops it cleanly.
        assert "Traceback" not in daemon.log(), daemon.tail()
        assert daemon.returncode == 0, daemon.tail()


@pytest.fixture
def topic(broker: Broker, unique: Callable[[str], str]) -> str:
    """A fresh topic with 3 partitions."""
    name = unique("e2e-topic")
    broker.create_topic(name)
    return name


def fill(varnish: Varnish, ats: TrafficServer, origin: Origin, path: str, host: str = HOST) -> None:
    """Fetch ``path`` through Varnish until it is a hit in both caches."""
    before = origin.hits(path)  # the origin counts by path, whatever the host
    first = varnish.fetch(path, host)
    assert first.status == 200
    assert not first.hit, "a fresh path must be a Varnish miss"
    assert not via_hit(first.header("Via")), "a fresh path must be a Traffic Server miss"
    assert varnish.get(path, host) == (200, True)
    assert ats_cached(ats, path, host)
    assert origin.hits(path) == before + 1
    time.sleep(FILL_SETTLE)


def ats_cached(ats: TrafficServer, path: str, host: str = HOST) -> bool:
    """Whether Traffic Server holds ``path``, asked without filling it (only-if-cached)."""
    conn = http.client.HTTPConnection("127.0.0.1", ats.port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host, "Cache-Control": "only-if-cached"})
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status in (200, 504), response.status
    return response.status == 200


def assert_purged_from_both(varnish: Varnish, origin: Origin, path: str, host: str = HOST) -> None:
    """One fetch through Varnish misses in both caches and reaches the origin again."""
    before = origin.hits(path)
    after = varnish.fetch(path, host)
    assert after.status == 200
    assert not after.hit, "Varnish still had the page"
    assert not via_hit(after.header("Via")), "Traffic Server still had the page"
    assert origin.hits(path) == before + 1


def assert_still_cached(varnish: Varnish, ats: TrafficServer, path: str, host: str = HOST) -> None:
    assert ats_cached(ats, path, host), "Traffic Server lost a page nobody purged"
    assert varnish.get(path, host) == (200, True), "Varnish lost a page nobody purged"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def url(path: str, host: str = HOST) -> str:
    return f"https://{host}{path}"


# --- the purge through both real caches ---------------------------------------------------


def test_event_purges_the_page_from_both_caches_and_the_origin_is_asked_again(
    broker: Broker,
    varnish: Varnish,
    ats: TrafficServer,
    origin: Origin,
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    delay_ms = 2000
    start_daemon([topic], ats.address, varnish.address, delay_ms)
    path = f"/wiki/{unique('Main_Page')}"
    fill(varnish, ats, origin, path)

    broker.produce(topic, [make_event(url(path))])

    # The backend first: Traffic Server loses the page while Varnish still serves it.
    wait_until(lambda: not ats_cached(ats, path), WAIT, "Traffic Server purged")
    backend_purged_by = time.monotonic()
    assert varnish.get(path, HOST) == (200, True), "Varnish was purged with the backend"
    # Then, a frontend delay later, Varnish. Each hit here proves Varnish still had it.
    last_hit_sent = backend_purged_by
    deadline = backend_purged_by + WAIT
    while time.monotonic() < deadline:
        sent = time.monotonic()
        result = varnish.fetch(path, HOST)
        if not result.hit:
            break
        last_hit_sent = sent
        time.sleep(0.02)
    else:
        raise AssertionError("Varnish was never purged")
    # That first miss went through to Traffic Server, which missed too, and to the origin.
    assert not via_hit(result.header("Via"))
    assert origin.hits(path) == 2
    # Lower bound of the gap between the two PURGEs; the slack is for this polling loop
    # on a busy machine (the exact gap is checked against recorders below).
    assert last_hit_sent - backend_purged_by >= delay_ms / 1000 / 2


def test_frontend_purge_of_a_url_arrives_at_least_the_delay_after_its_backend_purge(
    broker: Broker,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    delay_ms = 500
    backend, frontend = recorder(), recorder()
    start_daemon([topic], backend.address, frontend.address, delay_ms)
    paths = [f"/wiki/{unique('Timed')}" for _ in range(20)]

    broker.produce(topic, [make_event(url(p)) for p in paths])

    backend.wait_for(len(paths), WAIT)
    frontend.wait_for(len(paths), WAIT)
    at_backend = {r.target: r.time for r in backend.requests}
    at_frontend = {r.target: r.time for r in frontend.requests}
    assert set(at_backend) == set(at_frontend) == set(paths)
    for path in paths:
        assert at_frontend[path] - at_backend[path] >= delay_ms / 1000, path
    # The frontend receives the URLs in the order the backend did.
    assert frontend.targets() == backend.targets()


def test_purge_request_is_exactly_what_the_caches_expect(
    broker: Broker,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    backend, frontend = recorder(), recorder()
    start_daemon([topic], backend.address, frontend.address)
    name = unique("Straße")
    broker.produce(topic, [make_event(f"https://user@de.wikipedia.org/wiki/{name}?a=%2F#frag")])

    for layer in (backend, frontend):
        (request,) = layer.wait_for(1, WAIT)
        assert request.method == "PURGE"
        assert request.host == "de.wikipedia.org"
        assert request.target == f"/wiki/{name.replace('ß', '%C3%9F')}?a=%2F"
        assert layer.errors == []


# --- filtering --------------------------------------------------------------------------


def test_host_regex_purges_matching_hosts_only_and_counts_the_others(
    broker: Broker,
    varnish: Varnish,
    ats: TrafficServer,
    origin: Origin,
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    daemon = start_daemon(
        [topic], ats.address, varnish.address, 0, extra=("-host_regex", "[um][pa][lp][os]")
    )
    upload, text = "upload.wikimedia.org", "en.wikipedia.org"
    path = f"/a/{unique('Example')}.jpg"
    fill(varnish, ats, origin, path, upload)
    fill(varnish, ats, origin, path, text)

    broker.produce(topic, [make_event(url(path, text)), make_event(url(path, upload))])

    daemon.wait_metric("purged_http_requests_total", lambda v: v == 1, WAIT, layer="frontend")
    assert daemon.metric("purged_urls_skipped_total", reason="host_regex") == 1
    assert daemon.metric("purged_events_received_total", status="ok") == 2
    assert_purged_from_both(varnish, origin, path, upload)
    assert_still_cached(varnish, ats, path, text)


def test_events_older_than_purge_max_age_are_not_purged_and_counted_expired(
    broker: Broker,
    varnish: Varnish,
    ats: TrafficServer,
    origin: Origin,
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    daemon = start_daemon([topic], ats.address, varnish.address, 0, extra=("-purgeMaxAge", "60"))
    old_path, new_path = f"/wiki/{unique('Old')}", f"/wiki/{unique('New')}"
    fill(varnish, ats, origin, old_path)
    fill(varnish, ats, origin, new_path)
    now = datetime.now(UTC)

    broker.produce(
        topic,
        [
            # root_event.dt is the event's time: an old root makes an old event.
            make_event(url(old_path), dt=now, root_dt=now - timedelta(minutes=10)),
            make_event(url(new_path), dt=now - timedelta(hours=1), root_dt=now),
        ],
    )

    daemon.wait_metric("purged_http_requests_total", lambda v: v == 1, WAIT, layer="frontend")
    assert daemon.metric("purged_events_received_total", status="expired", topic=topic) == 1
    assert daemon.metric("purged_events_received_total", status="ok", topic=topic) == 1
    assert_purged_from_both(varnish, origin, new_path)
    assert_still_cached(varnish, ats, old_path)


# --- metrics ----------------------------------------------------------------------------


def test_events_are_counted_by_tag_status_and_topic(
    broker: Broker,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    eqiad, codfw = unique("eqiad.resource-purge"), unique("codfw.resource-purge")
    for name in (eqiad, codfw):
        broker.create_topic(name)
    backend, frontend = recorder(), recorder()
    daemon = start_daemon(
        [eqiad, codfw], backend.address, frontend.address, extra=("-purgeMaxAge", "3600")
    )
    page = unique("Page")
    old = datetime.now(UTC) - timedelta(days=1)

    broker.produce(eqiad, [make_event(url(f"/wiki/{page}_{i}")) for i in range(3)])
    broker.produce(eqiad, [make_event(url(f"/wiki/{page}_old"), dt=old)])
    broker.produce(eqiad, [make_event(url(f"/wiki/{page}_bad_time"), dt="yesterday")])
    broker.produce(codfw, [make_event(url(f"/wiki/{page}_p"), tags=("purge", "mediawiki"))])
    broker.produce(codfw, [make_event(url(f"/wiki/{page}_t"), tags=())])
    broker.produce(codfw, [b"not json", make_event("not a url"), b'{"meta": {}}'])

    expected = {
        ("mediawiki", "ok", eqiad): 4,  # an unparsable time is taken as now
        ("mediawiki", "expired", eqiad): 1,
        ("purge", "ok", codfw): 1,
        ("", "ok", codfw): 1,
        ("", "discarded", codfw): 2,  # not JSON; no meta.uri
        ("mediawiki", "discarded", codfw): 1,  # a URL that cannot be purged
    }
    total = sum(expected.values())
    daemon.wait_metric("purged_events_received_total", lambda v: v == total, WAIT)
    samples = daemon.scrape()
    counted = {
        (labels["tag"], labels["status"], labels["topic"]): value
        for (name, label_set), value in samples.items()
        if name == "purged_events_received_total"
        for labels in [dict(label_set)]
        if value
    }
    assert counted == expected
    assert daemon.metric("purged_urls_skipped_total", samples, reason="invalid_url") == 1
    assert "unparsable time" in daemon.log()
    assert "discarding event" in daemon.log()  # the URL that cannot be purged is logged
    frontend.wait_for(6, WAIT)
    assert f"/wiki/{page}_bad_time" in frontend.targets()


def test_answers_are_counted_by_status_and_layer(
    broker: Broker,
    varnish: Varnish,
    ats: TrafficServer,
    origin: Origin,
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    daemon = start_daemon([topic], ats.address, varnish.address)
    cached, absent = f"/wiki/{unique('Cached')}", f"/wiki/{unique('Absent')}"
    fill(varnish, ats, origin, cached)

    broker.produce(topic, [make_event(url(cached)), make_event(url(absent))])

    daemon.wait_metric("purged_http_requests_total", lambda v: v == 2, WAIT, layer="frontend")
    samples = daemon.scrape()
    counted = {
        (labels["status"], labels["layer"]): value
        for (name, label_set), value in samples.items()
        if name == "purged_http_requests_total"
        for labels in [dict(label_set)]
    }
    # Traffic Server: 200 when it held the object, 404 when not; Varnish: 200 either way.
    assert counted == {("200", "backend"): 1, ("404", "backend"): 1, ("200", "frontend"): 2}


def test_metrics_have_every_original_name_from_the_start(
    recorder: Callable[..., Recorder], start_daemon: StartDaemon, topic: str
) -> None:
    backend, frontend = recorder(), recorder()
    daemon = start_daemon([topic], backend.address, frontend.address)
    samples = daemon.scrape()
    names = {name for name, _ in samples}
    for layer in ("backend", "frontend"):
        assert ("purged_backlog", frozenset({("layer", layer)})) in samples
    assert ("purged_event_lag", frozenset({("topic", topic)})) in samples
    assert daemon.metric("purged_event_lag", samples, topic=topic) == 0  # no event yet
    # Alerts on errors can be written before the first error happens.
    assert ("purged_tcp_errors_total", frozenset({("type", "connect")})) in samples
    assert {"purged_htcp_packets_total", "purged_udp_bytes_read_total"} <= names


def test_event_lag_is_nanoseconds_since_the_newest_event_time(
    broker: Broker,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    backend, frontend = recorder(), recorder()
    daemon = start_daemon([topic], backend.address, frontend.address)
    age = timedelta(minutes=5)
    broker.produce(topic, [make_event(url(f"/wiki/{unique('Lag')}"), dt=datetime.now(UTC) - age)])

    lag = daemon.wait_metric("purged_event_lag", lambda v: v > 0, WAIT, topic=topic)
    seconds = age.total_seconds()
    assert seconds * 1e9 <= lag <= (seconds + WAIT) * 1e9


def test_backlog_returns_to_zero_once_everything_is_purged(
    broker: Broker,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    backend, frontend = recorder(), recorder()
    frontend.stall = True  # the frontend holds on to every request: a backlog builds up
    daemon = start_daemon([topic], backend.address, frontend.address)
    paths = [f"/wiki/{unique('Backlog')}" for _ in range(50)]
    broker.produce(topic, [make_event(url(p)) for p in paths])
    backend.wait_for(len(paths), WAIT)

    daemon.wait_metric("purged_backlog", lambda v: v == len(paths), WAIT, layer="frontend")
    assert daemon.metric("purged_backlog", layer="backend") == 0
    frontend.stall = False

    daemon.wait_metric("purged_backlog", lambda v: v == 0, WAIT, layer="frontend")
    assert sorted(frontend.targets()) == sorted(paths)


def test_librdkafka_statistics_are_exported_when_enabled(
    broker: Broker,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    topic: str,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    backend, frontend = recorder(), recorder()
    group = unique("stats-group")
    config = broker.write_kafka_config(
        tmp_path / "stats.json", group, **{"statistics.interval.ms": 200}
    )
    daemon = Purged(
        daemon_args(
            topics=[topic],
            kafka_config=config,
            backend=backend.address,
            frontend=frontend.address,
        ),
        tmp_path / "stats.log",
    ).start()
    try:
        daemon.wait_ready(WAIT)
        daemon.wait_metric("rdkafka_consumer_replyq", lambda v: v >= 0, WAIT)
        names = {name for name, _ in daemon.scrape()}
        assert "rdkafka_consumer_msg_cnt" in names
        assert "rdkafka_consumer_brokers_rtt_avg" in names
        assert "rdkafka_consumer_topics_partitions_consumer_lag" in names
    finally:
        daemon.stop()


# --- the frontend over a Unix socket ------------------------------------------------------


def test_frontend_over_varnish_unix_socket(
    broker: Broker,
    varnish: Varnish,
    ats: TrafficServer,
    origin: Origin,
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    assert varnish.socket_path is not None
    daemon = start_daemon([topic], ats.address, varnish.socket_path)
    path = f"/wiki/{unique('Unix')}"
    fill(varnish, ats, origin, path)

    broker.produce(topic, [make_event(url(path))])

    daemon.wait_metric("purged_http_requests_total", lambda v: v == 1, WAIT, layer="frontend")
    # 200, not 405: the VCL allows PURGE on the listener named "purge".
    assert daemon.metric("purged_http_requests_total", status="200", layer="frontend") == 1
    assert_purged_from_both(varnish, origin, path)


# --- connections -------------------------------------------------------------------------


def test_each_layer_keeps_its_number_of_persistent_connections(
    broker: Broker,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    backend, frontend = recorder(), recorder()
    start_daemon(
        [topic],
        backend.address,
        frontend.address,
        extra=("-backend_workers", "3", "-frontend_workers", "2"),
    )
    paths = [f"/wiki/{unique('Conn')}" for _ in range(300)]

    broker.produce(topic, [make_event(url(p)) for p in paths])

    backend.wait_for(len(paths), WAIT)
    frontend.wait_for(len(paths), WAIT)
    assert backend.connections_opened == 3
    assert frontend.connections_opened == 2


def test_a_cache_that_is_down_at_start_gets_its_purges_once_it_is_up(
    broker: Broker,
    recorder: Callable[..., Recorder],
    topic: str,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    backend, frontend = recorder(), recorder()
    backend.refuse()
    config = broker.write_kafka_config(tmp_path / "down.json", unique("down-group"))
    args = daemon_args(
        topics=[topic], kafka_config=config, backend=backend.address, frontend=frontend.address
    )
    daemon = Purged(args, tmp_path / "down.log").start()
    try:
        path = f"/wiki/{unique('Down')}"
        broker.produce(topic, [make_event(url(path))])
        # It keeps trying to connect, counting each failure.
        daemon.wait_metric("purged_tcp_errors_total", lambda v: v >= 2, WAIT, type="connect")
        assert frontend.count() == 0  # never the frontend before the backend

        backend.accept()

        assert [r.target for r in backend.wait_for(1, WAIT)] == [path]
        assert [r.target for r in frontend.wait_for(1, WAIT)] == [path]
        assert daemon.alive()
    finally:
        daemon.stop()
    assert daemon.returncode == 0


# --- every cache host sees every purge -----------------------------------------------------


def test_two_daemons_with_different_groups_both_purge_every_event(
    broker: Broker,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
) -> None:
    hosts = [(recorder(), recorder()) for _ in range(2)]
    for backend, frontend in hosts:
        start_daemon([topic], backend.address, frontend.address, group=unique("cp"))
    paths = [f"/wiki/{unique('Everywhere')}" for _ in range(60)]

    broker.produce(topic, [make_event(url(p)) for p in paths])  # spread over 3 partitions

    for backend, frontend in hosts:
        for layer in (backend, frontend):
            layer.wait_for(len(paths), WAIT)
            assert sorted(layer.targets()) == sorted(paths)


# --- stopping -----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_daemon_with_exit_status_0(
    broker: Broker,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    topic: str,
    unique: Callable[[str], str],
    signum: signal.Signals,
) -> None:
    backend, frontend = recorder(), recorder()
    daemon = start_daemon([topic], backend.address, frontend.address)
    broker.produce(topic, [make_event(url(f"/wiki/{unique('Before_stop')}"))])
    frontend.wait_for(1, WAIT)

    daemon.send(signum)

    assert daemon.wait(WAIT) == 0, daemon.tail()
    assert "Traceback" not in daemon.log()
