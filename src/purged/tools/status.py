"""`purged status`: a running daemon's numbers, live like varnishstat, or once for scripts.

It reads the daemon's /metrics (the same numbers Prometheus gets) and shows totals and
per-second rates. One table serves both modes, one row per series, whitespace-separated
columns: METRIC, LABELS (`k=v,k=v`, or `-`), VALUE (a counter's total or a gauge's value)
and PER-SECOND (counters only, over the last two samples).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families

from purged.tools import ToolError, UsageError, parser, positive_float

DEFAULT_URL = "http://127.0.0.1:2112/metrics"
CLEAR_SCREEN = "\x1b[H\x1b[2J"

Key = tuple[str, frozenset[tuple[str, str]]]

EPILOG = """\
rows (METRIC LABELS VALUE PER-SECOND):
  events        topic,status    Kafka events received (ok, expired, discarded)
  htcp          state           HTCP packets received (good, bad)
  purges        layer,status    PURGEs answered by the caches, by HTTP status
  backlog       layer           purges queued or in flight per cache layer
  pending       -               purges not finished on both layers
  event_lag_ms  topic           ms since the newest event's time (the lag alert's number)
  consumer_lag  topic           messages not consumed yet (needs statistics.interval.ms)
  kafka_paused  -               1 while consumption is paused by backpressure
  coalesced     layer           duplicate purges merged
  resent        layer           PURGEs sent again after a failure
  errors        kind,...        connection errors, Kafka errors, failed purges, skipped
                                URLs, bad and dropped HTCP packets, failed commits

