"""A tiny origin web server behind the caches (demo and tests).

Answers ``GET``/``HEAD`` for any path with 200, a body containing a per-server counter and
``Cache-Control: max-age=3600`` so that both caches store the object. Every request is
recorded as ``(method, host, path)``.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

from .processes import Stoppable, wait_port


class OriginRequest(NamedTuple):
    method: str
    host: str
    path: str


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without this every keep-alive response from the caches' point of view stalls ~40 ms
    # (Nagle + delayed ACK), see infra.md.
    disable_nagle_algorithm = True
    server: _Server

    def _answer(self, send_body: bool) -> None:
        origin = self.server.origin
        n = origin._record(self.command, self.headers.get("Host", ""), self.path)
        body = f"origin response #{n} for {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600")
        self.send_header("X-Origin-Count", str(n))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_PURGE(self) -> None:
        # A cache should never forward a PURGE; record it (tests can assert on it) and
        # answer 405 so that a misconfiguration is visible.
        self.server.origin._record(self.command, self.headers.get("Host", ""), self.path)
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the demo's and pytest's output stay readable


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    origin: Origin


class Origin(Stoppable):
    """Origin HTTP/1.1 server on ``127.0.0.1:<free port>``, served from a thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[OriginRequest] = []
        self._counter = 0
        self._stopped = False
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.origin = self
        self.port: int = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"origin-{self.port}",
            daemon=True,
        )
        self._thread.start()
        wait_port("127.0.0.1", self.port, 5.0, what="origin")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _record(self, method: str, host: str, path: str) -> int:
        with self._lock:
            self._requests.append(OriginRequest(method, host, path))
            self._counter += 1
            return self._counter

    @property
    def requests(self) -> list[OriginRequest]:
        """Copy of all requests seen so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def hits(self, path: str) -> int:
        """Number of GET requests the origin served for ``path`` (path and query)."""
        with self._lock:
            return sum(1 for r in self._requests if r.method == "GET" and r.path == path)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
