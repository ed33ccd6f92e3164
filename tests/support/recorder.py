"""A recording HTTP/1.1 server standing in for a cache that receives PURGE requests.

It runs an asyncio loop in its own thread and records every request it receives as
``RecordedRequest(time, method, host, target)`` (``time`` is ``time.monotonic()`` at
arrival). Requests are answered strictly in order per connection, also when pipelined.
Knobs, settable at any time from the test thread:

- ``status``: int (default 200), or a callable ``RecordedRequest -> int``;
- ``delay``: seconds to wait before each answer (a slow cache);
- ``close_after``: after answering N requests on a connection, close it, leaving the rest of
  the pipeline unanswered (``None``: never);
- ``stall``: keep accepting and reading (and recording) but answer nothing until cleared;
- ``refuse()`` / ``accept()``: stop listening (connects are refused) / listen again on the
  same port or socket path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any, NamedTuple

from purged.embedded.processes import Stoppable

from .ports import free_port


class RecordedRequest(NamedTuple):
    time: float
    method: str
    host: str
    target: str


StatusSpec = int | Callable[[RecordedRequest], int]


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


class Recorder(Stoppable):
    """Recording PURGE sink on ``127.0.0.1:<free port>``, or on the Unix socket ``unix_path``."""

    def __init__(self, *, unix_path: str | os.PathLike[str] | None = None) -> None:
        self.unix_path: str | None = os.fspath(unix_path) if unix_path is not None else None
        self.port: int | None = None if self.unix_path is not None else free_port()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._answered: list[tuple[RecordedRequest, int]] = []
        self._errors: list[str] = []
        self._connections_opened = 0
        self._status: StatusSpec = 200
        self._delay = 0.0
        self._close_after: int | None = None
        self._stall = False
        self._stopped = False

        self._loop = asyncio.new_event_loop()
        self._unstalled = asyncio.Event()  # bound to self._loop on first use (3.10+)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"recorder-{self.address}", daemon=True
        )
        self._thread.start()
        self._call(self._unstall_set(True))
        self.accept()

    # -- loop plumbing -----------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        # Cancel what is left (connection tasks) and close the loop.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, None], timeout: float = 5.0) -> None:
        """Run ``coro`` in the recorder's loop and wait for it."""
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _unstall_set(self, value: bool) -> None:
        if value:
            self._unstalled.set()
        else:
            self._unstalled.clear()

    # -- knobs -------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, or the Unix socket path (what purged's address flags take)."""
        return self.unix_path if self.unix_path is not None else f"127.0.0.1:{self.port}"

    @property
    def status(self) -> StatusSpec:
        with self._lock:
            return self._status

    @status.setter
    def status(self, value: StatusSpec) -> None:
        with self._lock:
            self._status = value

    @property
    def delay(self) -> float:
        with self._lock:
            return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        with self._lock:
            self._delay = float(value)

    @property
    def close_after(self) -> int | None:
        with self._lock:
            return self._close_after

    @close_after.setter
    def close_after(self, value: int | None) -> None:
        with self._lock:
            self._close_after = value

    @property
    def stall(self) -> bool:
        with self._lock:
            return self._stall

    @stall.setter
    def stall(self, value: bool) -> None:
        with self._lock:
            self._stall = bool(value)
        self._call(self._unstall_set(not value))

    def refuse(self, close_connections: bool = False) -> None:
        """Stop listening: new connects are refused. Open connections stay unless
        ``close_connections``."""
        self._call(self._refuse(close_connections))

    def accept(self) -> None:
        """(Re)start listening on the same port / socket path."""
        self._call(self._listen())

    def close_connections(self) -> None:
        """Close every open client connection now (the listener stays)."""
        self._call(self._close_connections())

    # -- results -----------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """Copy of every request received so far (answered or not), in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def answered(self) -> list[tuple[RecordedRequest, int]]:
        """``(request, status)`` of every request answered so far, in answer order."""
        with self._lock:
            return list(self._answered)

    @property
    def errors(self) -> list[str]:
        """Protocol errors seen (malformed requests, requests with a body)."""
        with self._lock:
            return list(self._errors)

    @property
    def connections_opened(self) -> int:
        with self._lock:
            return self._connections_opened

    def targets(self) -> list[str]:
        with self._lock:
            return [r.target for r in self._requests]

    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def wait_for(self, n: int, timeout: float) -> list[RecordedRequest]:
        """Wait until at least ``n`` requests were received; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = [r.target for r in self._requests[-5:]]
                    raise TimeoutError(
                        f"recorder {self.address}: {len(self._requests)} of {n} requests "
                        f"after {timeout:.1f}s (last targets: {tail}, errors: {self._errors[-3:]},"
                        f" connections opened: {self._connections_opened})"
                    )
                self._cond.wait(left)
            return list(self._requests)

    # -- server side (runs in the loop thread) -----------------------------------------
    async def _listen(self) -> None:
        if self._server is not None:
            return
        if self.unix_path is not None:
            # start_unix_server replaces a stale socket file left by refuse().
            self._server = await asyncio.start_unix_server(self._serve, path=self.unix_path)
            os.chmod(self.unix_path, 0o666)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            self._server = await asyncio.start_server(self._serve, sock=sock, backlog=1024)

    async def _refuse(self, close_connections: bool) -> None:
        if self._server is not None:
            # close() stops listening at once; wait_closed() is not awaited because from
            # Python 3.12 on it also waits for the open connections to end.
            self._server.close()
            self._server = None
        if close_connections:
            await self._close_connections()

    async def _close_connections(self) -> None:
        for w in list(self._writers):
            w.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._connections_opened += 1
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writers.add(writer)
        queue: asyncio.Queue[RecordedRequest | None] = asyncio.Queue()
        answerer = asyncio.create_task(self._answer(queue, writer))
        try:
            await self._read(reader, queue)
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)  # end of input: answer what is queued, then stop
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await answerer
            self._writers.discard(writer)
            writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[RecordedRequest | None]
    ) -> None:
        # Hand parser: PURGE requests have no body, so a request is exactly its head and
        # requests are delimited by the blank line "\r\n\r\n". Splitting the buffer on it
        # handles several requests in one read (pipelining) and a request split across
        # reads (the incomplete tail stays in the buffer). A request announcing a body is
        # recorded as a protocol error: this server is only meant for PURGE.
        buf = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            *heads, buf = buf.split(b"\r\n\r\n")
            if not heads:
                continue
            now = time.monotonic()
            batch = [self._parse(head, now) for head in heads]
            with self._cond:
                self._requests.extend(batch)
                self._cond.notify_all()
            for req in batch:
                queue.put_nowait(req)

    def _parse(self, head: bytes, now: float) -> RecordedRequest:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._error(f"malformed request line: {lines[0]!r}")
            parts = [*parts, "", "", ""][:3]
        host = ""
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._error(f"malformed header line: {line!r}")
                continue
            lname = name.strip().lower()
            if lname == "host":
                host = value.strip()
            elif (lname == "content-length" and value.strip() != "0") or (
                lname == "transfer-encoding"
            ):
                self._error(f"request with a body is not supported: {lines[0]!r}")
        return RecordedRequest(now, parts[0], host, parts[1])

    def _error(self, msg: str) -> None:
        with self._lock:
            self._errors.append(msg)

    async def _answer(
        self, queue: asyncio.Queue[RecordedRequest | None], writer: asyncio.StreamWriter
    ) -> None:
        answered_here = 0
        while True:
            req = await queue.get()
            if req is None:
                return
            await self._unstalled.wait()
            with self._lock:
                delay, status, close_after = self._delay, self._status, self._close_after
            if delay > 0:
                await asyncio.sleep(delay)
                await self._unstalled.wait()
            code = status(req) if callable(status) else status
            head = f"HTTP/1.1 {code} {_reason(code)}\r\n"
            if code != 204 and code >= 200:
                head += "Content-Length: 0\r\n"
            writer.write((head + "\r\n").encode())
            answered_here += 1
            with self._lock:
                self._answered.append((req, code))
            if close_after is not None and answered_here >= close_after:
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.drain()
                writer.close()
                return
            if queue.empty():
                await writer.drain()

    # -- teardown ----------------------------------------------------------------------
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            self._call(self._refuse(close_connections=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
