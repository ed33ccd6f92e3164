"""The purged daemon as a child process of a test: start, wait ready, scrape, signal, stop.

Tests of delivery and faults need the daemon's own PID (for real signals and its RSS), so it
is started directly with ``start_new_session=True`` (not under the ``spawn`` watchdog), and
stopped by the fixture that made it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from purged.embedded.broker import Broker

from .ports import free_port, stop_process_group

PURGED = str(Path(sys.executable).parent / "purged")
READY_LINE = "ready: consuming, and both caches connected"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Purged:
    """One purged process: ``start()`` it, then read its log, metrics and memory."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.metrics_port = free_port()
        self.args = [*args, "-prometheus_addr", f"127.0.0.1:{self.metrics_port}"]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> Purged:
        """Start the daemon (its log is appended to ``log_path``)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PURGED, *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the daemon's readiness line (group joined, both caches connected)."""
        self.wait_log(READY_LINE, timeout)

    def wait_log(self, text: str, timeout: float, count: int = 1) -> None:
        """Wait until ``text`` appears at least ``count`` times in the log."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if not self.alive():
                raise AssertionError(f"purged exited ({self.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in the log after {timeout} s:\n{self.tail()}")
            time.sleep(0.05)

    def send(self, signum: int) -> None:
        """Send a signal to the daemon itself."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        """Wait for the daemon to exit; its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a while; idempotent (for teardown)."""
        if self.proc is not None:
            stop_process_group(self.proc, timeout=15.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- observation -------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def scrape(self, timeout: float = 5.0) -> Samples:
        """Every sample of /metrics, by (name, labels)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def metric(self, name: str, samples: Samples | None = None, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        if samples is None:
            samples = self.scrape()
        wanted = set(labels.items())
        return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)

    def wait_metric(
        self,
        name: str,
        predicate: Callable[[float], bool],
        timeout: float,
        **labels: str,
    ) -> float:
        """Poll /metrics until ``predicate(metric(name, **labels))``; the value."""
        deadline = time.monotonic() + timeout
        value = None
        while True:
            if not self.alive():
                raise AssertionError(f"purged exited ({self.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError):
                value = self.metric(name, **labels)
                if predicate(value):
                    return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}{labels} = {value} after {timeout} s:\n{self.tail()}")
            time.sleep(0.1)

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the daemon, in KiB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out


def daemon_args(
    *,
    topics: Iterable[str],
    kafka_config: Path,
    backend: str,
    frontend: str,
    frontend_delay_ms: int = 0,
    extra: Iterable[str] = (),
) -> list[str]:
    """The command line of a daemon reading ``topics`` and purging to two caches."""
    return [
        "-topics",
        ",".join(topics),
        "-kafkaConfig",
        str(kafka_config),
        "-backend_addr",
        backend,
        "-frontend_addr",
        frontend,
        "-frontend_delay",
        str(frontend_delay_ms),
        *extra,
    ]


class Daemons:
    """Starts daemons for one test (``start``) and stops every one of them (``stop_all``)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Purged] = []

    def start(
        self,
        *,
        topics: Iterable[str],
        kafka_config: Path,
        backend: str,
        frontend: str,
        frontend_delay_ms: int = 0,
        extra: Iterable[str] = (),
        ready: bool = True,
        timeout: float = 30.0,
    ) -> Purged:
        """A started daemon (and ready, unless ``ready=False``); its log is in ``workdir``."""
        args = daemon_args(
            topics=topics,
            kafka_config=kafka_config,
            backend=backend,
            frontend=frontend,
            frontend_delay_ms=frontend_delay_ms,
            extra=extra,
        )
        log_path = self.workdir / f"purged-{len(self.started) + 1}.log"
        daemon = Purged(args, log_path).start()
        self.started.append(daemon)
        if ready:
            daemon.wait_ready(timeout)
        return daemon

    def consume(
        self,
        broker: Broker,
        topic: str,
        group: str,
        backend: str,
        frontend: str,
        *,
        frontend_delay_ms: int = 0,
        extra: Iterable[str] = (),
        ready: bool = True,
    ) -> Purged:
        """``start`` on ``topic`` as ``group`` of ``broker`` (its config in ``workdir``)."""
        return self.start(
            topics=[topic],
            kafka_config=broker.write_kafka_config(self.workdir / f"{group}.json", group),
            backend=backend,
            frontend=frontend,
            frontend_delay_ms=frontend_delay_ms,
            extra=extra,
            ready=ready,
        )

    def stop_all(self) -> None:
        for daemon in self.started:
            daemon.stop()


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, daemon: Purged | None = None
) -> float:
    """Poll ``condition`` until true; the seconds it took. Fails early if ``daemon`` died."""
    started = time.monotonic()
    while not condition():
        if daemon is not None and not daemon.alive():
            raise AssertionError(f"purged exited ({daemon.returncode}):\n{daemon.tail()}")
        if time.monotonic() - started > timeout:
            tail = f":\n{daemon.tail()}" if daemon is not None else ""
            raise TimeoutError(f"not {what} after {timeout} s{tail}")
        time.sleep(0.05)
    return time.monotonic() - started


__all__ = ["PURGED", "READY_LINE", "Daemons", "Purged", "Samples", "daemon_args", "wait_until"]
