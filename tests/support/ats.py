"""Apache Traffic Server 9.2 run from a private run-root, as infra.md describes.

The implementation lives in ``purged.embedded.trafficserver`` (the demo uses it too); it
reads the configuration pieces in ``deploy/trafficserver/``, so docs and tests cannot drift
apart.
"""

from __future__ import annotations

from purged.embedded.trafficserver import (
    DEPLOY_DIR,
    HIT_CODES,
    PRIVATE_RECORDS,
    TrafficServer,
    apply_records,
    snippet_lines,
    via_hit,
)

TEST_RECORDS = PRIVATE_RECORDS

__all__ = [
    "DEPLOY_DIR",
    "HIT_CODES",
    "TEST_RECORDS",
    "TrafficServer",
    "apply_records",
    "snippet_lines",
    "via_hit",
]
