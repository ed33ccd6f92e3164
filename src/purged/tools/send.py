"""`purged send`: purge URLs by hand, through Kafka, HTCP multicast, or straight to caches.

URLs come from the arguments, or from stdin one per line (blank lines and `#` comments
skipped). Every URL is checked before anything is sent: one invalid URL refuses the whole
batch (exit 2), so that a typo in a list never half-purges it.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from purged.cache import Address
from purged.config import ConfigError, parse_address
from purged.htcp import HtcpError, encode_clr
from purged.http import ProtocolError, ResponseReader
from purged.multicast import HTCP_PORT, parse_groups
from purged.tools import (
    QuietRdkafkaLog,
    ToolError,
    UsageError,
    add_kafka_config_flag,
    add_timeout_flag,
    client_config,
    parser,
    read_kafka_config,
)
from purged.url import UrlError, parse_purge_url, purge_request

DEFAULT_TAG = "purged-send"
# What a cache answers when it purged, or had nothing to purge (ATS: 404 when absent).
PURGED_STATUSES = frozenset({200, 201, 202, 204, 404})
MAX_RECONNECTS = 3  # per cache, when it closes the connection before answering everything

EPILOG = """\
exactly one transport:
  --kafka --topic T      publish resource_change events (what MediaWiki does); every purged
                         consuming T purges them on its host
  --htcp GROUPS          multicast HTCP CLR packets to the groups (the legacy transport)
  --cache ADDR           send PURGE straight to a cache (repeat for several; in the order
                         given, each after the previous one answered everything)

examples:
  purged send --kafka --topic eqiad.resource-purge https://en.wikipedia.org/wiki/Main_Page
  purged send --htcp 239.128.0.112 --mcast-iface 10.0.0.5 < urls.txt
  purged send --cache 127.0.0.1:3128 --cache /run/varnish-privileged.socket URL

