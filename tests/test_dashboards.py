"""The Grafana dashboard and the Prometheus alerting rules in deploy/.

Every metric they name must be one a running daemon exports, the rules must pass
`promtool check rules`, and the lag and backlog alerts must fire at production's thresholds
(`promtool test rules` with synthetic series).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from purged.htcp import encode_clr
from tests.support.broker import Broker, make_event
from tests.support.mcast import send_htcp
from tests.support.purged_proc import daemon_args
from tests.support.recorder import Recorder
from tests.support.tool_run import running_daemon

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "purged.json"
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
requires_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (./dev setup installs Debian's prometheus)"
)

# --- reading the files -----------------------------------------------------------------

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)
_TOKEN = re.compile(r"(?P<number>\d[\w.]*)|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables
    names = set()
    for match in _TOKEN.finditer(text):
        name = match.group("name")
        if name is None or name.lower() in _KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function
        names.add(name)
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        label_values = re.match(r"label_values\((\w+)", str(query or ""))
        if label_values:
            exprs.append(label_values.group(1))
    return exprs


def rules() -> list[dict[str, Any]]:
    """The alerting rules: alert, expr, for and labels of each.

    A line reader for this one file (PyYAML is not a dependency; promtool checks the YAML
    itself): every rule starts with `- alert:`, and its `expr:` is on one line.
    """
    found: list[dict[str, Any]] = []
    for line in RULES.read_text().splitlines():
        key, _, value = line.strip().removeprefix("- ").partition(": ")
        value = value.strip().strip("'\"")
        if key == "alert":
            found.append({"alert": value, "labels": {}})
        elif found and key in ("expr", "for"):
            found[-1][key] = value
        elif found and key == "severity":
            found[-1]["labels"]["severity"] = value
    assert all(rule.get("expr") not in (None, "", ">-", "|") for rule in found)
    return found


def rule(name: str) -> dict[str, Any]:
    [found] = [r for r in rules() if r.get("alert") == name]
    return found


# --- what the daemon exports -----------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def exported_names(text: str) -> set[str]:
    """Names a query can use: every sample's, and `<name>_total` of counters with none yet."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


