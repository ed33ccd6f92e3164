"""A private Varnish instance (``varnishd -F``) using ``deploy/varnish/purge.vcl``.

The worker process runs as user ``vcache``: the work directory, the VCL and the Unix socket
live in a 0755 directory under /tmp (not a 0700 temp dir of root's), see infra.md.
"""

from __future__ import annotations

import http.client
import os
import socket
import tempfile
from pathlib import Path

from .processes import Component, Fetch, free_port, log_tail, wait_port

REPO_ROOT = Path(__file__).resolve().parents[3]
VCL_TEMPLATE = REPO_ROOT / "deploy" / "varnish" / "purge.vcl"
# Name of the Unix socket listener; purge.vcl allows PURGE on it by this name.
UNIX_LISTENER_NAME = "purge"


def render_vcl(backend_host: str, backend_port: int) -> str:
    """``deploy/varnish/purge.vcl`` with the backend address filled in."""
    return (
        VCL_TEMPLATE.read_text()
        .replace("@BACKEND_HOST@", backend_host)
        .replace("@BACKEND_PORT@", str(backend_port))
    )


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Varnish(Component):
    """``varnishd`` on ``127.0.0.1:<free port>`` (plus an optional Unix socket listener)
    in front of ``backend_port`` on 127.0.0.1."""

    def __init__(
        self, backend_port: int, unix_socket: bool = False, *, start_timeout: float = 15.0
    ) -> None:
        self.backend_port = backend_port
        self.port: int = free_port()
        self.admin_port: int = free_port()
        super().__init__(Path(tempfile.mkdtemp(prefix="purged-varnish-", dir="/tmp")))
        os.chmod(self.dir, 0o755)
        self.workdir = self.dir / "n"
        self.vcl_path = self.dir / "purge.vcl"
        self.socket_path: str | None = str(self.dir / "varnish.sock") if unix_socket else None
        try:
            self.vcl_path.write_text(render_vcl("127.0.0.1", backend_port))
            os.chmod(self.vcl_path, 0o644)
            self._start(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        cmd = [
            "varnishd",
            "-F",
            "-a",
            f"127.0.0.1:{self.port}",
            "-T",
            f"127.0.0.1:{self.admin_port}",
            "-n",
            str(self.workdir),
            "-f",
            str(self.vcl_path),
            "-s",
            "malloc,64m",
        ]
        if self.socket_path is not None:
            cmd[4:4] = ["-a", f"{UNIX_LISTENER_NAME}={self.socket_path},mode=0666"]
        proc = self._spawn(cmd, "varnishd.out")
        wait_port("127.0.0.1", self.port, timeout, what="varnishd", tail=self.log_tail, proc=proc)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.dir / "varnishd.out", lines)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def get(
        self, path: str, host: str, *, unix: bool = False, timeout: float = 5.0
    ) -> tuple[int, bool]:
        """GET ``path`` with ``Host: host`` through Varnish; return ``(status, hit)``.

        ``unix=True`` goes through the Unix socket listener."""
        f = self.fetch(path, host, unix=unix, timeout=timeout)
        return f.status, f.hit

    def fetch(self, path: str, host: str, *, unix: bool = False, timeout: float = 5.0) -> Fetch:
        """GET through Varnish, returning status, Varnish hit, headers and body (the
        headers include the backend's, e.g. Traffic Server's ``Via``)."""
        conn: http.client.HTTPConnection
        if unix:
            if self.socket_path is None:
                raise ValueError("this Varnish has no Unix socket listener")
            conn = _UnixHTTPConnection(self.socket_path, timeout)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            body = resp.read()
            headers = resp.getheaders()
            x_cache = resp.getheader("X-Cache")
        finally:
            conn.close()
        if x_cache not in ("HIT", "MISS"):
            raise AssertionError(f"Varnish response without X-Cache HIT/MISS: {x_cache!r}")
        return Fetch(resp.status, x_cache == "HIT", headers, body)
