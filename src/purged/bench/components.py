"""The processes a benchmark run needs beyond `purged.embedded`: the daemon, and /proc readings.

The broker, Traffic Server and Varnish are `purged.embedded`'s (the demo's and the tests'
components); this module adds the daemon as a child process, the events the benchmark
produces, and CPU and memory readings from /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from purged.embedded.broker import Broker
from purged.embedded.processes import free_port


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the benchmark dies, so no daemon outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Process:
    """A child process in its own session, its output in `log`."""

    def __init__(self, cmd: list[str], log: Path, cwd: Path | None = None) -> None:
        self.log = log
        self._out: IO[bytes] = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the session, wait up to `timeout`, then SIGKILL it; the exit status."""
        code: int | None = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout)
        else:
            code = self.proc.returncode
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self._out.close()
        return code


def session_cpu(leader: int) -> float:
    """CPU seconds (user + system) of every live process in the session led by `leader`."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == leader:  # field 6 of proc(5): session id
            total += int(fields[11]) + int(fields[12])
    return total / tick


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS of `pid`, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


# --- events ------------------------------------------------------------------------------
def make_event(seq: int, uri: str, dt: str) -> bytes:
    """A resource_change/1.0.0 event of typical size (~330 bytes), as MediaWiki sends it."""
    return (
        f'{{"$schema":"/resource_change/1.0.0","meta":{{"uri":"{uri}","dt":"{dt}",'
        f'"stream":"resource-purge","domain":"en.wikipedia.org",'
        f'"id":"{seq:08x}-0000-4000-8000-{seq:012x}","request_id":"{seq:032x}"}},'
        f'"tags":["mediawiki"],"root_event":{{"dt":"{dt}","signature":"bench:{seq:012x}"}}}}'
    ).encode()


def rfc3339(seconds: float) -> str:
    """A UTC RFC 3339 time with microseconds (`2024-05-07T09:48:24.065123Z`)."""
    whole = int(seconds)
    micros = int((seconds - whole) * 1e6)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{micros:06d}Z"


# --- the daemon -------------------------------------------------------------------------
def purged_command() -> list[str]:
    """How to run the daemon: the venv's `purged` script, else `python -m purged`."""
    script = Path(sys.executable).parent / "purged"
    return [str(script)] if script.exists() else [sys.executable, "-m", "purged"]


class Daemon:
    """`purged` consuming `topic`, sending to `backend` and `frontend` (host:port)."""

    def __init__(
        self,
        workdir: Path,
        broker: Broker,
        topic: str,
        group: str,
        backend: str,
        frontend: str,
        flags: list[str],
        kafka: dict[str, Any],
    ) -> None:
        config = workdir / f"{group}.json"
        settings = {**broker.kafka_config(group), "client.id": "purged", **kafka}
        config.write_text(json.dumps(settings))
        self.metrics_port = free_port()
        self.process = Process(
            [
                *purged_command(),
                "-topics",
                topic,
                "-kafkaConfig",
                str(config),
                "-backend_addr",
                backend,
                "-frontend_addr",
                frontend,
                "-prometheus_addr",
                f"127.0.0.1:{self.metrics_port}",
                *flags,
            ],
            workdir / f"{group}.log",
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> str:
        """The text of /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
        return text

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait for the "ready" log line (group joined, both caches connected)."""
        deadline = time.monotonic() + timeout
        while "ready: consuming" not in self.process.log_text():
            if not self.process.alive():
                raise RuntimeError(f"purged exited:\n{self.process.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"purged not ready after {timeout} s")
            time.sleep(0.05)

    def stop(self) -> int | None:
        """SIGTERM; the exit status (0 = clean)."""
        return self.process.stop(30)


_SAMPLE = re.compile(r"^purged_http_requests_total\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def answered_by_layer(metrics_text: str) -> dict[str, dict[str, int]]:
    """`purged_http_requests_total` as {layer: {status: count}}."""
    out: dict[str, dict[str, int]] = {"backend": {}, "frontend": {}}
    for labels, value in _SAMPLE.findall(metrics_text):
        label = dict(_LABEL.findall(labels))
        out.setdefault(label.get("layer", ""), {})[label.get("status", "")] = int(float(value))
    return out


def caches_available() -> bool:
    """Whether both traffic_server and varnishd are installed."""
    return shutil.which("traffic_server") is not None and shutil.which("varnishd") is not None
