"""`purged offsets`: a consumer group's position, and moving it past a stale backlog."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from purged.tools import ToolError, UsageError
from purged.tools.offsets import GroupReader, format_age, parse_when
from tests.support.broker import Broker, make_event
from tests.support.ports import free_port
from tests.support.purged_proc import daemon_args
from tests.support.recorder import Recorder
from tests.support.tool_run import Result, run_purged, running_daemon

HOST = "en.wikipedia.org"
PARTITIONS = 3


class Setup:
    """A topic, a group and its Kafka config file."""

    def __init__(self, broker: Broker, tmp_path: Path, unique: Callable[[str], str]) -> None:
        self.broker = broker
        self.topic = unique("offsets")
        self.group = unique("group")
        broker.create_topic(self.topic, partitions=PARTITIONS)
        self.config = broker.write_kafka_config(tmp_path / "kafka.json", self.group)

    def produce(self, prefix: str, per_partition: int, dt: datetime | None = None) -> list[str]:
        """Events for /wiki/PREFIX_P_I on every partition P; their paths."""
        paths = []
        for partition in range(PARTITIONS):
            batch = [f"/wiki/{prefix}_{partition}_{i}" for i in range(per_partition)]
            values = [make_event(f"https://{HOST}{path}", dt=dt) for path in batch]
            self.broker.produce(self.topic, values, partition=partition)
            paths += batch
        return paths

    def commit(self, offsets: list[int]) -> None:
        consumer = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": self.group})
        try:
            partitions = [TopicPartition(self.topic, p, o) for p, o in enumerate(offsets)]
            consumer.commit(offsets=partitions, asynchronous=False)
        finally:
            consumer.close()

    def committed(self) -> list[int]:
        consumer = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": self.group})
        try:
            partitions = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
            return [p.offset for p in consumer.committed(partitions, timeout=10)]
        finally:
            consumer.close()

    def offsets(self, *args: str) -> Result:
        return run_purged("offsets", "-kafkaConfig", str(self.config), "-topics", self.topic, *args)

    def daemon_args(self, backend: Recorder, frontend: Recorder) -> list[str]:
        return daemon_args(
            topics=[self.topic],
            kafka_config=self.config,
            backend=backend.address,
            frontend=frontend.address,
        )


@pytest.fixture
def setup(broker: Broker, tmp_path: Path, unique: Callable[[str], str]) -> Setup:
    return Setup(broker, tmp_path, unique)


def table(result: Result) -> dict[int, list[str]]:
    """The partition rows of the printed table, by partition: the columns as printed."""
    rows = {}
    for line in result.stdout.splitlines():
        cells = line.split()
        if len(cells) >= 5 and cells[1].isdigit():
            rows[int(cells[1])] = cells
    return rows


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- showing -------------------------------------------------------------------------


def test_offsets_shows_committed_high_watermark_lag_and_oldest_event_age(setup: Setup) -> None:
    three_days_ago = datetime.now(UTC) - timedelta(days=3)
    setup.produce("Stale", per_partition=4, dt=three_days_ago)
    setup.commit([1, 4, 0])
    result = setup.offsets()
    assert result.code == 0, result
    rows = table(result)
    # TOPIC PARTITION COMMITTED HIGH-WATERMARK LAG OLDEST-UNCONSUMED
    assert rows[0][2:5] == ["1", "4", "3"]
    assert rows[1][2:6] == ["4", "4", "0", "-"]
    assert rows[2][2:5] == ["0", "4", "4"]
    for partition in (0, 2):
        assert rows[partition][5] in ("3d00h", "2d23h"), result
        assert rows[partition][6] == f"({three_days_ago.strftime('%Y-%m-%dT%H:%M:%S')}Z)"
    assert "total lag: 7 messages" in result.stdout


def test_offsets_high_watermark_is_right_when_the_producer_batches(setup: Setup) -> None:
    # One flush of many small events: the producer sends them in batches, and ListOffsets
    # "latest" answers the last batch's base offset with this broker.
    setup.produce("Batch", per_partition=200)
    result = setup.offsets()
    assert result.code == 0, result
    for partition in range(PARTITIONS):
        assert table(result)[partition][3] == "200"


def test_offsets_group_without_commits_shows_dash_and_full_lag(setup: Setup) -> None:
    setup.produce("New", per_partition=2)
    result = setup.offsets()
    assert result.code == 0, result
    # auto.offset.reset=earliest in the tests' config: the daemon would start at 0.
    assert [table(result)[p][2:5] for p in range(PARTITIONS)] == [["-", "2", "2"]] * PARTITIONS


# --- moving --------------------------------------------------------------------------


def test_offsets_dry_run_shows_the_move_and_changes_nothing(setup: Setup) -> None:
    setup.produce("Dry", per_partition=3)
    setup.commit([0, 1, 2])
    result = setup.offsets("--to-latest")
    assert result.code == 0, result
    assert "NEW-OFFSET" in result.stdout
    assert [table(result)[p][-2:] for p in range(PARTITIONS)] == [
        ["3", "+3"],
        ["3", "+2"],
        ["3", "+1"],
    ]
    assert "dry run: nothing changed" in result.stdout
    assert setup.committed() == [0, 1, 2]


def test_offsets_to_latest_skips_the_backlog_and_the_daemon_purges_only_what_follows(
    setup: Setup, recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    stale = setup.produce("Stale", per_partition=5, dt=datetime.now(UTC) - timedelta(days=3))
    setup.commit([0, 0, 0])
    result = setup.offsets("--to-latest", "--execute")
    assert result.code == 0, result
    assert setup.committed() == [5, 5, 5]
    fresh = setup.produce("Fresh", per_partition=1)
    backend, frontend = recorder(), recorder()
    with running_daemon(setup.daemon_args(backend, frontend), tmp_path / "purged.log"):
        frontend.wait_for(len(fresh), timeout=20)
        time.sleep(0.5)  # anything stale would have come first, partition by partition
    assert sorted(backend.targets()) == sorted(fresh)
    assert not set(stale) & set(frontend.targets())


def test_offsets_to_time_moves_to_the_first_message_after_it_and_the_daemon_starts_there(
    setup: Setup, recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    before = setup.produce("Before", per_partition=3)
    time.sleep(0.3)
    cut = datetime.now(UTC)
    time.sleep(0.3)
    after = setup.produce("After", per_partition=2)
    setup.commit([0, 0, 0])
    result = setup.offsets("--to-time", iso(cut), "--execute")
    assert result.code == 0, result
    assert setup.committed() == [3, 3, 3]
    backend, frontend = recorder(), recorder()
    with running_daemon(setup.daemon_args(backend, frontend), tmp_path / "purged.log"):
        frontend.wait_for(len(after), timeout=20)
        time.sleep(0.5)
    assert sorted(backend.targets()) == sorted(after)
    assert not set(before) & set(frontend.targets())


def test_offsets_to_relative_time_can_move_back_to_purge_again(setup: Setup) -> None:
    setup.produce("Again", per_partition=2)
    setup.commit([2, 2, 2])
    result = setup.offsets("--to-time", "-10m", "--execute")
    assert result.code == 0, result
    assert setup.committed() == [0, 0, 0]
    assert [table(result)[p][-1] for p in range(PARTITIONS)] == ["-2"] * PARTITIONS


def test_offsets_to_time_after_the_last_message_moves_to_the_end(setup: Setup) -> None:
    # ListOffsets by time answers 0 here with this broker: that would rewind the group.
    setup.produce("Past", per_partition=2)
    setup.commit([1, 1, 1])
    later = datetime.now(UTC) + timedelta(hours=1)
    result = setup.offsets("--to-time", iso(later), "--execute")
    assert result.code == 0, result
    assert setup.committed() == [2, 2, 2]


def test_offsets_move_is_refused_while_the_daemon_is_in_the_group(
    setup: Setup, recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    setup.produce("Busy", per_partition=1)
    backend, frontend = recorder(), recorder()
    with running_daemon(setup.daemon_args(backend, frontend), tmp_path / "purged.log"):
        frontend.wait_for(PARTITIONS, timeout=20)
        deadline = time.monotonic() + 20
        while setup.committed() != [1, 1, 1] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert setup.committed() == [1, 1, 1]
        refused = setup.offsets("--to-time", "-1d", "--execute")
        dry = setup.offsets("--to-time", "-1d")
        assert setup.committed() == [1, 1, 1]
    assert refused.code == 1, refused
    assert f"refusing to move group {setup.group}: it has active members" in refused.stderr
    assert "stop purged" in refused.stderr
    assert dry.code == 0, dry
    assert "a move would be refused" in dry.stdout
    # Once the daemon has left the group, the same command moves it.
    again = setup.offsets("--to-time", "-1d", "--execute")
    assert again.code == 0, again
    assert setup.committed() == [0, 0, 0]


def test_offsets_commit_from_outside_is_rejected_by_the_broker_while_a_member_is_in(
    setup: Setup, broker: Broker
) -> None:
    # The second guard: even if the group's state was read before a member joined, the
    # commit itself is refused.
    member = Consumer(broker.kafka_config(setup.group, enable_auto_commit=False))
    member.subscribe([setup.topic])
    deadline = time.monotonic() + 20
    while not member.assignment() and time.monotonic() < deadline:
        member.poll(0.1)
    try:
        assert member.assignment(), "the member did not join"
        reader = GroupReader(json.loads(setup.config.read_text()), setup.group, timeout=10)
        try:
            states = reader.states([setup.topic])
            for state in states:
                state.new = state.high
            with pytest.raises(ToolError, match="has active members"):
                reader.commit(states)
        finally:
            reader.close()
    finally:
        member.close()


# --- errors --------------------------------------------------------------------------


def test_offsets_unknown_topic_fails(setup: Setup, unique: Callable[[str], str]) -> None:
    missing = unique("missing")
    result = run_purged("offsets", "-kafkaConfig", str(setup.config), "-topics", missing)
    assert result.code == 1, result
    assert f"topic {missing!r} does not exist" in result.stderr


def test_offsets_with_the_broker_down_fails(tmp_path: Path) -> None:
    config = tmp_path / "kafka.json"
    config.write_text(json.dumps({"bootstrap.servers": f"127.0.0.1:{free_port()}"}))
    result = run_purged("offsets", "-kafkaConfig", str(config), "-topics", "t", "--timeout", "2")
    assert result.code == 1, result
    assert "cannot reach the Kafka broker" in result.stderr


def test_offsets_execute_without_a_move_is_a_usage_error(setup: Setup) -> None:
    result = setup.offsets("--execute")
    assert result.code == 2
    assert "add --to-latest or --to-time" in result.stderr


def test_offsets_bad_time_is_a_usage_error(setup: Setup) -> None:
    result = setup.offsets("--to-time", "yesterday")
    assert result.code == 2
    assert "--to-time: 'yesterday'" in result.stderr


def test_offsets_bad_config_file_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "kafka.json"
    config.write_text("{")
    result = run_purged("offsets", "-kafkaConfig", str(config), "-topics", "t")
    assert result.code == 2
    assert "not valid JSON" in result.stderr


# --- pure parts ----------------------------------------------------------------------


def test_parse_when_reads_rfc3339_and_times_before_now() -> None:
    now = 1_700_000_000.0
    assert parse_when("-5m", now) == now - 300
    assert parse_when("-90s", now) == now - 90
    assert parse_when("-2h", now) == now - 7200
    assert parse_when("-1.5d", now) == now - 129600
    assert parse_when("2023-11-14T22:13:20Z", now) == 1_700_000_000
    assert parse_when("2023-11-14T23:13:20.500+01:00", now) == 1_700_000_000.5
    with pytest.raises(UsageError, match="no time zone"):
        parse_when("2023-11-14T22:13:20", now)
    with pytest.raises(UsageError):
        parse_when("+5m", now)


def test_format_age() -> None:
    assert format_age(0.25) == "250ms"
    assert format_age(42.9) == "42s"
    assert format_age(725) == "12m05s"
    assert format_age(3 * 3600 + 7 * 60) == "3h07m"
    assert format_age(2 * 86400 + 4 * 3600 + 59) == "2d04h"
