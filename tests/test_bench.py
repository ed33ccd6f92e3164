"""The benchmark (`python -m purged.bench`, `./dev bench`) runs in a short mode, so it cannot rot.

No speed is asserted here (2 shared cores); only that a run completes, that every purge was
seen on both layers exactly once, and that the results file is sane.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from purged.bench.runner import percentile
from purged.bench.sink import RESPONSE, SinkProcess, url
from purged.url import purge_request
from tests.support import requires_ats, requires_varnish

QUICK_EVENTS = 2000


def run_bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "purged.bench", "--quick", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    return json.loads(out.read_text()), done.stdout


def test_quick_run_against_the_sink_writes_sane_results(tmp_path: Path) -> None:
    report, stdout = run_bench(tmp_path, "--targets", "sink")

    assert "end-to-end URLs/s" in stdout and "sink limit" in stdout
    assert report["settings"]["events"] == QUICK_EVENTS
    sink = report["targets"]["sink"]
    (run,) = sink["runs"]
    assert run["exit_status"] == 0
    assert run["backend_received"] == run["frontend_received"] == QUICK_EVENTS
    assert run["duplicates"] == 0
    assert run["urls_per_s"] > 0 and run["cpu_us_per_url"] > 0
    assert 0 < run["peak_rss_mib"] < 4096
    assert 0 < run["latency_p50_ms"] <= run["latency_p99_ms"] <= run["latency_max_ms"]
    assert sink["median"]["urls_per_s"] == run["urls_per_s"]
    assert sink["limit"]["rate"] > 0
    assert 0 < run["floor_p50_ms"] <= run["floor_p99_ms"] <= run["floor_max_ms"]
    assert sink["median"]["latency_added_p99_ms"] == run["latency_added_p99_ms"]
    assert sink["fraction_of_limit"] > 0


@requires_ats
@requires_varnish
def test_quick_run_against_traffic_server_and_varnish_purges_every_url_once(
    tmp_path: Path,
) -> None:
    report, stdout = run_bench(tmp_path, "--targets", "caches")

    assert "Traffic Server + Varnish" in stdout
    (run,) = report["targets"]["caches"]["runs"]
    assert run["exit_status"] == 0
    # Nothing is cached: Traffic Server answers 404, Varnish 200; each URL exactly once.
    assert run["answers"] == {"backend": {"404": QUICK_EVENTS}, "frontend": {"200": QUICK_EVENTS}}
    assert run["urls_per_s"] > 0
    assert report["targets"]["caches"]["limit"]["rate"] > 0


def test_sink_answers_pipelined_requests_split_anywhere_in_order() -> None:
    requests = [purge_request(url(seq))[1] for seq in range(5)]
    stream = b"".join(requests)
    with SinkProcess() as sink:
        sink.arm(5)
        with socket.create_connection(("127.0.0.1", sink.backend_port), timeout=5) as conn:
            cut = len(requests[0]) + len(requests[1]) + 7  # inside the third request
            conn.sendall(stream[:cut])
            conn.sendall(stream[cut:])
            answer = b""
            while len(answer) < 5 * len(RESPONSE):
                chunk = conn.recv(65536)
                assert chunk, "the sink closed the connection"
                answer += chunk
        stats = sink.stats()

    assert answer == RESPONSE * 5
    assert stats["backend"]["total"] == stats["backend"]["distinct"] == 5
    assert stats["frontend"]["total"] == 0


@pytest.mark.parametrize(
    ("p", "expected"), [(50, 50.0), (99, 99.0), (100, 100.0), (0.1, 1.0), (1, 1.0)]
)
def test_percentile_is_nearest_rank(p: float, expected: float) -> None:
    assert percentile([float(v) for v in range(1, 101)], p) == expected
