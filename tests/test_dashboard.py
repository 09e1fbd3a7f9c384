"""
Tests for C{etc/grafana/smtpauth-relay.json}: the Grafana dashboard asks
only for series L{smtpauth_relay.metrics.RelayMetrics} exposes, by only the
labels they have, so renaming a metric or a label breaks a test here rather
than a panel in production.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.metrics import RelayMetrics

DASHBOARD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "etc",
    "grafana",
    "smtpauth-relay.json",
)

#: The sample names a family of each type exposes, by suffix.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum", ""),
}

#: Labels Prometheus adds at scrape time.
TARGET_LABELS = {"instance", "job"}

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(.*?)\s*(?:,\s*([A-Za-z_]\w*))?\s*\)\s*$"
)


def metricNames(expr: str) -> set[str]:
    """
    The metric names a PromQL expression selects: identifiers that are not
    functions, keywords, label names in matchers or grouping clauses, or
    inside strings, durations and Grafana variables.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\w+", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if re.match(r"\s*\(", text[match.end() :]):
            continue
        if match.group().lower() in _KEYWORDS:
            continue
        if match.start() > 0 and (
            text[match.start() - 1].isdigit() or text[match.start() - 1] == "."
        ):
            continue  # the exponent of a number, e.g. 1e3
        names.add(match.group())
    return names


def labelNames(expr: str) -> set[str]:
    """
    The label names an expression matches on or groups by.
    """
    text = _STRING.sub('""', expr)
    names = set()
    for matchers in _MATCHERS.findall(text):
        names.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in _GROUPING.findall(text):
        names.update(n.strip() for n in grouping.split(",") if n.strip())
    return names


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """
    Every panel, rows' nested panels included.
    """
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """
    C{(where, expr)} for every PromQL expression: panel targets, and the
    metric selector of each C{label_values} variable query.
    """
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        if isinstance(query, dict):
            query = query["query"]
        match = _LABEL_VALUES.match(query)
        where = f"variable {variable['name']!r}"
        if match is None:
            yield where, query
        else:
            yield where, match.group(1)


def exercisedMetrics() -> RelayMetrics:
    """
    A L{RelayMetrics} with a sample in every labelled series, so that each
    family's label names can be read off its samples.
    """
    metrics = RelayMetrics()
    metrics.connectionOpened("tcp:587", "starttls")
    metrics.connectionRefused("rate")
    metrics.authAttempt("PLAIN", "success")
    metrics.lockoutStarted("ip")
    metrics.messageAccepted(1)
    metrics.messageRejected("size")
    metrics.deliveryAttempt("delivered", "smtp.example.net")
    metrics.deliveryLatency(1.0)
    metrics.setQueueSource(lambda: (1, 1.0))
    return metrics


def exposedSeries(metrics: RelayMetrics) -> dict[str, tuple[str, set[str]]]:
    """
    Each sample name a query may use, to its family name and the family's
    label names.
    """
    series: dict[str, tuple[str, set[str]]] = {}
    for family in metrics.registry.collect():
        labels = {name for sample in family.samples for name in sample.labels}
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = (family.name, labels)
    return series


class ExpressionParsingTests(SynchronousTestCase):
    """
    The PromQL reading the dashboard test relies on finds metric and label
    names, and nothing else.
    """

    def test_metricNames(self) -> None:
        """
        Functions, keywords, grouping labels, matchers, strings, durations,
        variables and numbers are not taken for metric names.
        """
        self.assertEqual(
            metricNames(
                'histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y z"}'
                "[$__rate_interval])))"
            ),
            {"a_bucket"},
        )
        self.assertEqual(
            metricNames(
                "sum without (job) (b_total offset 5m) / ignoring(kind) "
                "group_left c * 1e3 > bool 0 or on(instance) d:recorded"
            ),
            {"b_total", "c", "d:recorded"},
        )

    def test_labelNames(self) -> None:
        """
        Matcher and grouping labels are found, not the values matched.
        """
        self.assertEqual(
            labelNames(
                'sum by (result, upstream) (rate(x{instance=~"$instance", '
                'tls!="a=b"}[5m]))'
            ),
            {"result", "upstream", "instance", "tls"},
        )


class DashboardTests(SynchronousTestCase):
    """
    The shipped dashboard against the metrics L{RelayMetrics} registers.
    """

    def setUp(self) -> None:
        with open(DASHBOARD, encoding="utf-8") as f:
            self.dashboard = json.load(f)
        self.series = exposedSeries(exercisedMetrics())
        self.expressions = list(expressions(self.dashboard))

    def test_everyMetricExists(self) -> None:
        """
        Every metric name in every panel's and variable's expression is one
        a L{RelayMetrics} registry exposes.
        """
        self.assertGreater(len(self.expressions), 10)
        unknown = [
            (where, name)
            for where, expr in self.expressions
            for name in sorted(metricNames(expr))
            if name not in self.series
        ]
        self.assertEqual(unknown, [])

    def test_everyExpressionSelectsAMetric(self) -> None:
        """
        No expression is left without a metric (which would make the check
        above pass vacuously).
        """
        empty = [where for where, expr in self.expressions if not metricNames(expr)]
        self.assertEqual(empty, [])

    def test_everyLabelExists(self) -> None:
        """
        Every label an expression matches on or groups by is one of the
        labels of the metrics it selects (C{le} for histogram buckets), or
        one Prometheus adds at scrape time.
        """
        wrong: list[tuple[str, str]] = []
        for where, expr in self.expressions:
            known = set(TARGET_LABELS)
            for name in metricNames(expr):
                known |= self.series.get(name, ("", set()))[1]
                if name.endswith("_bucket"):
                    known.add("le")
            wrong.extend((where, label) for label in sorted(labelNames(expr) - known))
        self.assertEqual(wrong, [])

    def test_everyMetricShown(self) -> None:
        """
        Every family L{RelayMetrics} registers appears on the dashboard.
        """
        used = {
            self.series[name][0]
            for _, expr in self.expressions
            for name in metricNames(expr)
            if name in self.series
        }
        families = {family for family, _ in self.series.values()}
        self.assertEqual(sorted(families - used), [])

    def test_datasourceVariable(self) -> None:
        """
        Every panel and query uses the C{DS_PROMETHEUS} data source
        variable, which the dashboard defines as a Prometheus data source
        choice.
        """
        variables = {v["name"]: v for v in self.dashboard["templating"]["list"]}
        self.assertEqual(variables["DS_PROMETHEUS"]["type"], "datasource")
        self.assertEqual(variables["DS_PROMETHEUS"]["query"], "prometheus")
        wanted = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for panel in panels(self.dashboard["panels"]):
            if panel["type"] == "row":
                continue
            self.assertEqual(panel["datasource"], wanted, panel["title"])
            for target in panel["targets"]:
                self.assertEqual(target["datasource"], wanted, panel["title"])

    def test_structure(self) -> None:
        """
        The dashboard is a Grafana 10/11 one (schema 39) with a fixed uid, and
        its panels have unique ids and a title each.
        """
        self.assertEqual(self.dashboard["schemaVersion"], 39)
        self.assertEqual(self.dashboard["uid"], "smtpauth-relay")
        ids = [panel["id"] for panel in panels(self.dashboard["panels"])]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in panels(self.dashboard["panels"]):
            self.assertTrue(panel["title"])
