"""Running the `purged` operator subcommands (and a daemon for them to act on) from tests."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .purged_proc import PURGED, Purged


def run_purged(*args: str, stdin: str | None = None, timeout: float = 60.0) -> Result:
    """Run `purged ARGS...` to completion; its exit status, stdout and stderr."""
    completed = subprocess.run(
        [PURGED, *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(completed.returncode, completed.stdout, completed.stderr)


class Result:
    """What a finished `purged SUBCOMMAND` printed, and its exit status."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


@contextlib.contextmanager
def running_daemon(args: list[str], log_path: Path, timeout: float = 30.0) -> Iterator[Purged]:
    """A `purged` daemon started with `args`, ready (consuming, caches connected), stopped
    at the end of the block."""
    daemon = Purged(args, log_path)
    try:
        daemon.start()
        daemon.wait_ready(timeout)
        yield daemon
    finally:
        daemon.stop()


__all__ = ["Result", "run_purged", "running_daemon"]
