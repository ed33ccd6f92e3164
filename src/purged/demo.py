"""`python -m purged.demo` (`./dev demo`): the real pipeline on this machine, narrated.

It starts an embedded Kafka broker (Tansu), an origin web server, Apache Traffic Server in
front of it (the backend cache), Varnish in front of that (the frontend cache, reached over
a Unix socket as in production) and `purged` between Kafka and the caches. Then it fetches a
page through Varnish (a miss, then a hit), publishes a resource_change event for the page's
URL, shows the PURGE requests purged sent (from its own /metrics), and fetches the page
again: a miss in both caches, served by the origin anew. Everything is stopped at the end;
the exit status is 0 when every step did what it should, 1 otherwise (with the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from purged.embedded.broker import Broker, make_event
from purged.embedded.origin import Origin
from purged.embedded.processes import (
    Spawned,
    free_port,
    log_tail,
    spawn,
    stop_process_group,
)
from purged.embedded.trafficserver import TrafficServer, via_hit
from purged.embedded.varnish import Varnish

HOST = "en.wikipedia.org"
PATH = "/wiki/Purged_demo"
TOPIC = "eqiad.resource-purge"
GROUP = "cp-demo"  # production: the cache host's name
FRONTEND_DELAY_MS = 1000  # the original's default
READY_LINE = "ready: consuming, and both caches connected"
WAIT = 30.0  # seconds: bound of every wait


class DemoError(Exception):
    """A step did not do what it should; the message says which and why."""


class Narrator:
    """Prints the story to stdout, each line stamped with the seconds since the start."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.started = time.monotonic()

    def say(self, text: str = "") -> None:
        stamp = f"[{time.monotonic() - self.started:5.1f}s] " if text else ""
        print(f"{stamp}{text}", file=self.out, flush=True)

    def detail(self, text: str) -> None:
        print(f"         {text}", file=self.out, flush=True)


