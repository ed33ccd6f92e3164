"""A fast PURGE sink for the benchmark, run in its own process (`python -m purged.bench.sink`).

It listens on two ports, one per cache layer, answers every request with an empty 200, in
order, also when pipelined: PURGE requests have no body, so a request is exactly its head
and the stream splits on the blank line. For each benchmark URL (`url(seq)`) it records the
wall-clock time of its FIRST arrival per layer, which gives the end-to-end throughput
(first purge to last, both layers) and the Kafka-to-backend latency (against the produce
time the harness notes). It is kept cheap: one split, one `int()` and one array store per
request, one write per read.

The harness drives it through stdin/stdout, one command and one answer line each:

- `arm N PID`: forget everything, expect the URLs 0..N-1 on both layers; the CPU time of
  process PID (the daemon), in total and per thread, is read at the first arrival and when
  both layers have all N;
- `stats`: a JSON object (see `Sink.stats`);
- `dump PATH`: write the first-arrival times (N doubles backend, then N frontend, 0 = never)
  to PATH;
- `quit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from array import array
from typing import IO, Any

from purged.embedded.processes import Stoppable

# The benchmark's URLs; the sink reads `seq` back from the request line.
URL_PREFIX = "https://en.wikipedia.org/wiki/Bench_"
REQUEST_PREFIX = b"PURGE /wiki/Bench_"
_SEQ_AT = len(REQUEST_PREFIX)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def url(seq: int) -> str:
    """The URL of benchmark purge number `seq`."""
    return f"{URL_PREFIX}{seq}"


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process `pid`, all threads (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, proc(5)).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process `pid` by thread name (librdkafka's threads are `rdk:...`)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
        fields = raw.rpartition(b")")[2].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLOCK_TICK
    return out


class LayerRecord:
    """What one port received: totals, and the first arrival time of each benchmark URL."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.first = array("d", bytes(8 * capacity))
        self.capacity = capacity
        self.total = 0  # requests received, duplicates included
        self.distinct = 0  # benchmark URLs received at least once
        self.foreign = 0  # requests that are not benchmark URLs in range
        self.first_time = 0.0  # first request of any kind
        self.last_new = 0.0  # when `distinct` last grew
        self.connections = 0

    def stats(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "distinct": self.distinct,
            "foreign": self.foreign,
            "first": self.first_time,
            "last": self.last_new,
            "connections": self.connections,
        }


class Sink:
    """The state of the sink process: both layers' records and the run's bookkeeping."""

    def __init__(self) -> None:
        self.backend = LayerRecord("backend", 0)
        self.frontend = LayerRecord("frontend", 0)
        self.expected = 0
        self.pid = 0
        self.cpu_first: float | None = None  # the daemon's CPU seconds at the first arrival
        self.cpu_done: float | None = None  # ... when both layers had every URL
        self.threads_first: dict[str, float] = {}  # the same, per daemon thread name
        self.threads_done: dict[str, float] = {}
        self.done_time = 0.0

    def arm(self, expected: int, pid: int) -> None:
        """Start a run: forget everything, expect URLs 0..expected-1 on both layers."""
        self.backend = LayerRecord("backend", expected)
        self.frontend = LayerRecord("frontend", expected)
        self.expected = expected
        self.pid = pid
        self.cpu_first = self.cpu_done = None
        self.threads_first, self.threads_done = {}, {}
        self.done_time = 0.0

    def received(self, layer: LayerRecord, heads: list[bytes]) -> None:
        """Record a batch of request heads that arrived on `layer`'s port together."""
        now = time.time()
        if not layer.total:
            layer.first_time = now
            if self.pid and self.cpu_first is None:
                self.cpu_first = process_cpu(self.pid)
                self.threads_first = thread_cpu(self.pid)
        layer.total += len(heads)
        first = layer.first
        capacity = layer.capacity
        new = 0
        for head in heads:
            try:
                seq = int(head[_SEQ_AT : head.index(b" ", _SEQ_AT)])
            except ValueError:
                layer.foreign += 1
                continue
            if 0 <= seq < capacity:
                if not first[seq]:
                    first[seq] = now
                    new += 1
            else:
                layer.foreign += 1
        if new:
            layer.distinct += new
            layer.last_new = now
            expected = self.expected
            if (
                expected
                and not self.done_time
                and self.backend.distinct == expected
                and self.frontend.distinct == expected
            ):
                self.done_time = now
                if self.pid:
                    self.cpu_done = process_cpu(self.pid)
                    self.threads_done = thread_cpu(self.pid)

    def stats(self) -> dict[str, Any]:
        """Counts and times of the current run, and the sink's own CPU seconds."""
        times = os.times()
        return {
            "expected": self.expected,
            "backend": self.backend.stats(),
            "frontend": self.frontend.stats(),
            "done": self.done_time,
            "daemon_cpu_first": self.cpu_first,
            "daemon_cpu_done": self.cpu_done,
            "daemon_threads_first": self.threads_first,
            "daemon_threads_done": self.threads_done,
            "sink_cpu": times.user + times.system,
        }

    def dump(self, path: str) -> None:
        """Write the first-arrival times: backend's then frontend's, as native doubles."""
        with open(path, "wb") as f:
            self.backend.first.tofile(f)
            self.frontend.first.tofile(f)


