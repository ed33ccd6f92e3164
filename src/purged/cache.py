"""One cache layer: persistent, pipelined HTTP/1.1 connections that send PURGEs.

A layer owns a queue of purges (and, for the frontend, a FIFO that holds each purge until
its delay has passed: the delay is constant, so one timer for the head suffices). Each
connection keeps up to `depth` requests in flight and reads the answers in order; a
connection that fails gives its unanswered requests back to the front of the queue and
is re-opened with capped exponential back-off, forever.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from purged import metrics
from purged.http import ProtocolError, ResponseReader
from purged.logs import log, ratelimited
from purged.pipeline import Layer, Purge

BACKOFF_FIRST = 0.05  # seconds before the first reconnect attempt after a failure
BACKOFF_MAX = 5.0  # reconnects never wait longer than this


@dataclass(frozen=True)
class Address:
    """A cache address: TCP host and port, or an absolute Unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Connection(asyncio.Protocol):
    """One persistent connection to a cache, with its pipeline of unanswered requests."""

    def __init__(self, layer: CacheLayer) -> None:
        self.layer = layer
        self.transport: asyncio.Transport | None = None
        self.inflight: deque[Purge] = deque()
        self.reader = ResponseReader()
        self.answered = 0  # responses read on this connection
        self.last_progress = 0.0  # loop time of the last byte read or first request sent
        self.error: str | None = None  # why we closed it ourselves
        self.closed: asyncio.Future[None] = layer.loop.create_future()

    @property
    def ready(self) -> bool:
        return self.transport is not None and not self.reader.closing and self.error is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def send(self, batch: list[Purge]) -> None:
        """Write a batch of requests in one go (the pipeline window has room for them)."""
        assert self.transport is not None
        if not self.inflight:
            self.last_progress = self.layer.loop.time()
        self.inflight.extend(batch)
        self.transport.write(b"".join([purge.request for purge in batch]))

    def data_received(self, data: bytes) -> None:
        self.last_progress = self.layer.loop.time()
        try:
            statuses = self.reader.feed(data)
        except ProtocolError as error:
            self.abort("protocol", f"unparsable response: {error}")
            return
        if len(statuses) > len(self.inflight):
            self.abort("protocol", "more responses than requests")
            return
        self.answered += len(statuses)
        inflight = self.inflight
        layer = self.layer
        if statuses:
            layer.count_answers(statuses)
        for status in statuses:
            layer.answered(inflight.popleft(), status)
        if self.reader.closing and self.transport is not None:
            self.transport.close()  # the cache asked to close; unanswered ones go back
        if statuses:
            self.layer.kick()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        # An error: a reset (always), or a close while a response was awaited, even if the
        # status line of the one being read had arrived. A close between responses is
        # a cache ending an idle keep-alive connection, which is normal.
        broken = exc is not None or bool(self.inflight)
        status = self.reader.eof()
        if status is not None and self.inflight:
            self.answered += 1
            self.layer.count_answers([status])
            self.layer.answered(self.inflight.popleft(), status)
        if self.error is None and broken:
            self.error = "reset" if exc is not None else "closed"
            ratelimited.warning(
                f"{self.layer.name}-lost",
                "%s cache %s: connection lost with %d requests unanswered (%s)",
                self.layer.name,
                self.layer.address,
                len(self.inflight),
                exc or "closed by the cache",
            )
        if self.error is not None:
            self.layer.count_error(self.error)
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self, kind: str, why: str) -> None:
        """Close the connection at once because of `kind` of error."""
        if self.error is None:
            self.error = kind
            ratelimited.warning(
                f"{self.layer.name}-{kind}",
                "%s cache %s: %s",
                self.layer.name,
                self.layer.address,
                why,
            )
        if self.transport is not None:
            self.transport.abort()


