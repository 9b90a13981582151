"""The monitoring component (k8s/components/monitoring) against the guard it watches.

Every PromQL expression of the PrometheusRule and of the Grafana dashboard must name only
series that a real ``extauthz serve`` exposes on ``/metrics``; a renamed metric in
``extauthz/telemetry/metrics.py`` then fails here instead of leaving a silent alert or an empty
panel. The component is also rendered with the real ``k8s/base`` to check that its
ServiceMonitor finds the guard's Service and port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc

from extauthz.demo import stack

REPO = Path(__file__).resolve().parents[2]
COMPONENT = REPO / "k8s" / "components" / "monitoring"
BASE = REPO / "k8s" / "base"
RULES_FILE = COMPONENT / "prometheusrule.yaml"
DASHBOARD_FILE = COMPONENT / "dashboard.json"

# Alert name → a metric its expression must use (the brief each alert answers).
REQUIRED_ALERTS = {
    "ExtauthzExtractionSuspected": "extauthz_risk_level_changes_total",
    "ExtauthzClientsBlocked": "extauthz_decisions_total",
    "ExtauthzStoreErrors": "extauthz_errors_total",
    "ExtauthzDecisionLatencyHigh": "extauthz_decision_seconds_bucket",
    "ExtauthzNotReady": "extauthz_ready",
    "ExtauthzPolicyReloadErrors": "extauthz_policy_reload_errors_total",
}

# Words of PromQL that look like identifiers but are not metric names.
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*(?![\w:])")
_CALL_FOLLOWS = re.compile(r"\s*\(")
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)\s*$")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*$")
_LABEL_REFERENCE = re.compile(r"\$labels\.(\w+)")
_AGGREGATION = re.compile(r"\b(?:sum|avg|min|max|count|group|topk|bottomk|quantile)\b")

# The suffixes each metric type's series carry (text exposition 0.0.4, as prometheus_client
# writes it: a counter's TYPE line may or may not already end in _total).
_TYPE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
}


def promql_metric_names(expr: str) -> set[str]:
    """Return the metric names an expression selects.

    Strings (label values), label matchers, ranges, grouping clauses (label names) and Grafana
    variables are removed first; of the identifiers left, those followed by ``(`` are functions
    or aggregations and the rest, minus PromQL keywords, are metric names. ``{__name__=...}``
    selectors are refused: their names cannot be checked this way.
    """
    if "__name__" in expr:
        raise ValueError(f"selecting by __name__ is not checkable: {expr!r}")
    for opening, closing in ("()", "{}", "[]"):
        if expr.count(opening) != expr.count(closing):
            raise ValueError(f"unbalanced {opening}{closing} in {expr!r}")
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = _MATCHERS.sub("{}", text)
    text = _RANGES.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        if name.lower() in _KEYWORDS or _CALL_FOLLOWS.match(text, match.end()):
            continue
        names.add(name)
    return names


def exposed_series_names(exposition: str) -> set[str]:
    """Return every series name a scrape can hold, from the ``# TYPE`` lines of an exposition.

    The TYPE lines are read instead of the samples: a labelled metric that was never used
    has no sample yet but is declared, and Prometheus will have its series once it is used.
    """
    names: set[str] = set()
    for line in exposition.splitlines():
        match = _TYPE_LINE.match(line)
        if match is None:
            continue
        family, kind = match.groups()
        if kind == "counter":
            names.add(family if family.endswith("_total") else family + "_total")
        else:
            names.update(family + suffix for suffix in _TYPE_SUFFIXES.get(kind, ("",)))
    return names


def unknown_metrics(expressions: dict[str, str], exposed: set[str]) -> dict[str, set[str]]:
    """Map each expression's label to the names it uses that ``exposed`` lacks (empty: all good)."""
    missing: dict[str, set[str]] = {}
    for label, expr in expressions.items():
        unknown = promql_metric_names(expr) - exposed
        if unknown:
            missing[label] = unknown
    return missing


def load_rules() -> list[dict[str, Any]]:
    """Return the alerting and recording rules of the component's PrometheusRule."""
    document = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    assert document["kind"] == "PrometheusRule"
    return [rule for group in document["spec"]["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return document


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def rule_expressions() -> dict[str, str]:
    return {f"rule {rule.get('alert') or rule['record']}": rule["expr"] for rule in load_rules()}


def dashboard_expressions() -> dict[str, str]:
    """Return every PromQL query of the dashboard: panel targets and variable queries."""
    dashboard = load_dashboard()
    expressions: dict[str, str] = {}
    for panel in _walk_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expressions[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(text)
        expressions[f"variable {variable['name']}"] = match.group(1) if match else text
    return expressions


def _require_binary(name: str, hint: str) -> str:
    """Return the path of ``name``; missing fails under CI=true, else skips."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH ({hint})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _check_request() -> auth_pb2.CheckRequest:
    request = auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = "10.9.8.7"
    request.attributes.request.http.path = "/v1/models/m:predict"
    request.attributes.request.http.method = "POST"
    return request


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Run a real guard on free ports, send it one Check, and return its ``/metrics`` text."""
    grpc_port, http_port = stack.free_port(), stack.free_port()
    proc = stack.start_guard(
        policy=None,
        grpc_port=grpc_port,
        http_port=http_port,
        workdir=tmp_path_factory.mktemp("guard"),
        extra_args=["--drain-s", "0"],
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            answer = auth_grpc.AuthorizationStub(channel).Check(_check_request(), timeout=5)
        assert answer.status.code == 0
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
    finally:
        proc.stop()
    return text


class TestPromqlNames:
    """The name extractor finds metric names and nothing else, so the checks below mean something."""

    def test_skips_functions_labels_values_ranges_and_variables(self) -> None:
        expr = (
            'histogram_quantile(0.99, sum by (le, path) (rate(extauthz_decision_seconds_bucket{path=~"check|x", '
            'namespace="$namespace"}[$__rate_interval]))) > 0.05 '
            "or on (namespace) group_left extauthz_ready offset 5m == bool 1e3"
        )
        assert promql_metric_names(expr) == {"extauthz_decision_seconds_bucket", "extauthz_ready"}

    def test_finds_bare_names_around_operators(self) -> None:
        expr = "extauthz_ready==0 or(a_total/b_count)and c:recorded:rate5m"
        assert promql_metric_names(expr) == {
            "extauthz_ready",
            "a_total",
            "b_count",
            "c:recorded:rate5m",
        }

    def test_refuses_name_selectors_and_unbalanced_text(self) -> None:
        with pytest.raises(ValueError, match="__name__"):
            promql_metric_names('{__name__=~"extauthz_.*"}')
        with pytest.raises(ValueError, match="unbalanced"):
            promql_metric_names("sum(rate(extauthz_errors_total[5m])")


class TestExposedNames:
    """Series names come from TYPE lines with the suffixes of each type, not any suffix at all."""

    EXPOSITION = (
        "# HELP c_total Some counter.\n"
        "# TYPE c_total counter\n"
        "# TYPE d counter\n"
        "# TYPE h histogram\n"
        'h_bucket{le="+Inf"} 0.0\n'
        "# TYPE g gauge\n"
        "g 1.0\n"
    )

    def test_counters_histograms_and_gauges(self) -> None:
        assert exposed_series_names(self.EXPOSITION) == {
            "c_total",
            "d_total",
            "h_bucket",
            "h_sum",
            "h_count",
            "g",
        }

    def test_wrong_suffix_for_the_type_is_unknown(self) -> None:
        exposed = exposed_series_names(self.EXPOSITION)
        missing = unknown_metrics(
            {"counter as histogram": "rate(c_bucket[5m])", "bare counter": "rate(d[5m])"}, exposed
        )
        assert missing == {"counter as histogram": {"c_bucket"}, "bare counter": {"d"}}


class TestQueriesMatchTheGuard:
    """Every metric that an alert or a panel queries is exposed by a running guard."""

    def test_scrape_declares_the_labelled_families(self, scrape: str) -> None:
        exposed = exposed_series_names(scrape)
        # Labelled counters appear as TYPE lines before first use; the Check made one sample.
        assert {"extauthz_decisions_total", "extauthz_detections_total"} <= exposed
        assert re.search(r'^extauthz_decisions_total\{[^}]*path="check"', scrape, re.MULTILINE)

    def test_alert_expressions_use_exposed_metrics(self, scrape: str) -> None:
        assert unknown_metrics(rule_expressions(), exposed_series_names(scrape)) == {}

    def test_dashboard_queries_use_exposed_metrics(self, scrape: str) -> None:
        expressions = dashboard_expressions()
        assert len(expressions) >= 20
        assert unknown_metrics(expressions, exposed_series_names(scrape)) == {}

    def test_a_made_up_metric_is_reported(self, scrape: str) -> None:
        exposed = exposed_series_names(scrape)
        fake = {
            "panel 'fake' A": "sum by (tier) (rate(extauthz_made_up_total[$__rate_interval]))",
            "panel 'fake' B": "rate(extauthz_decisions[5m])",  # the family, not the series
            "panel 'fake' C": "histogram_quantile(0.5, rate(extauthz_decisions_bucket[5m]))",
        }
        assert unknown_metrics({**dashboard_expressions(), **fake}, exposed) == {
            "panel 'fake' A": {"extauthz_made_up_total"},
            "panel 'fake' B": {"extauthz_decisions"},
            "panel 'fake' C": {"extauthz_decisions_bucket"},
        }


class TestRules:
    """Each alert the runbook relies on exists, waits, is graded and explains itself."""

    def test_required_alerts_query_their_metrics(self) -> None:
        rules = {rule["alert"]: rule for rule in load_rules() if "alert" in rule}
        for alert, metric in REQUIRED_ALERTS.items():
            assert alert in rules, f"missing alert {alert}"
            assert metric in promql_metric_names(rules[alert]["expr"]), alert

    def test_specific_selectors(self) -> None:
        rules = {rule["alert"]: rule["expr"] for rule in load_rules() if "alert" in rule}
        assert 'level=~"suspicious' in rules["ExtauthzExtractionSuspected"]
        assert 'action="block"' in rules["ExtauthzClientsBlocked"]
        assert 'reason=~"store.*"' in rules["ExtauthzStoreErrors"]
        assert "histogram_quantile(" in rules["ExtauthzDecisionLatencyHigh"]
        assert "0.99" in rules["ExtauthzDecisionLatencyHigh"]
        assert "> 0.05" in rules["ExtauthzDecisionLatencyHigh"]  # the 50 ms budget, in seconds
        assert re.search(r"extauthz_ready\s*==\s*0", rules["ExtauthzNotReady"])

    def test_every_alert_has_for_severity_and_text(self) -> None:
        for rule in load_rules():
            assert "alert" in rule, "only alerting rules are expected here"
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert rule["annotations"]["summary"].strip(), rule["alert"]
            assert rule["annotations"]["description"].strip(), rule["alert"]

    def test_annotations_only_use_labels_the_expression_keeps(self) -> None:
        for rule in load_rules():
            expr = rule["expr"]
            if not _AGGREGATION.search(expr):
                continue  # raw series keep all their labels
            kept = {
                label.strip()
                for clause in re.findall(r"\bby\s*\(([^()]*)\)", expr)
                for label in clause.split(",")
            }
            text = " ".join(rule["annotations"].values())
            used = set(_LABEL_REFERENCE.findall(text))
            assert used <= kept, f"{rule['alert']}: {used - kept} dropped by the aggregation"


# Grafana's variables, replaced by values Prometheus accepts, so promtool can parse the queries.
_GRAFANA_SUBSTITUTES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": "extauthz",
    "$pod": ".*",
}

# Alert scenarios for ``promtool test rules``: input series, then when each alert must (not) fire.
# Annotations are stripped from the rules under test (promtool compares them verbatim); their
# templates are still checked by ``promtool check rules``.
_NS = 'namespace="extauthz"'
_SCENARIOS: list[dict[str, Any]] = [
    {
        "interval": "1m",
        "input_series": [
            {"series": f'extauthz_ready{{{_NS}, pod="stuck"}}', "values": "0x15"},
            {"series": f'extauthz_ready{{{_NS}, pod="fine"}}', "values": "1x15"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "ExtauthzNotReady", "exp_alerts": []},
            {
                "eval_time": "6m",
                "alertname": "ExtauthzNotReady",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "extauthz", "pod": "stuck"}}
                ],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            # 0.5 store errors/s; body parse errors must not count as store errors.
            {
                "series": f'extauthz_errors_total{{{_NS}, pod="a", reason="store_unavailable"}}',
                "values": "0+30x20",
            },
            {
                "series": f'extauthz_errors_total{{{_NS}, pod="b", reason="body_parse_error"}}',
                "values": "0+600x20",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "ExtauthzStoreErrors", "exp_alerts": []},
            {
                "eval_time": "12m",
                "alertname": "ExtauthzStoreErrors",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": "extauthz"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            # path=check: 90 % of decisions above 50 ms; path=ext_proc_request_body: all fast.
            *(
                {
                    "series": f'extauthz_decision_seconds_bucket{{{_NS}, pod="a", path="check", le="{le}"}}',
                    "values": values,
                }
                for le, values in (("0.05", "0+6x30"), ("0.1", "0+60x30"), ("+Inf", "0+60x30"))
            ),
            *(
                {
                    "series": f'extauthz_decision_seconds_bucket{{{_NS}, pod="a", path="ext_proc_request_body", le="{le}"}}',
                    "values": "0+60x30",
                }
                for le in ("0.01", "0.05", "+Inf")
            ),
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "ExtauthzDecisionLatencyHigh", "exp_alerts": []},
            {
                "eval_time": "20m",
                "alertname": "ExtauthzDecisionLatencyHigh",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "extauthz",
                            "path": "check",
                        }
                    }
                ],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {
                "series": f'extauthz_decisions_total{{{_NS}, pod="a", path="check", action="block", tier="free", reason="deny_list"}}',
                "values": "0+60x30",
            },
            {
                "series": f'extauthz_decisions_total{{{_NS}, pod="a", path="check", action="allow", tier="free", reason="none"}}',
                "values": "0+6000x30",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "ExtauthzClientsBlocked", "exp_alerts": []},
            {
                "eval_time": "20m",
                "alertname": "ExtauthzClientsBlocked",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "extauthz"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            # One client turns suspicious at minute 3; a return to normal is not an alarm.
            {
                "series": f'extauthz_risk_level_changes_total{{{_NS}, pod="a", level="suspicious"}}',
                "values": "0 0 0 1 1 1 1 1 1 1",
            },
            {
                "series": f'extauthz_risk_level_changes_total{{{_NS}, pod="a", level="normal"}}',
                "values": "0+5x9",
            },
            {
                "series": f'extauthz_detections_total{{{_NS}, pod="a", detector="prada", reason="prada_non_normal"}}',
                "values": "0x9",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "ExtauthzExtractionSuspected", "exp_alerts": []},
            {
                "eval_time": "6m",
                "alertname": "ExtauthzExtractionSuspected",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "extauthz"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {
                "series": f'extauthz_policy_reload_errors_total{{{_NS}, pod="a"}}',
                "values": "0 0 1 1 1 1 1 1",
            },
            {"series": f'extauthz_policy_reload_errors_total{{{_NS}, pod="b"}}', "values": "0x7"},
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "ExtauthzPolicyReloadErrors", "exp_alerts": []},
            {
                "eval_time": "4m",
                "alertname": "ExtauthzPolicyReloadErrors",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "extauthz", "pod": "a"}}
                ],
            },
        ],
    },
]