exit status: 0 all sent (and, with --cache, purged); 1 a delivery or a cache failed;
2 bad usage or an invalid URL (then nothing is sent)."""


def build_parser() -> argparse.ArgumentParser:
    """The flags of `purged send`."""
    p = parser("send", "Purge URLs by hand: from the arguments, or stdin one per line.", EPILOG)
    p.add_argument("urls", nargs="*", metavar="URL", help="absolute http(s) URLs (or stdin)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--kafka", action="store_true", help="publish resource_change events to --topic"
    )
    how.add_argument(
        "--htcp", metavar="GROUPS", help="comma-separated multicast groups to send HTCP CLR to"
    )
    how.add_argument(
        "--cache",
        metavar="ADDR",
        action="append",
        help="cache to PURGE directly: host:port, [v6]:port or a Unix socket path",
    )
    kafka = p.add_argument_group("with --kafka")
    kafka.add_argument("--topic", metavar="T", help="topic to publish to (required)")
    add_kafka_config_flag(kafka)
    kafka.add_argument(
        "--tag",
        action="append",
        metavar="TAG",
        help=f"event tag (repeatable; default {DEFAULT_TAG}); the first is the metrics' tag",
    )
    htcp = p.add_argument_group("with --htcp")
    htcp.add_argument(
        "--mcast-port", type=int, default=HTCP_PORT, metavar="P", help="UDP port (default 4827)"
    )
    htcp.add_argument(
        "--mcast-iface",
        default="",
        metavar="ADDR",
        help="IPv4 address of the interface to send from (default: by route)",
    )
    htcp.add_argument(
        "--mcast-ttl",
        type=int,
        default=1,
        metavar="N",
        help="multicast TTL: 0 this host only, 1 this network (default 1)",
    )
    add_timeout_flag(p)
    return p


def main(args: list[str]) -> int:
    """Run `purged send`."""
    options = build_parser().parse_args(args)
    _check_mode_flags(options)
    urls = list(options.urls) if options.urls else list(_stdin_urls(sys.stdin))
    if not urls:
        raise UsageError("no URL given (as arguments, or on stdin one per line)")
    _refuse_invalid(urls)
    if options.kafka:
        return send_kafka(urls, options)
    if options.htcp is not None:
        return send_htcp(urls, options)
    return send_caches(urls, [_address(text) for text in options.cache], options.timeout)


def _check_mode_flags(options: argparse.Namespace) -> None:
    if options.kafka and not options.topic:
        raise UsageError("--kafka needs --topic T")
    if not options.kafka and (options.topic or options.tag):
        raise UsageError("--topic and --tag go with --kafka")
    if options.htcp is None and (
        options.mcast_port != HTCP_PORT or options.mcast_iface or options.mcast_ttl != 1
    ):
        raise UsageError("--mcast-port, --mcast-iface and --mcast-ttl go with --htcp")
    if not 1 <= options.mcast_port <= 65535:
        raise UsageError(f"--mcast-port: {options.mcast_port} is not a port (1-65535)")
    if not 0 <= options.mcast_ttl <= 255:
        raise UsageError(f"--mcast-ttl: {options.mcast_ttl} is out of range (0-255)")


def _stdin_urls(lines: Iterable[str]) -> Iterable[str]:
    for line in lines:
        url = line.strip()
        if url and not url.startswith("#"):
            yield url


def _refuse_invalid(urls: list[str]) -> None:
    bad = []
    for url in urls:
        try:
            parse_purge_url(url)
        except UrlError as error:
            bad.append(f"invalid URL {url!r}: {error}")
    if bad:
        raise UsageError("\n  ".join([f"{len(bad)} invalid URL(s), nothing sent:", *bad]))


def _address(text: str) -> Address:
    try:
        return parse_address(text, "--cache")
    except ConfigError as error:
        raise UsageError(str(error)) from None


# --- Kafka ---------------------------------------------------------------------------


def resource_change(url: str, tags: list[str], now: datetime | None = None) -> bytes:
    """A resource_change/1.0.0 event purging `url`, as MediaWiki would produce it."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    event: dict[str, Any] = {
        "$schema": "/resource_change/1.0.0",
        "meta": {
            "uri": url,
            "dt": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "stream": "resource-purge",
            "domain": parse_purge_url(url).host.rsplit(":", 1)[0].strip("[]"),
            "id": str(uuid.uuid4()),
            "request_id": str(uuid.uuid4()),
        },
        "tags": tags,
    }
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def send_kafka(urls: list[str], options: argparse.Namespace) -> int:
    """Publish one event per URL to the topic; exit status 1 if any was not delivered."""
    config = client_config(read_kafka_config(options.kafka_config), drop_consumer_keys=True)
    topic: str = options.topic
    tags: list[str] = options.tag or [DEFAULT_TAG]
    timeout: float = options.timeout
    rdkafka_log = QuietRdkafkaLog()
    config.setdefault("client.id", "purged-send")
    config.update(
        {
            # A typo in --topic must not create a topic that nobody consumes.
            "allow.auto.create.topics": False,
            "message.timeout.ms": int(timeout * 1000),
            "logger": rdkafka_log,
        }
    )
    try:
        producer = Producer(config)
    except KafkaException as error:
        raise UsageError(f"-kafkaConfig: {error.args[0].str()}") from None
    _require_topic(producer, topic, timeout, rdkafka_log)
    failed = 0

    def delivered(error: KafkaError | None, message: Message) -> None:
        nonlocal failed
        url = json.loads(message.value() or b"{}")["meta"]["uri"]
        if error is not None:
            failed += 1
            print(f"FAILED {url}: {error.str()}", file=sys.stderr)
        else:
            print(f"sent {url} to {topic}[{message.partition()}] at offset {message.offset()}")

    for url in urls:
        while True:
            try:
                producer.produce(topic, resource_change(url, tags), on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain first
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(timeout + 1)
    if left:
        failed += left
        print(f"FAILED: {left} event(s) not delivered within {timeout:g} s", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(urls)} event(s) not delivered", file=sys.stderr)
        return 1
    return 0


def _require_topic(producer: Producer, topic: str, timeout: float, log: QuietRdkafkaLog) -> None:
    try:
        metadata = producer.list_topics(topic, timeout=timeout)
    except KafkaException as error:
        producer.poll(0)
        detail = log.last_error or error.args[0].str()
        raise ToolError(f"cannot reach the Kafka broker: {detail}") from None
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        raise ToolError(f"topic {topic!r} does not exist on the broker")


# --- HTCP ----------------------------------------------------------------------------


def send_htcp(urls: list[str], options: argparse.Namespace) -> int:
    """Multicast one HTCP CLR per URL to every group."""
    try:
        groups = parse_groups(options.htcp)
        # The transaction id only tells packets apart in captures: any will do.
        first = random.getrandbits(32)
        packets = [
            encode_clr(url, transaction_id=(first + i) & 0xFFFFFFFF) for i, url in enumerate(urls)
        ]
    except (ValueError, HtcpError) as error:
        raise UsageError(f"--htcp: {error}") from None
    if not groups:
        raise UsageError("--htcp: no multicast group given")
    port: int = options.mcast_port
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, options.mcast_ttl)
        # Loop back too: the purged of this very host listens to the same groups.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        if options.mcast_iface:
            try:
                interface = socket.inet_aton(options.mcast_iface)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface)
            except OSError as error:
                raise UsageError(
                    f"--mcast-iface: {options.mcast_iface!r} is not a local IPv4 address: {error}"
                ) from None
        for url, packet in zip(urls, packets, strict=True):
            for group in groups:
                try:
                    sock.sendto(packet, (group, port))
                except OSError as error:
                    raise ToolError(f"cannot send to {group}:{port}: {error.strerror}") from None
            print(f"sent HTCP CLR {url} to {','.join(groups)} port {port}")
    finally:
        sock.close()
    return 0


