"""Every metric purged exports, declared once, with its help text.

The names and labels of the original daemon are a contract (dashboards and alerts use them);
the ones marked "new" are ours. All updates happen on the event loop thread; the metrics
HTTP server thread only reads, through prometheus_client's own locks, or through collectors
that read immutable snapshots the loop publishes (see `Snapshots`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LAYERS = ("backend", "frontend")
# Pre-created so that alerts can be written before the first error (the original's flaw).
TCP_ERROR_TYPES = ("connect", "reset", "closed", "timeout", "protocol", "write")
SKIP_REASONS = ("invalid_url", "host_regex")

disable_created_metrics()  # type: ignore[no-untyped-call]  # the original exported no *_created series
REGISTRY = CollectorRegistry(auto_describe=True)

http_requests = Counter(
    "purged_http_requests",
    "PURGE requests answered by a cache, by HTTP status and layer",
    ["status", "layer"],
    registry=REGISTRY,
)
tcp_errors = Counter(
    "purged_tcp_errors",
    "Connection errors towards the caches, by type",
    ["type"],
    registry=REGISTRY,
)
backlog = Gauge(
    "purged_backlog",
    "Purges queued for or in flight to each layer (not those held for the frontend delay)",
    ["layer"],
    registry=REGISTRY,
)
events_received = Counter(
    "purged_events_received",
    "Kafka events received, by first tag, status (ok/expired/discarded) and topic",
    ["tag", "status", "topic"],
    registry=REGISTRY,
)
htcp_packets = Counter(
    "purged_htcp_packets",
    "HTCP datagrams received, by state (good/bad)",
    ["state"],
    registry=REGISTRY,
)
udp_bytes_read = Counter(
    "purged_udp_bytes_read",
    "Bytes read from the multicast socket",
    registry=REGISTRY,
)
# new: HTCP purges dropped because the pipeline was full (UDP cannot be paused).
htcp_dropped = Counter(
    "purged_htcp_packets_dropped",
    "Good HTCP packets dropped because the pipeline was full",
    registry=REGISTRY,
)
# new: datagrams the kernel dropped because the socket's receive buffer was full.
udp_kernel_drops = Counter(
    "purged_udp_kernel_drops",
    "Multicast datagrams dropped by the kernel (receive buffer full), read from the socket",
    registry=REGISTRY,
)
# new: coalesced duplicates (issue 5).
coalesced = Counter(
    "purged_coalesced",
    "Purges merged into an identical purge already waiting in the layer",
    ["layer"],
    registry=REGISTRY,
)
# new: URLs not purged on purpose.
urls_skipped = Counter(
    "purged_urls_skipped",
    "URLs not purged: invalid_url (unsafe or unparsable) or host_regex (host filtered out)",
    ["reason"],
    registry=REGISTRY,
)
# new: requests sent again after a connection failure or a 5xx.
purges_resent = Counter(
    "purged_purges_resent",
    "PURGE requests sent again after a connection failure, timeout or 5xx, per layer",
    ["layer"],
    registry=REGISTRY,
)
# new: errors reported by librdkafka (non-fatal ones are retried by librdkafka itself).
kafka_errors = Counter(
    "purged_kafka_errors",
    "Errors reported by the Kafka client, by librdkafka error name",
    ["code"],
    registry=REGISTRY,
)
# new: offsets committed.
kafka_commits = Counter(
    "purged_kafka_commits",
    "Offset commits sent to the broker, by result (ok/error)",
    ["result"],
    registry=REGISTRY,
)
# new: whether Kafka consumption is paused because the pipeline is full.
kafka_paused = Gauge(
    "purged_kafka_paused",
    "1 while Kafka consumption is paused by backpressure (pending purges at -max_pending)",
    registry=REGISTRY,
)
pending = Gauge(
    "purged_pending",
    "Purges accepted and not yet finished on both layers (bounded by -max_pending)",
    registry=REGISTRY,
)


def initialise() -> None:
    """Create every labelled series we know in advance, so that each exists from the start."""
    for layer in LAYERS:
        backlog.labels(layer)
        coalesced.labels(layer)
        purges_resent.labels(layer)
    for kind in TCP_ERROR_TYPES:
        tcp_errors.labels(kind)
    for state in ("good", "bad"):
        htcp_packets.labels(state)
    for reason in SKIP_REASONS:
        urls_skipped.labels(reason)
    for result in ("ok", "error"):
        kafka_commits.labels(result)


class Snapshots(Collector):
    """Metrics computed at scrape time from immutable snapshots published by the event loop.

    The loop replaces `newest_event` and `rdkafka` wholesale (never mutates them in place),
    so the scraping thread can read them without a lock: the seed crash cannot happen here.
    """

    def __init__(self) -> None:
        self.topics: tuple[str, ...] = ()
        self.newest_event: Mapping[str, float] = MappingProxyType({})
        self.rdkafka: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...], float], ...] = ()

    def publish_newest(self, newest: dict[str, float]) -> None:
        """Replace the newest-event-time snapshot (called on the loop thread)."""
        self.newest_event = MappingProxyType(dict(newest))

    def publish_rdkafka(self, stats: dict[str, Any]) -> None:
        """Replace the librdkafka statistics snapshot (called on the loop thread)."""
        self.rdkafka = tuple(flatten_rdkafka_stats(stats))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.time()
        newest = self.newest_event
        lag = GaugeMetricFamily(
            "purged_event_lag",
            "Nanoseconds since the newest event timestamp seen on the topic (0 before the first)",
            labels=["topic"],
        )
        for topic in self.topics:
            seen = newest.get(topic)
            lag.add_metric([topic], 0.0 if seen is None else max(0.0, (now - seen) * 1e9))
        yield lag
        families: dict[str, GaugeMetricFamily] = {}
        for name, doc, label_names, label_values, value in self.rdkafka:
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, doc, labels=list(label_names))
            family.add_metric(list(label_values), value)
        yield from families.values()


snapshots = Snapshots()
REGISTRY.register(snapshots)

_TOP_LEVEL = (
    "replyq",
    "msg_cnt",
    "msg_size",
    "rx",
    "rx_bytes",
    "tx",
    "tx_bytes",
    "metadata_cache_cnt",
)
_BROKER = (
    "outbuf_cnt",
    "waitresp_cnt",
    "tx",
    "txbytes",
    "txerrs",
    "txretries",
    "req_timeouts",
    "rx",
    "rxbytes",
    "rxerrs",
    "connects",
    "disconnects",
)
_WINDOW = ("min", "max", "avg", "p99")
_PARTITION = (
    "msgq_cnt",
    "fetchq_cnt",
    "fetchq_size",
    "msgs",
    "rxmsgs",
    "rxbytes",
    "consumer_lag",
    "consumer_lag_stored",
    "hi_offset",
    "committed_offset",
    "stored_offset",
    "app_offset",
)


def flatten_rdkafka_stats(
    stats: Mapping[str, Any],
) -> Iterator[tuple[str, str, tuple[str, ...], tuple[str, ...], float]]:
    """Turn a librdkafka statistics document into `rdkafka_consumer_*` gauge samples.

    Names follow the JSON path: `rdkafka_consumer_msg_cnt`,
    `rdkafka_consumer_brokers_rxbytes{broker}`, `rdkafka_consumer_brokers_rtt_avg{broker}`,
    `rdkafka_consumer_topics_partitions_consumer_lag{topic,partition}`. Values are in
    librdkafka's own units (bytes, counts, microseconds for rtt).
    """
    doc = "librdkafka statistic (see librdkafka STATISTICS.md)"
    for key in _TOP_LEVEL:
        value = stats.get(key)
        if isinstance(value, int | float):
            yield f"rdkafka_consumer_{key}", doc, (), (), float(value)
    brokers = stats.get("brokers")
    if isinstance(brokers, Mapping):
        for broker_name, broker in brokers.items():
            if not isinstance(broker, Mapping) or broker.get("nodeid", 0) == -1:
                continue  # bootstrap placeholders duplicate the real brokers
            labels: tuple[str, ...] = (str(broker_name),)
            for key in _BROKER:
                value = broker.get(key)
                if isinstance(value, int | float):
                    yield f"rdkafka_consumer_brokers_{key}", doc, ("broker",), labels, float(value)
            rtt = broker.get("rtt")
            if isinstance(rtt, Mapping):
                for key in _WINDOW:
                    value = rtt.get(key)
                    if isinstance(value, int | float):
                        yield (
                            f"rdkafka_consumer_brokers_rtt_{key}",
                            doc,
                            ("broker",),
                            labels,
                            float(value),
                        )
    topics = stats.get("topics")
    if isinstance(topics, Mapping):
        for topic_name, topic in topics.items():
            partitions = topic.get("partitions") if isinstance(topic, Mapping) else None
            if not isinstance(partitions, Mapping):
                continue
            for partition_id, partition in partitions.items():
                if partition_id == "-1" or not isinstance(partition, Mapping):
                    continue  # the internal UA partition
                labels = (str(topic_name), str(partition_id))
                for key in _PARTITION:
                    value = partition.get(key)
                    if isinstance(value, int | float):
                        yield (
                            f"rdkafka_consumer_topics_partitions_{key}",
                            doc,
                            ("topic", "partition"),
                            labels,
                            float(value),
                        )
