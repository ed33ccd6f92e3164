"""The command line: the original's flags, spelled and defaulted the same, and clear refusals.

Details are checked through ``purged.config.parse_flags``; exit statuses and messages through
the real ``purged`` command.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from purged.cache import Address
from purged.config import ConfigError, build_parser, parse_flags
from tests.support.ports import free_port

PURGED = str(Path(sys.executable).parent / "purged")
MCAST = ["-mcast_addrs", "239.128.0.112"]  # a source, so that nothing else is required


@pytest.fixture
def kafka_conf(tmp_path: Path) -> Path:
    """A -kafkaConfig file like production's (bootstrap, group, a Go-only key, numbers)."""
    path = tmp_path / "purgedkafka.conf"
    path.write_text(
        json.dumps(
            {
                "bootstrap.servers": "127.0.0.1:9092",
                "client.id": "purged",
                "group.id": "cp1001",
                "statistics.interval.ms": 60000,
                "go.events.channel.enable": True,
                "enable.partition.eof": False,
            }
        )
    )
    return path


def write_json(tmp_path: Path, content: Any) -> str:
    path = tmp_path / "kafka.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def refusal(argv: list[str]) -> str:
    """The message parse_flags refuses ``argv`` with."""
    with pytest.raises(ConfigError) as caught:
        parse_flags(argv)
    return str(caught.value)


def run_purged(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PURGED, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# --- the original's flags and defaults -----------------------------------------------------

ORIGINAL_DEFAULTS = {
    "backend_addr": "127.0.0.1:3128",
    "frontend_addr": "127.0.0.1:80",
    "mcast_addrs": "",
    "mcast_bufsize": "16777216",
    "prometheus_addr": ":2112",
    "host_regex": "",
    "backend_workers": "4",
    "frontend_workers": "1",
    "frontend_delay": "1000",
    "topics": "",
    "kafkaConfig": "/etc/purgedkafka.conf",
    "purgeMaxAge": "0",
}


@pytest.mark.parametrize(("flag", "default"), ORIGINAL_DEFAULTS.items())
def test_every_original_flag_exists_with_its_default(flag: str, default: str) -> None:
    assert getattr(build_parser().parse_args([]), flag) == default


def test_defaults_mean_what_the_original_meant() -> None:
    config = parse_flags(MCAST)
    assert config.backend == Address(host="127.0.0.1", port=3128)
    assert config.frontend == Address(host="127.0.0.1", port=80)
    assert config.mcast_groups == ("239.128.0.112",)
    assert config.mcast_bufsize == 16 * 1024 * 1024
    assert (config.prometheus_host, config.prometheus_port) == ("", 2112)
    assert config.host_regex is None
    assert config.backend_workers == 4
    assert config.frontend_workers == 1
    assert config.frontend_delay == 1.0
    assert config.topics == ()
    assert config.purge_max_age == 0


def test_help_lists_every_original_flag_with_a_single_dash() -> None:
    result = run_purged("-h")
    assert result.returncode == 0
    for flag in ORIGINAL_DEFAULTS:
        assert f"-{flag} " in result.stdout, flag


def test_version() -> None:
    result = run_purged("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"purged \d+\.\d+\.\d+\n", result.stdout)


# --- spellings ------------------------------------------------------------------------------

PRODUCTION_LINE = [
    "-backend_addr",
    "127.0.0.1:3128",
    "-frontend_addr",
    "/run/varnish-privileged.socket",
    "-prometheus_addr",
    ":2112",
    "-backend_workers",
    "48",
    "-frontend_workers",
    "4",
    "-host_regex",
    "[um][pa][lp][os]",
    "-mcast_addrs",
    "239.128.0.112,239.128.0.115",
    "-topics",
    "eqiad.resource-purge,codfw.resource-purge",
]


def test_production_command_line(kafka_conf: Path) -> None:
    config = parse_flags([*PRODUCTION_LINE, "-kafkaConfig", str(kafka_conf)])
    assert config.backend == Address(host="127.0.0.1", port=3128)
    assert config.frontend == Address(path="/run/varnish-privileged.socket")
    assert config.backend_workers == 48
    assert config.frontend_workers == 4
    assert config.host_regex is not None and config.host_regex.pattern == "[um][pa][lp][os]"
    assert config.mcast_groups == ("239.128.0.112", "239.128.0.115")
    assert config.topics == ("eqiad.resource-purge", "codfw.resource-purge")
    assert config.kafka["group.id"] == "cp1001"


@pytest.mark.parametrize(
    "argv",
    [
        ["-frontend_delay", "250", "-purgeMaxAge", "60", "-backend_workers", "8"],
        ["-frontend_delay=250", "-purgeMaxAge=60", "-backend_workers=8"],
        ["--frontend_delay", "250", "--purgeMaxAge", "60", "--backend_workers", "8"],
        ["--frontend_delay=250", "--purgeMaxAge=60", "--backend_workers=8"],
    ],
    ids=["-flag value", "-flag=value", "--flag value", "--flag=value"],
)
def test_flag_spellings_are_all_accepted(argv: list[str]) -> None:
    config = parse_flags([*MCAST, *argv])
    assert config.frontend_delay == 0.25
    assert config.purge_max_age == 60
    assert config.backend_workers == 8


def test_frontend_delay_is_milliseconds() -> None:
    assert parse_flags([*MCAST, "-frontend_delay", "0"]).frontend_delay == 0.0
    assert parse_flags([*MCAST, "-frontend_delay", "1500"]).frontend_delay == 1.5


def test_topics_are_comma_separated_and_trimmed(kafka_conf: Path) -> None:
    config = parse_flags(["-topics", " a, b,,c ", "-kafkaConfig", str(kafka_conf)])
    assert config.topics == ("a", "b", "c")


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("127.0.0.1:3128", Address(host="127.0.0.1", port=3128)),
        ("localhost:80", Address(host="localhost", port=80)),
        ("[::1]:6081", Address(host="::1", port=6081)),
        ("/run/varnish-privileged.socket", Address(path="/run/varnish-privileged.socket")),
    ],
)
def test_cache_addresses(value: str, address: Address) -> None:
    config = parse_flags([*MCAST, "-backend_addr", value, "-frontend_addr", value])
    assert config.backend == address
    assert config.frontend == address


