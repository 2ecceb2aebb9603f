"""The operator's view of a running pgveil: health and readiness probes, Prometheus metrics, reload on
SIGHUP (valid, invalid, and a change that needs a restart), graceful shutdown on SIGTERM, the client
connection limit, and the ``pgveil check`` / ``pgveil serve`` commands.

Every proxy here is a real ``pgveil serve`` subprocess in front of the session's PostgreSQL cluster; the
admin endpoints are read over HTTP and the metrics parsed from the exposition text. Waits are bounded
polls, never sleeps that stand in for an assertion.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from conftest import PW_PASSWORD, ProxyProcess, proxy_config, wait_until
from faultproxy import RawClient, raw_session, startup_packet
from prometheus_client.parser import text_string_to_metric_families

from proxy.devcluster import DevCluster, free_port

pytestmark = pytest.mark.integration

HTTP_TIMEOUT = 5.0
WAIT = 10.0  # the bound on every poll; the happy path takes a fraction of it
PROC_EXIT_TIMEOUT = 15.0

MakeProxy = Callable[..., ProxyProcess]


# -- helpers ----------------------------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of a GET; an HTTP error status is a result, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
            return int(resp.status), str(resp.headers.get("Content-Type", "")), bytes(resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return int(e.code), str(e.headers.get("Content-Type", "")), bytes(e.read())


def metric(p: ProxyProcess, sample: str, **labels: str) -> float:
    """The value of one sample (e.g. ``pgveil_sessions_total``) on ``p``'s ``/metrics``; fails if absent."""
    status, _, body = http_get(f"{p.admin_url}/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample}{labels or ''} on /metrics")


def wait_for_metric_above(p: ProxyProcess, sample: str, baseline: float, **labels: str) -> float:
    """Polls until the sample exceeds ``baseline``; returns its last value either way."""
    seen = [baseline]

    def above() -> bool:
        seen.append(metric(p, sample, **labels))
        return seen[-1] > baseline

    wait_until(above, timeout=WAIT, interval=0.1)
    return seen[-1]


def wait_for_log(p: ProxyProcess, text: str, count: int = 1) -> bool:
    return wait_until(lambda: p.logs().count(text) >= count, timeout=WAIT)


def select_one(p: ProxyProcess, port: int | None = None) -> None:
    """A fresh connection through ``p`` (or another of its ports) runs a query."""
    dsn = p.dsn(connect_timeout="5")
    if port is not None:
        dsn = dsn.replace(f":{p.port}/", f":{port}/")
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SELECT 41 + 1").fetchone() == (42,)


def assert_refuses_new_connections(p: ProxyProcess) -> None:
    """A new client is either not accepted at all or told FATAL 57P03 before anything else."""
    try:
        raw = RawClient(p.host, p.port, timeout=5)
    except OSError:
        return
    with raw:
        try:
            raw.send(startup_packet(user="app", database="app"))
        except OSError:
            return
        fields = raw.expect_fatal()
    assert fields["C"] == "57P03", fields


