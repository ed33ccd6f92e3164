"""Operator subcommands of `purged`: send, offsets, status, check.

Each subcommand lives in its own module with a `main(args) -> int`. The conventions they
share are here: exit status 0 when all went well, 1 when the tool could not do its job
(a broker or cache unreachable, a refused move), 2 for a bad command line, an invalid URL
or a bad config file; messages for people go to stderr as `purged NAME: message`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from typing import Any

from purged.config import ConfigError, load_kafka_config
from purged.logs import setup_logging

DEFAULT_KAFKA_CONFIG = "/etc/purgedkafka.conf"


class ToolError(Exception):
    """The tool could not do its job; the message says why (exit status 1 unless given)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class UsageError(ToolError):
    """A bad command line or input (exit status 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=2)


def run_tool(name: str, args: list[str]) -> int:
    """Run subcommand `name` with its arguments; return the exit status."""
    # Warnings only: a tool's own output is its report, not a log.
    setup_logging(logging.WARNING)
    module = importlib.import_module(f"purged.tools.{name}")
    try:
        status: int = module.main(args)
    except ConfigError as error:
        print(f"purged {name}: {error}", file=sys.stderr)
        return 2
    except ToolError as error:
        print(f"purged {name}: {error}", file=sys.stderr)
        return error.status
    except SystemExit as exit_:  # argparse: -h (0) and usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    return status


def parser(name: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser for `purged NAME` (usage errors exit 2, as argparse does)."""
    return argparse.ArgumentParser(
        prog=f"purged {name}",
        description=description,
        epilog=epilog,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_kafka_config_flag(parser: argparse._ActionsContainer) -> None:
    """`-kafkaConfig FILE` (the daemon's spelling) and `--kafka-config FILE`."""
    parser.add_argument(
        "-kafkaConfig",
        "--kafka-config",
        dest="kafka_config",
        metavar="FILE",
        default=DEFAULT_KAFKA_CONFIG,
        help="JSON object of librdkafka properties, the daemon's file "
        f"(default {DEFAULT_KAFKA_CONFIG})",
    )


def add_timeout_flag(parser: argparse.ArgumentParser, default: float = 10.0) -> None:
    """`--timeout S`: how long to wait for a broker or cache before giving up."""
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=default,
        metavar="S",
        help=f"seconds to wait for a broker or cache before giving up (default {default:g})",
    )


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def read_kafka_config(path: str) -> dict[str, Any]:
    """The daemon's -kafkaConfig file (librdkafka properties), or raise UsageError."""
    try:
        return load_kafka_config(path)
    except ConfigError as error:
        raise UsageError(str(error)) from None


class QuietRdkafkaLog(logging.Logger):
    """librdkafka's own log lines, kept for error messages instead of printed.

    librdkafka repeats connection failures every few ms; the tools report the last one in
    their own words ("cannot reach the broker: ... Connection refused").
    """

    def __init__(self) -> None:
        super().__init__("purged.tools.rdkafka")
        self.last_error = ""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level >= logging.WARNING:
            text = " ".join(str(a) for a in args[2:]) if len(args) > 2 else str(msg)
            self.last_error = _THREAD_PREFIX.sub("", text)


_THREAD_PREFIX = re.compile(r"^\[thrd:[^\]]*\]: ")


def client_config(config: dict[str, Any], drop_consumer_keys: bool = False) -> dict[str, Any]:
    """librdkafka properties for a tool's own client, from the daemon's config file.

    With `drop_consumer_keys`, properties that only a consumer knows (group, fetch,
    offsets) are left out, so that a producer does not complain about them.
    """
    if not drop_consumer_keys:
        return dict(config)
    return {
        key: value
        for key, value in config.items()
        if not key.startswith(_CONSUMER_ONLY_PREFIXES) and key not in _CONSUMER_ONLY
    }


_CONSUMER_ONLY_PREFIXES = (
    "group.",
    "fetch.",
    "queued.",
    "auto.",
    "enable.auto.",
    "coordinator.",
    "offset.",
    "isolation.",
    "session.",
    "heartbeat.",
)
_CONSUMER_ONLY = frozenset(
    {
        "partition.assignment.strategy",
        "max.poll.interval.ms",
        "max.partition.fetch.bytes",
        "enable.partition.eof",
        "check.crcs",
        "consume.callback.max.messages",
    }
)