def test_prometheus_addr_with_a_host() -> None:
    config = parse_flags([*MCAST, "-prometheus_addr", "127.0.0.1:9100"])
    assert (config.prometheus_host, config.prometheus_port) == ("127.0.0.1", 9100)


def test_host_regex_is_an_unanchored_search() -> None:
    regex = parse_flags([*MCAST, "-host_regex", "[um][pa][lp][os]"]).host_regex
    assert regex is not None
    assert regex.search("upload.wikimedia.org")
    assert regex.search("maps.wikimedia.org")
    assert not regex.search("en.wikipedia.org")


# --- the Kafka config file ----------------------------------------------------------------


def test_kafka_config_keeps_librdkafka_properties_with_their_json_types(kafka_conf: Path) -> None:
    config = parse_flags(["-topics", "t", "-kafkaConfig", str(kafka_conf)])
    assert config.kafka == {
        "bootstrap.servers": "127.0.0.1:9092",
        "client.id": "purged",
        "group.id": "cp1001",
        "statistics.interval.ms": 60000,
        "enable.partition.eof": False,
    }


def test_go_client_keys_are_ignored_with_one_log_line(
    kafka_conf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="purged"):
        config = parse_flags(["-topics", "t", "-kafkaConfig", str(kafka_conf)])
    assert "go.events.channel.enable" not in config.kafka
    lines = [r.getMessage() for r in caplog.records if "go.events.channel.enable" in r.getMessage()]
    assert len(lines) == 1


def test_kafka_config_is_not_read_without_topics() -> None:
    config = parse_flags([*MCAST, "-kafkaConfig", "/nonexistent/purgedkafka.conf"])
    assert config.kafka == {}


def test_kafka_config_without_group_id_uses_the_host_name(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"bootstrap.servers": "127.0.0.1:9092"})
    config = parse_flags(["-topics", "t", "-kafkaConfig", path])
    assert config.kafka["group.id"] == socket.gethostname()


# --- refusals: one clear message and exit status 2 ------------------------------------------


def test_unknown_flag_is_refused() -> None:
    assert "-no_such_flag" in refusal([*MCAST, "-no_such_flag", "1"])


def test_abbreviated_flag_is_refused() -> None:
    assert "-backend" in refusal([*MCAST, "-backend", "127.0.0.1:1"])


def test_flag_without_its_value_is_refused() -> None:
    assert "-frontend_delay" in refusal([*MCAST, "-frontend_delay"])


def test_positional_argument_is_refused() -> None:
    assert "stray" in refusal([*MCAST, "stray"])


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("-backend_workers", "four"),
        ("-backend_workers", "0"),
        ("-frontend_workers", "1.5"),
        ("-frontend_delay", "-1"),
        ("-frontend_delay", "1s"),
        ("-purgeMaxAge", "forever"),
        ("-purgeMaxAge", "-5"),
        ("-mcast_bufsize", "16M"),
    ],
)
def test_bad_number_is_refused_naming_the_flag(flag: str, value: str) -> None:
    message = refusal([*MCAST, flag, value])
    assert flag in message
    assert value.lstrip("-") in message


