"""The benchmark harness: `python -m purged.bench` (`./dev bench`).

One run against the fast sink (`--targets sink`):

1. **Throughput.** N events (default 100,000, distinct URLs, round robin over the topic's
   partitions) are produced to a fresh topic *before* the daemon starts; then
   `.venv/bin/purged` starts (48 backend / 4 frontend connections as in production,
   `-frontend_delay 0`) and drains them into the sink. End-to-end URLs/s is N divided by
   the time from the first PURGE the sink received (either layer) to the moment both layers
   had received every URL. The daemon's CPU per URL is its user+system time (all threads,
   librdkafka's included, from /proc/PID/stat) between those two moments, divided by N; the
   sink reads it itself at both moments. Peak RSS is the daemon's VmHWM afterwards.
   The throughput run uses `-frontend_delay 0`: the delay is a constant 1 s shift of the
   frontend half that would measure the delay rather than the daemon (`--frontend-delay`
   changes it).
2. **Latency.** A new daemon (`-frontend_delay 0`), on a fresh topic as the floor below gets,
   then gets events produced at a steady `--rate` (default 10,000 events/s) for
   `--latency-seconds` (a fetch from Tansu's memory storage costs more the more the topic
   holds, so reusing the throughput topic would measure the broker); each event's produce
   time is noted (it is also its `meta.dt`/`root_event.dt`, with microseconds), and the
   latency of a URL is the time from that to its first arrival at the sink's backend port:
   p50, p99, max. It includes the producer's linger (5 ms) and the broker. The daemon's
   `fetch.wait.max.ms` is 5 ms (`--fetch-wait-ms`): Tansu holds a fetch that found no data
   for that long even when data arrives meanwhile (Kafka answers at once), so the default
   500 ms would dominate.
   The JSON also has the latency per half second and the CPU share of the broker, the sink,
   this harness, the daemon and the whole machine meanwhile (is the daemon starved?).

3. **The latency floor**, in every run right after the daemon's latency run: the same
   steady load, consumed by a plain librdkafka consumer (`purged.bench.floor`) instead of
   purged, on the same broker: what the broker and the client cost already. The table shows
   it and the median of the per-run differences (what purged adds).

Once per invocation:

4. **The limit.** The load generator (`purged.bench.loadgen`, its own process) sends the
   same URLs to the same sink over the daemon's connection layout (48 + 4 connections, 32 in
   flight each) for a few seconds: the PURGEs/s the sink absorbs on this machine. The
   daemon's fraction is 2 x URLs/s (one backend and one frontend PURGE per URL) divided by
   it.

Against real caches (`--targets caches`): Traffic Server (backend) and Varnish (frontend)
from deploy/, no objects cached (every PURGE is a miss). The daemon's answer counters are
polled from /metrics every 50 ms for the timing (so it is ±25 ms), the limit is the load
generator against both caches, and there is no latency figure (the caches cannot timestamp
arrivals for us).

`--repeat K` repeats each run K times on fresh topics and daemons and reports medians;
results also go to `--json` (default bench-results.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError

from purged import __version__
from purged.embedded.broker import Broker
from purged.embedded.processes import free_port
from purged.embedded.trafficserver import TrafficServer
from purged.embedded.varnish import Varnish

from . import loadgen
from .components import (
    Daemon,
    answered_by_layer,
    caches_available,
    make_event,
    memory_kib,
    rfc3339,
    session_cpu,
)
from .sink import SinkProcess, process_cpu, url

# The goals of issue 5 on this 2-core machine.
GOALS = {
    "urls_per_s": 45_000,
    "cpu_us_per_url": 20.0,
    "peak_rss_mib": 100.0,
    "latency_p99_ms": 50.0,
}


def say(message: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not values:
        return float("nan")
    rank = math.ceil(p / 100 * len(values))
    return values[max(0, min(len(values), rank) - 1)]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Bench:
    """Shared state of one invocation: options, work directory, broker, run counter."""

    def __init__(self, args: argparse.Namespace, workdir: Path, broker: Broker) -> None:
        self.args = args
        self.workdir = workdir
        self.broker = broker
        self.counter = 0

    def names(self, kind: str) -> tuple[str, str]:
        """A fresh topic and consumer group for one run."""
        self.counter += 1
        stamp = f"{kind}-{os.getpid()}-{self.counter}"
        return f"bench-{stamp}", f"bench-group-{stamp}"

    def start_daemon(
        self, topic: str, group: str, backend: str, frontend: str, frontend_delay: int
    ) -> Daemon:
        """purged consuming ``topic`` as ``group``, purging to ``backend`` and ``frontend``."""
        return Daemon(
            self.workdir,
            self.broker,
            topic,
            group,
            backend,
            frontend,
            self.daemon_flags(frontend_delay),
            self.kafka_properties(),
        )

    def daemon_flags(self, frontend_delay: int) -> list[str]:
        args = self.args
        return [
            "-backend_workers",
            str(args.backend_workers),
            "-frontend_workers",
            str(args.frontend_workers),
            "-frontend_delay",
            str(frontend_delay),
            *(["-pipeline_depth", str(args.pipeline_depth)] if args.pipeline_depth else []),
            *args.daemon_flag,
        ]

    def kafka_properties(self) -> dict[str, Any]:
        """The daemon's librdkafka properties on top of the broker's test defaults."""
        # A short fetch.wait.max.ms: Tansu answers a fetch that found no data only when that
        # wait expires, even if data arrives meanwhile (Kafka answers at once), which would
        # add up to librdkafka's default 500 ms to every latency.
        properties: dict[str, Any] = {"fetch.wait.max.ms": self.args.fetch_wait_ms}
        for item in self.args.kafka_property:
            key, _, value = item.partition("=")
            properties[key] = int(value) if value.lstrip("-").isdigit() else value
        return properties

    def preload(self, topic: str, count: int) -> None:
        """Create `topic` and fill it with `count` events for the URLs 0..count-1."""
        partitions = self.args.partitions
        self.broker.create_topic(topic, partitions)
        dt = rfc3339(time.time())
        started = time.perf_counter()
        self.broker.produce(topic, (make_event(i, url(i), dt) for i in range(count)), timeout=120)
        say(f"preloaded {count} events in {time.perf_counter() - started:.1f} s")

    def produce_steady(self, topic: str, count: int, rate: float) -> tuple[array[float], float]:
        """Produce events for URLs 0..count-1 at `rate`/s; their produce times, the rate."""
        partitions = self.args.partitions
        producer = self.broker.producer()
        errors: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: object) -> None:
            if error is not None:
                errors.append(error)

        produced = array("d", bytes(8 * count))
        start = time.time()
        sent = 0
        while sent < count:
            due = min(count, int((time.time() - start) * rate) + 1)
            while sent < due:
                now = time.time()
                event = make_event(sent, url(sent), rfc3339(now))
                try:
                    producer.produce(
                        topic, event, partition=sent % partitions, on_delivery=delivered
                    )
                except BufferError:  # the local queue is full: serve deliveries, then retry
                    producer.poll(0.01)
                    continue
                produced[sent] = now
                sent += 1
            producer.poll(0)
            pause = start + sent / rate - time.time()
            if pause > 0:
                time.sleep(pause)
        achieved = count / max(1e-9, time.time() - start)
        left = producer.flush(30)
        if left or errors:
            raise RuntimeError(f"latency run: {left} events undelivered, errors {errors[:3]}")
        return produced, achieved

    def machine_cpu(self, sink: SinkProcess) -> dict[str, float]:
        """CPU seconds so far of the broker, the sink, this harness, and the whole machine."""
        broker = self.broker._proc  # the embedded broker's process session leader
        times = os.times()
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        busy = sum(int(v) for v in fields) - int(fields[3]) - int(fields[4])  # minus idle, iowait
        return {
            "broker": session_cpu(broker.pid) if broker is not None else 0.0,
            "sink": process_cpu(sink.pid) or 0.0,
            "harness": times.user + times.system,
            "machine": busy / os.sysconf("SC_CLK_TCK"),
        }

    def start_profiler(self, pid: int) -> subprocess.Popen[bytes] | None:
        if not self.args.profile:
            return None
        command = self.args.profile.replace("{pid}", str(pid))
        say(f"profiling: {command}")
        return subprocess.Popen(command, shell=True, start_new_session=True)

    @staticmethod
    def stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
        if profiler is None:
            return
        os.killpg(profiler.pid, signal.SIGINT)  # py-spy record writes its output on SIGINT
        try:
            profiler.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(profiler.pid, signal.SIGKILL)
            profiler.wait(5)


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not alive():
            raise RuntimeError(f"the daemon exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


# --- against the fast sink ----------------------------------------------------------------
def run_sink(bench: Bench, sink: SinkProcess, index: int) -> dict[str, Any]:
    """One throughput + latency run against the sink."""
    args = bench.args
    n = args.events
    topic, group = bench.names("sink")
    load_before = loadavg()
    bench.preload(topic, n)
    daemon = bench.start_daemon(
        topic, group, sink.backend_addr, sink.frontend_addr, args.frontend_delay
    )
    result: dict[str, Any] = {"run": index, "loadavg_before": load_before}
    try:
        sink.arm(n, daemon.pid)
        profiler = bench.start_profiler(daemon.pid)
        try:
            wait_until(
                lambda: bool(sink.stats()["done"]),
                timeout=60 + n / 1000,
                what=f"{n} URLs on both layers",
                alive=daemon.process.alive,
            )
        finally:
            bench.stop_profiler(profiler)
        stats = sink.stats()
        memory = memory_kib(daemon.pid)
        start = min(stats["backend"]["first"], stats["frontend"]["first"])
        elapsed = stats["done"] - start
        cpu = stats["daemon_cpu_done"] - stats["daemon_cpu_first"]
        result.update(
            urls=n,
            seconds=round(elapsed, 4),
            urls_per_s=round(n / elapsed, 1),
            cpu_us_per_url=round(cpu / n * 1e6, 2),
            daemon_cpu_s=round(cpu, 3),
            peak_rss_mib=round(memory["VmHWM"] / 1024, 1),
            rss_after_mib=round(memory["VmRSS"] / 1024, 1),
            backend_received=stats["backend"]["total"],
            frontend_received=stats["frontend"]["total"],
            duplicates=stats["backend"]["total"]
            + stats["frontend"]["total"]
            - stats["backend"]["distinct"]
            - stats["frontend"]["distinct"],
            backend_connections=stats["backend"]["connections"],
            threads_cpu_us_per_url=threads_per_url(stats, n),
            frontend_connections=stats["frontend"]["connections"],
        )
        say(
            f"sink run {index}: {result['urls_per_s']:,.0f} URLs/s, "
            f"{result['cpu_us_per_url']} us CPU/URL, peak RSS {result['peak_rss_mib']} MiB"
        )
        # A fresh daemon on a fresh topic, as the floor gets: with Tansu's memory storage a
        # fetch costs more the more a topic holds, and the throughput topic holds N events.
        if daemon.stop() != 0:
            raise RuntimeError(f"purged did not stop cleanly; log in {daemon.process.log}")
        topic, group = bench.names("latency")
        bench.broker.create_topic(topic, args.partitions)
        daemon = bench.start_daemon(topic, group, sink.backend_addr, sink.frontend_addr, 0)
        daemon.wait_ready()
        result.update(latency_run(bench, sink, daemon, topic))
    finally:
        code = daemon.stop()
    result["exit_status"] = code
    if code != 0:
        raise RuntimeError(f"purged exited with status {code}; log in {daemon.process.log}")
    # Side by side: the same load to a plain consumer, in every run, on the same broker.
    result.update(latency_floor(bench))
    result["latency_added_p50_ms"] = round(result["latency_p50_ms"] - result["floor_p50_ms"], 3)
    result["latency_added_p99_ms"] = round(result["latency_p99_ms"] - result["floor_p99_ms"], 3)
    result["loadavg_after"] = loadavg()
    return result


def threads_per_url(stats: dict[str, Any], urls: int) -> dict[str, float]:
    """The daemon's CPU per URL by thread name, between the first arrival and the last."""
    first, done = stats["daemon_threads_first"], stats["daemon_threads_done"]
    out = {name: round((done[name] - first.get(name, 0.0)) / urls * 1e6, 2) for name in done}
    return {name: value for name, value in sorted(out.items()) if value}