class _Connection(asyncio.Protocol):
    """One client connection to a layer's port."""

    __slots__ = ("buffer", "layer_name", "sink", "transport")

    def __init__(self, sink: Sink, layer_name: str) -> None:
        self.sink = sink
        self.layer_name = layer_name
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._layer().connections += 1

    def _layer(self) -> LayerRecord:
        return self.sink.backend if self.layer_name == "backend" else self.sink.frontend

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data = self.buffer + data
        heads = data.split(b"\r\n\r\n")
        self.buffer = heads.pop()  # an incomplete request, or b""
        if heads:
            assert self.transport is not None
            self.transport.write(RESPONSE * len(heads))
            self.sink.received(self._layer(), heads)


class SinkProcess(Stoppable):
    """The harness's handle on a sink process: start it, send commands, stop it."""

    def __init__(self, backend_port: int = 0, frontend_port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "purged.bench.sink", str(backend_port), str(frontend_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        banner = self._readline(timeout=20.0).split()
        if len(banner) != 3 or banner[0] != "ready":
            self.stop()
            raise RuntimeError(f"sink did not start: {' '.join(banner)!r}")
        self.backend_port = int(banner[1])
        self.frontend_port = int(banner[2])

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def backend_addr(self) -> str:
        return f"127.0.0.1:{self.backend_port}"

    @property
    def frontend_addr(self) -> str:
        return f"127.0.0.1:{self.frontend_port}"

    def _readline(self, timeout: float) -> str:
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"sink did not answer within {timeout:g} s")
        return stdout.readline().decode()

    def command(self, line: str, timeout: float = 20.0) -> str:
        """Send one command line; return the answer line."""
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()
        answer = self._readline(timeout).strip()
        if answer.startswith("error"):
            raise RuntimeError(f"sink: {answer}")
        return answer

    def arm(self, expected: int, pid: int = 0) -> None:
        """Start a run expecting URLs 0..expected-1 on both layers; watch `pid`'s CPU."""
        self.command(f"arm {expected} {pid}")

    def stats(self) -> dict[str, Any]:
        """The sink's counters for the current run (see `Sink.stats`)."""
        result: dict[str, Any] = json.loads(self.command("stats"))
        return result

    def first_arrivals(self, path: str) -> tuple[array[float], array[float]]:
        """First-arrival times per URL of the current run: (backend, frontend); 0 = never."""
        self.command(f"dump {path}")
        times = array("d")
        with open(path, "rb") as f:
            times.frombytes(f.read())
        os.unlink(path)
        half = len(times) // 2
        return times[:half], times[half:]

    def stop(self) -> None:
        """Ask the sink to quit; kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()


async def _serve(backend_port: int, frontend_port: int) -> None:
    loop = asyncio.get_running_loop()
    sink = Sink()
    servers = [
        await loop.create_server(
            lambda name=name: _Connection(sink, name),  # type: ignore[misc]
            "127.0.0.1",
            port,
            backlog=1024,
            reuse_address=True,
        )
        for name, port in (("backend", backend_port), ("frontend", frontend_port))
    ]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    out.write(f"ready {ports[0]} {ports[1]}\n")
    out.flush()
    while line := await reader.readline():
        command, *args = line.decode().split()
        answer = "ok"
        if command == "arm":
            sink.arm(int(args[0]), int(args[1]) if len(args) > 1 else 0)
        elif command == "stats":
            answer = json.dumps(sink.stats())
        elif command == "dump":
            sink.dump(args[0])
        elif command == "quit":
            break
        else:
            answer = f"error unknown command {command!r}"
        out.write(answer + "\n")
        out.flush()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m purged.bench.sink [BACKEND_PORT FRONTEND_PORT]` (0 = any free port)."""
    args = sys.argv[1:] if argv is None else argv
    backend_port = int(args[0]) if args else 0
    frontend_port = int(args[1]) if len(args) > 1 else 0
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(backend_port, frontend_port))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(_serve(backend_port, frontend_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
