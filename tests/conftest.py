"""Shared fixtures: one broker, origin, Traffic Server and Varnish per test session.

The chain is client -> Varnish -> Traffic Server -> origin, as on a CDN cache host. The
components are shared, so tests must use unique topics, group ids and URL paths
(``unique(prefix)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.support import TRAFFIC_SERVER, VARNISHD
from tests.support import unique as _unique
from tests.support.ats import TrafficServer
from tests.support.broker import Broker
from tests.support.origin import Origin
from tests.support.purged_proc import Daemons
from tests.support.recorder import Recorder
from tests.support.varnish import Varnish

# The machine is shared and noisy (2 cores): a slow draw or example says nothing about the
# code under test. Every example still runs; only timing-based health checks are off.
settings.register_profile(
    "shared-machine", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("shared-machine")


@pytest.fixture
def unique() -> Callable[[str], str]:
    """``unique(prefix) -> str``: a name no other test of this run uses."""
    return _unique


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    with Broker() as b:
        yield b


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    with Origin() as o:
        yield o


@pytest.fixture(scope="session")
def ats(origin: Origin) -> Iterator[TrafficServer]:
    if TRAFFIC_SERVER is None:
        pytest.skip("traffic_server not installed (./dev setup installs Debian's trafficserver)")
    with TrafficServer(origin.port) as server:
        yield server


@pytest.fixture(scope="session")
def varnish(ats: TrafficServer) -> Iterator[Varnish]:
    """Varnish in front of ``ats``, with a Unix socket listener too (``.socket_path``)."""
    if VARNISHD is None:
        pytest.skip("varnishd not installed (./dev setup installs Debian's varnish)")
    with Varnish(ats.port, unix_socket=True) as v:
        yield v


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """Starts purged daemons (``daemons.start(...)``); all are stopped at teardown."""
    made = Daemons(tmp_path)
    yield made
    made.stop_all()


@pytest.fixture
def recorder() -> Iterator[Callable[..., Recorder]]:
    """Factory: ``recorder(unix_path=None) -> Recorder``; all are stopped at teardown."""
    made: list[Recorder] = []

    def make(**kwargs: Any) -> Recorder:
        r = Recorder(**kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()
