"""The pass-through fast path (no protected tables, ``sessions.track_statements: auto``) with real drivers.

The other driver tests run a proxy with the full statement model; these make sure the frame-level path,
which is what a proxy without protected tables runs, is just as transparent.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, ProxyProcess

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration


def test_psycopg_pipeline_copy_and_binary(light_proxy: ProxyProcess) -> None:
    with psycopg.connect(light_proxy.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS light_t")
        conn.execute("CREATE TABLE light_t (id int PRIMARY KEY, v text)")
        with conn.pipeline():
            for i in range(50):
                conn.execute("INSERT INTO light_t VALUES (%s, %s)", (i, f"v{i}"))
        with conn.cursor() as cur, cur.copy("COPY light_t FROM STDIN") as copy:
            for i in range(50, 100):
                copy.write_row((i, f"v{i}"))
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT count(*), sum(id) FROM light_t")
            assert cur.fetchone() == (100, sum(range(100)))
        with conn.cursor() as cur, cur.copy("COPY (SELECT v FROM light_t ORDER BY id) TO STDOUT") as copy:
            rows = [bytes(r).decode() for r in copy]
        assert rows[0] == "v0\n"
        assert len(rows) == 100
        # an error in a pipeline keeps the session usable
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():  # noqa: PT012 - the whole pipeline
            conn.execute("INSERT INTO light_t VALUES (1, 'dup')")
            conn.execute("SELECT 1")
        assert conn.execute("SELECT 42").fetchone() == (42,)


def test_cancel_and_backend_pid(light_proxy: ProxyProcess) -> None:
    with psycopg.connect(light_proxy.dsn()) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert pid == (conn.info.backend_pid,)
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - started < 20
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_asyncpg_prepared_and_copy(light_proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(light_proxy.dsn())
    try:
        stmt = await conn.prepare("SELECT $1::int8 * 2, $2::numeric, $3::jsonb")
        for i in range(200):
            row = await stmt.fetchrow(i, "1.50", '{"a": 1}')
            assert row is not None
            assert row[0] == i * 2
        await conn.execute("CREATE TEMP TABLE light_c (a int, b bytea)")
        await conn.copy_records_to_table("light_c", records=[(i, bytes([i % 256]) * 1000) for i in range(500)])
        assert await conn.fetchval("SELECT sum(length(b)) FROM light_c") == 500_000
    finally:
        await conn.close()


def test_pgbench_extended_and_prepared(light_proxy: ProxyProcess, pg: DevCluster) -> None:
    env = dict(os.environ, PGPASSWORD=APP_PASSWORD)
    pgbench = str(pg.bin / "pgbench")
    base = ["-h", light_proxy.host, "-p", str(light_proxy.port), "-U", "app"]
    subprocess.run([pgbench, *base, "-i", "-s", "1", "app"], env=env, check=True, capture_output=True, timeout=120)
    for mode in ("simple", "extended", "prepared"):
        out = subprocess.run(
            [pgbench, *base, "-M", mode, "-c", "4", "-j", "2", "-t", "100", "app"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert "number of transactions actually processed: 400/400" in out, out
        assert "number of failed transactions: 0 " in out, out
