"""The daemon's command line: the original's flags (same spelling, defaults, meaning) and ours.

Parsing is pure: `parse_flags(argv)` returns a `Config` or raises `ConfigError` (the CLI
prints it and exits 2). The original used Go's `flag` package, so `-flag value`,
`-flag=value`, `--flag value` and `--flag=value` are all accepted.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from purged import __version__, multicast
from purged.cache import Address
from purged.logs import log


class ConfigError(Exception):
    """A bad flag value or config file: reported on stderr with exit status 2."""


@dataclass(frozen=True)
class Config:
    """Everything the daemon runs with."""

    backend: Address
    frontend: Address
    mcast_groups: tuple[str, ...]
    mcast_bufsize: int
    mcast_port: int
    mcast_iface: str
    prometheus_host: str
    prometheus_port: int
    host_regex: re.Pattern[str] | None
    backend_workers: int
    frontend_workers: int
    frontend_delay: float  # seconds
    topics: tuple[str, ...]
    kafka: dict[str, Any] = field(hash=False)
    purge_max_age: float  # seconds; 0 = no limit
    shutdown_timeout: float  # seconds
    max_pending: int
    cache_timeout: float  # seconds
    pipeline_depth: int
    log_level: str


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise ConfigError(message)


def _flag(parser: argparse._ActionsContainer, name: str, **kwargs: Any) -> None:
    kwargs.setdefault("metavar", kwargs.pop("meta", "VALUE"))
    parser.add_argument(f"-{name}", f"--{name}", dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The daemon's flags, with the original's names and defaults first."""
    parser = _Parser(
        prog="purged",
        description="Reads purge events from Kafka and HTCP multicast and sends HTTP PURGE "
        "requests to the local backend cache (ATS) and, after a delay, the frontend "
        "cache (Varnish). Subcommands: send, offsets, status, check (purged SUBCOMMAND -h).",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"purged {__version__}")
    orig = parser.add_argument_group("flags of the original purged")
    _flag(
        orig,
        "backend_addr",
        meta="ADDR",
        default="127.0.0.1:3128",
        help="backend cache (ATS): host:port, [v6]:port or an absolute Unix socket path",
    )
    _flag(
        orig,
        "frontend_addr",
        meta="ADDR",
        default="127.0.0.1:80",
        help="frontend cache (Varnish): host:port, [v6]:port or an absolute Unix socket path",
    )
    _flag(
        orig,
        "mcast_addrs",
        meta="GROUPS",
        default="",
        help="comma-separated HTCP multicast groups; empty = no HTCP",
    )
    _flag(
        orig,
        "mcast_bufsize",
        meta="BYTES",
        default="16777216",
        help="kernel receive buffer for the multicast socket, bytes",
    )
    _flag(
        orig, "prometheus_addr", meta="ADDR", default=":2112", help="metrics at http://ADDR/metrics"
    )
    _flag(
        orig,
        "host_regex",
        meta="REGEX",
        default="",
        help="only purge URLs whose host matches this regex (unanchored); empty = all",
    )
    _flag(orig, "backend_workers", meta="N", default="4", help="backend cache connections")
    _flag(orig, "frontend_workers", meta="N", default="1", help="frontend cache connections")
    _flag(
        orig,
        "frontend_delay",
        meta="MS",
        default="1000",
        help="ms between the backend's answer and the frontend PURGE of a URL",
    )
    _flag(
        orig,
        "topics",
        meta="TOPICS",
        default="",
        help="comma-separated Kafka topics; empty = no Kafka",
    )
    _flag(
        orig,
        "kafkaConfig",
        meta="FILE",
        default="/etc/purgedkafka.conf",
        help="JSON object of librdkafka properties",
    )
    _flag(
        orig,
        "purgeMaxAge",
        meta="SECONDS",
        default="0",
        help="seconds; events older than this are not purged (0 = no limit)",
    )
    new = parser.add_argument_group("flags new in this purged")
    _flag(
        new, "mcast_port", meta="PORT", default="4827", help="UDP port of the HTCP multicast groups"
    )
    _flag(
        new,
        "mcast_iface",
        meta="IP",
        default="",
        help="IPv4 address of the interface to join the groups on; empty = the default",
    )
    _flag(
        new,
        "shutdown_timeout",
        meta="DURATION",
        default="10s",
        help="on SIGTERM/SIGINT, how long to finish the purges in flight before exiting",
    )
    _flag(
        new,
        "max_pending",
        meta="N",
        default="100000",
        help="purges in flight at most; Kafka consumption pauses (HTCP drops) when full",
    )
    _flag(
        new,
        "cache_timeout",
        meta="DURATION",
        default="10s",
        help="a cache connection that connects or answers slower than this is re-opened",
    )
    _flag(
        new,
        "pipeline_depth",
        meta="N",
        default="32",
        help="PURGE requests in flight per cache connection (1 = no pipelining)",
    )
    _flag(
        new,
        "log_level",
        meta="LEVEL",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level",
    )
    return parser