class CacheLayer(Layer):
    """The backend or the frontend: a queue of purges and the connections that send them."""

    def __init__(
        self,
        name: str,
        address: Address,
        *,
        workers: int,
        depth: int,
        timeout: float,
        delay: float,
        on_done: Callable[[Purge], None],
        on_superseded: Callable[[Purge], None] | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.workers = workers
        self.depth = depth
        self.timeout = timeout
        self.delay = delay
        self._on_done = on_done
        self._on_superseded = on_superseded
        self.loop = asyncio.get_running_loop()
        self.queue: deque[Purge] = deque()  # ready to send
        self.delayed: deque[Purge] = deque()  # waiting for their `due` time (frontend)
        self.waiting: dict[bytes, Purge] = {}  # not yet sent, by request: for coalescing
        self.retrying = 0  # purges waiting to be re-sent after a 5xx
        self.connections = [Connection(self) for _ in range(workers)]
        self._next_connection = 0
        self._kicked = False
        self._timer: asyncio.TimerHandle | None = None
        self._coalesced = metrics.coalesced.labels(name)
        self._resent = metrics.purges_resent.labels(name)
        self._status_counters: dict[int, Any] = {}

    # --- accepting purges -------------------------------------------------------------
    def enqueue(self, purge: Purge) -> bool:
        """Queue a purge; False when it was merged into one of the same URL not yet sent."""
        older = self.waiting.get(purge.request)
        if self.delay:
            self._hold(purge, older)
            return True
        if older is not None:
            self._coalesced.inc()
            older.tickets.extend(purge.tickets)  # the older one is sent later than now
            return False
        self.waiting[purge.request] = purge
        self.queue.append(purge)
        self.kick()
        return True

    def _hold(self, purge: Purge, older: Purge | None) -> None:
        """Put a purge in the FIFO of the delay (the frontend), superseding `older` if it may.

        The newer purge must wait its full delay after its own backend answer, so it replaces
        an older one of its URL still held, which is then sent later than it was due. At most
        one delay later, though: a URL purged over and over still reaches the frontend (and
        its offsets get committed) about once per delay.
        """
        now = self.loop.time()
        purge.due = now + self.delay
        purge.latest_due = purge.due + self.delay
        if older is not None and older.due > now and purge.due <= older.latest_due:
            self._coalesced.inc()
            older.dead = True
            purge.tickets.extend(older.tickets)
            older.tickets = []
            purge.latest_due = older.latest_due
            if self._on_superseded is not None:
                self._on_superseded(older)
        self.waiting[purge.request] = purge
        self.delayed.append(purge)
        if self._timer is None:
            self._timer = self.loop.call_at(purge.due, self._release)

    def _release(self) -> None:
        """Move the purges whose delay has passed from the FIFO to the send queue."""
        self._timer = None
        now = self.loop.time()
        delayed, queue = self.delayed, self.queue
        while delayed and delayed[0].due <= now:
            purge = delayed.popleft()
            if not purge.dead:
                queue.append(purge)
        if delayed:
            self._timer = self.loop.call_at(delayed[0].due, self._release)
        self.kick()

    # --- sending ----------------------------------------------------------------------
    def kick(self) -> None:
        """Send what can be sent, once per loop iteration however often it is asked."""
        if not self._kicked and self.queue:
            self._kicked = True
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._kicked = False
        queue, waiting, depth = self.queue, self.waiting, self.depth
        connections = self.connections
        count = len(connections)
        start = self._next_connection
        for index in range(count):
            if not queue:
                break
            connection = connections[(start + index) % count]
            if not connection.ready:
                continue
            room = depth - len(connection.inflight)
            batch: list[Purge] = []
            while room > 0 and queue:
                purge = queue.popleft()
                if purge.dead:
                    continue
                if waiting.get(purge.request) is purge:
                    del waiting[purge.request]
                batch.append(purge)
                room -= 1
            if batch:
                connection.send(batch)
        self._next_connection = (start + 1) % count

    def count_answers(self, statuses: list[int]) -> None:
        """Count the responses of one read: one counter update per status, not per answer."""
        first = statuses[0]
        if statuses.count(first) == len(statuses):
            self._status_counter(first).inc(len(statuses))
            return
        for status in set(statuses):
            self._status_counter(status).inc(statuses.count(status))

    def _status_counter(self, status: int) -> Any:
        counter = self._status_counters.get(status)
        if counter is None:
            counter = self._status_counters[status] = metrics.http_requests.labels(
                str(status), self.name
            )
        return counter

    def answered(self, purge: Purge, status: int) -> None:
        """A response was read for `purge` (and counted by `count_answers`)."""
        if status >= 500:
            # The cache cannot purge now (restarting, overloaded): the purge is not done.
            # Retried with capped back-off until it is answered otherwise, like a connection
            # failure; meanwhile the backlog grows and backpressure pauses consumption.
            purge.attempts += 1
            self.retrying += 1
            self.loop.call_later(_backoff(purge.attempts), self._retry, purge)
            ratelimited.warning(
                f"{self.name}-5xx",
                "%s cache %s answered %d to %r; retrying",
                self.name,
                self.address,
                status,
                purge.request[:200],
            )
            return
        self._on_done(purge)

    def _retry(self, purge: Purge) -> None:
        self.retrying -= 1
        self._resent.inc()
        self.queue.append(purge)
        self.kick()

    def count_error(self, kind: str) -> None:
        metrics.tcp_errors.labels(kind).inc()

    @property
    def backlog(self) -> int:
        """Purges ready for, or in flight to, this layer (not those waiting for the delay).

        As in the original, whose frontend queue only got a URL once its delay was over: the
        production alerts on `purged_backlog` assume this meaning.
        """
        inflight = sum(len(connection.inflight) for connection in self.connections)
        return len(self.queue) + inflight + self.retrying

    # --- connections ------------------------------------------------------------------
    async def run(self) -> None:
        """Keep every connection open until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            for index in range(self.workers):
                tasks.create_task(self._keep(index))
            tasks.create_task(self._watch_timeouts())

    async def _keep(self, index: int) -> None:
        failures = 0
        while True:
            connection = self.connections[index] = Connection(self)
            try:
                # Not wait_for: in 3.11 it swallows a cancel that lands as the connect fails.
                async with asyncio.timeout(self.timeout):
                    await self._connect(connection)
            except (OSError, TimeoutError) as error:
                failures += 1
                self.count_error("timeout" if isinstance(error, TimeoutError) else "connect")
                ratelimited.warning(
                    f"{self.name}-connect",
                    "%s cache %s: cannot connect (%s); retrying",
                    self.name,
                    self.address,
                    error or "timed out",
                )
                await asyncio.sleep(_backoff(failures))
                continue
            if failures:
                log.info("%s cache %s: connected", self.name, self.address)
            self.kick()
            try:
                await connection.closed
            finally:
                if connection.transport is not None:  # cancelled: close it ourselves
                    connection.transport.abort()
            self._give_back(connection)
            if connection.answered and connection.error is None:
                failures = 0  # a normal close (Connection: close): reconnect at once
                continue
            failures = failures + 1 if not connection.answered else 1
            await asyncio.sleep(_backoff(failures))

    async def _connect(self, connection: Connection) -> None:
        address = self.address
        if address.path:
            await self.loop.create_unix_connection(lambda: connection, address.path)
        else:
            await self.loop.create_connection(lambda: connection, address.host, address.port)
            sock = connection.transport.get_extra_info("socket") if connection.transport else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _give_back(self, connection: Connection) -> None:
        """Put a lost connection's unanswered requests back at the head of the queue."""
        if connection.inflight:
            self._resent.inc(len(connection.inflight))
            self.queue.extendleft(reversed(connection.inflight))
            connection.inflight.clear()
            self.kick()

    async def _watch_timeouts(self) -> None:
        interval = max(0.05, min(1.0, self.timeout / 4))
        while True:
            await asyncio.sleep(interval)
            deadline = self.loop.time() - self.timeout
            for connection in self.connections:
                if connection.inflight and connection.last_progress < deadline:
                    connection.abort("timeout", f"no answer for {self.timeout:g} s")


def _backoff(failures: int) -> float:
    """Capped exponential back-off with jitter (so that workers do not reconnect in step)."""
    delay = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** min(failures - 1, 16)))
    return float(delay * random.uniform(0.5, 1.0))
