"""The Grafana dashboard and the Prometheus rules in deploy/: every metric and label their PromQL names is
exposed by a running processor and trainer (a panel on a metric that does not exist stays empty, and a
rule on one never fires), the rules pass ``promtool check rules`` where it is installed, and compose
provisions both."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fabwatch.stream.kafka.topics import ensure_topics
from onnx_fixtures import make_registry, readings
from stream_helpers import REPO, log_has, produce, read_all, serve_env, start_serve, stop, wait_for

DASHBOARD = REPO / "deploy" / "grafana" / "fabwatch.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
RULES = REPO / "deploy" / "prometheus" / "rules.yaml"
DOCKER = REPO / "deploy" / "docker"
# written by Prometheus itself for every target, not by an exporter
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"job", "instance"}
# Grafana's own interval variables stand where PromQL takes a duration
GRAFANA_INTERVAL = re.compile(r"\$__(rate_interval|interval|range)\b")
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",), "unknown": ("",)}


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target and every rule."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
             for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    return found + [(f"rule {r['alert']}", r["expr"]) for r in _rules()]


def _parse(expr: str) -> promql_parser.Expr:
    return promql_parser.parse(GRAFANA_INTERVAL.sub("5m", expr))


def _selectors(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []
    promql_parser.walk(expr, lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None)
    return found


def _grouping_labels(expr: promql_parser.Expr) -> list[tuple[set[str], list[str]]]:
    """(metric names aggregated, labels named in ``by (...)``) of every aggregation."""
    found: list[tuple[set[str], list[str]]] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None \
                and node.modifier.type == promql_parser.AggModifierType.By:
            found.append(({s.name for s in _selectors(node.expr)}, list(node.modifier.labels)))

    promql_parser.walk(expr, visit)
    return found


def _exposed(text: str) -> dict[str, set[str] | None]:
    """Sample name -> label names seen on it, for every series an exposition declares (a labelled family
    with no child yet has no samples: its names come from its type, its labels stay unknown: None)."""
    exposed: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SAMPLE_SUFFIXES[family.type]:
            exposed.setdefault(family.name + suffix, None)
        for sample in family.samples:
            exposed[sample.name] = (exposed.get(sample.name) or set()) | set(sample.labels)
    return exposed


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unknown_names(exposed: dict[str, set[str] | None]) -> list[str]:
    """What the dashboard and rules name that ``exposed`` lacks: metrics, and labels of metrics with samples."""
    problems = []
    for where, expr in _expressions():
        tree = _parse(expr)
        for sel in _selectors(tree):
            if sel.name in PROMETHEUS_SERIES:
                continue
            if sel.name not in exposed:
                problems.append(f"{where}: no metric {sel.name}")
                continue
            labels = exposed[sel.name]
            problems += [f"{where}: {sel.name} has no label {m.name}" for m in sel.matchers.matchers
                         if labels is not None and m.name not in labels | TARGET_LABELS]
        for names, by in _grouping_labels(tree):
            label_sets = [exposed.get(n) for n in names - PROMETHEUS_SERIES]
            if all(labels is not None for labels in label_sets):  # every one was seen with its labels
                known = set().union(*label_sets) | TARGET_LABELS
                problems += [f"{where}: no label {label} on {sorted(names)}" for label in by if label not in known]
    return problems


def test_every_expression_parses_and_names_metrics():
    expressions = _expressions()
    assert len(expressions) >= 20
    for where, expr in expressions:
        assert _selectors(_parse(expr)), where  # _parse raises on a syntax error


def test_the_check_catches_a_metric_or_label_that_does_not_exist():
    exposed: dict[str, set[str] | None] = {"fabwatch_alerts_total": {"kind", "state"}}
    assert _unknown_names(exposed)  # almost everything is missing here
    problems = "\n".join(_unknown_names(exposed))
    assert "no metric fabwatch_consumer_lag" in problems
    assert "no label severity on ['fabwatch_alerts_total']" in problems


@pytest.mark.integration
def test_dashboard_and_rules_name_only_what_a_running_processor_and_trainer_expose(settings, tmp_path: Path):
    ensure_topics(settings, settings.topics.all(), partitions=2)
    registry = tmp_path / "registry"
    make_registry(registry)
    entities = [f"OHT-{i:03d}" for i in range(4)]
    # a spike opens an alert (kind and severity labels), a broken message makes a dead letter (reason)
    produce(settings, settings.topics.sensors, readings(entities, 150, seed=3, spikes={"OHT-002": [120, 121]}))
    produce(settings, settings.topics.sensors, [b"{not json"], keys=[b"OHT-000"])
    log = tmp_path / "serve.log"
    started = time.time()
    proc = start_serve(settings, registry, "--metrics-port", "0", log_path=log)
    trainer_port = _free_port()
    with (tmp_path / "trainer.log").open("wb") as trainer_log:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "fabwatch.stream.cli.main", "trainer", "--registry", str(registry),
             "--store", str(tmp_path / "store"), "--every", "6h", "--metrics-port", str(trainer_port)],
            cwd=REPO, env=serve_env(settings), stdout=trainer_log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log_has(log, "metrics on port"), 60, what="the processor's metrics server")
        port = int(re.search(r"metrics on port (\d+)", log.read_text()).group(1))
        read_all(settings, settings.topics.alerts, expect=1, timeout_s=90)
        read_all(settings, settings.topics.dlq, expect=1, timeout_s=60)

        def scraped() -> str | None:
            try:
                return _get(f"http://127.0.0.1:{port}/metrics") + _get(f"http://127.0.0.1:{trainer_port}/metrics")
            except OSError:
                return None

        def complete(text: str | None) -> bool:
            """The counters behind the alert and the dead letter count once their batch is produced, the lag
            with the first housekeeping after the assignment, the trainer's schedule after its first ingest."""
            if text is None:
                return False
            e = _exposed(text)
            return all(e[name] is not None for name in ("fabwatch_alerts_total", "fabwatch_dlq_total",
                                                        "fabwatch_consumer_lag")) \
                and _samples(text)["fabwatch_trainer_next_retrain_timestamp_seconds", ()] > 0

        wait_for(lambda: complete(scraped()), 90, what="alerts, dead letters, lag and the trainer's schedule")
        text = scraped()
    finally:
        trainer.terminate()
        trainer.wait(60)
        assert stop(proc) == 0
    assert text is not None
    problems = _unknown_names(_exposed(text))
    assert not problems, "\n".join(problems)
    values = _samples(text)
    assert values["fabwatch_ready", ()] == 1.0
    assert started <= values["fabwatch_model_loaded_timestamp_seconds", ()] <= time.time()
    assert started + 6 * 3600 <= values["fabwatch_trainer_next_retrain_timestamp_seconds", ()] <= time.time() + 6 * 3600
    # every decision's series exists from the start, at 0, so that increase() over it sees the first one
    assert {d: values["fabwatch_trainer_decisions_total", (("decision", d),)] for d in ("promoted", "rejected", "skipped")} \
        == {"promoted": 0.0, "rejected": 0.0, "skipped": 0.0}


