"""psql through the pass-through proxy: simple queries, multi-statement strings, \\copy both ways, and a
session that survives its errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import APP_PASSWORD, ProxyProcess

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

PSQL = shutil.which("psql") or "psql"


def run_psql(
    proxy: ProxyProcess,
    *args: str,
    stdin: str | None = None,
    stop_on_error: bool = True,
    dsn: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    argv = [PSQL, "-X", "-q", "-A", "-t", "-v", f"ON_ERROR_STOP={int(stop_on_error)}", "-d", dsn or proxy.dsn()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        [*argv, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line]


def test_simple_query(proxy: ProxyProcess) -> None:
    r = run_psql(proxy, "-c", "SELECT 1 + 1, current_user, current_database()")
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == ["2|app|app"]


def test_multi_statement_string(proxy: ProxyProcess) -> None:
    sql = (
        "CREATE TEMP TABLE ms (a int); INSERT INTO ms SELECT generate_series(1, 10); "
        "SELECT count(*) FROM ms; SELECT sum(a) FROM ms; SELECT 'x;y' AS s"
    )
    r = run_psql(proxy, "-c", sql)
    assert r.returncode == 0, r.stderr
    # psql 15 prints the result of every statement of a multi-statement string.
    assert lines(r.stdout) == ["10", "55", "x;y"]


def test_notice_and_large_result(proxy: ProxyProcess) -> None:
    sql = (
        "DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$; "
        "SELECT g, repeat('z', 100) FROM generate_series(1, 20000) g"
    )
    r = run_psql(proxy, "-c", sql)
    assert r.returncode == 0, r.stderr
    assert "NOTICE:  hello from plpgsql" in r.stderr
    out = lines(r.stdout)
    assert len(out) == 20000
    assert out[-1] == "20000|" + "z" * 100


def test_copy_both_ways(proxy: ProxyProcess, tmp_path: Path) -> None:
    src = tmp_path / "in.tsv"
    null = "\\N"
    rows = [f"{i}\tname {i} with \\\\ backslash and \\t tab\t{null if i % 7 == 0 else 'note'}" for i in range(1, 5001)]
    src.write_text("\n".join(rows) + "\n")
    dst = tmp_path / "out.tsv"
    csv_dst = tmp_path / "out.csv"
    script = f"""
        DROP TABLE IF EXISTS psql_copy;
        CREATE TABLE psql_copy (id int PRIMARY KEY, name text, note text);
        \\copy psql_copy FROM '{src}'
        SELECT count(*), count(note), sum(id) FROM psql_copy;
        \\copy (SELECT * FROM psql_copy ORDER BY id) TO '{dst}'
        \\copy psql_copy TO '{csv_dst}' WITH (FORMAT csv, HEADER)
        DROP TABLE psql_copy;
    """
    r = run_psql(proxy, "-f", "-", stdin=script)
    assert r.returncode == 0, r.stderr
    # 714 of 5000 ids are multiples of 7 and have a NULL note.
    assert lines(r.stdout) == [f"5000|{5000 - 714}|{5000 * 5001 // 2}"]
    assert dst.read_text() == src.read_text()
    csv_lines = csv_dst.read_text().splitlines()
    assert csv_lines[0] == "id,name,note"
    assert len(csv_lines) == 5001


def test_errors_keep_the_session_usable(proxy: ProxyProcess) -> None:
    script = """
        \\set VERBOSITY verbose
        SELECT 1/0;
        SELECT 'after error' AS a;
        BEGIN;
        SELECT no_such_column FROM pg_class;
        SELECT 'in aborted transaction';
        ROLLBACK;
        SELECT 'after rollback';
        COPY (SELECT 1) TO STDOUT (FORMAT nonsense);
        SELECT 'after copy error';
    """
    r = run_psql(proxy, "-f", "-", stdin=script, stop_on_error=False)
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == ["after error", "after rollback", "after copy error"]
    assert "22012" in r.stderr  # division_by_zero, SQLSTATE shown with VERBOSITY verbose
    assert "42703" in r.stderr  # undefined_column
    assert "25P02" in r.stderr  # in_failed_sql_transaction
    assert "server closed the connection" not in r.stderr


def test_on_error_stop_exits_3(proxy: ProxyProcess) -> None:
    r = run_psql(proxy, "-f", "-", stdin="SELECT 1/0;\nSELECT 'unreached';\n")
    assert r.returncode == 3
    assert "unreached" not in r.stdout
    assert "division by zero" in r.stderr


def test_wrong_password_via_psql(proxy: ProxyProcess) -> None:
    r = run_psql(proxy, "-c", "SELECT 1", dsn=proxy.dsn(password="not-" + APP_PASSWORD))
    assert r.returncode == 2
    assert 'password authentication failed for user "app"' in r.stderr


def test_psql_session_is_a_server_session(proxy: ProxyProcess, pg: DevCluster) -> None:
    r = run_psql(proxy, "-c", "SELECT pg_backend_pid(), inet_server_port()")
    assert r.returncode == 0, r.stderr
    _pid, port = lines(r.stdout)[0].split("|")
    assert int(port) == pg.port
