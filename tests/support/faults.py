"""Fault injection for delivery tests: broken cache connections, a fencing Kafka proxy, fast
event batches, and the committed offsets of a consumer group.

Everything listens on loopback only. The proxies are plain threads over blocking sockets:
they only have to be correct, not fast.
"""

from __future__ import annotations

import contextlib
import json
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from purged.embedded.broker import Broker, tansu_binary

from .ports import free_port, spawn, wait_port


def resource_changes(uris: Iterable[str]) -> Iterator[bytes]:
    """resource_change events for ``uris``, dated now (``make_event`` is too slow for 1M)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    head = b'{"$schema":"/resource_change/1.0.0","meta":{"uri":'
    tail = f',"dt":"{now}","stream":"resource-purge"}},"tags":["mediawiki"]}}'.encode()
    for uri in uris:
        yield head + json.dumps(uri).encode() + tail


def committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> list[int]:
    """The offsets ``group`` committed for ``topic`` (-1001: nothing committed)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        found = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10
        )
        return [tp.offset for tp in sorted(found, key=lambda tp: tp.partition)]
    finally:
        consumer.close()


# -- a cache connection that breaks ------------------------------------------------------


class BreakingProxy:
    """TCP proxy in front of a cache; while ``mode`` is set, every connection it carries is
    broken in the middle of a status line, so at least one request on it is unanswered:
    ``"close"`` closes it (FIN), ``"reset"`` resets it (RST)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.mode: str | None = None
        self.broken = 0  # connections broken so far
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=128)
        self._stopped = False
        threading.Thread(target=self._accept, name="breaking-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.update((client, server))
            threading.Thread(target=self._carry, args=(client, server), daemon=True).start()

    def _carry(self, client: socket.socket, server: socket.socket) -> None:
        """One thread per connection, so that closing it is immediate: a socket closed while
        another thread is blocked reading it would only send its FIN or RST once that read
        returned."""
        with contextlib.suppress(OSError, ValueError):
            while True:
                readable, _, _ = select.select([client, server], [], [])
                if client in readable:
                    if not (data := client.recv(65536)):
                        break
                    server.sendall(data)
                if server in readable:
                    if not (data := server.recv(65536)):
                        break
                    mode = self.mode
                    start = data.find(b"HTTP/1.") if mode is not None else -1
                    if start < 0:  # not breaking, or only the tail of a response: through
                        client.sendall(data)
                        continue
                    # Up to a random point inside the status line: that response is never read.
                    client.sendall(data[: start + random.randint(0, 11)])
                    if mode == "reset":  # linger 0: close() sends RST
                        linger = struct.pack("ii", 1, 0)
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    with self._lock:
                        self.broken += 1
                    break
        self._close(client, server)

    def _close(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                self._sockets.discard(sock)

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        self._close(*sockets)


# -- a broker that fences its consumer -----------------------------------------------------

HEARTBEAT = 12  # Kafka API key
FENCED_INSTANCE_ID = 82  # Kafka error code: another consumer took this group.instance.id


class FencingProxy:
    """Kafka-protocol-aware TCP proxy: once ``fence()`` is called, every Heartbeat response
    it carries says FENCED_INSTANCE_ID, as a broker does to a static group member whose
    ``group.instance.id`` another consumer took over. librdkafka treats it as fatal.

    (Tansu does not fence static members itself: two consumers with the same
    ``group.instance.id`` are both given every partition.)
    """

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self.fenced = threading.Event()
        self.fenced_responses = 0
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", port), backlog=64)
        threading.Thread(target=self._accept, name="fencing-proxy", daemon=True).start()

    def fence(self) -> None:
        self.fenced.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            requests: dict[int, tuple[int, int]] = {}  # correlation id -> (api key, version)
            threading.Thread(
                target=self._requests, args=(client, server, requests), daemon=True
            ).start()
            threading.Thread(
                target=self._responses, args=(server, client, requests), daemon=True
            ).start()

    def _requests(
        self, client: socket.socket, server: socket.socket, requests: dict[int, tuple[int, int]]
    ) -> None:
        with contextlib.suppress(OSError):
            for frame in _frames(client):
                key, version, correlation = struct.unpack_from(">hhi", frame, 4)
                requests[correlation] = (key, version)
                server.sendall(frame)
        _close(client, server)

    def _responses(
        self, server: socket.socket, client: socket.socket, requests: dict[int, tuple[int, int]]
    ) -> None:
        with contextlib.suppress(OSError):
            for frame in _frames(server):
                (correlation,) = struct.unpack_from(">i", frame, 4)
                key, version = requests.pop(correlation, (-1, 0))
                if key == HEARTBEAT and self.fenced.is_set():
                    # size, correlation id, [header tags (v4+)], [throttle time (v1+)], error
                    at = 8 + (1 if version >= 4 else 0) + (4 if version >= 1 else 0)
                    frame = frame[:at] + struct.pack(">h", FENCED_INSTANCE_ID) + frame[at + 2 :]
                    self.fenced_responses += 1
                client.sendall(frame)
        _close(client, server)

    def stop(self) -> None:
        self._listener.close()
        _close(*self._sockets)


def _frames(sock: socket.socket) -> Iterator[bytes]:
    """Size-prefixed Kafka frames read from ``sock`` (with their size prefix)."""
    buffer = b""
    while True:
        while len(buffer) >= 4:
            (size,) = struct.unpack_from(">i", buffer)
            if len(buffer) < 4 + size:
                break
            yield buffer[: 4 + size]
            buffer = buffer[4 + size :]
        data = sock.recv(65536)
        if not data:
            return
        buffer += data


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()


class FencingBroker(Broker):
    """A Tansu broker reached only through a `FencingProxy` (``.proxy``): Tansu advertises
    the proxy's port, so every client connection, bootstrap or not, goes through it."""

    def __init__(self) -> None:
        self.tansu_port = free_port()
        self.proxy: FencingProxy | None = None
        super().__init__()

    def _start(self, timeout: float) -> None:
        # Broker chose self.port: that is the proxy's, the address clients know.
        self.proxy = FencingProxy(self.port, self.tansu_port)
        self._out = open(self.dir / "tansu.log", "wb")  # noqa: SIM115 - closed by stop()
        self._proc = spawn(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.tansu_port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            cwd=self.dir,
            log=self._out,
        )
        wait_port("127.0.0.1", self.tansu_port, timeout, what="tansu", proc=self._proc)
        self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        while True:  # the first metadata answer through the proxy
            try:
                self._admin.list_topics(timeout=2)
                return
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        super().stop()
        if self.proxy is not None:
            self.proxy.stop()


class SamePortBroker(Broker):
    """A new Tansu on the port of one that stopped (memory storage: it starts empty)."""

    def __init__(self, port: int) -> None:
        self._fixed_port = port
        super().__init__()

    def _start(self, timeout: float) -> None:
        self.port = self._fixed_port
        self.bootstrap = f"127.0.0.1:{self.port}"
        super()._start(timeout)
