"""pgbench through the pass-through proxy: initialisation (COPY of 100 000 rows), then TPC-B-like runs in
each query mode with concurrent clients, and not one failed transaction."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from conftest import APP_PASSWORD, ProxyProcess

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

PGBENCH = shutil.which("pgbench") or "pgbench"
CLIENTS, THREADS, TRANSACTIONS = 4, 2, 200


def run_pgbench(proxy: ProxyProcess, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST=proxy.host,
        PGPORT=str(proxy.port),
        PGUSER="app",
        PGPASSWORD=APP_PASSWORD,
        PGDATABASE="app",
        PGSSLMODE="disable",
        PGCONNECT_TIMEOUT="10",
    )
    return subprocess.run([PGBENCH, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def initialised(proxy: ProxyProcess, pg: DevCluster) -> Iterator[ProxyProcess]:
    r = run_pgbench(proxy, "-i", "-s", "1", "-q")
    assert r.returncode == 0, r.stderr
    assert "done" in r.stderr
    assert pg.psql("SELECT count(*) FROM pgbench_accounts", dbname="app").strip() == "100000"
    yield proxy
    pg.psql("DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history", dbname="app")


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_run(initialised: ProxyProcess, pg: DevCluster, mode: str) -> None:
    before = int(pg.psql("SELECT count(*) FROM pgbench_history", dbname="app"))
    r = run_pgbench(initialised, "-M", mode, "-c", str(CLIENTS), "-j", str(THREADS), "-t", str(TRANSACTIONS), "-n")
    assert r.returncode == 0, r.stdout + r.stderr
    expected = CLIENTS * TRANSACTIONS
    assert f"query mode: {mode}" in r.stdout
    m = re.search(r"number of transactions actually processed: (\d+)/(\d+)", r.stdout)
    assert m is not None, r.stdout
    assert (int(m.group(1)), int(m.group(2))) == (expected, expected)
    failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
    assert failed is not None, r.stdout
    assert int(failed.group(1)) == 0
    # Every transaction really reached the server: each one inserts one history row.
    after = int(pg.psql("SELECT count(*) FROM pgbench_history", dbname="app"))
    assert after - before == expected


def test_pgbench_select_only_with_connect_per_transaction(initialised: ProxyProcess) -> None:
    # -C opens a new connection per transaction: startup and authentication through the proxy, 200 times.
    r = run_pgbench(initialised, "-S", "-C", "-c", "2", "-j", "2", "-t", "100", "-n")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"number of transactions actually processed: (\d+)/(\d+)", r.stdout)
    assert m is not None, r.stdout
    assert m.group(1) == m.group(2) == "200"
