"""A column the role sees hidden is not fetched (issue 8, performance of the hidden fetch): where the
statement's own SELECT list names an encrypted column, pgveil asks the server for
``CASE WHEN false THEN <the column> END`` in its place (folded to a NULL bytea by the planner), so the
envelopes it would drop never leave the server, while the parser's checks of the reference stay. The
client sees what it saw before: NULL with the declared type, under the same output name; the server's
view of the text is read back from ``pg_stat_activity`` in the same statement. A statement prepared while
a column was hidden cannot show it later: after a reload that reveals the column it is refused (prepare
again), never served NULL under the new policy."""

from __future__ import annotations

import asyncio
import copy
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import visfixtures
from conftest import ProxyProcess
from visfixtures import TABLE, Customer, VisEnv, insert_customers, issue_policy, make_customer, reload_policy

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

TEXT_OID = 25
SEEN = "(SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid())"  # the text the server runs
SQL = f"SELECT id, email AS e, ssn, phone, {SEEN} AS q FROM vis_customers WHERE id = %s"


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def row(env: VisEnv) -> Customer:
    r = make_customer("hiddenfetch")
    insert_customers(env, [r])
    return r


@pytest.fixture(scope="module")
def proxy(env: VisEnv) -> Iterator[ProxyProcess]:
    with visfixtures.own_proxy(env, issue_policy(), "hiddenfetch") as p:
        yield p


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("prepare", [False, True], ids=["unprepared", "prepared"])
def test_a_hidden_role_gets_null_and_the_server_is_asked_for_null(
    env: VisEnv, proxy: ProxyProcess, row: Customer, binary: bool, prepare: bool
) -> None:
    with psycopg.connect(env.dsn("outsider", proxy), autocommit=True) as c:
        cur = c.cursor(binary=binary)
        got = cur.execute(SQL, [row.id], prepare=prepare).fetchone()
        assert got is not None
        assert got[:4] == (row.id, None, None, None)
        assert cur.description is not None
        names = [d.name for d in cur.description]
        assert names == ["id", "e", "ssn", "phone", "q"]
        assert [d.type_code for d in cur.description[1:3]] == [TEXT_OID, TEXT_OID], "the declared type"
        seen = got[4]
        assert "CASE WHEN false THEN email END AS e" in seen, seen
        assert 'CASE WHEN false THEN ssn END AS "ssn"' in seen, seen
        assert "phone" in seen, "a plain column is fetched and hidden by pgveil"


def test_a_plaintext_role_runs_the_text_as_sent(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    with psycopg.connect(env.dsn("billing", proxy), autocommit=True) as c:
        got = c.execute(SQL, [row.id]).fetchone()
        assert got is not None
        assert got[:4] == (row.id, row.email, row.ssn, row.phone)
        assert "CASE WHEN false" not in got[4]


def test_psql_simple_protocol(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    sql = f"SELECT ssn, email, {SEEN} FROM vis_customers WHERE id = {row.id}"
    out = subprocess.run(
        ["psql", env.dsn("outsider", proxy), "-XAt", "-F", "|", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    ssn, email, seen = out.split("|", 2)
    assert (ssn, email) == ("", "")
    assert 'CASE WHEN false THEN ssn END AS "ssn", CASE WHEN false THEN email END AS "email"' in seen


async def _asyncpg(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    conn = await asyncpg.connect(env.dsn("outsider", proxy))
    try:
        got = await conn.fetchrow(f"SELECT ssn, email, {SEEN} AS q FROM vis_customers WHERE id = $1", row.id)
        assert got is not None
        assert (got["ssn"], got["email"]) == (None, None)
        assert "CASE WHEN false THEN ssn END" in got["q"]
        stmt = await conn.prepare("SELECT ssn FROM vis_customers WHERE id = $1")
        assert [a.type.name for a in stmt.get_attributes()] == ["text"]
    finally:
        await conn.close()


def test_asyncpg(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    asyncio.run(_asyncpg(env, proxy, row))


def _revealing(roles: dict[str, Any]) -> dict[str, Any]:
    p = copy.deepcopy(roles)
    p["default"] = "plaintext"
    return p


def test_a_statement_prepared_while_hidden_is_refused_once_the_column_is_revealed(
    env: VisEnv, proxy: ProxyProcess, row: Customer
) -> None:
    try:
        with psycopg.connect(env.dsn("outsider", proxy), autocommit=True) as c:
            sql = "SELECT ssn FROM vis_customers WHERE id = %s"
            assert c.execute(sql, [row.id], prepare=True).fetchone() == (None,)
            reload_policy(proxy, _revealing(issue_policy()))
            with pytest.raises(psycopg.errors.FeatureNotSupported, match=r"was hidden from this role"):
                c.execute(sql, [row.id], prepare=True)
            assert c.execute("SELECT 1").fetchone() == (1,), "the session stays usable"
            # Prepared anew (another text: psycopg keeps its name for the old one), the column shows.
            assert c.execute(sql + " AND true", [row.id], prepare=True).fetchone() == (row.ssn,)
            assert c.execute(f"SELECT ssn FROM vis_customers WHERE id = {row.id}").fetchone() == (row.ssn,)
    finally:
        reload_policy(proxy, issue_policy())


def test_still_hidden_after_a_reload_is_served(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    """A reload that keeps the column hidden does not disturb the prepared statement."""
    try:
        with psycopg.connect(env.dsn("outsider", proxy), autocommit=True) as c:
            sql = f"SELECT ssn, {SEEN} FROM vis_customers WHERE id = %s"
            assert c.execute(sql, [row.id], prepare=True).fetchone()[0] is None  # type: ignore[index]
            changed = issue_policy()
            changed["support"] = {f"{TABLE}.*": "hidden"}
            reload_policy(proxy, changed)
            got = c.execute(sql, [row.id], prepare=True).fetchone()
            assert got is not None
            assert got[0] is None
    finally:
        reload_policy(proxy, issue_policy())


@pytest.mark.parametrize("sql", ["SELECT ssn, count(*) FROM vis_customers", "SELECT sn FROM vis_customers"])
def test_the_server_still_checks_the_reference(env: VisEnv, proxy: ProxyProcess, sql: str) -> None:
    """An ungrouped or unknown column is the server's error for a hidden role as for anyone."""
    with psycopg.connect(env.direct_dsn, autocommit=True) as direct, pytest.raises(psycopg.Error) as expected:
        direct.execute(sql)
    with psycopg.connect(env.dsn("outsider", proxy), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as got:
            c.execute(sql)
        assert got.value.sqlstate == expected.value.sqlstate
        assert c.execute("SELECT 1").fetchone() == (1,)
