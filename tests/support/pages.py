"""Pages to purge: produce one event per distinct page, and wait until a cache got them all."""

from __future__ import annotations

import time

from tests.support.broker import Broker
from tests.support.faults import resource_changes
from tests.support.purged_proc import Purged, wait_until
from tests.support.recorder import Recorder

WAIT = 60.0  # seconds: bound of every wait for the daemon (2 noisy cores)
HOST = "en.wikipedia.org"


def produce_pages(
    broker: Broker, topic: str, count: int, prefix: str = "", create: bool = True
) -> list[str]:
    """Produce one event per distinct page (to a new topic of 3 partitions, unless
    ``create=False``); the request-targets to expect."""
    if create:
        broker.create_topic(topic, partitions=3)
    paths = [f"/wiki/{topic}/{prefix}{i}" for i in range(count)]
    broker.produce(topic, resource_changes(f"https://{HOST}{p}" for p in paths), timeout=120)
    return paths


def received_all(layer: Recorder, paths: list[str], since: int = 0) -> bool:
    """Every path reached ``layer`` (in its requests from index ``since`` on)."""
    return set(paths) <= set(layer.targets()[since:])


def wait_received(
    layer: Recorder,
    paths: list[str],
    timeout: float,
    daemon: Purged | None = None,
    *,
    since: int = 0,
) -> None:
    """Wait until every path reached ``layer`` (and the daemon stays alive).

    Counts first: comparing sets of a million paths on every poll would be slow.
    """
    deadline = time.monotonic() + timeout
    wait_until(lambda: layer.count() - since >= len(paths), timeout, "enough requests", daemon)
    while not received_all(layer, paths, since):
        if time.monotonic() > deadline:
            missing = set(paths) - set(layer.targets()[since:])
            raise AssertionError(f"{len(missing)} pages never reached {layer.address}")
        time.sleep(0.1)