@pytest.fixture(scope="module")
def daemon_metrics(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a daemon after Kafka and HTCP traffic, with librdkafka statistics on."""
    tmp = tmp_path_factory.mktemp("dashboards")
    topic = f"dashboards-{time.monotonic_ns()}"
    broker.create_topic(topic)
    config = broker.write_kafka_config(
        tmp / "kafka.json", f"{topic}-group", statistics_interval_ms=500
    )
    group, port = "239.128.0.125", free_udp_port()
    with Recorder() as backend, Recorder() as frontend:
        args = daemon_args(
            topics=[topic],
            kafka_config=config,
            backend=backend.address,
            frontend=frontend.address,
            extra=["-mcast_addrs", group, "-mcast_port", str(port), "-mcast_iface", "127.0.0.1"],
        )
        with running_daemon(args, tmp / "purged.log") as daemon:
            broker.produce(topic, [make_event(f"https://a.org/{i}") for i in range(6)])
            send_htcp([encode_clr("https://a.org/htcp")], group, port)
            daemon.wait_metric("purged_http_requests_total", lambda v: v >= 7, 20, layer="frontend")
            url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
            deadline = time.monotonic() + 20
            while True:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
                if "rdkafka_consumer_brokers_rtt_avg" in text and "consumer_lag{" in text:
                    break
                assert time.monotonic() < deadline, "no librdkafka statistics in /metrics"
                time.sleep(0.2)
            yield text


# --- tests -----------------------------------------------------------------------------


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (instance, topic) (rate(purged_events_received_total{status="ok",'
        'instance=~"$instance"}[$__rate_interval])) / 1e6 > 0.5 and on (instance) up'
    )
    assert metric_names(expr) == {"purged_events_received_total", "up"}


def test_every_metric_of_the_dashboard_is_exported(daemon_metrics: str) -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert {"purged_event_lag", "purged_backlog", "purged_http_requests_total"} <= used
    assert sorted(used - exported_names(daemon_metrics)) == []


def test_every_metric_of_the_alert_rules_is_exported(daemon_metrics: str) -> None:
    used = set().union(*(metric_names(r["expr"]) for r in rules()))
    assert {"purged_event_lag", "purged_backlog"} <= used
    assert sorted(used - exported_names(daemon_metrics)) == []


@requires_promtool
def test_alert_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_lag_and_backlog_alerts_use_the_production_expressions() -> None:
    def normal(expr: str) -> str:
        return re.sub(r"\s+", "", expr)

    assert (
        normal(rule("PurgedEventLagHigh")["expr"]) == "minby(instance)(purged_event_lag)/1e6>3000"
    )
    assert normal(rule("PurgedEventLagCritical")["expr"]) == (
        "minby(instance)(purged_event_lag)/1e6>5000"
    )
    assert normal(rule("PurgedBacklogHigh")["expr"]) == "sumby(instance)(purged_backlog)>1000"
    assert normal(rule("PurgedBacklogCritical")["expr"]) == "sumby(instance)(purged_backlog)>10000"
    for name in ("PurgedEventLagHigh", "PurgedEventLagCritical"):
        assert rule(name)["for"] == "5m"
    assert rule("PurgedEventLagHigh")["labels"]["severity"] == "warning"
    assert rule("PurgedEventLagCritical")["labels"]["severity"] == "critical"


def without_annotations(text: str) -> str:
    """The rules file with every `annotations:` block left out."""
    out, skip_deeper_than = [], -1
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than >= 0 and (not line.strip() or indent > skip_deeper_than):
            continue
        skip_deeper_than = indent if line.strip() == "annotations:" else -1
        if skip_deeper_than < 0:
            out.append(line)
    return "\n".join(out) + "\n"


@requires_promtool
def test_alerts_fire_at_the_production_thresholds(tmp_path: Path) -> None:
    # Host a: lag 4 s on its busy topic (the idle topic's lag is larger and must not
    # count: the minimum across topics is the host's lag) and a backlog of 1,500.
    # Host b: lag 6 s, backlog 20,000. Lag values are in nanoseconds.
    # promtool compares annotations too: test the rules without their prose.
    rules_file = tmp_path / "alerts.yml"
    rules_file.write_text(without_annotations(RULES.read_text()))
    tests = textwrap.dedent(
        f"""\
        rule_files: [{rules_file}]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'purged_event_lag{{instance="a",topic="eqiad"}}'
                values: '4e9x10'
              - series: 'purged_event_lag{{instance="a",topic="codfw"}}'
                values: '9e12x10'
              - series: 'purged_event_lag{{instance="b",topic="eqiad"}}'
                values: '6e9x10'
              - series: 'purged_backlog{{instance="a",layer="backend"}}'
                values: '1000x10'
              - series: 'purged_backlog{{instance="a",layer="frontend"}}'
                values: '500x10'
              - series: 'purged_backlog{{instance="b",layer="backend"}}'
                values: '20000x10'
            alert_rule_test:
              - eval_time: 4m
                alertname: PurgedEventLagHigh
                exp_alerts: []
              - eval_time: 6m
                alertname: PurgedEventLagHigh
                exp_alerts:
                  - exp_labels: {{severity: warning, instance: a}}
                  - exp_labels: {{severity: warning, instance: b}}
              - eval_time: 6m
                alertname: PurgedEventLagCritical
                exp_alerts:
                  - exp_labels: {{severity: critical, instance: b}}
              - eval_time: 6m
                alertname: PurgedBacklogHigh
                exp_alerts:
                  - exp_labels: {{severity: warning, instance: a}}
                  - exp_labels: {{severity: warning, instance: b}}
              - eval_time: 6m
                alertname: PurgedBacklogCritical
                exp_alerts:
                  - exp_labels: {{severity: critical, instance: b}}
        """
    )
    path = tmp_path / "alerts_test.yml"
    path.write_text(tests)
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_panels_cover_lag_backlog_purges_errors_and_consumer_lag() -> None:
    titles = {p["title"]: p for p in dashboard_panels() if p["type"] != "row"}
    exprs_by_metric: dict[str, list[str]] = {}
    for panel in titles.values():
        for target in panel["targets"]:
            for name in metric_names(target["expr"]):
                exprs_by_metric.setdefault(name, []).append(target["expr"])
    for metric in (
        "purged_event_lag",
        "purged_backlog",
        "purged_http_requests_total",
        "purged_events_received_total",
        "purged_tcp_errors_total",
        "purged_kafka_errors_total",
        "rdkafka_consumer_topics_partitions_consumer_lag",
    ):
        assert metric in exprs_by_metric, metric
    assert any("by (layer, status)" in e for e in exprs_by_metric["purged_http_requests_total"])
    # The lag panels show ms, with the alerts' thresholds drawn.
    lag = titles["Event lag per topic"]
    assert lag["fieldConfig"]["defaults"]["unit"] == "ms"
    steps = lag["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 3000, 5000]
    backlog = titles["Backlog (purges waiting, both layers)"]
    steps = backlog["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 1000, 10000]


def test_dashboard_is_well_formed() -> None:
    data = dashboard()
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs))
    assert data["uid"] == "purged"
    assert {v["name"] for v in data["templating"]["list"]} == {"datasource", "instance"}


def test_operations_doc_quotes_the_cache_settings_the_tests_use() -> None:
    doc = (REPO / "README.md").read_text()
    for snippet in (
        "deploy/varnish/purge.vcl",
        "deploy/trafficserver/records.config.snippet",
        "deploy/trafficserver/ip_allow.yaml",
        "deploy/trafficserver/remap.config",
    ):
        assert (REPO / snippet).read_text().strip() in doc, snippet


def test_operations_doc_lists_the_alerts_of_the_rules_file() -> None:
    doc = (REPO / "README.md").read_text()
    for found in rules():
        assert f"| {found['alert']} |" in doc, found["alert"]