def _run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = _require_binary("promtool", "Debian package prometheus")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


class TestPromtool:
    """Prometheus' own tool parses every query and fires each alert when, and only when, it should."""

    def test_rules_pass_promtool_check(self, tmp_path: Path) -> None:
        document = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
        rules = tmp_path / "rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": document["spec"]["groups"]}), encoding="utf-8")
        done = _run_promtool("check", "rules", str(rules))
        assert done.returncode == 0, done.stdout + done.stderr

    def test_dashboard_queries_parse(self, tmp_path: Path) -> None:
        records = []
        for n, expr in enumerate(dashboard_expressions().values()):
            for variable, value in _GRAFANA_SUBSTITUTES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
            records.append({"record": f"dashboard:query_{n}", "expr": expr})
        rules = tmp_path / "dashboard-rules.yaml"
        rules.write_text(
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}), encoding="utf-8"
        )
        done = _run_promtool("check", "rules", str(rules))
        assert done.returncode == 0, done.stdout + done.stderr

    def test_alerts_fire_on_their_scenarios(self, tmp_path: Path) -> None:
        document = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
        groups = document["spec"]["groups"]
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
        tested = {test["alertname"] for s in _SCENARIOS for test in s["alert_rule_test"]}
        assert tested == set(REQUIRED_ALERTS)
        suite = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": _SCENARIOS}
        (tmp_path / "tests.yaml").write_text(yaml.safe_dump(suite), encoding="utf-8")
        done = _run_promtool("test", "rules", str(tmp_path / "tests.yaml"))
        assert done.returncode == 0, done.stdout + done.stderr