def wait_for_exit(p: ProxyProcess) -> int:
    assert p.proc is not None
    try:
        rc = p.proc.wait(PROC_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pgveil did not exit:\n{p.logs()}") from None
    return rc


def reload(p: ProxyProcess, result: str) -> None:
    """Sends SIGHUP and waits until ``pgveil_config_reloads_total{result=...}`` has moved."""
    before = metric(p, "pgveil_config_reloads_total", result=result)
    p.signal(signal.SIGHUP)
    after = wait_for_metric_above(p, "pgveil_config_reloads_total", before, result=result)
    assert after == before + 1, p.logs()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aproxy(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy whose admin endpoints and metrics the read-only tests share (they compare deltas)."""
    p = ProxyProcess(proxy_config(pg), tmp_path_factory.mktemp("lifecycle-proxy"))
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def dead_upstream(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, int]]:
    """A proxy whose upstream is a loopback port nobody listens on, and that port."""
    port = free_port()
    cfg = proxy_config(pg, upstream={"host": "127.0.0.1", "port": port, "tls": "prefer", "connect_timeout": 2})
    p = ProxyProcess(cfg, tmp_path_factory.mktemp("dead-upstream-proxy"))
    p.start()
    yield p, port
    p.stop()


# -- health, readiness, metrics ---------------------------------------------------------------------------


def test_healthz_is_200_json(aproxy: ProxyProcess) -> None:
    status, content_type, body = http_get(f"{aproxy.admin_url}/healthz")
    assert status == 200
    assert content_type.startswith("application/json")
    doc = json.loads(body)
    assert doc["status"] == "ok"
    assert isinstance(doc["version"], str)
    assert doc["version"]


def test_readyz_is_200_when_the_server_answers(aproxy: ProxyProcess) -> None:
    status, content_type, body = http_get(f"{aproxy.admin_url}/readyz")
    assert status == 200, body
    assert content_type.startswith("application/json")
    assert json.loads(body)["status"] == "ready"


def test_unreachable_upstream_is_alive_but_not_ready(dead_upstream: tuple[ProxyProcess, int]) -> None:
    p, port = dead_upstream
    status, _, body = http_get(f"{p.admin_url}/readyz")
    assert status == 503
    doc = json.loads(body)
    assert doc["status"] == "not ready"
    assert doc["reason"]
    assert str(port) not in doc["reason"]  # the probe endpoint is unauthenticated: no addresses
    status, _, _ = http_get(f"{p.admin_url}/healthz")
    assert status == 200


def test_serve_with_unreachable_upstream_gives_08006_naming_the_address(
    dead_upstream: tuple[ProxyProcess, int],
) -> None:
    p, port = dead_upstream
    with RawClient(p.host, p.port, timeout=10) as raw:
        raw.send(startup_packet(user="app", database="app"))
        fields = raw.expect_fatal()
    assert fields["S"] == "FATAL"
    assert fields["C"] == "08006"
    assert f"127.0.0.1:{port}" in fields["M"]
    assert p.proc is not None
    assert p.proc.poll() is None


def test_metrics_is_prometheus_text_with_sessions_total(aproxy: ProxyProcess) -> None:
    status, content_type, body = http_get(f"{aproxy.admin_url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert "pgveil_sessions_total" in names
    assert "pgveil_config_reloads_total" in names


def test_sessions_total_counts_a_connection(aproxy: ProxyProcess) -> None:
    before = metric(aproxy, "pgveil_sessions_total")
    select_one(aproxy)
    assert wait_for_metric_above(aproxy, "pgveil_sessions_total", before) >= before + 1


def test_relayed_messages_are_counted_while_the_session_is_open(aproxy: ProxyProcess) -> None:
    name = "pgveil_relayed_messages_total"
    up = metric(aproxy, name, direction="client_to_server")
    down = metric(aproxy, name, direction="server_to_client")
    with psycopg.connect(aproxy.dsn(connect_timeout="5"), autocommit=True) as c:
        for i in range(5):
            assert c.execute("SELECT %s::int", [i]).fetchone() == (i,)
        # Still open: only the periodic flush can make these move.
        assert wait_for_metric_above(aproxy, name, up, direction="client_to_server") >= up + 5
        assert wait_for_metric_above(aproxy, name, down, direction="server_to_client") >= down + 5


# -- reload -----------------------------------------------------------------------------------------------


def test_sighup_applies_a_valid_change(make_proxy: MakeProxy) -> None:
    p = make_proxy()
    select_one(p)
    assert "client connected from" not in p.logs()  # a debug line, and the level is info
    p.config["logging"] = {"level": "debug"}
    p.write_config()
    reload(p, "success")
    assert wait_for_log(p, "configuration reloaded")
    select_one(p)
    assert wait_for_log(p, "client connected from")  # the new level took effect


def test_sighup_with_an_invalid_file_keeps_the_running_config(make_proxy: MakeProxy) -> None:
    p = make_proxy()
    good = p.config_path.read_text()
    bad = yaml.safe_load(good)
    bad["logging"] = {"level": "debug"}  # valid on its own; must not be applied from a rejected file
    bad["sessions"]["max_client_connections"] = 0
    bad["upstream"]["port"] = "not-a-port"
    p.config_path.write_text(yaml.safe_dump(bad))
    reload(p, "failure")
    assert wait_for_log(p, "upstream.port")
    logs = p.logs()
    assert "sessions.max_client_connections" in logs
    assert "configuration reloaded" not in logs
    select_one(p)
    assert "client connected from" not in p.logs()  # still at level info
    # The file fixed again, a reload succeeds.
    p.config_path.write_text(good)
    reload(p, "success")
    select_one(p)


def test_sighup_changing_listen_warns_and_keeps_the_old_port(make_proxy: MakeProxy) -> None:
    p = make_proxy()
    new_port = free_port()
    p.config["listen"] = f"127.0.0.1:{new_port}"
    p.write_config()
    reload(p, "success")
    assert wait_for_log(p, "needs a restart")
    warning = next(line for line in p.logs().splitlines() if "needs a restart" in line)
    assert "WARNING" in warning
    assert f"127.0.0.1:{p.port}" in warning
    assert f"127.0.0.1:{new_port}" in warning
    select_one(p)
    with pytest.raises(psycopg.OperationalError):
        select_one(p, port=new_port)


def test_sighup_compares_listen_with_the_bound_sockets(make_proxy: MakeProxy) -> None:
    """A refused listen change must not become the running value: putting the bound address back in the
    file is no change at all, and a file that still names another address is still one."""
    p = make_proxy()
    original = p.config["listen"]
    elsewhere = f"127.0.0.1:{free_port()}"
    p.config["listen"] = elsewhere
    p.write_config()
    reload(p, "success")
    assert p.logs().count("needs a restart") == 1, p.logs()
    p.config["listen"] = original
    p.write_config()
    reload(p, "success")
    assert p.logs().count("needs a restart") == 1, p.logs()  # the file now matches the bound socket
    p.config["listen"] = elsewhere
    p.write_config()
    reload(p, "success")
    reload(p, "success")  # the same file twice: both times it differs from what is bound
    assert p.logs().count("needs a restart") == 3, p.logs()
    select_one(p)


def test_sighup_changing_upstream_applies_to_new_sessions(make_proxy: MakeProxy) -> None:
    p = make_proxy()
    with psycopg.connect(p.dsn(connect_timeout="5"), autocommit=True) as old:
        dead = free_port()
        p.config["upstream"] = {"host": "127.0.0.1", "port": dead, "tls": "disable", "connect_timeout": 2}
        p.write_config()
        reload(p, "success")
        with RawClient(p.host, p.port, timeout=10) as raw:
            raw.send(startup_packet(user="app", database="app"))
            fields = raw.expect_fatal()
        assert fields["C"] == "08006"
        assert f"127.0.0.1:{dead}" in fields["M"]
        assert old.execute("SELECT 3").fetchone() == (3,)  # a session keeps the server it has


def test_sighup_applies_a_log_format_change(make_proxy: MakeProxy) -> None:
    """Only ``listen`` and ``admin.listen`` wait for a restart; the log format is not one of them."""
    p = make_proxy()
    p.config["logging"] = {"level": "info", "format": "json"}
    p.write_config()
    reload(p, "success")
    select_one(p)
    assert wait_for_log(p, "authenticated as role")
    line = next(line for line in p.logs().splitlines() if "authenticated as role" in line)
    try:
        doc = json.loads(line)
    except json.JSONDecodeError:
        raise AssertionError(f"not a JSON log line after reloading with logging.format json: {line}") from None
    assert doc["level"] == "info"


# -- shutdown ---------------------------------------------------------------------------------------------


def test_sigterm_lets_an_open_transaction_commit(pg: DevCluster, make_proxy: MakeProxy) -> None:
    p = make_proxy(sessions={"shutdown_timeout": 10, "track_statements": "always"})
    with psycopg.connect(p.dsn(connect_timeout="5"), autocommit=True) as setup:
        setup.execute("DROP TABLE IF EXISTS lifecycle_shutdown_tx")
        setup.execute("CREATE TABLE lifecycle_shutdown_tx (n int)")
    conn = psycopg.connect(p.dsn(connect_timeout="5"))
    try:
        conn.execute("INSERT INTO lifecycle_shutdown_tx VALUES (1)")  # opens the transaction (BEGIN)
        p.signal(signal.SIGTERM)
        assert wait_for_log(p, "shutting down"), p.logs()
        assert_refuses_new_connections(p)
        status, _, body = http_get(f"{p.admin_url}/readyz")
        assert status == 503, body
        assert p.proc is not None
        assert p.proc.poll() is None  # the transaction holds the shutdown open
        conn.execute("INSERT INTO lifecycle_shutdown_tx VALUES (2)")
        conn.commit()
    finally:
        conn.close()
    assert wait_for_exit(p) == 0, p.logs()
    with psycopg.connect(pg.dsn(dbname="app"), connect_timeout=5) as direct:
        rows = direct.execute("SELECT n FROM lifecycle_shutdown_tx ORDER BY n").fetchall()
        direct.execute("DROP TABLE lifecycle_shutdown_tx")
    assert rows == [(1,), (2,)]


def test_sigterm_ends_idle_sessions_with_57p01(make_proxy: MakeProxy) -> None:
    # A grace period far beyond the read timeout: the FATAL must come from ending idle sessions at
    # once, not from the deadline.
    p = make_proxy(sessions={"shutdown_timeout": 60, "track_statements": "always"})
    conn = psycopg.connect(p.dsn(connect_timeout="5"), autocommit=True)
    try:
        with raw_session(p.host, p.port, "pwuser", PW_PASSWORD, "app") as raw:
            raw.sock.settimeout(5)
            raw.simple_query("SELECT 1")
            p.signal(signal.SIGTERM)
            fields = raw.expect_fatal()
        assert fields["S"] == "FATAL"
        assert fields["C"] == "57P01"
        assert "shutting down" in fields["M"]
        assert wait_for_exit(p) == 0, p.logs()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()


# -- connection limit -------------------------------------------------------------------------------------


def test_third_connection_over_the_limit_gets_53300(make_proxy: MakeProxy) -> None:
    p = make_proxy(sessions={"shutdown_timeout": 5, "max_client_connections": 2})
    first = psycopg.connect(p.dsn(connect_timeout="5"), autocommit=True)
    second = psycopg.connect(p.dsn(connect_timeout="5"), autocommit=True)
    try:
        with RawClient(p.host, p.port, timeout=5) as raw:
            fields = raw.expect_fatal()  # refused before the client says anything
        assert fields["S"] == "FATAL"
        assert fields["C"] == "53300"
        assert second.execute("SELECT 2").fetchone() == (2,)
        second.close()
        assert wait_until(lambda: metric(p, "pgveil_sessions_active") == 1, timeout=WAIT)
        select_one(p)  # a slot is free again
        assert first.execute("SELECT 1").fetchone() == (1,)
    finally:
        first.close()
        second.close()


# -- the command line -------------------------------------------------------------------------------------


def test_check_reports_every_bad_setting_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "upstream": {"host": "127.0.0.1", "port": "abc", "tls": "sometimes"},
                "sessions": {"max_client_connections": 0, "shutdown_timout": 5},
                "logging": {"level": "loud"},
            }
        )
    )
    out = run_cli("check", "--config", str(path), cwd=tmp_path)
    assert out.returncode == 2, out
    text = out.stdout + out.stderr
    for dotted in (
        "upstream.port",
        "upstream.tls",
        "sessions.max_client_connections",
        "sessions.shutdown_timout",
        "logging.level",
    ):
        assert dotted in text, (dotted, text)
    assert "configuration OK" not in text


def test_check_accepts_a_good_file(pg: DevCluster, tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{free_port()}", **proxy_config(pg)}))
    out = run_cli("check", "--config", str(path), cwd=tmp_path)
    assert out.returncode == 0, out
    assert "configuration OK" in out.stdout


def test_serve_with_an_invalid_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"listen": "127.0.0.1:nope"}))
    out = run_cli("serve", "--config", str(path), cwd=tmp_path)
    assert out.returncode == 2, out
    assert "listen" in out.stderr
