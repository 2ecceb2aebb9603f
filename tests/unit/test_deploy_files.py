"""The deployment files, checked with the tools that read them, without a container engine.

- ``deploy/docker-compose.yml``: Debian's ``docker-compose`` (1.29) validates it against its Compose schema
  and resolves it (``docker-compose config`` needs no engine); the resolved file is then checked for what
  the example promises (loopback ports, the key volume, the mounted rules and dashboard).
- ``deploy/prometheus/``: ``promtool check config``, ``promtool check rules`` and ``promtool test rules``
  (Debian's ``prometheus`` package), and every dashboard query parsed by promtool as a recording rule.
- ``config/grafana-dashboard.json``: its structure (Grafana's dashboard model: ids, grid, datasource,
  targets, variables), checked here.
- ``deploy/systemd/pgveil.service``: ``systemd-analyze verify`` and ``systemd-analyze security --offline``.
- ``Dockerfile``: its stages and runtime settings, read as text (no engine can build it here).

A missing tool skips these tests on a developer's machine and fails them under CI (``CI=true``);
``scripts/bootstrap`` installs the tools as root. That the metric names exist in pgveil is checked
against a running pgveil in ``tests/integration/test_deploy_metrics.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployfiles import (
    DASHBOARD,
    DEPLOY,
    PROMETHEUS_SERIES,
    ROOT,
    RULES,
    dashboard,
    dashboard_expressions,
    rule_expressions,
    tool,
    used_metric_names,
)

from proxy.config.loader import read_yaml
from proxy.config.parser import parse_config

PROMETHEUS = DEPLOY / "prometheus"
GUIDE = ROOT / "docs" / "existing-database.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# -- docker compose ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    done = run([tool("docker-compose"), "--file", "docker-compose.yml", "config"], DEPLOY)
    assert done.returncode == 0, done.stderr
    resolved: dict[str, Any] = yaml.safe_load(done.stdout)
    return resolved


def test_compose_has_the_four_parts_and_publishes_on_loopback_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "pgveil", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}"
            assert published.startswith("127.0.0.1:"), f"{name} publishes {published} beyond the loopback"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, from the resolved short syntax ``SOURCE:TARGET[:MODE]``."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_compose_wires_keys_rules_and_dashboard(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pgveil = services["pgveil"]
    assert _mounts(pgveil)["/var/lib/pgveil"] == "pgveil-keys"  # the key file outlives the container
    assert Path(_mounts(pgveil)["/etc/pgveil"]) == DEPLOY / "pgveil"
    assert pgveil["read_only"] is True
    assert pgveil["depends_on"]["pgveil-schema"]["condition"] == "service_completed_successfully"
    assert Path(_mounts(services["prometheus"])["/etc/prometheus"]) == PROMETHEUS

    grafana = _mounts(services["grafana"])
    provisioning = Path(grafana["/etc/grafana/provisioning"])
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "pgveil.yml").read_text())["providers"][0]
    mounted = {target: Path(source) for target, source in grafana.items()}
    dashboards = [t for t, s in mounted.items() if s == DASHBOARD]
    assert dashboards, "the dashboard JSON is not mounted into grafana"
    assert str(Path(dashboards[0]).parent) == provider["options"]["path"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["uid"] == dashboard()["panels"][1]["datasource"]["uid"]


def test_compose_pgveil_configurations_are_valid_and_match_the_guide() -> None:
    guide_yaml = [yaml.safe_load(b) for kind, b in FENCE.findall(GUIDE.read_text()) if kind == "yaml"]
    for name, guide in zip(("pgveil.yaml", "pgveil-dba.yaml"), guide_yaml, strict=True):
        path = DEPLOY / "pgveil" / name
        data = read_yaml(path)
        config = parse_config(data, base_dir=path.parent, environ={})
        assert config.tables, name
        assert data["tables"] == guide["tables"], f"{name}: tables differ from docs/existing-database.md"
        assert data.get("roles") == guide.get("roles"), name
    (guide_sql,) = [b for kind, b in FENCE.findall(GUIDE.read_text()) if kind == "sql"]
    assert (DEPLOY / "postgres" / "pgveil-roles.psql").read_text() == guide_sql


def test_compose_secrets_stay_out_of_git_and_images() -> None:
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "deploy" in ignored
    assert "**/*.key" in ignored


# -- Prometheus -------------------------------------------------------------------------------------------


def test_promtool_checks_the_prometheus_config_and_its_rules() -> None:
    done = run([tool("promtool"), "check", "config", "prometheus.yml"], PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "alerts.yml" in done.stdout  # the rule file was found and checked with the config


def test_promtool_checks_the_rules() -> None:
    done = run([tool("promtool"), "check", "rules", str(RULES)], ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rule_expressions())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    done = run([tool("promtool"), "test", "rules", "alerts_test.yml"], PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_test_that_fires_it() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert fired == set(rule_expressions())


def test_the_failure_modes_have_alerts() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    for alert in ("PgveilUpstreamDown", "PgveilDecryptFailures", "PgveilKeystoreUnreachable", "PgveilRefusalSpike",
                  "PgveilAuditAnomaly", "PgveilJobStalled"):  # fmt: skip
        assert alert in rules
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    exprs = dashboard_expressions()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs.values())
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = run([tool("promtool"), "check", "rules", str(path)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(exprs)} rules found" in done.stdout


def test_rules_and_dashboard_select_only_pgveil_metrics() -> None:
    used = used_metric_names()
    assert used
    foreign = {n: sorted(w) for n, w in used.items() if not n.startswith("pgveil_") and n not in PROMETHEUS_SERIES}
    assert foreign == {}


# -- the Grafana dashboard --------------------------------------------------------------------------------

PANEL_TYPES = {"row", "timeseries", "stat", "table", "gauge", "bargauge", "text"}


def test_dashboard_structure() -> None:
    d = dashboard()
    assert isinstance(d["uid"], str)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert d["title"]
    assert isinstance(d["schemaVersion"], int)
    assert d["schemaVersion"] >= 36
    assert "id" not in d or d["id"] is None  # a provisioned dashboard gets its id from Grafana
    variables = {v["name"] for v in d["templating"]["list"]}
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], int] = {}
    datasource_uids = set()
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["title"]
        assert p["title"]
        g = p["gridPos"]
        assert 1 <= g["w"] <= 24
        assert g["h"] >= 1
        assert g["x"] >= 0
        assert g["x"] + g["w"] <= 24
        assert g["y"] >= 0
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["type"] == "prometheus"
        datasource_uids.add(p["datasource"]["uid"])
        refs = [t["refId"] for t in p["targets"]]
        assert refs
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip()
            for used in re.findall(r"\$(\w+)", t["expr"]):
                assert used.startswith("__") or used in variables, f"{p['title']}: ${used} is not a variable"
    assert len(datasource_uids) == 1


# -- systemd ------------------------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "pgveil.service"


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """The unit as installed where pgveil lives in this test's environment: only ExecStart's path changes
    (verify checks that the executable exists)."""
    pgveil = Path(sys.executable).parent / "pgveil"
    if not pgveil.exists():
        pgveil = Path(shutil.which("pgveil") or pgveil)
    text = UNIT.read_text()
    assert "/opt/pgveil/bin/pgveil " in text
    path = tmp_path / "pgveil.service"
    path.write_text(text.replace("/opt/pgveil/bin/pgveil ", f"{pgveil} "))
    return path


def test_systemd_unit_verifies(installed_unit: Path) -> None:
    done = run([tool("systemd-analyze"), "verify", str(installed_unit)], installed_unit.parent)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""  # unknown keys and bad values are only warnings


def test_systemd_unit_is_hardened(installed_unit: Path) -> None:
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["ReadWritePaths"] == "/var/lib/pgveil"
    assert settings["User"] not in ("root", "0")
    assert settings["CapabilityBoundingSet"] == ""
    # systemd's own exposure score, 0 (best) to 10: at most 2.0 ("OK").
    done = run([tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20", str(installed_unit)],
               installed_unit.parent)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


# -- Dockerfile -----------------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per stage, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def test_dockerfile_is_multi_stage_non_root_with_a_key_volume_and_a_healthcheck() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    runtime = stages[-1]
    args = {i: a for i, a in runtime}
    assert any(i == "COPY" and a.startswith("--from=") for i, a in runtime)
    user = args["USER"].split(":")[0]
    assert user.isdigit()
    assert int(user) != 0
    assert "/var/lib/pgveil" in args["VOLUME"]
    assert args["HEALTHCHECK"].startswith("--")
    assert "CMD" in args["HEALTHCHECK"]
    assert "6432" in args["EXPOSE"]
    assert "9187" in args["EXPOSE"]
    # The runtime stage installs no compiler: the accelerator is built in the build stage.
    runs = " ".join(a for i, a in runtime if i == "RUN")
    assert "gcc" not in runs
    assert "apt-get install" not in runs
    # The runtime user owns the key directory, so the local provider can write its key there.
    assert "-o pgveil -g pgveil -m 0700 /var/lib/pgveil" in runs
