"""Pipelined PURGEs (issue 5): many requests in flight per connection, answers matched in order.

Against the real caches, thousands of purges stream through pipelined connections while
other pages are fetched through the same caches, and every purge must take effect. Against
recording servers, the matching of answers to requests is made visible (a chosen set of
requests is answered 503 and must be exactly the set re-sent), and a connection closed in
the middle of a pipeline must lose nothing and count nothing twice.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.ats import TrafficServer, via_hit
from tests.support.broker import Broker, make_event
from tests.support.origin import Origin
from tests.support.purged_proc import Daemons, Purged
from tests.support.recorder import RecordedRequest, Recorder
from tests.support.varnish import Varnish

HOST = "en.wikipedia.org"
WAIT = 60.0  # seconds: bound of every wait for the daemon (2 noisy cores)
REQUESTS = "purged_http_requests_total"

StartDaemon = Callable[..., Purged]


@pytest.fixture
def start_daemon(
    broker: Broker, tmp_path: Path, unique: Callable[[str], str]
) -> Iterator[StartDaemon]:
    """``start_daemon(topic, backend, frontend, *flags)``: a ready purged on its own group."""
    daemons = Daemons(tmp_path)

    def start(topic: str, backend: str, frontend: str, *flags: str) -> Purged:
        group = unique("pipelining-group")
        config = broker.write_kafka_config(tmp_path / f"{group}.json", group)
        return daemons.start(
            topics=[topic], kafka_config=config, backend=backend, frontend=frontend, extra=flags
        )

    yield start
    daemons.stop_all()
    for daemon in daemons.started:
        assert "Traceback" not in daemon.log(), daemon.tail()
        assert daemon.returncode == 0, daemon.tail()


@pytest.fixture
def topic(broker: Broker, unique: Callable[[str], str]) -> str:
    name = unique("pipelining-topic")
    broker.create_topic(name, partitions=3)
    return name


def url(path: str) -> str:
    return f"https://{HOST}{path}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def answers(daemon: Purged, layer: str, status: str | None = None) -> int:
    labels = {"layer": layer} if status is None else {"layer": layer, "status": status}
    return int(daemon.metric(REQUESTS, **labels))


# --- against Traffic Server and Varnish ----------------------------------------------------


@pytest.mark.parametrize("depth", [32, 1], ids=["pipelined", "depth-1"])
def test_pipelined_purges_interleaved_with_fetches_all_take_effect(
    depth: int,
    broker: Broker,
    topic: str,
    origin: Origin,
    ats: TrafficServer,
    varnish: Varnish,
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    # Two halves of the pages take turns: while one half is purged, the other is fetched
    # through the same caches; then the purged half must miss in both caches. Pages never
    # fetched are purged too (Traffic Server answers those 404, so each answer's status
    # says which request it belongs to).
    prefix = "/" + unique("pipelined")
    halves = [[f"{prefix}/a/{i}" for i in range(300)], [f"{prefix}/b/{i}" for i in range(300)]]
    daemon = start_daemon(
        topic,
        ats.address,
        varnish.address,
        *("-pipeline_depth", str(depth), "-backend_workers", "4", "-frontend_workers", "2"),
    )
    for path in halves[0]:
        assert varnish.fetch(path, HOST).status == 200
    time.sleep(0.05)  # Traffic Server can lose a purge landing within ~1 ms of its fill

    sent = 0
    for round_ in range(3):
        purged, fetched = halves[round_ % 2], halves[(round_ + 1) % 2]
        absent = [f"{prefix}/never-fetched/{round_}/{i}" for i in range(300)]
        before = {
            "200": answers(daemon, "backend", "200"),
            "404": answers(daemon, "backend", "404"),
            "frontend": answers(daemon, "frontend"),
        }
        # Interleaved: cached, absent, cached, absent, ...
        stream = [p for pair in zip(purged, absent, strict=True) for p in pair]
        failures: list[str] = []
        fetcher = threading.Thread(target=_fetch_all, args=(varnish, fetched, failures))
        fetcher.start()
        broker.produce(topic, [make_event(url(path)) for path in stream])
        sent += len(stream)
        expected = sent
        wait_until(
            lambda: answers(daemon, "frontend") >= expected,  # noqa: B023 - used at once
            WAIT,
            f"{expected} frontend answers",
        )
        fetcher.join(WAIT)
        assert not failures, failures[:5]

        assert answers(daemon, "backend", "200") - before["200"] == len(purged)
        assert answers(daemon, "backend", "404") - before["404"] == len(absent)
        assert answers(daemon, "frontend") - before["frontend"] == len(stream)
        for path in purged:
            hits = origin.hits(path)
            page = varnish.fetch(path, HOST)
            assert page.status == 200
            assert not page.hit, f"round {round_}: Varnish still had {path}"
            assert not via_hit(page.header("Via")), f"round {round_}: ATS still had {path}"
            assert origin.hits(path) == hits + 1
        time.sleep(0.05)


def _fetch_all(varnish: Varnish, paths: list[str], failures: list[str]) -> None:
    for path in paths:
        try:
            status = varnish.fetch(path, HOST).status
        except OSError as error:
            failures.append(f"{path}: {error}")
            continue
        if status != 200:
            failures.append(f"{path}: status {status}")


# --- against recording servers --------------------------------------------------------------


def test_each_answer_is_matched_to_its_request_in_the_pipeline(
    broker: Broker,
    topic: str,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    # One backend connection, 32 deep: every 7th URL is answered 503 the first time. If an
    # answer were credited to the wrong request, other URLs would be re-sent instead.
    prefix = "/" + unique("matched")
    paths = [f"{prefix}/{i}" for i in range(2000)]
    refused = set(paths[::7])
    first_seen: set[str] = set()

    def status(request: RecordedRequest) -> int:
        if request.target in refused and request.target not in first_seen:
            first_seen.add(request.target)
            return 503
        return 200

    backend, frontend = recorder(), recorder()
    backend.status = status
    daemon = start_daemon(
        topic,
        backend.address,
        frontend.address,
        *("-backend_workers", "1", "-frontend_workers", "1", "-pipeline_depth", "32"),
    )
    broker.produce(topic, [make_event(url(path)) for path in paths])
    frontend.wait_for(len(paths), WAIT)
    time.sleep(0.2)  # anything sent twice would arrive now

    sent = Counter(backend.targets())
    assert {path for path, n in sent.items() if n == 2} == refused
    assert {path for path, n in sent.items() if n == 1} == set(paths) - refused
    assert Counter(frontend.targets()) == Counter(paths)
    assert answers(daemon, "backend", "503") == len(refused)
    assert answers(daemon, "backend", "200") == len(paths)
    # The frontend purge of a refused URL follows its second, successful backend purge.
    last_backend = {r.target: r.time for r in backend.requests}
    assert all(r.time >= last_backend[r.target] for r in frontend.requests)
    # Pipelined: requests arrived several per read (same arrival time).
    assert max(Counter(r.time for r in backend.requests).values()) > 1


def test_connection_closed_mid_pipeline_resends_the_unanswered_and_counts_each_once(
    broker: Broker,
    topic: str,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    # The backend closes every connection after 10 answers, with the rest of the pipeline
    # read but unanswered: those must be sent again on a new connection.
    prefix = "/" + unique("closed")
    paths = [f"{prefix}/{i}" for i in range(1000)]
    backend, frontend = recorder(), recorder()
    backend.close_after = 10
    daemon = start_daemon(
        topic,
        backend.address,
        frontend.address,
        *("-backend_workers", "2", "-frontend_workers", "1", "-pipeline_depth", "32"),
    )
    broker.produce(topic, [make_event(url(path)) for path in paths])
    frontend.wait_for(len(paths), WAIT)
    time.sleep(0.2)

    assert len(backend.requests) > len(paths), "no request was left unanswered by a close"
    assert backend.connections_opened >= len(paths) // 10
    # None lost. (The backend may have answered a few twice: closing a socket with unread
    # requests sends a reset, which can destroy answers already sent; those are re-sent.)
    assert {request.target for request, _status in backend.answered} == set(paths)
    # None counted twice: one answer read per purge, and one frontend purge each.
    assert answers(daemon, "backend") == len(paths)
    assert answers(daemon, "frontend") == len(paths)
    assert Counter(frontend.targets()) == Counter(paths)
    assert daemon.metric("purged_purges_resent_total", layer="backend") > 0


def test_pipeline_depth_1_sends_the_next_request_only_after_the_answer(
    broker: Broker,
    topic: str,
    recorder: Callable[..., Recorder],
    start_daemon: StartDaemon,
    unique: Callable[[str], str],
) -> None:
    prefix = "/" + unique("depth1")
    paths = [f"{prefix}/{i}" for i in range(30)]
    backend, frontend = recorder(), recorder()
    backend.delay = 0.02
    start_daemon(
        topic,
        backend.address,
        frontend.address,
        *("-backend_workers", "1", "-frontend_workers", "1", "-pipeline_depth", "1"),
    )
    broker.produce(topic, [make_event(url(path)) for path in paths])
    frontend.wait_for(len(paths), WAIT)

    assert sorted(backend.targets()) == sorted(paths)
    times = [r.time for r in backend.requests]
    # Each request waits for the previous answer, which the backend delays by 20 ms.
    assert all(later - earlier >= 0.018 for earlier, later in itertools.pairwise(times))
