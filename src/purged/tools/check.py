"""`purged check [daemon flags...]`: would the daemon work with these flags, here, now?

It takes exactly the daemon's flags (copy them from the unit file) and checks, one line
each, "NAME: ok (detail)" or "NAME: FAIL: reason":
- the flags and the Kafka config file (what the daemon would refuse at startup),
- each cache: the address resolves, a connection opens, and a harmless PURGE (of a URL no
  one caches, `http://purged-check.invalid/purged-check`) is allowed: a 403 or 405 means
  the cache refuses PURGE from this host,
- the Kafka broker answers a metadata request, and each topic exists,
- the HTCP multicast groups can be joined on the port and interface given.

Exit status: 0 all ok; 1 a check failed; 2 the flags or config are bad (as the daemon).
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException

from purged.cache import Address
from purged.config import Config, ConfigError, build_parser, parse_flags
from purged.kafka import consumer_config
from purged.multicast import open_socket
from purged.tools import QuietRdkafkaLog
from purged.tools.send import PURGED_STATUSES, purge_pipelined
from purged.url import purge_request

PROBE_URL = "http://purged-check.invalid/purged-check"
MAX_CHECK_TIMEOUT = 10.0  # seconds: a check waits at most this long, whatever -cache_timeout

HELP = """\
usage: purged check [daemon flags...]

Check the daemon's flags (the same as `purged -h` lists) and what they point at, one
line per check: the flags and Kafka config file, both caches (connect, and a harmless
PURGE of http://purged-check.invalid/purged-check must be allowed), the Kafka broker and
topics, the HTCP multicast groups.

exit status: 0 all ok; 1 a check failed; 2 the flags or config are bad.
"""


class CheckFailed(Exception):
    """A check failed; the message is the reason shown after FAIL:."""


def main(args: list[str]) -> int:
    """Run `purged check`."""
    if any(arg in ("-h", "--help", "-help") for arg in args):
        print(HELP)
        return 0
    # The daemon's own log lines (Kafka config notes, multicast buffer) are not checks.
    logging.getLogger("purged").setLevel(logging.ERROR)
    try:
        config = parse_flags(args)
    except ConfigError as error:
        report("flags", f"FAIL: {error}")
        print("purged check: see 'purged -h' for the flags", file=sys.stderr)
        return 2
    report("flags", "ok")
    timeout = min(config.cache_timeout, MAX_CHECK_TIMEOUT)
    failed = 0
    kafka = None
    if config.topics:
        name = f"kafka config {_kafka_config_path(args)}"
        try:
            kafka = kafka_consumer(config)
        except CheckFailed as error:
            report(name, f"FAIL: {error}")
            return 2
        report(name, f"ok (group.id {config.kafka['group.id']})")
    checks: list[tuple[str, Callable[[], str]]] = [
        (f"backend cache {config.backend}", lambda: check_cache(config.backend, timeout)),
        (f"frontend cache {config.frontend}", lambda: check_cache(config.frontend, timeout)),
    ]
    for name, check in checks:
        failed += run(name, check)
    if kafka is not None:
        try:
            failed += check_kafka(kafka, config, timeout)
        finally:
            kafka[0].close()
    if config.mcast_groups:
        name = f"multicast groups {','.join(config.mcast_groups)} port {config.mcast_port}"
        failed += run(name, lambda: check_multicast(config))
    return 1 if failed else 0


def report(name: str, result: str) -> None:
    """Print one check's line."""
    print(f"{name}: {result}", flush=True)


def run(name: str, check: Callable[[], str]) -> int:
    """Run one check and print its line; 1 if it failed."""
    try:
        detail = check()
    except CheckFailed as error:
        report(name, f"FAIL: {error}")
        return 1
    report(name, f"ok ({detail})" if detail else "ok")
    return 0


def _kafka_config_path(args: list[str]) -> str:
    return str(build_parser().parse_args(args).kafkaConfig)


def check_cache(cache: Address, timeout: float) -> str:
    """Connect and PURGE a URL nobody caches; the detail names the answer."""
    if not cache.path:
        try:
            socket.getaddrinfo(cache.host, cache.port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise CheckFailed(f"cannot resolve {cache.host!r}: {error.strerror}") from None
    started = time.monotonic()
    try:
        [status] = purge_pipelined(cache, [purge_request(PROBE_URL)[1]], timeout)
    except OSError as error:
        raise CheckFailed(str(error)) from None
    took = (time.monotonic() - started) * 1000
    if status in (403, 405):
        raise CheckFailed(
            f"PURGE refused with {status}: the cache must allow PURGE from this host "
            "(README: Varnish VCL, Traffic Server ip_allow.yaml)"
        )
    if status not in PURGED_STATUSES:
        raise CheckFailed(f"PURGE answered {status}")
    return f"PURGE answered {status} in {took:.1f} ms"


def kafka_consumer(config: Config) -> tuple[Consumer, QuietRdkafkaLog]:
    """The daemon's consumer properties in a consumer that never subscribes, and its log."""
    properties = consumer_config(config.kafka)
    properties.pop("statistics.interval.ms", None)  # no statistics callback here
    properties["logger"] = log = QuietRdkafkaLog()
    try:
        return Consumer(properties), log
    except KafkaException as error:
        raise CheckFailed(error.args[0].str()) from None


def check_kafka(kafka: tuple[Consumer, QuietRdkafkaLog], config: Config, timeout: float) -> int:
    """The broker answers a metadata request, and every topic exists; failures counted."""
    consumer, log = kafka
    servers = config.kafka.get("bootstrap.servers") or config.kafka.get("metadata.broker.list")
    name = f"kafka broker {servers}"
    try:
        metadata = consumer.list_topics(timeout=timeout)
    except KafkaException as error:
        consumer.poll(0)  # serve librdkafka's log lines: the last one says why
        detail = log.last_error or error.args[0].str()
        report(name, f"FAIL: no answer in {timeout:g} s: {detail}")
        return 1
    brokers = ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())
    report(name, f"ok (brokers {brokers})")
    failed = 0
    for topic in config.topics:
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            report(f"kafka topic {topic}", "FAIL: does not exist on the broker")
            failed += 1
        else:
            report(f"kafka topic {topic}", f"ok ({len(info.partitions)} partitions)")
    return failed


def check_multicast(config: Config) -> str:
    """Bind the port and join every group on the interface, as the daemon will."""
    try:
        sock = open_socket(
            list(config.mcast_groups), config.mcast_port, config.mcast_iface, config.mcast_bufsize
        )
    except OSError as error:
        raise CheckFailed(error.strerror or str(error)) from None
    try:
        buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    finally:
        sock.close()
    detail = f"joined on {config.mcast_iface or 'the default interface'}"
    # Linux reports twice the size it was asked for (it counts its bookkeeping).
    if buffer < config.mcast_bufsize:
        detail += (
            f"; receive buffer only {buffer} bytes of {config.mcast_bufsize}: raise "
            "net.core.rmem_max or grant CAP_NET_ADMIN"
        )
    return detail


__all__ = ["check_cache", "check_kafka", "check_multicast", "main"]