class Daemon:
    """The `purged` command as a child process, with its log and its metrics."""

    def __init__(self, args: list[str], workdir: Path) -> None:
        self.metrics_port = free_port()
        self.command = [
            sys.executable,
            "-m",
            "purged",
            *args,
            "-prometheus_addr",
            f"127.0.0.1:{self.metrics_port}",
        ]
        self.log_path = workdir / "purged.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc: Spawned | None = spawn(self.command, cwd=workdir, log=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log():
            if self.proc is None or self.proc.poll() is not None:
                raise DemoError(f"purged exited before it was ready:\n{log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise DemoError(
                    f"purged not ready within {timeout:g} s:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def requests_answered(self) -> dict[tuple[str, str], float]:
        """`purged_http_requests_total` by (layer, status)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "purged_http_requests_total":
                    key = (sample.labels["layer"], sample.labels["status"])
                    counts[key] = sample.value
        return counts

    def stop(self) -> int | None:
        """SIGTERM, as systemd does; the exit status (None when it was already stopped)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        stop_process_group(proc, timeout=15.0)
        self._log.close()
        return proc.returncode


def describe(fetch_hit: bool, via: str, origin_before: int, origin_after: int) -> str:
    """One fetch through Varnish, as a reader's browser would see it, and what it cost."""
    varnish = "HIT" if fetch_hit else "MISS"
    if fetch_hit:
        return f"Varnish {varnish} (neither Traffic Server nor the origin was asked)"
    ats = "HIT" if via_hit(via) else "MISS"
    origin = (
        f"the origin served it (request #{origin_after})"
        if origin_after > origin_before
        else "the origin was not asked"
    )
    return f"Varnish {varnish}, Traffic Server {ats}, {origin}"


def fetch(varnish: Varnish, origin: Origin, say: Narrator) -> tuple[bool, bool, int]:
    """GET the page through Varnish's public listener: (Varnish hit, ATS hit, origin hits)."""
    before = origin.hits(PATH)
    result = varnish.fetch(PATH, HOST)
    if result.status != 200:
        raise DemoError(f"GET {PATH} through Varnish answered {result.status}")
    after = origin.hits(PATH)
    via = result.header("Via")
    outcome = describe(result.hit, via, before, after)
    say.detail(f"GET https://{HOST}{PATH} -> {result.status}, {outcome}")
    ats_hit = True if result.hit else via_hit(via)
    return result.hit, ats_hit, after


def wait_for_purges(daemon: Daemon, timeout: float) -> dict[str, tuple[str, float]]:
    """Poll purged's metrics until both layers answered a PURGE: {layer: (status, seconds)}."""
    started = time.monotonic()
    seen: dict[str, tuple[str, float]] = {}
    while len(seen) < 2:
        if time.monotonic() - started > timeout:
            missing = {"backend", "frontend"} - set(seen)
            raise DemoError(
                f"no PURGE answered by the {' and '.join(sorted(missing))} within {timeout:g} s "
                f"(purged_http_requests_total: {daemon.requests_answered()})\n"
                f"{log_tail(daemon.log_path)}"
            )
        for (layer, status), value in daemon.requests_answered().items():
            if value and layer not in seen:
                seen[layer] = (status, time.monotonic() - started)
        time.sleep(0.01)
    return seen


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="purged-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(say: Narrator) -> None:
    """The demo's story; raises DemoError (or any error) when a step fails."""
    missing = [tool for tool in ("traffic_server", "varnishd") if shutil.which(tool) is None]
    if missing:
        raise DemoError(f"{' and '.join(missing)} not installed: run ./dev setup first")
    say.say("purged demo: Kafka -> purged -> Traffic Server (backend) and Varnish (frontend)")
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(workdir())
        broker = stack.enter_context(Broker())
        say.say(f"Kafka broker (Tansu) on {broker.bootstrap}")
        origin = stack.enter_context(Origin())
        say.say(f"origin web server on {origin.address}")
        ats = stack.enter_context(TrafficServer(origin.port))
        say.say(f"Apache Traffic Server (backend cache) on {ats.address}, in front of the origin")
        varnish = stack.enter_context(Varnish(ats.port, unix_socket=True))
        assert varnish.socket_path is not None
        say.say(
            f"Varnish (frontend cache) on {varnish.address} and {varnish.socket_path}, "
            "in front of Traffic Server"
        )
        broker.create_topic(TOPIC, partitions=3)
        config = broker.write_kafka_config(work / "purgedkafka.conf", GROUP)
        daemon = Daemon(
            [
                "-topics",
                TOPIC,
                "-kafkaConfig",
                str(config),
                "-backend_addr",
                ats.address,
                "-frontend_addr",
                varnish.socket_path,
                "-frontend_delay",
                str(FRONTEND_DELAY_MS),
            ],
            work,
        )
        stack.callback(daemon.stop)
        shown = [os.path.basename(daemon.command[0]), *daemon.command[1:]]
        say.say("purged: " + " ".join(shown))
        daemon.wait_ready(WAIT)
        say.say("purged is ready: consuming the topic, connected to both caches")

        say.say()
        say.say("1. A reader fetches the page through Varnish, twice:")
        varnish_hit, ats_hit, _ = fetch(varnish, origin, say)
        if varnish_hit or ats_hit:
            raise DemoError("the first fetch of a new page was a cache hit")
        varnish_hit, _, origin_hits = fetch(varnish, origin, say)
        if not varnish_hit or origin_hits != 1:
            raise DemoError("the second fetch was not a Varnish hit")
        time.sleep(0.05)  # Traffic Server can lose a PURGE landing right after its fill

        say.say()
        say.say(f"2. The page is edited: MediaWiki publishes an event to Kafka topic {TOPIC}:")
        event = make_event(f"https://{HOST}{PATH}")
        say.detail(json.dumps(json.loads(event), separators=(", ", ": ")))
        broker.produce(TOPIC, [event])

        say.say()
        say.say("3. purged sends PURGE to the backend, then to the frontend (from its /metrics):")
        answered = wait_for_purges(daemon, WAIT)
        for layer, cache in (("backend", "Traffic Server"), ("frontend", "Varnish")):
            status, seconds = answered[layer]
            say.detail(
                f"{layer:8} PURGE {PATH} (Host: {HOST}) -> {status} from {cache}, "
                f"{seconds:.2f} s after the event was published"
            )
        gap = answered["frontend"][1] - answered["backend"][1]
        say.detail(f"the frontend PURGE came {gap:.2f} s after the backend's (-frontend_delay)")

        say.say()
        say.say("4. The next reader fetches the page again:")
        varnish_hit, ats_hit, origin_hits = fetch(varnish, origin, say)
        if varnish_hit or ats_hit or origin_hits != 2:
            raise DemoError("the page was still cached after the purge")

        say.say()
        code = daemon.stop()
        say.say(f"stopped purged with SIGTERM: exit status {code}")
        if code != 0:
            raise DemoError(f"purged exited with status {code}:\n{log_tail(daemon.log_path)}")
        if "Traceback" in daemon.log():
            raise DemoError(f"purged logged a traceback:\n{log_tail(daemon.log_path)}")
        say.say("stopping Varnish, Traffic Server, the origin and the broker")
    say.say("demo OK: after the purge the page was a MISS in both caches and the origin served it")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when every step did what it should."""
    parser = argparse.ArgumentParser(
        prog="python -m purged.demo",
        description="Run the real pipeline (Kafka, purged, Traffic Server, Varnish) on an "
        "embedded default and show a page purged from both caches.",
    )
    parser.parse_args(argv)
    say = Narrator(sys.stdout)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so that everything is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run(say)
    except KeyboardInterrupt:
        print("demo interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except DemoError as error:
        print(f"demo FAILED: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(f"demo FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
