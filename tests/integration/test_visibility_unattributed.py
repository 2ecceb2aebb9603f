"""A result column pgveil cannot attribute but whose values carry pgveil envelopes is treated as
restricted (issue 8, item 3). A function over the table (here a SECURITY DEFINER SQL function the
statement names instead of the table, so pgveil's analysis never sees the table) hands a role the stored
envelope of a column the role may not see. For a role to which some encrypted column is neither
plaintext nor ciphertext, every unattributed value that carries an envelope, in any form PostgreSQL's
output functions give it (raw in binary results, hex or escape text, inside arrays and records), comes
back NULL; values without one are untouched. Roles that may see every encrypted column (plaintext or as
ciphertext) get the server's bytes as before.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import visfixtures
from conftest import ProxyProcess
from visfixtures import Customer, VisEnv, insert_customers, issue_policy, make_customer

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

FUNCTION = (
    "CREATE OR REPLACE FUNCTION vis_stored_ssn(int) RETURNS bytea LANGUAGE sql STABLE SECURITY DEFINER "
    "AS 'SELECT ssn FROM public.vis_customers WHERE id = $1'"
)
PREFIX = b"PV\x01\x01"


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    e = visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)
    with psycopg.connect(e.direct_dsn, autocommit=True) as c:
        c.execute(FUNCTION)
        c.execute("GRANT EXECUTE ON FUNCTION vis_stored_ssn(int) TO PUBLIC")
    return e


@pytest.fixture(scope="module")
def row(env: VisEnv) -> Customer:
    r = make_customer("unattributed")
    insert_customers(env, [r])
    return r


@pytest.fixture(scope="module")
def proxy(env: VisEnv) -> Iterator[ProxyProcess]:
    with visfixtures.own_proxy(env, issue_policy(), "unattributed") as p:
        yield p


def forms(row: Customer) -> str:
    """One statement with the envelope in every form, and two values without one."""
    f = f"vis_stored_ssn({row.id})"
    return (
        f"SELECT {f} AS raw, {f}::text AS txt, ARRAY[{f}, {f}] AS arr, ROW({f}, 1) AS rec,"
        " '\\x0102'::bytea AS other, 'x5056' AS note"
    )


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("role", ["support", "outsider", "matcher"])
def test_a_restricted_role_gets_null_for_every_form_of_an_envelope(
    env: VisEnv, proxy: ProxyProcess, row: Customer, binary: bool, role: str
) -> None:
    with psycopg.connect(env.dsn(role, proxy), autocommit=True) as c:
        got = c.cursor(binary=binary).execute(forms(row)).fetchone()
        assert got is not None
        assert got[:4] == (None, None, None, None)
        assert got[4] == b"\x01\x02"
        assert got[5] == "x5056"
        c.execute("SET bytea_output = escape")
        escaped = c.cursor(binary=binary).execute(forms(row)).fetchone()
        assert escaped is not None
        assert escaped[:4] == (None, None, None, None)
        assert escaped[4] == b"\x01\x02"


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("role", ["fin_member", "backup"])
def test_roles_that_see_every_encrypted_column_get_the_server_bytes(
    env: VisEnv, proxy: ProxyProcess, row: Customer, role: str, binary: bool
) -> None:
    """fin_member (through finance) sees every encrypted column in plaintext, backup as ciphertext:
    nothing to restrict, the envelope comes as the server sends it."""
    with psycopg.connect(env.dsn(role, proxy), autocommit=True) as c:
        got = c.cursor(binary=binary).execute(forms(row)).fetchone()
        assert got is not None
        assert bytes(got[0]).startswith(PREFIX)
        assert got[2] is not None
        assert got[2][0] == got[0]


def test_billing_is_restricted_where_the_typed_table_is_hidden(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    """billing's policy names vis_customers and vis_plain only: the typed table's encrypted columns fall to
    default (hidden), so its results are screened too, although it sees this column in plaintext through
    the table itself. A function is not a way around a grant it lacks elsewhere."""
    with psycopg.connect(env.dsn("billing", proxy), autocommit=True) as c:
        assert c.execute(forms(row)).fetchone()[0] is None  # type: ignore[index]
        assert c.execute("SELECT ssn FROM vis_customers WHERE id = %s", [row.id]).fetchone() == (row.ssn,)


def test_psql_simple_protocol(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    out = subprocess.run(
        ["psql", env.dsn("support", proxy), "-XAt", "-F", "|", "-c", forms(row)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    raw, txt, arr, rec, other, note = out.split("|")
    assert (raw, txt, arr, rec) == ("", "", "", "")
    assert (other, note) == ("\\x0102", "x5056")


async def _asyncpg(env: VisEnv, proxy: ProxyProcess, row: Customer) -> list[Any]:
    conn = await asyncpg.connect(env.dsn("support", proxy))
    try:
        got = await conn.fetchrow("SELECT vis_stored_ssn($1) AS raw, ARRAY[vis_stored_ssn($1)] AS arr", row.id)
        assert got is not None
        return [got["raw"], got["arr"]]
    finally:
        await conn.close()


def test_asyncpg(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    assert asyncio.run(_asyncpg(env, proxy, row)) == [None, None]


def test_the_direct_read_is_an_envelope(env: VisEnv, row: Customer) -> None:
    """The premise: the function does return the stored envelope (so the NULLs above are pgveil's)."""
    with psycopg.connect(env.direct_dsn, dbname=visfixtures.DB, autocommit=True) as c:
        got = c.execute(f"SELECT vis_stored_ssn({row.id})").fetchone()
        assert got is not None
        assert bytes(got[0]).startswith(PREFIX)