exit status: 0 (also on Ctrl-C); 1 the metrics cannot be read (with --once); 2 bad usage."""


@dataclass(frozen=True)
class Sample:
    """One scrape of /metrics: every sample by (name, labels), and when it was taken."""

    monotonic: float
    wall: float
    values: dict[Key, float]

    def series(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        """(labels, value) of every sample called `name`."""
        for (sample_name, labels), value in self.values.items():
            if sample_name == name:
                yield dict(labels), value


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    metric: str
    labels: str
    value: float
    rate: float | None  # None for gauges, or when there is no earlier sample


def build_parser() -> argparse.ArgumentParser:
    """The flags of `purged status`."""
    p = parser("status", "Show a running purged's numbers, refreshing like varnishstat.", EPILOG)
    p.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="the daemon's metrics: a URL, or HOST:PORT of its -prometheus_addr "
        f"(default {DEFAULT_URL})",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one plain snapshot and exit (two samples --interval apart, for the rates)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between samples (default 1; with --once, 0 = totals only, no rates)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=5.0,
        metavar="S",
        help="seconds to wait for the metrics endpoint (default 5)",
    )
    return p


def main(args: list[str]) -> int:
    """Run `purged status`."""
    options = build_parser().parse_args(args)
    url = metrics_url(options.url)
    interval: float = options.interval
    if interval < 0 or (not options.once and interval == 0):
        raise UsageError("--interval must be greater than 0 (or 0 with --once)")
    try:
        if options.once:
            return once(url, interval, options.timeout)
        return live(url, interval, options.timeout)
    except KeyboardInterrupt:
        return 0


def metrics_url(text: str) -> str:
    """`127.0.0.1:2112` → `http://127.0.0.1:2112/metrics`; a full URL is kept."""
    url = text if "://" in text else "http://" + text
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise UsageError(f"--url: {text!r} is not an http URL")
    if "/" not in rest:
        url += "/metrics"
    return url


def scrape(url: str, timeout: float) -> Sample:
    """Read and parse the metrics; ToolError saying why when that fails."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        raise ToolError(f"cannot read {url}: HTTP {error.code}") from None
    except urllib.error.URLError as error:
        raise ToolError(f"cannot read {url}: {error.reason}") from None
    except (OSError, ValueError) as error:
        raise ToolError(f"cannot read {url}: {error}") from None
    values: dict[Key, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    except ValueError as error:
        raise ToolError(f"{url} is not Prometheus metrics: {error}") from None
    if not any(name.startswith("purged_") for name, _ in values):
        raise ToolError(f"{url} has no purged_* metrics: is it a purged?")
    return Sample(time.monotonic(), time.time(), values)


def once(url: str, interval: float, timeout: float) -> int:
    """Print one snapshot (rates over `interval` unless it is 0)."""
    first = scrape(url, timeout)
    earlier, last = None, first
    if interval > 0:
        time.sleep(interval)
        earlier, last = first, scrape(url, timeout)
    print(render(url, rows(earlier, last), last, earlier))
    return 0


def live(url: str, interval: float, timeout: float) -> int:
    """Redraw every `interval` seconds until Ctrl-C."""
    clear = CLEAR_SCREEN if sys.stdout.isatty() else "\n"
    earlier: Sample | None = None
    while True:
        started = time.monotonic()
        try:
            last = scrape(url, timeout)
        except ToolError as error:
            frame = f"purged status: {error} (retrying every {interval:g} s; Ctrl-C quits)"
            earlier = None
        else:
            frame = render(url, rows(earlier, last), last, earlier)
            frame += "\n(Ctrl-C quits)"
            earlier = last
        sys.stdout.write(clear + frame + "\n")
        sys.stdout.flush()
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def rows(earlier: Sample | None, last: Sample) -> list[Row]:
    """The table's rows from the last sample (rates against the earlier one, if any)."""
    out: list[Row] = []

    def counter(metric: str, name: str, by: tuple[str, ...], **match: str) -> None:
        for labels, value in _grouped(last, name, by, match):
            before = _grouped_value(earlier, name, by, match, labels)
            rate = None
            if earlier is not None and before is not None:
                seconds = max(1e-9, last.monotonic - earlier.monotonic)
                # A smaller total means the daemon restarted: count from zero.
                rate = (value - before if value >= before else value) / seconds
            out.append(Row(metric, _label_text(labels), value, rate))

    def gauge(metric: str, name: str, by: tuple[str, ...], scale: float = 1.0) -> None:
        for labels, value in _grouped(last, name, by, {}):
            out.append(Row(metric, _label_text(labels), value * scale, None))

    counter("events", "purged_events_received_total", ("topic", "status"))
    counter("htcp", "purged_htcp_packets_total", ("state",))
    counter("purges", "purged_http_requests_total", ("layer", "status"))
    gauge("backlog", "purged_backlog", ("layer",))
    gauge("pending", "purged_pending", ())
    gauge("event_lag_ms", "purged_event_lag", ("topic",), scale=1e-6)
    consumer_lag: dict[str, float] = {}
    for labels, value in last.series("rdkafka_consumer_topics_partitions_consumer_lag"):
        topic = labels.get("topic", "")
        consumer_lag[topic] = consumer_lag.get(topic, 0.0) + max(0.0, value)  # -1 = unknown
    for topic, value in sorted(consumer_lag.items()):
        out.append(Row("consumer_lag", f"topic={topic}", value, None))
    gauge("kafka_paused", "purged_kafka_paused", ())
    counter("coalesced", "purged_coalesced_total", ("layer",))
    counter("resent", "purged_purges_resent_total", ("layer",))
    for kind, name, by, match in _ERRORS:
        start = len(out)
        counter("errors", name, by, **match)
        for index in range(start, len(out)):
            row = out[index]
            text = f"kind={kind}" + ("" if row.labels == "-" else "," + row.labels)
            out[index] = Row(row.metric, text, row.value, row.rate)
    return out


# (kind, metric, labels kept, labels that must match) of the error rows.
_ERRORS: tuple[tuple[str, str, tuple[str, ...], dict[str, str]], ...] = (
    ("tcp", "purged_tcp_errors_total", ("type",), {}),
    ("kafka", "purged_kafka_errors_total", ("code",), {}),
    ("commit", "purged_kafka_commits_total", (), {"result": "error"}),
    ("skipped", "purged_urls_skipped_total", ("reason",), {}),
    ("htcp_bad", "purged_htcp_packets_total", (), {"state": "bad"}),
    ("htcp_dropped", "purged_htcp_packets_dropped_total", (), {}),
)


def _grouped(
    sample: Sample, name: str, by: tuple[str, ...], match: dict[str, str]
) -> list[tuple[tuple[tuple[str, str], ...], float]]:
    """Sum of the series of `name` matching `match`, per value of the labels `by`, sorted."""
    sums: dict[tuple[tuple[str, str], ...], float] = {}
    for labels, value in sample.series(name):
        if all(labels.get(k) == v for k, v in match.items()):
            key = tuple((k, labels.get(k, "")) for k in by)
            sums[key] = sums.get(key, 0.0) + value
    return sorted(sums.items())


def _grouped_value(
    sample: Sample | None,
    name: str,
    by: tuple[str, ...],
    match: dict[str, str],
    labels: tuple[tuple[str, str], ...],
) -> float | None:
    if sample is None:
        return None
    return dict(_grouped(sample, name, by, match)).get(labels)


def _label_text(labels: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels) or "-"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else f"{value:.1f}"


def render(url: str, table: list[Row], last: Sample, earlier: Sample | None) -> str:
    """The header line and the aligned table."""
    moment = datetime.fromtimestamp(last.wall, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if earlier is not None:
        over = f"rates over {last.monotonic - earlier.monotonic:.1f} s"
    else:
        over = "no rates yet (one sample)"
    cells = [("METRIC", "LABELS", "VALUE", "PER-SECOND")]
    for row in table:
        rate = "-" if row.rate is None else f"{row.rate:.1f}"
        value = str(round(row.value)) if row.metric == "event_lag_ms" else _number(row.value)
        cells.append((row.metric, row.labels, value, rate))
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [f"purged status of {url} at {moment}, {over}"]
    for c in cells:
        lines.append(
            f"{c[0].ljust(widths[0])}  {c[1].ljust(widths[1])}  "
            f"{c[2].rjust(widths[2])}  {c[3].rjust(widths[3])}"
        )
    return "\n".join(lines)


__all__ = ["Row", "Sample", "main", "metrics_url", "render", "rows", "scrape"]