class TestDashboard:
    """The dashboard imports into Grafana 10/11 with a Prometheus data source picked by the user."""

    def test_datasource_variable_feeds_every_panel(self) -> None:
        dashboard = load_dashboard()
        assert 36 <= dashboard["schemaVersion"] <= 41
        assert dashboard["uid"]
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        panels = [p for p in _walk_panels(dashboard["panels"]) if p["type"] != "row"]
        ids = [p["id"] for p in _walk_panels(dashboard["panels"])]
        assert len(ids) == len(set(ids))
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"

    def test_panels_cover_the_guard(self) -> None:
        used = set().union(*(promql_metric_names(e) for e in dashboard_expressions().values()))
        for metric in (
            "extauthz_decisions_total",
            "extauthz_decision_seconds_bucket",
            "extauthz_instances_total",
            "extauthz_detections_total",
            "extauthz_risk_level_changes_total",
            "extauthz_rewrite_l1_bucket",
            "extauthz_rewrite_top1_changed_total",
            "extauthz_rate_limited_total",
            "extauthz_challenges_total",
            "extauthz_errors_total",
            "extauthz_evidence_records_total",
            "extauthz_policy_reloads_total",
            "extauthz_policy_reload_errors_total",
            "extauthz_ready",
        ):
            assert metric in used, f"no panel shows {metric}"


