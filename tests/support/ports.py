"""Loopback port and child-process helpers shared by the integration-test support code.

The implementation lives in ``purged.embedded.processes`` (the demo uses it too)."""

from __future__ import annotations

from purged.embedded.processes import (
    Fetch,
    Spawned,
    free_port,
    log_tail,
    spawn,
    stop_process_group,
    wait_port,
)

__all__ = [
    "Fetch",
    "Spawned",
    "free_port",
    "log_tail",
    "spawn",
    "stop_process_group",
    "wait_port",
]
