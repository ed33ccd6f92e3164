"""Apache Traffic Server 9.2 run from a private run-root, as infra.md describes.

The configuration pieces that the README shows live in ``deploy/trafficserver/``
(``records.config.snippet``, ``ip_allow.yaml``, ``remap.config``); this module reads them
from there and substitutes the ports, so docs, demo and tests cannot drift apart.
"""

from __future__ import annotations

import http.client
import re
import shutil
import tempfile
import time
from pathlib import Path

from .processes import Component, Fetch, free_port, log_tail, wait_port

REPO_ROOT = Path(__file__).resolve().parents[3]
DEPLOY_DIR = REPO_ROOT / "deploy" / "trafficserver"
SYSTEM_CONFIG_DIR = Path("/etc/trafficserver")

# Settings of a private instance (not part of the deploy snippet): stay root instead of
# switching to the `trafficserver` user, and write no access logs.
PRIVATE_RECORDS = (
    "CONFIG proxy.config.admin.user_id STRING #-1",
    "CONFIG proxy.config.log.logging_enabled INT 0",
)

# Verbose Via (insert_response_via_str 3) looks like
#   "http/1.1 traffic_server (ApacheTrafficServer/9.2.9 [uScHs f p eN:t cCHp s ])"
# The first bracket block is "u<client> c<cache lookup> s<server> f<fill> p<proxy> e<error>".
# Cache-lookup codes H (fresh), R (fresh, from RAM) and W (read-while-write: the object was
# still being written by the fill; seen under load) are hits; M, S, A, C and " " are not.
_VIA_CACHE_LOOKUP = re.compile(r"\[u.c(.)")
HIT_CODES = frozenset("HRW")


def via_hit(via: str) -> bool:
    """Whether a Traffic Server verbose ``Via`` header value reports a cache hit.

    Works on a ``Via`` that passed through Varnish too (headers joined with ", ")."""
    m = _VIA_CACHE_LOOKUP.search(via)
    if m is None:
        raise AssertionError(f"no Traffic Server verbose Via in {via!r}")
    return m.group(1) in HIT_CODES


def apply_records(text: str, lines: list[str]) -> str:
    """Return records.config ``text`` with each ``CONFIG name TYPE value`` line of
    ``lines`` replacing the line of the same name, or appended when there is none."""
    out = text.splitlines()
    for line in lines:
        name = line.split()[1]
        pattern = re.compile(rf"^\s*CONFIG\s+{re.escape(name)}\s")
        idx = [i for i, cur in enumerate(out) if pattern.match(cur)]
        if idx:
            out[idx[0]] = line
            for i in reversed(idx[1:]):
                del out[i]
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def snippet_lines(path: Path, **subst: str) -> list[str]:
    """Non-comment, non-blank lines of a deploy snippet with ``@KEY@`` placeholders filled."""
    text = path.read_text()
    for key, value in subst.items():
        text = text.replace(f"@{key}@", value)
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


class TrafficServer(Component):
    """A private ``traffic_server`` on ``127.0.0.1:<free port>`` caching ``origin_port``.

    Every Host is mapped to the origin (see ``deploy/trafficserver/remap.config``); objects
    are keyed by the client's Host and path. PURGE is allowed from loopback.
    """

    def __init__(self, origin_port: int, *, start_timeout: float = 20.0) -> None:
        self.origin_port = origin_port
        self.port: int = free_port()
        super().__init__(Path(tempfile.mkdtemp(prefix="purged-ats-")))
        try:
            self._write_config()
            self._start(start_timeout)
        except BaseException:
            self.stop()
            raise

    # -- setup -------------------------------------------------------------------------
    def _write_config(self) -> None:
        d = self.dir
        etc = d / "etc"
        shutil.copytree(SYSTEM_CONFIG_DIR, etc, symlinks=False)
        for sub in ("cache", "run", "log", "var"):
            (d / sub).mkdir()
        # bindir/sbindir/libdir/plugins stay Debian's; everything writable is under DIR.
        (d / "runroot.yaml").write_text(
            f"prefix: {d}\n"
            "exec_prefix: /usr\n"
            "bindir: /usr/bin\n"
            "sbindir: /usr/sbin\n"
            f"sysconfdir: {etc}\n"
            "datadir: /usr/share/trafficserver\n"
            "includedir: /usr/include\n"
            "libdir: /usr/lib/trafficserver\n"
            "libexecdir: /usr/lib/trafficserver/modules\n"
            f"localstatedir: {d / 'var'}\n"
            f"runtimedir: {d / 'run'}\n"
            f"logdir: {d / 'log'}\n"
            f"cachedir: {d / 'cache'}\n"
        )
        records = etc / "records.config"
        lines = snippet_lines(DEPLOY_DIR / "records.config.snippet", PORT=str(self.port))
        records.write_text(apply_records(records.read_text(), [*lines, *PRIVATE_RECORDS]))
        (etc / "storage.config").write_text(f"{d / 'cache'} 256M\n")
        origin = f"127.0.0.1:{self.origin_port}"
        remap = snippet_lines(DEPLOY_DIR / "remap.config", ORIGIN=origin)
        (etc / "remap.config").write_text("\n".join(remap) + "\n")
        shutil.copyfile(DEPLOY_DIR / "ip_allow.yaml", etc / "ip_allow.yaml")

    def _start(self, timeout: float) -> None:
        proc = self._spawn(
            ["traffic_server", f"--run-root={self.dir / 'runroot.yaml'}"], "traffic_server.out"
        )
        # wait_for_cache=1: the port opens only once the cache initialised, or failed to:
        # then ATS serves without a cache, which would only show up as "always MISS".
        deadline = time.monotonic() + timeout
        wait_port(
            "127.0.0.1",
            self.port,
            timeout,
            what="traffic_server",
            tail=self.log_tail,
            proc=proc,
        )
        diags = self.dir / "log" / "diags.log"
        while True:
            text = diags.read_text(errors="replace") if diags.exists() else ""
            if "Cache Disabled" in text:
                raise RuntimeError(f"traffic_server runs without a cache\n{self.log_tail()}")
            if "cache enabled" in text:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"traffic_server: no 'cache enabled' in diags.log within {timeout:.1f}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    # -- diagnostics -------------------------------------------------------------------
    def log_tail(self, lines: int = 30) -> str:
        return (
            f"[traffic_server.out]\n{log_tail(self.dir / 'traffic_server.out', lines)}\n"
            f"[diags.log]\n{log_tail(self.dir / 'log' / 'diags.log', lines)}"
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- client helpers ----------------------------------------------------------------
    def get(self, path: str, host: str, timeout: float = 5.0) -> tuple[int, bool]:
        """GET ``path`` with ``Host: host`` through ATS; return ``(status, hit)``."""
        f = self.fetch(path, host, timeout=timeout)
        return f.status, f.hit

    def fetch(self, path: str, host: str, timeout: float = 5.0) -> Fetch:
        """GET through ATS, returning status, hit (from the verbose Via), headers, body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            body = resp.read()
            headers = resp.getheaders()
            via = resp.getheader("Via", "")
        finally:
            conn.close()
        return Fetch(resp.status, via_hit(via), headers, body)

    # -- teardown ----------------------------------------------------------------------