@pytest.mark.parametrize("regex", ["(", "[um", "*upload", "a{2,1}"])
def test_invalid_regex_is_refused(regex: str) -> None:
    message = refusal([*MCAST, "-host_regex", regex])
    assert "-host_regex" in message
    assert "regular expression" in message


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("-backend_addr", "nohostport"),
        ("-backend_addr", "127.0.0.1:"),
        ("-backend_addr", "127.0.0.1:http"),
        ("-backend_addr", "127.0.0.1:70000"),
        ("-backend_addr", ":3128"),
        ("-frontend_addr", "::1:80"),
        ("-frontend_addr", "[not-v6]:80"),
        ("-frontend_addr", "relative/varnish.socket"),
        ("-prometheus_addr", "2112"),
        ("-prometheus_addr", "127.0.0.1:0"),
    ],
)
def test_bad_address_is_refused_naming_the_flag(flag: str, value: str) -> None:
    message = refusal([*MCAST, flag, value])
    assert flag in message


@pytest.mark.parametrize("groups", ["10.0.0.1", "239.128.0.300", "not-a-group"])
def test_bad_multicast_group_is_refused(groups: str) -> None:
    assert "-mcast_addrs" in refusal(["-mcast_addrs", groups])


def test_missing_kafka_config_is_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    message = refusal(["-topics", "t", "-kafkaConfig", missing])
    assert "-kafkaConfig" in message
    assert missing in message


@pytest.mark.parametrize(
    "content",
    ["", "{", "bootstrap.servers=127.0.0.1:9092", '{"bootstrap.servers": "a",}'],
    ids=["empty", "truncated", "properties-format", "trailing-comma"],
)
def test_kafka_config_that_is_not_json_is_refused(tmp_path: Path, content: str) -> None:
    message = refusal(["-topics", "t", "-kafkaConfig", write_json(tmp_path, content)])
    assert "-kafkaConfig" in message
    assert "JSON" in message


@pytest.mark.parametrize("content", [[], ["bootstrap.servers"], "127.0.0.1:9092", 1, None])
def test_kafka_config_that_is_not_an_object_is_refused(tmp_path: Path, content: Any) -> None:
    message = refusal(["-topics", "t", "-kafkaConfig", write_json(tmp_path, json.dumps(content))])
    assert "-kafkaConfig" in message
    assert "object" in message


def test_kafka_config_with_a_nested_value_is_refused(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"bootstrap.servers": "a:1", "sasl": {"user": "x"}})
    message = refusal(["-topics", "t", "-kafkaConfig", path])
    assert "'sasl'" in message


def test_kafka_config_without_bootstrap_servers_is_refused(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"group.id": "g"})
    assert "bootstrap.servers" in refusal(["-topics", "t", "-kafkaConfig", path])


def test_neither_topics_nor_mcast_addrs_is_refused() -> None:
    message = refusal([])
    assert "-topics" in message
    assert "-mcast_addrs" in message


def test_empty_topics_and_mcast_addrs_count_as_not_given() -> None:
    assert "-topics" in refusal(["-topics", " , ", "-mcast_addrs", ""])


# --- the same refusals through the real command ------------------------------------------

REFUSED_COMMAND_LINES = {
    "unknown flag": (["-topics", "t", "-no_such_flag", "1"], "-no_such_flag"),
    "bad number": (["-topics", "t", "-frontend_delay", "soon"], "-frontend_delay"),
    "invalid regex": (["-topics", "t", "-host_regex", "(upload"], "-host_regex"),
    "bad address": (["-topics", "t", "-backend_addr", "localhost"], "-backend_addr"),
    "missing kafka config": (["-topics", "t", "-kafkaConfig", "/nonexistent.conf"], "-kafkaConfig"),
    "neither source": ([], "-topics"),
}


@pytest.mark.parametrize(
    ("argv", "named"), REFUSED_COMMAND_LINES.values(), ids=REFUSED_COMMAND_LINES.keys()
)
def test_command_refuses_with_exit_2_and_one_clear_message(argv: list[str], named: str) -> None:
    result = run_purged(*argv)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    # The problem, naming the flag; then a pointer to -h. No traceback, no usage dump.
    assert named in lines[0]
    assert lines[0].startswith("purged: ")
    assert len(lines) <= 2, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("not json", "JSON"),
        ("[1, 2]", "object"),
        ('{"group.id": "g"}', "bootstrap.servers"),
    ],
    ids=["invalid", "not-an-object", "no-bootstrap"],
)
def test_command_refuses_a_bad_kafka_config_with_exit_2(
    tmp_path: Path, content: str, named: str
) -> None:
    result = run_purged("-topics", "t", "-kafkaConfig", write_json(tmp_path, content))
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("properties", "named"),
    [
        ({"no.such.property": 1}, "no.such.property"),
        ({"session.timeout.ms": "soon"}, "session.timeout.ms"),
    ],
    ids=["unknown-property", "bad-value"],
)
def test_command_refuses_a_property_librdkafka_rejects_with_exit_2(
    tmp_path: Path, properties: dict[str, Any], named: str
) -> None:
    path = write_json(tmp_path, {"bootstrap.servers": "127.0.0.1:1", "group.id": "g", **properties})
    metrics = f"127.0.0.1:{free_port()}"
    result = run_purged("-topics", "t", "-kafkaConfig", path, "-prometheus_addr", metrics)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr
