"""`purged offsets`: where a consumer group stands, and moving it past a stale backlog.

Shown per partition: the committed offset, the high watermark, the lag in messages and the
age of the oldest unconsumed event (the event at the committed offset).

How it stays correct with the brokers we run on:
- The high watermark comes from a fetch (the consumer reads the message at the committed
  offset, or hits the end), never from ListOffsets: with Tansu, ListOffsets "latest"
  answers the base offset of the last batch when producers batch.
- A time is turned into offsets by a binary search over the messages' Kafka timestamps,
  not by ListOffsets-by-time (offsets_for_times): with Tansu that answers offset 0 for a
  time after the last message, which would rewind a group to the start instead of the end.
- Moving is refused while the group has members. DescribeGroups' member list is empty with
  Tansu, so the signal is the group state (anything but Empty or Dead means members), and
  the commit itself: it is sent as a non-member, which every broker rejects
  (UNKNOWN_MEMBER_ID, ILLEGAL_GENERATION, REBALANCE_IN_PROGRESS) once anyone has joined,
  so a daemon starting between the check and the commit cannot be overwritten either.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from purged.event import EventError, decode_event
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

# Group states in which nobody consumes (confluent_kafka's ConsumerGroupState names).
FREE_STATES = frozenset({"EMPTY", "DEAD"})
# What a broker answers to a commit from outside a group that has members.
MEMBER_ERRORS = frozenset(
    {
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.FENCED_INSTANCE_ID,
    }
)
_EARLIEST = frozenset({"smallest", "earliest", "beginning"})
_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)(s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

EPILOG = """\
examples:
  purged offsets -topics eqiad.resource-purge,codfw.resource-purge
  purged offsets -topics eqiad.resource-purge --to-time -10m            (dry run)
  purged offsets -topics eqiad.resource-purge --to-latest --execute

--to-time takes an RFC 3339 time (2024-05-01T12:00:00Z, 2024-05-01T14:00:00+02:00) or a
time before now (-90s, -5m, -2h, -3d); each partition moves to its first message with a
Kafka timestamp at or after it (to the end when there is none). In the table, CHANGE is
the number of messages skipped (+N) or to be purged again (-N) per partition.

Moving needs the group to have no members: stop purged on the host first (systemctl stop
purged). A member that crashed counts until the broker expires it (session.timeout.ms).

exit status: 0 done (or dry run shown); 1 broker unreachable, or the move was refused
because the group has members; 2 bad usage or config."""


@dataclass
class PartitionState:
    """One partition of the group: where it stands and where a move would put it."""

    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    low: int  # low watermark (oldest offset still stored)
    high: int  # high watermark (offset the next message will get)
    start: int  # where the group resumes: `committed`, or per auto.offset.reset
    oldest_time: float | None = None  # event time of the message at `start`; None: no message
    new: int | None = None  # target of a move

    @property
    def lag(self) -> int:
        """Messages not consumed yet."""
        return max(0, self.high - self.start)


def build_parser() -> argparse.ArgumentParser:
    """The flags of `purged offsets`."""
    p = parser(
        "offsets",
        "Show a consumer group's position per partition; move it to the end or to a time.",
        EPILOG,
    )
    add_kafka_config_flag(p)
    p.add_argument(
        "--group",
        metavar="G",
        help="consumer group (default: group.id of the config file, else the host name, "
        "as the daemon does)",
    )
    p.add_argument(
        "-topics",
        "--topics",
        dest="topics",
        required=True,
        metavar="T1,T2",
        help="comma-separated topics",
    )
    move = p.add_mutually_exclusive_group()
    move.add_argument("--to-latest", action="store_true", help="move to the end (skip all)")
    move.add_argument(
        "--to-time", metavar="WHEN", help="move to the first message at or after WHEN"
    )
    p.add_argument(
        "--execute", action="store_true", help="apply the move (default: dry run, show it)"
    )
    add_timeout_flag(p)
    return p


def main(args: list[str]) -> int:
    """Run `purged offsets`."""
    options = build_parser().parse_args(_attach_values(args))
    topics = [t for t in (x.strip() for x in options.topics.split(",")) if t]
    if not topics:
        raise UsageError("-topics: no topic given")
    if options.execute and not (options.to_latest or options.to_time):
        raise UsageError("--execute applies a move: add --to-latest or --to-time WHEN")
    when = parse_when(options.to_time, time.time()) if options.to_time else None
    config = read_kafka_config(options.kafka_config)
    group: str = options.group or str(config["group.id"])
    timeout: float = options.timeout

    reader = GroupReader(config, group, timeout)
    try:
        states = reader.states(topics)
        if options.to_latest:
            for state in states:
                state.new = state.high
        elif when is not None:
            for state in states:
                state.new = reader.first_at_or_after(state, when)
        group_state = describe_group(config, group, timeout)
        print(render(group, states, group_state, time.time(), when))
        if all(state.new is None for state in states):
            return 0
        if not options.execute:
            print("dry run: nothing changed; add --execute to move the offsets")
            return 0
        if group_state is not None and group_state not in FREE_STATES:
            raise ToolError(_members_message(group, f"its state is {group_state}"))
        reader.commit(states)
        print(f"moved group {group}: {len(states)} partition(s) committed")
        return 0
    finally:
        reader.close()


def _attach_values(args: list[str]) -> list[str]:
    """`--to-time -5m` → `--to-time=-5m`: argparse would take `-5m` for an option."""
    out: list[str] = []
    pending = False
    for arg in args:
        if pending:
            out[-1] += "=" + arg
            pending = False
        else:
            out.append(arg)
            pending = arg == "--to-time"
    return out


def parse_when(text: str, now: float) -> float:
    """Seconds since the epoch from an RFC 3339 time or `-N{s,m,h,d}` before `now`."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        return now - float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--to-time: {text!r} is neither an RFC 3339 time (2024-05-01T12:00:00Z) "
            "nor a time before now (-5m, -2h, -3d)"
        ) from None
    if moment.tzinfo is None:
        raise UsageError(f"--to-time: {text!r} has no time zone: add Z (UTC) or an offset")
    return moment.timestamp()


def _members_message(group: str, why: str) -> str:
    return (
        f"refusing to move group {group}: it has active members ({why}); stop purged on "
        "the host first (a crashed member counts until the broker expires it, after "
        "session.timeout.ms)"
    )


class GroupReader:
    """A consumer outside the group (assign, never subscribe) that reads its positions.

    It uses the group's id to read (and commit) the group's offsets, but never joins the
    group, so the daemon and the broker see no new member.
    """

    def __init__(self, config: dict[str, Any], group: str, timeout: float) -> None:
        self.group = group
        self.timeout = timeout
        self.log = QuietRdkafkaLog()
        properties = client_config(config)
        properties.pop("statistics.interval.ms", None)  # nobody reads them here
        # A static member id would make the broker take us for the daemon (and fence it).
        properties.pop("group.instance.id", None)
        self.reset_earliest = str(properties.get("auto.offset.reset", "")).lower() in _EARLIEST
        properties.update(
            {
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                # A committed offset the broker no longer has: read from the oldest kept.
                "auto.offset.reset": "earliest",
                # One message per partition is all we read: keep the prefetch small.
                "queued.max.messages.kbytes": 1024,
                "max.partition.fetch.bytes": 65536,
                "fetch.wait.max.ms": 10,
                "logger": self.log,
            }
        )
        try:
            self.consumer = Consumer(properties)
        except KafkaException as error:
            raise UsageError(f"-kafkaConfig: {error.args[0].str()}") from None

    def close(self) -> None:
        """Close the consumer (it commits nothing: auto commit is off)."""
        self.consumer.close()

    def _unreachable(self, error: KafkaException) -> ToolError:
        self.consumer.poll(0)  # serve the log callbacks: they say why
        detail = self.log.last_error or error.args[0].str()
        return ToolError(f"cannot reach the Kafka broker: {detail}")

    def partitions(self, topics: list[str]) -> list[TopicPartition]:
        """Every partition of the topics; ToolError naming a topic that does not exist."""
        try:
            metadata = self.consumer.list_topics(timeout=self.timeout)
        except KafkaException as error:
            raise self._unreachable(error) from None
        found: list[TopicPartition] = []
        for topic in topics:
            info = metadata.topics.get(topic)
            if info is None or info.error is not None:
                raise ToolError(f"topic {topic!r} does not exist on the broker")
            found.extend(TopicPartition(topic, p) for p in sorted(info.partitions))
        return found

    def states(self, topics: list[str]) -> list[PartitionState]:
        """Committed offset, watermarks, lag and oldest event of every partition."""
        partitions = self.partitions(topics)
        try:
            committed = self.consumer.committed(partitions, timeout=self.timeout)
        except KafkaException as error:
            raise self._unreachable(error) from None
        commits = {(p.topic, p.partition): p.offset if p.offset >= 0 else None for p in committed}
        starts = []
        for p in partitions:
            offset = commits[(p.topic, p.partition)]
            starts.append(
                TopicPartition(p.topic, p.partition, OFFSET_BEGINNING if offset is None else offset)
            )
        firsts = self._first_messages(starts)
        states = []
        for p in partitions:
            key = (p.topic, p.partition)
            low, high = self._watermarks(p)
            committed_offset = commits[key]
            if committed_offset is not None:
                start = committed_offset
            else:  # the daemon would start where auto.offset.reset says
                start = low if self.reset_earliest else high
            state = PartitionState(p.topic, p.partition, committed_offset, low, high, start)
            first = firsts[key]
            if first is not None and start < high:
                state.oldest_time = _message_time(first[1], event_time=True)
            states.append(state)
        return states

    def _watermarks(self, partition: TopicPartition) -> tuple[int, int]:
        # cached=True: the watermarks of the last fetch response, which are right; a fresh
        # ListOffsets query is not, with this broker (see the module docstring).
        low, high = self.consumer.get_watermark_offsets(partition, cached=True)
        if high < 0:
            raise ToolError(
                f"no watermarks for {partition.topic}[{partition.partition}] after reading it"
            )
        return max(0, low), high

    def _first_messages(
        self, starts: list[TopicPartition]
    ) -> dict[tuple[str, int], tuple[int, Message] | None]:
        """The first message at or after each start offset (None at the end of the log)."""
        pending = {(p.topic, p.partition) for p in starts}
        found: dict[tuple[str, int], tuple[int, Message] | None] = {}
        self.consumer.assign(starts)
        deadline = time.monotonic() + self.timeout
        last_error = ""
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    names = ", ".join(f"{t}[{p}]" for t, p in sorted(pending))
                    why = f" (last error: {last_error})" if last_error else ""
                    raise ToolError(
                        f"no answer from the broker for {names} in {self.timeout:g} s{why}"
                    )
                message = self.consumer.poll(min(left, 0.5))
                if message is None:
                    continue
                key = (message.topic() or "", message.partition() or 0)
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    if error.fatal():
                        raise ToolError(f"kafka: {error.str()}")
                    last_error = error.str()  # transient: librdkafka retries by itself
                    continue
                if key not in pending:
                    continue
                pending.discard(key)
                found[key] = None if error is not None else (message.offset() or 0, message)
                self.consumer.pause([TopicPartition(*key)])
        finally:
            # A pause outlives the assignment in librdkafka: undo it for the next read.
            self.consumer.resume(starts)
            self.consumer.unassign()
        return found

    def first_at_or_after(self, state: PartitionState, when: float) -> int:
        """Offset of the partition's first message with a Kafka timestamp >= `when`.

        A binary search over the messages (the high watermark when there is none):
        timestamps of purge events grow with their offsets, as producers stamp them.
        """
        lo, hi = state.low, state.high
        while lo < hi:
            middle = (lo + hi) // 2
            probe = self._probe(state.topic, state.partition, middle)
            if probe is None or _message_time(probe[1], event_time=False) >= when:
                hi = middle
            else:
                lo = probe[0] + 1
        return lo

    def _probe(self, topic: str, partition: int, offset: int) -> tuple[int, Message] | None:
        return self._first_messages([TopicPartition(topic, partition, offset)])[(topic, partition)]

    def commit(self, states: list[PartitionState]) -> None:
        """Commit the new offsets from outside the group; refused if it has members."""
        offsets = [TopicPartition(s.topic, s.partition, s.new) for s in states if s.new is not None]
        try:
            result = self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as error:
            raise self._commit_refused(error.args[0]) from None
        for p in result or []:
            if p.error is not None:
                raise self._commit_refused(p.error)
        try:
            committed = self.consumer.committed(offsets, timeout=self.timeout)
        except KafkaException as error:
            raise self._unreachable(error) from None
        wrong = [p for p in committed if p.offset != _target(offsets, p)]
        if wrong:
            names = ", ".join(f"{p.topic}[{p.partition}]={p.offset}" for p in wrong)
            raise ToolError(f"the broker accepted the commit but now has {names}")

    def _commit_refused(self, error: KafkaError) -> ToolError:
        if error.code() in MEMBER_ERRORS:
            return ToolError(_members_message(self.group, f"the broker said {error.name()}"))
        return ToolError(f"commit failed: {error.str()}")


