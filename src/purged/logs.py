"""Logging: one format for the daemon, and rate-limited warnings for bad input at run time."""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("purged")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr; under journald (JOURNAL_STREAM set) without our own timestamp."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RateLimitedLog:
    """Logs at most one line per key per interval, then says how many were suppressed.

    Bad input arrives at line rate (a flood of garbage datagrams, a poison topic); the
    counters carry the totals, the log only has to show that it happens and an example.
    """

    def __init__(self, interval: float = 10.0, logger: logging.Logger = log) -> None:
        self._interval = interval
        self._logger = logger
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log `message % args` unless `key` was logged less than `interval` seconds ago."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next[key] = now + self._interval
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f" ({suppressed} more like this suppressed)"
        self._logger.warning(message, *args)


ratelimited = RateLimitedLog()
