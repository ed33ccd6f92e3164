"""`purged status`: a running daemon's numbers, once for scripts or refreshing live."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from purged.htcp import encode_clr
from purged.tools.status import Sample, metrics_url, rows
from tests.support.broker import Broker, make_event
from tests.support.mcast import send_htcp
from tests.support.ports import free_port
from tests.support.purged_proc import PURGED, daemon_args
from tests.support.recorder import Recorder
from tests.support.tool_run import run_purged, running_daemon

GROUP = "239.128.0.121"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def parse(stdout: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(METRIC, LABELS) → (VALUE, PER-SECOND) of the printed table."""
    table = {}
    for line in stdout.splitlines()[2:]:
        metric, labels, value, rate = line.split()
        table[(metric, labels)] = (value, rate)
    return table


def test_status_once_shows_the_numbers_of_known_traffic(
    broker: Broker, recorder: Callable[..., Recorder], tmp_path: Path, unique: Callable[[str], str]
) -> None:
    topic = unique("status")
    broker.create_topic(topic)
    config = broker.write_kafka_config(
        tmp_path / "kafka.json", unique("group"), statistics_interval_ms=500
    )
    backend, frontend = recorder(), recorder()
    backend.status = 404  # what Traffic Server answers for an object it does not have
    port = free_udp_port()
    args = daemon_args(
        topics=[topic],
        kafka_config=config,
        backend=backend.address,
        frontend=frontend.address,
        extra=["-mcast_addrs", GROUP, "-mcast_port", str(port), "-mcast_iface", "127.0.0.1"],
    )
    minute_ago = datetime.now(UTC) - timedelta(seconds=60)
    with running_daemon(args, tmp_path / "purged.log") as daemon:
        events = [
            make_event(f"https://en.wikipedia.org/wiki/S{i}", dt=minute_ago) for i in range(7)
        ]
        broker.produce(topic, events)
        packets = [encode_clr(f"https://en.wikipedia.org/wiki/H{i}") for i in range(3)]
        send_htcp([*packets, b"not an HTCP packet at all"], GROUP, port)
        daemon.wait_metric("purged_http_requests_total", lambda v: v == 10, 20, layer="frontend")
        deadline = time.monotonic() + 20
        while not any(n.startswith("rdkafka_consumer_topics") for n, _ in daemon.scrape()):
            assert time.monotonic() < deadline, "no librdkafka statistics in /metrics"
            time.sleep(0.2)
        result = run_purged(
            "status", "--url", f"127.0.0.1:{daemon.metrics_port}", "--once", "--interval", "0.3"
        )
    assert result.code == 0, result
    table = parse(result.stdout)
    assert table[("events", f"topic={topic},status=ok")] == ("7", "0.0")
    assert table[("htcp", "state=good")] == ("3", "0.0")
    assert table[("purges", "layer=backend,status=404")] == ("10", "0.0")
    assert table[("purges", "layer=frontend,status=200")] == ("10", "0.0")
    assert table[("backlog", "layer=backend")] == ("0", "-")
    assert table[("backlog", "layer=frontend")] == ("0", "-")
    assert table[("pending", "-")] == ("0", "-")
    assert table[("kafka_paused", "-")] == ("0", "-")
    assert table[("consumer_lag", f"topic={topic}")] == ("0", "-")
    assert table[("errors", "kind=htcp_bad")] == ("1", "0.0")
    assert table[("errors", "kind=tcp,type=connect")] == ("0", "0.0")
    lag_ms = int(table[("event_lag_ms", f"topic={topic}")][0])
    assert 59_000 <= lag_ms <= 120_000
    assert "rates over 0.3 s" in result.stdout.splitlines()[0]


def test_status_live_redraws_until_ctrl_c_and_exits_0(
    recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    backend, frontend = recorder(), recorder()
    args = [
        "-mcast_addrs", GROUP, "-mcast_port", str(free_udp_port()), "-mcast_iface", "127.0.0.1",
        "-backend_addr", backend.address, "-frontend_addr", frontend.address,
    ]  # fmt: skip
    with running_daemon(args, tmp_path / "purged.log") as daemon:
        url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
        live = subprocess.Popen(
            [PURGED, "status", "--url", url, "--interval", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            frames = 0
            deadline = time.monotonic() + 20
            assert live.stdout is not None
            while frames < 3 and time.monotonic() < deadline:
                line = live.stdout.readline()
                frames += line.startswith("purged status of")
            os.killpg(live.pid, signal.SIGINT)
            code = live.wait(timeout=10)
        finally:
            if live.poll() is None:
                os.killpg(live.pid, signal.SIGKILL)
                live.wait()
    assert frames == 3
    assert code == 0, live.stderr.read() if live.stderr else ""


def test_status_once_against_nothing_fails_with_the_reason() -> None:
    result = run_purged("status", "--url", f"127.0.0.1:{free_port()}", "--once")
    assert result.code == 1, result
    assert "cannot read http://127.0.0.1:" in result.stderr
    assert "Connection refused" in result.stderr


def test_status_bad_interval_is_a_usage_error() -> None:
    assert run_purged("status", "--interval", "0").code == 2


# --- pure parts ----------------------------------------------------------------------


def sample(at: float, values: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> Sample:
    return Sample(at, 1_700_000_000 + at, {(n, frozenset(ls)): v for (n, ls), v in values.items()})


def test_rows_give_rates_per_second_between_two_samples() -> None:
    purges = "purged_http_requests_total"
    backend_200 = (("layer", "backend"), ("status", "200"))
    earlier = sample(10.0, {(purges, backend_200): 100})
    later = sample(12.0, {(purges, backend_200): 300})
    [row] = [r for r in rows(earlier, later) if r.metric == "purges"]
    assert (row.labels, row.value, row.rate) == ("layer=backend,status=200", 300, 100.0)


def test_rows_count_from_zero_after_a_daemon_restart() -> None:
    purges = "purged_http_requests_total"
    labels = (("layer", "frontend"), ("status", "200"))
    earlier = sample(0.0, {(purges, labels): 1000})
    later = sample(1.0, {(purges, labels): 40})
    [row] = [r for r in rows(earlier, later) if r.metric == "purges"]
    assert row.rate == 40.0


def test_rows_sum_events_over_tags_and_show_lag_in_ms() -> None:
    events = "purged_events_received_total"
    values = {
        (events, (("tag", "mediawiki"), ("status", "ok"), ("topic", "t"))): 5,
        (events, (("tag", "purged-send"), ("status", "ok"), ("topic", "t"))): 2,
        ("purged_event_lag", (("topic", "t"),)): 2_500_000_000,
    }
    table = {(r.metric, r.labels): r.value for r in rows(None, sample(0.0, values))}
    assert table[("events", "topic=t,status=ok")] == 7
    assert table[("event_lag_ms", "topic=t")] == 2500


def test_metrics_url_accepts_the_daemons_address() -> None:
    assert metrics_url("127.0.0.1:2112") == "http://127.0.0.1:2112/metrics"
    assert metrics_url("http://[::1]:2112/metrics") == "http://[::1]:2112/metrics"
