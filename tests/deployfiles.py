"""What the deployment files in ``deploy/`` and ``config/grafana-dashboard.json`` say, for their tests.

The alert rules and the dashboard's panels are PromQL; these helpers pull out every expression and the
metric names each one selects, so that ``tests/unit/test_deploy_files.py`` can have promtool parse them
and ``tests/integration/test_deploy_metrics.py`` can check the names against what pgveil exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"

# Metrics the rules and the dashboard use that pgveil does not export yet: the access audit's, which the
# audit work adds (pgveil_audit_values_read_total{role,column,outcome}, pgveil_audit_anomaly_active
# {role,column}, pgveil_audit_flush_errors_total). Once that work is merged the scrape exports them and
# this set must be emptied; nothing else may ever be added to it.
PENDING_METRICS: frozenset[str] = frozenset()  # the access audit has landed: every used metric is exported

# Grafana's variables, replaced by values PromQL accepts so that promtool can parse the panel queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$instance": ".*"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# PromQL words that are not metric names (functions are recognised by the "(" after them).
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
     "inf", "nan", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
     "topk", "quantile"}
)  # fmt: skip
# Series that are not pgveil's: Prometheus's own per target.
PROMETHEUS_SERIES = frozenset({"up"})


def tool(name: str) -> str:
    """The path of a command-line tool the tests need. Missing: a skip on a developer's machine, a failure
    under CI (CI=true), where ``scripts/bootstrap`` must have installed it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/bootstrap installs it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def rule_expressions() -> dict[str, str]:
    """Alert name -> expression, for every rule of deploy/prometheus/alerts.yml."""
    doc = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_expressions() -> dict[str, str]:
    """Panel title and refId -> the query with Grafana's variables replaced."""
    out: dict[str, str] = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            out[f"{panel['title']} / {target['refId']}"] = expr
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers outside strings and label matchers that are
    neither followed by "(" (functions, aggregations) nor PromQL keywords, nor durations."""
    text = _MATCHERS.sub(" ", _STRING.sub('""', expr))
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"(?<![A-Za-z0-9_:])\d[A-Za-z0-9_.]*", " ", text)  # numbers and durations (offset 5m)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        # Label lists of by/without/on/ignoring: "(job, instance)" directly after the keyword.
        before = text[: m.start()].rstrip()
        if re.search(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*$", before):
            continue
        names.add(word)
    return names


def used_metric_names() -> dict[str, set[str]]:
    """Metric name -> where it is used (alert names and dashboard panels)."""
    used: dict[str, set[str]] = {}
    for where, expr in (*rule_expressions().items(), *dashboard_expressions().items()):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    return used
