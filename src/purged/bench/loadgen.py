"""A minimal pipelined PURGE load generator: how many PURGEs/s a server absorbs ("the limit").

`python -m purged.bench.loadgen HOST:PORT[,HOST:PORT] [-c CONNS,CONNS] [-d DEPTH] [-t SECONDS]`
opens CONNS connections to each address, keeps DEPTH requests in flight on each (a new batch
is written as soon as answers arrive) and prints one JSON line: requests answered, seconds,
rate. The requests are the benchmark's URLs (`purged.bench.sink.url`), encoded by the
daemon's own encoder, so a sink does the same work per request as in a daemon run.

Responses of the benchmark sink are counted by their blank line (they have no body); with
`--http` they are read by the daemon's response reader (for real caches, whose answers have
bodies). It runs in its own process so that it has a core to itself, like the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from typing import Any

from purged.http import ResponseReader
from purged.url import encode_purge, parse_purge_url

from .sink import url


class _Client(asyncio.Protocol):
    def __init__(self, gen: LoadGenerator, index: int) -> None:
        self.gen = gen
        self.index = index  # of its address
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.reader = ResponseReader() if gen.http else None
        self.inflight = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send(self.gen.depth)

    def send(self, count: int) -> None:
        assert self.transport is not None
        self.transport.write(self.gen.take(count))
        self.inflight += count

    def data_received(self, data: bytes) -> None:
        if self.reader is not None:
            answered = len(self.reader.feed(data))
        else:
            # Responses end with a blank line; the last 3 bytes may start the next one.
            data = self.tail + data
            answered = data.count(b"\r\n\r\n")
            self.tail = data[-3:]
        if answered:
            self.inflight -= answered
            self.gen.answered[self.index] += answered
            if not self.gen.stopping:
                self.send(answered)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost += 1


class LoadGenerator:
    """Requests for the URLs 0..urls-1, round robin, `depth` in flight per connection."""

    def __init__(self, urls: int, depth: int, http: bool, addresses: int) -> None:
        self.requests = [encode_purge(parse_purge_url(url(seq))) for seq in range(urls)]
        self.depth = depth
        self.http = http
        self.next = 0
        self.answered = [0] * addresses  # responses read, per address
        self.lost = 0
        self.stopping = False

    def take(self, count: int) -> bytes:
        """The next `count` requests, as one buffer."""
        start = self.next
        end = start + count
        requests = self.requests
        if end <= len(requests):
            self.next = end % len(requests)
            return b"".join(requests[start:end])
        out = []
        for _ in range(count):
            out.append(requests[self.next])
            self.next = (self.next + 1) % len(requests)
        return b"".join(out)


async def run(
    addresses: list[tuple[str, int]],
    connections: list[int],
    *,
    depth: int,
    seconds: float,
    warmup: float,
    urls: int,
    http: bool,
) -> dict[str, Any]:
    """Load the addresses for `warmup` + `seconds`; the rate is measured after the warm-up."""
    loop = asyncio.get_running_loop()
    gen = LoadGenerator(urls, depth, http, len(addresses))
    clients: list[_Client] = []
    for index, ((host, port), count) in enumerate(zip(addresses, connections, strict=True)):
        for _ in range(count):
            client = _Client(gen, index)
            await loop.create_connection(lambda c=client: c, host, port)  # type: ignore[misc]
            clients.append(client)
    await asyncio.sleep(warmup)
    start_counts, start = list(gen.answered), time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - start
    counts = [now - before for now, before in zip(gen.answered, start_counts, strict=True)]
    count = sum(counts)
    gen.stopping = True
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    return {
        "requests": count,
        "seconds": elapsed,
        "rate": count / elapsed,
        "rates": [c / elapsed for c in counts],
        "connections": sum(connections),
        "depth": depth,
        "lost_connections": gen.lost,
    }


def measure(
    addresses: list[str],
    connections: list[int],
    *,
    depth: int = 32,
    seconds: float = 3.0,
    urls: int = 100_000,
    http: bool = False,
) -> dict[str, Any]:
    """Run the load generator in its own process against `addresses`; its JSON result."""
    cmd = [
        sys.executable,
        "-m",
        "purged.bench.loadgen",
        ",".join(addresses),
        "-c",
        ",".join(str(c) for c in connections),
        "-d",
        str(depth),
        "-t",
        str(seconds),
        "-u",
        str(urls),
    ]
    if http:
        cmd.append("--http")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    """Command line entry: prints the result as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m purged.bench.loadgen")
    parser.add_argument("addresses", help="HOST:PORT[,HOST:PORT...]")
    parser.add_argument("-c", "--connections", default="48,4", help="connections per address")
    parser.add_argument("-d", "--depth", type=int, default=32, help="requests in flight each")
    parser.add_argument("-t", "--seconds", type=float, default=3.0)
    parser.add_argument("-w", "--warmup", type=float, default=0.5)
    parser.add_argument("-u", "--urls", type=int, default=100_000, help="distinct URLs")
    parser.add_argument("--http", action="store_true", help="parse responses with bodies")
    args = parser.parse_args(argv)
    addresses = [_address(a) for a in args.addresses.split(",")]
    connections = [int(c) for c in args.connections.split(",")]
    if len(connections) < len(addresses):
        connections += [connections[-1]] * (len(addresses) - len(connections))
    import uvloop

    result = uvloop.run(
        run(
            addresses,
            connections[: len(addresses)],
            depth=args.depth,
            seconds=args.seconds,
            warmup=args.warmup,
            urls=args.urls,
            http=args.http,
        )
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