def parse_flags(argv: list[str]) -> Config:
    """Parse and check the daemon's command line, or raise ConfigError."""
    args = build_parser().parse_args(argv)
    topics = tuple(t for t in (x.strip() for x in args.topics.split(",")) if t)
    groups = parse_groups(args.mcast_addrs)
    if not topics and not groups:
        raise ConfigError("nothing to read: give -topics, -mcast_addrs, or both")
    prometheus_host, prometheus_port = _split_host_port(args.prometheus_addr, "-prometheus_addr")
    return Config(
        backend=parse_address(args.backend_addr, "-backend_addr"),
        frontend=parse_address(args.frontend_addr, "-frontend_addr"),
        mcast_groups=groups,
        mcast_bufsize=_int(args.mcast_bufsize, "-mcast_bufsize", 1),
        mcast_port=_int(args.mcast_port, "-mcast_port", 1, 65535),
        mcast_iface=_iface(args.mcast_iface),
        prometheus_host=prometheus_host,
        prometheus_port=prometheus_port,
        host_regex=_regex(args.host_regex),
        backend_workers=_int(args.backend_workers, "-backend_workers", 1, 1024),
        frontend_workers=_int(args.frontend_workers, "-frontend_workers", 1, 1024),
        frontend_delay=_int(args.frontend_delay, "-frontend_delay", 0) / 1000,
        topics=topics,
        kafka=load_kafka_config(args.kafkaConfig) if topics else {},
        purge_max_age=_int(args.purgeMaxAge, "-purgeMaxAge", 0),
        shutdown_timeout=parse_duration(args.shutdown_timeout, "-shutdown_timeout"),
        max_pending=_int(args.max_pending, "-max_pending", 1),
        cache_timeout=parse_duration(args.cache_timeout, "-cache_timeout", minimum=0.01),
        pipeline_depth=_int(args.pipeline_depth, "-pipeline_depth", 1, 10000),
        log_level=args.log_level,
    )


def _int(text: str, flag: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text, 0) if text.strip().lower().startswith("0x") else int(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a whole number") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{flag}: {value} is out of range (must be {bound})")
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, flag: str, minimum: float = 0.0) -> float:
    """Seconds from `10`, `10s`, `500ms`, `1.5m` (plain numbers are seconds)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{flag}: {text!r} is not a duration (like 10s, 500ms, 2m)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < minimum:
        raise ConfigError(f"{flag}: {text!r} is too short (at least {minimum:g} s)")
    return seconds


def _regex(text: str) -> re.Pattern[str] | None:
    if not text:
        return None
    try:
        return re.compile(text)
    except re.error as error:
        raise ConfigError(f"-host_regex: invalid regular expression {text!r}: {error}") from None


def _split_host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{flag}: {text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{flag}: {text!r} has an invalid IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{flag}: {text!r}: write an IPv6 address in brackets, [::1]:80")
    port = _int(port_text, flag, 1, 65535) if port_text else 0
    if not port_text:
        raise ConfigError(f"{flag}: {text!r} has no port")
    return host, port


def parse_address(text: str, flag: str) -> Address:
    """`host:port`, `[v6]:port` or an absolute Unix socket path."""
    if text.startswith("/"):
        return Address(path=text)
    host, port = _split_host_port(text, flag)
    if not host:
        raise ConfigError(f"{flag}: {text!r} has no host")
    return Address(host=host, port=port)


def parse_groups(text: str) -> tuple[str, ...]:
    """Comma-separated IPv4 multicast groups (224.0.0.0/4), as -mcast_addrs takes them."""
    try:
        return tuple(multicast.parse_groups(text))
    except ValueError as error:
        raise ConfigError(f"-mcast_addrs: {error}") from None


def _iface(text: str) -> str:
    if not text:
        return ""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ConfigError(f"-mcast_iface: {text!r} is not an IPv4 interface address") from None


def load_kafka_config(path: str) -> dict[str, Any]:
    """The -kafkaConfig file: a JSON object of librdkafka properties.

    Keys only the Go client knows (`go.*`) are dropped with one log line; a missing
    `group.id` defaults to the host name (every cache host must have its own group).
    """
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise ConfigError(f"-kafkaConfig: {path}: no such file") from None
    except OSError as error:
        raise ConfigError(f"-kafkaConfig: {path}: cannot read: {error.strerror}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"-kafkaConfig: {path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"-kafkaConfig: {path}: must be a JSON object of librdkafka properties")
    config: dict[str, Any] = {}
    ignored = []
    for key, value in data.items():
        if key.startswith("go."):
            ignored.append(key)
        elif isinstance(value, bool | int | float | str):
            config[key] = value
        else:
            raise ConfigError(f"-kafkaConfig: {path}: {key!r} must be a string, number or boolean")
    if ignored:
        log.info("kafka config: ignoring keys of the Go client: %s", ", ".join(sorted(ignored)))
    if "bootstrap.servers" not in config and "metadata.broker.list" not in config:
        raise ConfigError(f"-kafkaConfig: {path}: bootstrap.servers is missing")
    if "group.id" not in config:
        config["group.id"] = socket.gethostname()
        log.info("kafka config: no group.id; using the host name %s", config["group.id"])
    return config