@pytest.mark.integration
def test_a_partition_handed_to_another_instance_leaves_the_lag_gauge(settings, tmp_path: Path):
    """The dashboard and FabwatchConsumerLagGrowing sum the lag over instances: a partition must be reported by
    its owner only."""
    ensure_topics(settings, settings.topics.all(), partitions=2)
    registry = tmp_path / "registry"
    make_registry(registry)
    produce(settings, settings.topics.sensors, readings([f"OHT-{i:03d}" for i in range(4)], 20, seed=4))
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [start_serve(settings, registry, "--metrics-port", "0", "--group", "lag-owners", log_path=logs[0])]

    def lag_partitions(log: Path) -> set[str]:
        port = int(re.search(r"metrics on port (\d+)", log.read_text()).group(1))
        values = _samples(_get(f"http://127.0.0.1:{port}/metrics"))
        return {dict(labels)["partition"] for name, labels in values if name == "fabwatch_consumer_lag"}

    try:
        wait_for(lambda: log_has(logs[0], "metrics on port") and lag_partitions(logs[0]) == {"0", "1"}, 90,
                 what="the first instance reporting the lag of both partitions")
        procs.append(start_serve(settings, registry, "--metrics-port", "0", "--group", "lag-owners", log_path=logs[1]))
        wait_for(lambda: log_has(logs[1], "metrics on port") and len(lag_partitions(logs[1])) == 1, 90,
                 what="the second instance reporting the lag of the partition it was given")
        wait_for(lambda: lag_partitions(logs[0]) == {"0", "1"} - lag_partitions(logs[1]), 30,
                 what="the first instance reporting only the partition it kept")
    finally:
        assert [stop(p) for p in procs] == [0] * len(procs)


def test_rules_are_well_formed():
    rules = _rules()
    assert {r["alert"] for r in rules} >= {"FabwatchConsumerLagGrowing", "FabwatchDeadLetterRate",
                                           "FabwatchProcessorNotReady", "FabwatchNoScoring",
                                           "FabwatchModelNotReloaded", "FabwatchRetrainFailing",
                                           "FabwatchRetrainOverdue"}
    for rule in rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not on PATH (Prometheus' release archives ship it)")
@pytest.mark.parametrize("command", [["check", "rules", str(RULES)],
                                     ["test", "rules", str(RULES.with_name("rules.test.yaml"))]])
def test_promtool_checks_and_unit_tests_the_rules(command: list[str]):
    proc = subprocess.run(["promtool", *command], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_panels_query_the_provisioned_datasource():
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(dashboard["panels"])}) == len(list(_panels(dashboard["panels"])))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        assert all(t["expr"].strip() and t.get("datasource", p["datasource"]) == p["datasource"] for t in p["targets"])
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_compose_provisions_the_dashboard_and_loads_the_rules():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]

    def mounts(service: str) -> dict[Path, str]:
        """Host path (resolved from the compose file's folder) -> path in the container."""
        out = {}
        for volume in services[service]["volumes"]:
            host, container = volume.split(":")[:2]
            out[(DOCKER / host).resolve()] = container
        return out

    grafana = mounts("grafana")
    assert grafana[PROVISIONING.resolve()] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "fabwatch.yaml").read_text())["providers"]
    assert Path(grafana[DASHBOARD.resolve()]).parent == Path(provider["options"]["path"])
    prometheus = mounts("prometheus")
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert config["rule_files"] == [prometheus[RULES.resolve()]]
    assert prometheus[(DOCKER / "prometheus.yml").resolve()] == "/etc/prometheus/prometheus.yml"