def latency_run(bench: Bench, sink: SinkProcess, daemon: Daemon, topic: str) -> dict[str, Any]:
    """Produce at a steady rate to a running daemon; Kafka-to-backend latency percentiles."""
    args = bench.args
    count = max(1, int(args.rate * args.latency_seconds))
    sink.arm(count, daemon.pid)
    cpu_before = bench.machine_cpu(sink)
    produced, achieved = bench.produce_steady(topic, count, args.rate)
    wait_until(
        lambda: bool(sink.stats()["done"]),
        timeout=60 + count / 1000,
        what="the latency run's URLs",
        alive=daemon.process.alive,
    )
    stats = sink.stats()
    elapsed = time.time() - produced[0]
    cpu_after = bench.machine_cpu(sink)
    # Who used the 2 cores meanwhile (percent of one core): is the daemon starved?
    shares = {
        name: round((cpu_after[name] - cpu_before[name]) / elapsed * 100, 1) for name in cpu_after
    }
    shares["daemon"] = round(
        (stats["daemon_cpu_done"] - stats["daemon_cpu_first"]) / elapsed * 100, 1
    )
    backend, _frontend = sink.first_arrivals(str(bench.workdir / "arrivals.bin"))
    cpu = stats["daemon_cpu_done"] - stats["daemon_cpu_first"]
    out = {
        "latency_events": count,
        "latency_offered_rate": round(achieved, 1),
        **latency_summary("latency", produced, backend, args.rate),
        "latency_cpu_us_per_url": round(cpu / count * 1e6, 2),
        "latency_cpu_percent_of_a_core": shares,
    }
    say(
        f"latency at {achieved:,.0f} events/s: p50 {out['latency_p50_ms']} ms, "
        f"p99 {out['latency_p99_ms']} ms; CPU % of a core: {shares}"
    )
    return out