def _render(tmp_path: Path) -> list[dict[str, Any]]:
    """Render k8s/base with the monitoring component through a throwaway overlay."""
    kubectl = _require_binary("kubectl", "kubectl with kustomize v5")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # kustomize refuses absolute paths in resources/components: point at the repo relatively.
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(BASE, overlay)],
        "components": [os.path.relpath(COMPONENT, overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    done = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


class TestRenderedWithBase:
    """Rendered with k8s/base, the component scrapes the guard's Service and ships the dashboard."""

    def test_service_monitor_selects_the_guard_service_port(self, tmp_path: Path) -> None:
        docs = _render(tmp_path)
        monitor = _one(docs, "ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        namespace = monitor["metadata"]["namespace"]
        selected = [
            doc
            for doc in docs
            if doc["kind"] == "Service"
            and doc["metadata"]["namespace"] == namespace
            and selector.items() <= doc["metadata"].get("labels", {}).items()
        ]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["interval"] == "15s"
        scraped = [
            service
            for service in selected
            if any(port["name"] == endpoint["port"] for port in service["spec"]["ports"])
        ]
        # Exactly one: a second selected Service with the port would scrape every pod twice.
        assert [s["metadata"]["name"] for s in scraped] == ["extauthz"]
        (port,) = [p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert port["port"] == 9192

    def test_metrics_port_is_a_container_port_admitted_by_the_network_policy(
        self, tmp_path: Path
    ) -> None:
        docs = _render(tmp_path)
        monitor = _one(docs, "ServiceMonitor")
        service = next(
            d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "extauthz"
        )
        (port,) = [
            p
            for p in service["spec"]["ports"]
            if p["name"] == monitor["spec"]["endpoints"][0]["port"]
        ]
        container = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        target = port["targetPort"]
        number = named[target] if isinstance(target, str) else target
        assert number == 9192
        policy = _one(docs, "NetworkPolicy")
        admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
        assert number in admitted or target in admitted

    def test_rule_and_dashboard_land_in_the_guard_namespace(self, tmp_path: Path) -> None:
        docs = _render(tmp_path)
        namespace = _one(docs, "Namespace")["metadata"]["name"]
        assert _one(docs, "PrometheusRule")["metadata"]["namespace"] == namespace
        dashboards = [
            d
            for d in docs
            if d["kind"] == "ConfigMap"
            and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        ]
        assert len(dashboards) == 1
        config_map = dashboards[0]
        assert config_map["metadata"]["namespace"] == namespace
        assert config_map["metadata"]["name"] == "extauthz-dashboard"  # no hash suffix
        (content,) = config_map["data"].values()
        assert json.loads(content)["uid"] == load_dashboard()["uid"]