def _target(offsets: list[TopicPartition], p: TopicPartition) -> int:
    return next(o.offset for o in offsets if (o.topic, o.partition) == (p.topic, p.partition))


def _message_time(message: Message, event_time: bool) -> float:
    """Seconds since the epoch: the event's own time first when `event_time`, else the
    Kafka timestamp first; each falls back on the other."""
    kind, millis = message.timestamp()
    kafka = millis / 1000 if kind != TIMESTAMP_NOT_AVAILABLE else None
    event = None
    if event_time or kafka is None:
        try:
            event = decode_event(message.value() or b"").timestamp
        except EventError:
            event = None
    if event_time:
        return event if event is not None else kafka if kafka is not None else time.time()
    return kafka if kafka is not None else event if event is not None else time.time()


def describe_group(config: dict[str, Any], group: str, timeout: float) -> str | None:
    """The group's state name (EMPTY, STABLE, ...), or None when the broker cannot say."""
    properties = client_config(config, drop_consumer_keys=True)
    properties.pop("statistics.interval.ms", None)
    properties["logger"] = QuietRdkafkaLog()
    try:
        admin = AdminClient(properties)
        future = admin.describe_consumer_groups([group], request_timeout=timeout)[group]
        description = future.result(timeout=timeout + 1)
    except Exception:  # old brokers lack it; the commit check still guards
        return None
    return str(description.state.name)


def render(
    group: str,
    states: list[PartitionState],
    group_state: str | None,
    now: float,
    when: float | None = None,
) -> str:
    """The table `purged offsets` prints."""
    moving = any(s.new is not None for s in states)
    header = ["TOPIC", "PARTITION", "COMMITTED", "HIGH-WATERMARK", "LAG", "OLDEST-UNCONSUMED"]
    if moving:
        header += ["NEW-OFFSET", "CHANGE"]
    rows = [header]
    for s in states:
        row = [
            s.topic,
            str(s.partition),
            "-" if s.committed is None else str(s.committed),
            str(s.high),
            str(s.lag),
            _age(s, now),
        ]
        if moving and s.new is not None:
            row += [str(s.new), f"{s.new - s.start:+d}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(header))]
    lines = [f"group {group} (state {group_state or 'unknown'})"]
    if when is not None:
        lines[0] += f", moving to {_iso(when)}"
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    lines.append(f"total lag: {sum(s.lag for s in states)} messages")
    if group_state is not None and group_state not in FREE_STATES:
        lines.append(f"note: group {group} has active members: a move would be refused")
    return "\n".join(lines)


def _age(state: PartitionState, now: float) -> str:
    if state.lag == 0 or state.oldest_time is None:
        return "-"
    return f"{format_age(now - state.oldest_time)} ({_iso(state.oldest_time)})"


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_age(seconds: float) -> str:
    """`850ms`, `42s`, `12m05s`, `3h07m`, `2d04h`."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


__all__ = ["GroupReader", "PartitionState", "format_age", "main", "parse_when", "render"]
