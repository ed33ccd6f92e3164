"""Integration-test support: real brokers, caches and recording servers on loopback."""

from __future__ import annotations

import itertools
import os
import shutil
import uuid

import pytest

_counter = itertools.count(1)
_RUN = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"


def unique(prefix: str) -> str:
    """A name unique in this test run (topics, group ids, URL paths), e.g. ``t-1234-ab12cd-7``.

    Session-scoped brokers and caches are shared by all tests, so every test must use its own
    topic names, group ids and URL paths."""
    return f"{prefix}-{_RUN}-{next(_counter)}"


VARNISHD = shutil.which("varnishd")
TRAFFIC_SERVER = shutil.which("traffic_server")

requires_varnish = pytest.mark.skipif(
    VARNISHD is None, reason="varnishd not installed (./dev setup installs Debian's varnish)"
)
requires_ats = pytest.mark.skipif(
    TRAFFIC_SERVER is None,
    reason="traffic_server not installed (./dev setup installs Debian's trafficserver)",
)
