"""Every metric the alert rules (deploy/prometheus/alerts.yml) and the Grafana dashboard
(config/grafana-dashboard.json) use is one pgveil exports.

What is exported comes from scraping, not from a list: a real ``pgveil serve`` with an encrypted table
and a policy (its ``/metrics``), and a real ``pgveil jobs run --metrics-listen`` re-encrypting that table
after ``pgveil keys rotate`` (its job gauges exist only while a job runs). A family is exported with every
sample name Prometheus derives from it (``_total`` for counters, ``_bucket``/``_sum``/``_count`` for
histograms), also before it has a sample. The only names allowed to be missing are
``deployfiles.PENDING_METRICS`` (the access audit's, not on this branch yet).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from conftest import ProxyProcess, proxy_config, wait_until
from deployfiles import PENDING_METRICS, PROMETHEUS_SERIES, used_metric_names
from encfixtures import apply_tables
from prometheus_client.parser import text_string_to_metric_families

from proxy.devcluster import DevCluster, free_port

pytestmark = pytest.mark.integration

TABLES = {"public.dm_items": {"columns": {"v": {"type": "text", "encrypt": True}, "note": {"type": "text"}}}}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def exported_names(text: str) -> set[str]:
    """The sample names a scrape's families can have (a family without samples yet counts too)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        body: bytes = r.read()
    return body.decode()


@pytest.fixture(scope="module")
def served(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    db = f"dm_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {db} OWNER app")
    pg.psql("CREATE TABLE dm_items (id int PRIMARY KEY, v text, note text)", dbname=db)
    pg.psql("GRANT ALL ON dm_items TO app", dbname=db)
    asyncio.run(apply_tables(pg, db, TABLES))
    workdir = tmp_path_factory.mktemp("deploy-metrics")
    cfg = proxy_config(
        pg,
        keystore={"dsn": pg.dsn(dbname=db), "master_key": {"provider": "local", "path": str(workdir / "master.key")}},
        tables=TABLES,
        roles={"default": "hidden", "app": "plaintext"},
    )
    proxy = ProxyProcess(cfg, workdir)
    proxy.start()
    try:
        dsn = proxy.dsn(dbname=db)

        def ready() -> bool:
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as c:
                    c.execute("SELECT v FROM dm_items WHERE id = -1").fetchall()
                return True
            except psycopg.Error:
                return False

        assert wait_until(ready, timeout=30), proxy.logs()
        with psycopg.connect(dsn, autocommit=True) as c:
            for i in range(20):
                c.execute("INSERT INTO dm_items (id, v, note) VALUES (%s, %s, %s)", (i, f"value {i}", "n"))
            c.execute("SELECT v, note FROM dm_items").fetchall()
        yield proxy
    finally:
        proxy.stop()


def job_metrics(proxy: ProxyProcess) -> str:
    """Rotates dm_items.v and scrapes a ``jobs run`` re-encrypting it at 1 row per second, then stops it
    (the job stays resumable)."""
    cli = [sys.executable, "-m", "proxy.cli"]
    config = ["--config", str(proxy.config_path)]
    rotated = subprocess.run(
        [*cli, "keys", "rotate", "--column", "public.dm_items.v", "--no-run", *config],
        cwd=proxy.workdir, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    port = free_port()
    runner = subprocess.Popen(
        [*cli, "jobs", "run", "--throttle", "1", "--batch-size", "1", "--metrics-listen", f"127.0.0.1:{port}", *config],
        cwd=proxy.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    text = ""
    try:

        def running() -> bool:
            nonlocal text
            try:
                text = scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                return False
            return 'pgveil_job_running{column="public.dm_items.v",kind="dek"} 1.0' in text

        ok = wait_until(running, timeout=60, interval=0.2)
        assert ok, (runner.communicate()[1] if runner.poll() is not None else "") + text
    finally:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.communicate()
    return text


@pytest.fixture(scope="module")
def scrapes(served: ProxyProcess) -> tuple[str, str]:
    """The proxy's /metrics and the job runner's."""
    return scrape(f"{served.admin_url}/metrics"), job_metrics(served)


def test_rules_and_dashboard_use_only_exported_metrics(scrapes: tuple[str, str]) -> None:
    exported = exported_names(scrapes[0]) | exported_names(scrapes[1])
    used = used_metric_names()
    missing = {name: sorted(where) for name, where in used.items() if name not in exported | PROMETHEUS_SERIES}
    assert set(missing) <= PENDING_METRICS, f"used but not exported: {missing}"
    # The pending set names only what the files really use (so emptying it is all the merge needs).
    assert used.keys() >= PENDING_METRICS
    # The scrapes really are pgveil's: families of the proxy and of the job runner.
    assert {"pgveil_build_info", "pgveil_sessions_total", "pgveil_job_rows_done"} <= exported


def test_job_metrics_carry_the_column_label(scrapes: tuple[str, str]) -> None:
    labels = {s.name: s.labels for f in text_string_to_metric_families(scrapes[1]) for s in f.samples}
    assert labels["pgveil_job_rows_remaining"] == {"kind": "dek", "column": "public.dm_items.v"}
