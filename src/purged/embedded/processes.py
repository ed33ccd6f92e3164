"""Loopback ports and child processes: start a component in its own process group, stop it
with everything it started, and never leave it behind when the starting process dies."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, NamedTuple, Self


class Fetch(NamedTuple):
    """A response fetched through a cache: ``hit`` is that cache's verdict."""

    status: int
    hit: bool
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str:
        """All values of header ``name`` joined with ", " ("" when absent)."""
        return ", ".join(v for k, v in self.headers if k.lower() == name.lower())


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str,
    port: int,
    timeout: float,
    what: str = "",
    tail: Callable[[], str] | None = None,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections, or raise ``TimeoutError``.

    ``tail`` is an optional callable returning diagnostic text (e.g. the component's
    stderr) for the error message. When ``proc`` is given and exits first, raise
    ``RuntimeError`` at once instead of waiting out the timeout.
    """
    name = what or "service"
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as e:
            last = e
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with status {proc.returncode} before listening on "
                f"{host}:{port}{_detail(tail)}"
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{name} did not accept connections on {host}:{port} "
                f"within {timeout:.1f}s (last error: {last}){_detail(tail)}"
            )
        time.sleep(0.02)


def _detail(tail: Callable[[], str] | None) -> str:
    return f"\n--- log tail ---\n{tail()}" if tail is not None else ""


def log_tail(path: str | os.PathLike[str], lines: int = 40) -> str:
    """Last ``lines`` lines of a log file, for error messages ("" when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# Runs as the leader of the component's process group, between the starting process (a test
# or the demo) and the component. stdin is a "lifeline" pipe whose write end only the starter
# holds: when the starter dies without teardown (SIGKILL, or `timeout` sending SIGTERM), the
# pipe reads EOF and the watchdog SIGKILLs the whole group. PR_SET_PDEATHSIG cannot do this:
# the kernel clears it when a process changes credentials, and varnishd drops to the users
# varnish/vcache. The watchdog ignores SIGTERM (after starting the child, which must keep the
# default action) so that stop_process_group's SIGTERM to the group reaches the component once
# and the watchdog exits with the component's status.
_WATCHDOG = """
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def lifeline():
    while os.read(0, 4096):
        pass
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=lifeline, daemon=True).start()
sys.exit(child.wait())
"""


class Spawned(subprocess.Popen[bytes]):
    """A component started by :func:`spawn`: holds the lifeline pipe of its watchdog."""

    lifeline: int | None = None

    def close_lifeline(self) -> None:
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None


def spawn(cmd: list[str], *, cwd: str | os.PathLike[str], log: IO[bytes]) -> Spawned:
    """Start ``cmd`` in a new session / process group (so :func:`stop_process_group` reaches
    all its children), stdout and stderr to ``log``, under a watchdog that kills the group
    if the starting process dies without teardown."""
    read_end, write_end = os.pipe()  # not inheritable (PEP 446): only the watchdog gets it
    try:
        proc = Spawned(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, *cmd],
            cwd=cwd,
            stdin=read_end,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    proc.lifeline = write_end
    return proc


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session=True``),
    wait up to ``timeout`` seconds, then SIGKILL the group. Idempotent."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # Kill leftovers of the group (children that outlived the leader) and the leader.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout)
    if isinstance(proc, Spawned):
        proc.close_lifeline()


class Stoppable:
    """Something started that `stop()` ends; `with` stops it on the way out."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Component(Stoppable):
    """A process of its own group (see :func:`spawn`), with a work directory for its files and
    its log; `stop()` ends the whole group and removes the directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._proc: Spawned | None = None
        self._out: IO[bytes] | None = None

    def _spawn(self, cmd: list[str], log_name: str) -> Spawned:
        """Start ``cmd`` in the work directory, its output to ``log_name`` there."""
        self._out = open(self.dir / log_name, "wb")  # noqa: SIM115 - closed by stop()
        self._proc = spawn(cmd, cwd=self.dir, log=self._out)
        return self._proc

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 5 s, remove the work directory. Idempotent."""
        if self._proc is not None:
            stop_process_group(self._proc, timeout=5.0)
            self._proc = None
        if self._out is not None:
            self._out.close()
            self._out = None
        shutil.rmtree(self.dir, ignore_errors=True)