# --- caches --------------------------------------------------------------------------


def send_caches(urls: list[str], caches: list[Address], timeout: float) -> int:
    """PURGE every URL at every cache, in order; exit status 1 if any was not purged."""
    requests = [purge_request(url)[1] for url in urls]
    failed = 0
    for cache in caches:
        try:
            statuses = purge_pipelined(cache, requests, timeout)
        except OSError as error:
            failed += len(urls)
            print(f"FAILED {cache}: {error}", file=sys.stderr)
            continue
        for url, status in zip(urls, statuses, strict=True):
            if status in PURGED_STATUSES:
                print(f"PURGE {url} at {cache}: {status}")
            else:
                failed += 1
                print(f"FAILED PURGE {url} at {cache}: {status}{_hint(status)}", file=sys.stderr)
    return 1 if failed else 0


def _hint(status: int) -> str:
    if status in (403, 405):
        return " (the cache does not allow PURGE from here: see the README's cache settings)"
    return ""


def purge_pipelined(cache: Address, requests: list[bytes], timeout: float) -> list[int]:
    """Send every request on one connection at once and read the statuses, in order.

    A cache that closes the connection before answering everything gets the rest on a new
    connection (at most MAX_RECONNECTS times). Raises OSError with a readable message.
    """
    statuses: list[int] = []
    reconnects = 0
    while len(statuses) < len(requests):
        before = len(statuses)
        statuses.extend(_exchange(cache, requests[len(statuses) :], timeout))
        if len(statuses) == before:
            reconnects += 1
            if reconnects > MAX_RECONNECTS:
                raise OSError(f"closed the connection {reconnects} times without answering")
    return statuses


def _exchange(cache: Address, requests: list[bytes], timeout: float) -> list[int]:
    sock = connect(cache, timeout)
    reader = ResponseReader()
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(b"".join(requests))
        while len(statuses) < len(requests) and not reader.closing:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise OSError(
                    f"answered {len(statuses)} of {len(requests)} in {timeout:g} s"
                ) from None
            if not data:
                last = reader.eof()
                if last is not None:
                    statuses.append(last)
                break
            try:
                statuses.extend(reader.feed(data))
            except ProtocolError as error:
                raise OSError(f"not an HTTP response: {error}") from None
    finally:
        sock.close()
    return statuses[: len(requests)]


def connect(cache: Address, timeout: float) -> socket.socket:
    """A connected stream socket to a cache (TCP or Unix); OSError says what failed."""
    if cache.path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(cache.path)
        except OSError as error:
            sock.close()
            raise OSError(f"cannot connect: {error.strerror or error}") from None
        return sock
    try:
        sock = socket.create_connection((cache.host, cache.port), timeout=timeout)
    except socket.gaierror as error:
        raise OSError(f"cannot resolve {cache.host!r}: {error.strerror}") from None
    except TimeoutError:
        raise OSError(f"no connection within {timeout:g} s") from None
    except OSError as error:
        raise OSError(f"cannot connect: {error.strerror or error}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


__all__ = ["main", "purge_pipelined", "resource_change"]
