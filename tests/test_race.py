"""The seed's crash, by construction impossible: scraping /metrics while consuming at full speed.

The original died with "concurrent map read and map write" because its metrics loop read a
map the Kafka loop wrote. Here several threads scrape /metrics as fast as they can while the
daemon consumes a backlog of events at full speed: nothing may raise, the process stays
alive, every purge reaches both layers and every scrape parses.

``scrape_race`` is the reusable scenario: issue 4 re-runs it under fault scenarios (pass
your own recorders with knobs set, extra flags, and a ``during`` callback).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support import unique
from tests.support.broker import Broker, make_event
from tests.support.purged_proc import Purged, daemon_args
from tests.support.recorder import Recorder

# Counters whose value must never go down from one scrape to the next.
MONOTONIC = ("purged_events_received_total", "purged_http_requests_total")


@dataclass
class Scraper:
    """One thread scraping /metrics in a loop until ``stop`` is set."""

    url: str
    stop: threading.Event
    scrapes: int = 0  # successful, fully parsed scrapes
    errors: list[str] = field(default_factory=list)
    first_ok: float | None = None
    last_ok: float | None = None
    _last: dict[str, float] = field(default_factory=dict)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=30) as response:
                    text = response.read().decode()
            except (urllib.error.URLError, ConnectionError) as error:
                if self.first_ok is not None:  # before the server is up, refusals are expected
                    self.errors.append(f"scrape failed: {error!r}")
                time.sleep(0.01)
                continue
            except Exception as error:
                self.errors.append(f"scrape failed: {error!r}")
                continue
            try:
                self._check(text)
            except Exception as error:
                self.errors.append(f"unparsable scrape: {error!r}\n{text[:2000]}")
                continue
            self.scrapes += 1
            self.last_ok = time.monotonic()
            if self.first_ok is None:
                self.first_ok = self.last_ok

    def _check(self, text: str) -> None:
        totals = dict.fromkeys(MONOTONIC, 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
        for name, value in totals.items():
            if value < self._last.get(name, 0.0):
                raise AssertionError(f"{name} went down: {self._last[name]} -> {value}")
            self._last[name] = value


@dataclass
class RaceResult:
    """What a scrape race observed (all of it already checked by ``scrape_race``)."""

    daemon: Purged
    backend: Recorder
    frontend: Recorder
    paths: list[str]
    scrapers: list[Scraper]
    consumed_in: float  # seconds from the daemon's start to the last frontend PURGE

    @property
    def scrapes(self) -> int:
        return sum(s.scrapes for s in self.scrapers)


def scrape_race(
    broker: Broker,
    workdir: Path,
    *,
    events: int = 20_000,
    scrapers: int = 4,
    backend: Recorder | None = None,
    frontend: Recorder | None = None,
    extra: Iterable[str] = (),
    during: Callable[[Purged, Recorder, Recorder], None] | None = None,
    timeout: float = 240.0,
) -> RaceResult:
    """Consume ``events`` at full speed while ``scrapers`` threads scrape /metrics; check that
    nothing raised, the daemon stayed alive, every purge reached both layers, and every
    scrape parsed (with counters never going down). Returns what it saw.

    The events are produced before the daemon starts, so that it consumes a backlog as fast
    as it can. ``backend`` / ``frontend`` default to fresh recorders (the caller stops the
    ones it passes). ``during(daemon, backend, frontend)`` runs in the calling thread once
    the daemon and the scrapers run, e.g. to inject faults; it must return before the end.
    """
    own: list[Recorder] = []
    if backend is None:
        backend = Recorder()
        own.append(backend)
    if frontend is None:
        frontend = Recorder()
        own.append(frontend)
    daemon: Purged | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        topic, group = unique("race"), unique("race-group")
        broker.create_topic(topic, partitions=3)
        paths = [f"/wiki/{topic}/{i}" for i in range(events)]
        broker.produce(topic, (make_event(f"https://en.wikipedia.org{p}") for p in paths))

        config = broker.write_kafka_config(workdir / f"{group}.json", group)
        args = daemon_args(
            topics=[topic],
            kafka_config=config,
            backend=backend.address,
            frontend=frontend.address,
            extra=extra,
        )
        daemon = Purged(args, workdir / f"{group}.log")
        url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
        workers = [Scraper(url, stop) for _ in range(scrapers)]
        started = time.monotonic()
        daemon.start()
        for worker in workers:
            thread = threading.Thread(target=worker.run, name="scraper", daemon=True)
            thread.start()
            threads.append(thread)
        if during is not None:
            during(daemon, backend, frontend)

        deadline = started + timeout
        for layer in (backend, frontend):
            while layer.count() < events:
                assert daemon.alive(), f"purged died ({daemon.returncode}):\n{daemon.tail()}"
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{layer.count()} of {events} purges reached {layer.address} "
                        f"in {timeout} s:\n{daemon.tail()}"
                    )
                time.sleep(0.05)
        consumed_in = time.monotonic() - started
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

        assert daemon.alive(), f"purged died ({daemon.returncode}):\n{daemon.tail()}"
        log = daemon.log()
        assert "Traceback" not in log, log[-5000:]
        for layer in (backend, frontend):
            assert set(layer.targets()) == set(paths), f"{layer.address} missed purges"
            assert layer.errors == []
        errors = [e for worker in workers for e in worker.errors]
        assert errors == [], f"{len(errors)} bad scrapes, first: {errors[0]}"
        for worker in workers:
            # Each thread scraped while the daemon was consuming, not only before or after.
            assert worker.scrapes > 0 and worker.first_ok is not None
            assert worker.first_ok < started + consumed_in
        return RaceResult(daemon, backend, frontend, paths, workers, consumed_in)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        if daemon is not None:
            daemon.stop()
        for recorder in own:
            recorder.stop()


def test_scraping_metrics_while_consuming_at_full_speed_raises_nothing_and_loses_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    result = scrape_race(broker, tmp_path, events=20_000, scrapers=4)
    # Evidence that the race was run: the threads scraped many times during consumption.
    assert result.scrapes >= 4 * 2, result.scrapes