def latency_summary(
    prefix: str, produced: array[float], arrived: array[float], rate: float
) -> dict[str, Any]:
    """p50, p99 and max of arrival - produce time (ms), and the same per half second."""
    in_order = [(arrived[i] - produced[i]) * 1000 for i in range(len(produced))]
    latencies = sorted(in_order)
    # Per half second of producing: shows whether slow arrivals come in bursts (pauses), or
    # grow during the run.
    step = max(1, int(rate / 2))
    windows = []
    for first in range(0, len(in_order), step):
        part = sorted(in_order[first : first + step])
        windows.append(
            [
                round(produced[first] - produced[0], 2),
                round(percentile(part, 50), 2),
                round(percentile(part, 99), 2),
                round(part[-1], 2),
            ]
        )
    return {
        f"{prefix}_p50_ms": round(percentile(latencies, 50), 3),
        f"{prefix}_p99_ms": round(percentile(latencies, 99), 3),
        f"{prefix}_max_ms": round(latencies[-1], 3),
        f"{prefix}_windows_s_p50_p99_max_ms": windows,
    }


def latency_floor(bench: Bench) -> dict[str, Any]:
    """Kafka-to-consumer latency of a plain librdkafka consumer: what purged cannot beat."""
    args = bench.args
    count = max(1, int(args.rate * args.latency_seconds))
    topic, group = bench.names("floor")
    bench.broker.create_topic(topic, args.partitions)
    out = bench.workdir / f"{topic}.bin"
    cmd = [sys.executable, "-m", "purged.bench.floor", bench.broker.bootstrap, topic, group]
    cmd += [str(count), str(out), str(args.fetch_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the floor consumer did not start")
        produced, achieved = bench.produce_steady(topic, count, args.rate)
        proc.wait(60 + count / 1000)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
    arrivals = array("d")
    arrivals.frombytes(out.read_bytes())
    out.unlink()
    result = {
        "floor_offered_rate": round(achieved, 1),
        **latency_summary("floor", produced, arrivals, args.rate),
    }
    say(
        f"latency floor (plain consumer): p50 {result['floor_p50_ms']} ms, "
        f"p99 {result['floor_p99_ms']} ms"
    )
    return result


def sink_limit(bench: Bench, sink: SinkProcess) -> dict[str, Any]:
    """PURGEs/s the sink absorbs from the load generator (the daemon's connection layout)."""
    args = bench.args
    sink.arm(args.events, 0)
    result = loadgen.measure(
        [sink.backend_addr, sink.frontend_addr],
        [args.backend_workers, args.frontend_workers],
        depth=args.pipeline_depth or 32,
        seconds=args.limit_seconds,
        urls=args.events,
    )
    result["sink_cpu_s"] = sink.stats()["sink_cpu"]
    say(f"sink limit: {result['rate']:,.0f} PURGEs/s")
    return result


# --- against real caches ------------------------------------------------------------------
def run_caches(bench: Bench, ats: TrafficServer, varnish: Varnish, index: int) -> dict[str, Any]:
    """One throughput run against Traffic Server (backend) and Varnish (frontend)."""
    args = bench.args
    n = args.events
    topic, group = bench.names("caches")
    load_before = loadavg()
    bench.preload(topic, n)
    # The launch is the first sample: nothing can have been purged before it. A short run
    # (--quick) may be over before the first scrape answers; its rate then counts from here.
    samples = [(time.time(), 0.0, caches_cpu_s(ats, varnish), 0, 0)]
    daemon = bench.start_daemon(topic, group, ats.address, varnish.address, args.frontend_delay)
    try:
        profiler = bench.start_profiler(daemon.pid)
        try:
            deadline = time.monotonic() + 120 + n / 500
            while True:
                if not daemon.process.alive():
                    raise RuntimeError(f"purged exited; log in {daemon.process.log}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the caches run did not finish")
                try:
                    text = daemon.metrics()
                except OSError:
                    time.sleep(0.05)
                    continue
                now = time.time()
                cpu = process_cpu(daemon.pid) or 0.0
                caches_cpu = caches_cpu_s(ats, varnish)
                layers = answered_by_layer(text)
                backend = sum(layers["backend"].values())
                frontend = sum(layers["frontend"].values())
                samples.append((now, cpu, caches_cpu, backend, frontend))
                if backend >= n and frontend >= n:
                    break
                time.sleep(0.05)
        finally:
            bench.stop_profiler(profiler)
        memory = memory_kib(daemon.pid)
    finally:
        code = daemon.stop()
    if code != 0:
        raise RuntimeError(f"purged exited with status {code}; log in {daemon.process.log}")
    # Timing from the samples around the first answer and the last: midpoints (±25 ms).
    first = next(i for i, s in enumerate(samples) if s[3] + s[4] > 0)
    before = samples[first - 1]
    end, last_incomplete = samples[-1], samples[-2]
    start_time = (before[0] + samples[first][0]) / 2
    end_time = (last_incomplete[0] + end[0]) / 2
    elapsed = end_time - start_time
    result = {
        "run": index,
        "loadavg_before": load_before,
        "urls": n,
        "seconds": round(elapsed, 3),
        "timed_from_launch": first == 1,
        "urls_per_s": round(n / elapsed, 1),
        "cpu_us_per_url": round((end[1] - before[1]) / n * 1e6, 2),
        "caches_cpu_us_per_url": round((end[2] - before[2]) / n * 1e6, 2),
        "peak_rss_mib": round(memory["VmHWM"] / 1024, 1),
        "answers": answered_by_layer(text),
        "exit_status": code,
        "loadavg_after": loadavg(),
    }
    say(
        f"caches run {index}: {result['urls_per_s']:,.0f} URLs/s, "
        f"{result['cpu_us_per_url']} us CPU/URL, peak RSS {result['peak_rss_mib']} MiB"
    )
    return result


def caches_cpu_s(ats: TrafficServer, varnish: Varnish) -> float:
    """CPU seconds used so far by Traffic Server and Varnish (each a process session)."""
    # Their session leaders are the embedded package's watchdog processes.
    leaders = [cache._proc.pid for cache in (ats, varnish) if cache._proc is not None]
    return sum(session_cpu(leader) for leader in leaders)


def caches_limit(bench: Bench, ats: TrafficServer, varnish: Varnish) -> dict[str, Any]:
    """PURGEs/s Traffic Server and Varnish absorb together from the load generator."""
    args = bench.args
    result = loadgen.measure(
        [ats.address, varnish.address],
        [args.backend_workers, args.frontend_workers],
        depth=args.pipeline_depth or 32,
        seconds=args.limit_seconds,
        urls=args.events,
        http=True,
    )
    say(
        f"caches limit: {result['rate']:,.0f} PURGEs/s "
        f"(ATS {result['rates'][0]:,.0f}, Varnish {result['rates'][1]:,.0f})"
    )
    return result


# --- results -------------------------------------------------------------------------------
def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric field over the runs."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "run":
            out[key] = round(statistics.median(run[key] for run in runs), 3)
    return out


def _goal(value: float, goal: float, unit: str, higher_is_better: bool, quick: bool) -> str:
    """The goal column: the goal and whether it is met (not judged for a quick run)."""
    text = f"{'>=' if higher_is_better else '<='} {goal:,g}{unit}"
    if quick:
        return f"({text}: not judged on a quick run)"
    ok = value >= goal if higher_is_better else value <= goal
    return f"{text}  {'ok' if ok else 'MISSED'}"


def table(title: str, rows: list[tuple[str, str, str]]) -> str:
    """A plain-text table: measure, value, goal."""
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [title, "-" * len(title)]
    for name, value, goal in rows:
        lines.append(f"  {name:<{width}}  {value:>{vwidth}}  {goal}".rstrip())
    return "\n".join(lines)


def fraction_of_limit(results: dict[str, Any]) -> float:
    """The daemon's PURGEs/s (two per URL) as a fraction of the target's limit."""
    urls_per_s: float = results["median"]["urls_per_s"]
    limit: float = results["limit"]["rate"]
    return round(2 * urls_per_s / limit, 4)


def sink_table(results: dict[str, Any], settings: dict[str, Any]) -> str:
    m, limit = results["median"], results["limit"]
    fraction = results["fraction_of_limit"]
    title = (
        f"fast sink: {settings['events']:,} events, {settings['partitions']} partitions, "
        f"{settings['backend_workers']}/{settings['frontend_workers']} connections, "
        f"-frontend_delay {settings['frontend_delay']} (median of {len(results['runs'])})"
    )
    goal, quick = GOALS, bool(settings["quick"])
    rows = [
        (
            "end-to-end URLs/s (first purge to last, both layers)",
            f"{m['urls_per_s']:,.0f}",
            _goal(m["urls_per_s"], goal["urls_per_s"], "", True, quick),
        ),
        (
            "daemon CPU per URL (all threads)",
            f"{m['cpu_us_per_url']:.1f} us",
            _goal(m["cpu_us_per_url"], goal["cpu_us_per_url"], " us", False, quick),
        ),
        (
            "daemon peak RSS (VmHWM)",
            f"{m['peak_rss_mib']:.1f} MiB",
            _goal(m["peak_rss_mib"], goal["peak_rss_mib"], " MiB", False, quick),
        ),
        (
            f"Kafka-to-backend latency p50 at {m['latency_offered_rate']:,.0f} events/s",
            f"{m['latency_p50_ms']:.1f} ms",
            "",
        ),
        (
            f"Kafka-to-backend latency p99 at {m['latency_offered_rate']:,.0f} events/s",
            f"{m['latency_p99_ms']:.1f} ms",
            _goal(m["latency_p99_ms"], goal["latency_p99_ms"], " ms", False, quick),
        ),
        ("daemon CPU per URL at that load", f"{m['latency_cpu_us_per_url']:.1f} us", ""),
        (
            "latency floor p50 / p99 (plain librdkafka consumer, no purged)",
            f"{m['floor_p50_ms']:.1f} / {m['floor_p99_ms']:.1f} ms",
            "",
        ),
        (
            "what purged adds to it, p50 / p99 (median of the runs' differences)",
            f"{m['latency_added_p50_ms']:.1f} / {m['latency_added_p99_ms']:.1f} ms",
            "",
        ),
        (
            f"sink limit (load generator, {limit['connections']} conns x {limit['depth']} deep)",
            f"{limit['rate']:,.0f} PURGE/s",
            "",
        ),
        ("daemon throughput / limit (2 PURGEs per URL)", f"{fraction:.1%}", ""),
    ]
    return table(title, rows)


def caches_table(results: dict[str, Any], settings: dict[str, Any]) -> str:
    m, limit = results["median"], results["limit"]
    fraction = results["fraction_of_limit"]
    title = (
        f"Traffic Server + Varnish: {settings['events']:,} events (every PURGE a miss), "
        f"-frontend_delay {settings['frontend_delay']} (median of {len(results['runs'])})"
    )
    rows = [
        ("end-to-end URLs/s (first purge to last, both layers)", f"{m['urls_per_s']:,.0f}", ""),
        ("daemon CPU per URL (all threads)", f"{m['cpu_us_per_url']:.1f} us", ""),
        ("caches' CPU per URL (ATS + Varnish)", f"{m['caches_cpu_us_per_url']:.1f} us", ""),
        ("daemon peak RSS (VmHWM)", f"{m['peak_rss_mib']:.1f} MiB", ""),
        ("Kafka-to-backend latency", "n/a", "(the caches cannot timestamp arrivals)"),
        (
            f"caches' limit (load generator, {limit['connections']} conns x {limit['depth']})",
            f"{limit['rate']:,.0f} PURGE/s",
            f"(ATS {limit['rates'][0]:,.0f}, Varnish {limit['rates'][1]:,.0f})",
        ),
        ("daemon throughput / limit (2 PURGEs per URL)", f"{fraction:.1%}", ""),
    ]
    return table(title, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m purged.bench",
        description="Benchmark purged end to end: embedded broker, fast sink, real caches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-n", "--events", type=int, default=100_000, help="events per run")
    parser.add_argument(
        "--quick", action="store_true", help="a small, fast run (CI): 2,000 events, short load"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per target (medians)")
    parser.add_argument("--targets", choices=["sink", "caches", "both"], default="both")
    parser.add_argument("--json", default="bench-results.json", help="results file")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--rate", type=float, default=10_000, help="latency run events/s")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--limit-seconds", type=float, default=3.0)
    parser.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=5,
        help="the daemon's fetch.wait.max.ms (Tansu holds an empty fetch this long)",
    )
    parser.add_argument("--frontend-delay", type=int, default=0, help="ms, throughput run")
    parser.add_argument("--backend-workers", type=int, default=48)
    parser.add_argument("--frontend-workers", type=int, default=4)
    parser.add_argument("--pipeline-depth", type=int, default=0, help="0: the daemon's default")
    parser.add_argument(
        "--daemon-flag",
        action="append",
        default=[],
        help="extra daemon flag, e.g. --daemon-flag=-max_pending=50000 (repeatable)",
    )
    parser.add_argument(
        "--kafka-property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka property for the daemon, e.g. queued.max.messages.kbytes=4096",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="command started with the throughput run's daemon ({pid} = its pid) and stopped "
        "with SIGINT at the end, e.g. 'py-spy record -o profile.svg --pid {pid}'",
    )
    parser.add_argument("--workdir", default="", help="keep logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.events = min(args.events, 2_000)
        args.rate = min(args.rate, 2_000)
        args.latency_seconds = min(args.latency_seconds, 1.0)
        args.limit_seconds = min(args.limit_seconds, 1.0)
        if "--repeat" not in (argv if argv is not None else sys.argv[1:]):
            args.repeat = 1
    return args


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables; write the JSON file. Exit 1 on failure."""
    args = parse_args(argv)
    targets = ["sink", "caches"] if args.targets == "both" else [args.targets]
    if "caches" in targets and not caches_available():
        if args.targets == "caches":
            say("traffic_server and varnishd are needed for --targets caches (./dev setup)")
            return 1
        say("traffic_server or varnishd missing: skipping the caches table")
        targets.remove("caches")
    settings = {
        "events": args.events,
        "partitions": args.partitions,
        "repeat": args.repeat,
        "backend_workers": args.backend_workers,
        "frontend_workers": args.frontend_workers,
        "frontend_delay": args.frontend_delay,
        "pipeline_depth": args.pipeline_depth or "default",
        "latency_rate": args.rate,
        "latency_seconds": args.latency_seconds,
        "daemon_flags": args.daemon_flag,
        "fetch_wait_ms": args.fetch_wait_ms,
        "kafka_properties": args.kafka_property,
        "quick": args.quick,
    }
    report: dict[str, Any] = {
        "benchmark": "purged",
        "purged_version": __version__,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        "machine": machine(),
        "settings": settings,
        "goals": GOALS,
        "targets": {},
    }
    tables: list[str] = []
    with ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="purged-bench-")))
        broker = stack.enter_context(Broker())
        bench = Bench(args, workdir, broker)
        if "sink" in targets:
            sink = stack.enter_context(SinkProcess())
            runs = [run_sink(bench, sink, i + 1) for i in range(args.repeat)]
            results: dict[str, Any] = {
                "runs": runs,
                "median": medians(runs),
                "limit": sink_limit(bench, sink),
            }
            results["fraction_of_limit"] = fraction_of_limit(results)
            report["targets"]["sink"] = results
            tables.append(sink_table(results, settings))
        if "caches" in targets:
            # No origin is needed: a PURGE never reaches it.
            ats = stack.enter_context(TrafficServer(free_port()))
            varnish = stack.enter_context(Varnish(ats.port))
            runs = [run_caches(bench, ats, varnish, i + 1) for i in range(args.repeat)]
            results = {
                "runs": runs,
                "median": medians(runs),
                "limit": caches_limit(bench, ats, varnish),
            }
            results["fraction_of_limit"] = fraction_of_limit(results)
            report["targets"]["caches"] = results
            tables.append(caches_table(results, settings))
    report["machine"]["loadavg_end"] = loadavg()
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    header = (
        f"purged {__version__} benchmark, {os.cpu_count()} CPUs, load average "
        f"{report['machine']['loadavg_start']} at start, {report['machine']['loadavg_end']} "
        "at end"
    )
    print(header)
    for text in tables:
        print()
        print(text)
    print(f"\nresults written to {args.json}")
    return 0
