"""The canary for visibility (issue 8): a distinctive plaintext in ssn (encrypted), email (encrypted) and
phone (plain) never appears in anything a hidden, masked or denied role receives: every byte pgveil sends
on the connection is recorded (a :class:`visfixtures.Tap` between the driver and pgveil), for psycopg in
text and binary, asyncpg and psql (whose output also goes to a file that is searched), over a battery of
statements on every path out, refused ones included. The search is for every 10-character piece of the
value (no mask keeps that much of it) as UTF-8 and as hex.

The control: the same battery as billing (plaintext) finds every canary, through every driver, so the
search is not blind.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncpg
import psycopg
import pytest
import visfixtures
from encfixtures import run_psql
from visfixtures import (
    ENCRYPTED,
    GOVERNED,
    SUPERUSER_ROLE,
    TABLE,
    Customer,
    Tap,
    VisEnv,
    expected_grant,
    insert_customers,
    issue_policy,
    leaked,
    make_customer,
)

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

# One role per kind of view: masked (two masks), hidden (unlisted, superuser), denied, ciphertext, combined.
ROLES = ["support", "m_hash", "outsider", SUPERUSER_ROLE, "contractor", "backup", "mixed"]


def battery(r: Customer) -> list[str]:
    w = f"WHERE id = {r.id}"
    return [
        f"SELECT * FROM vis_customers {w}",
        f"SELECT email, ssn, phone FROM vis_customers {w}",
        f"SELECT t.* FROM vis_customers t {w}",
        f"SELECT t FROM vis_customers t {w}",
        f"WITH c AS (SELECT * FROM vis_customers {w}) SELECT * FROM c",
        f"SELECT * FROM (SELECT ssn, phone, email FROM vis_customers {w}) s",
        f"SELECT phone FROM vis_customers {w} UNION ALL SELECT phone FROM vis_customers {w}",
        f"SELECT * FROM vis_view {w}",
        f"SELECT * FROM vis_view_renamed {w}",
        f"SELECT * FROM vis_view_expr {w}",
        f"UPDATE vis_customers SET name = name {w} RETURNING *",
        f"SELECT id FROM vis_customers {w} AND phone LIKE '+%'",
        f"SELECT id FROM vis_customers {w} ORDER BY phone",
        f"SELECT lower(phone), upper(email) FROM vis_customers {w}",
        f"SELECT id FROM vis_customers {w} AND ssn IS NOT NULL",
        f"SELECT row_to_json(t) FROM vis_customers t {w}",
        f"SELECT name FROM vis_customers {w} UNION ALL SELECT phone FROM vis_customers {w}",
        f"SELECT ARRAY(SELECT phone FROM vis_customers {w})",
    ]


def copies(r: Customer) -> list[str]:
    q = f"SELECT id, email, ssn, phone FROM vis_customers WHERE id = {r.id}"
    return [
        f"COPY ({q}) TO STDOUT",
        f"COPY ({q}) TO STDOUT (FORMAT csv)",
        f"COPY ({q}) TO STDOUT (FORMAT binary)",
        "COPY vis_customers TO STDOUT",
    ]


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def canary(env: VisEnv) -> Customer:
    r = make_customer("canary")
    insert_customers(env, [r])
    return r


def psycopg_receives(tap: Tap, role: str, r: Customer, binary: bool) -> None:
    with psycopg.connect(tap.dsn(role)) as c:
        for sql in battery(r):
            with contextlib.suppress(psycopg.Error):
                c.cursor(binary=binary).execute(sql).fetchall()
            c.rollback()
        for sql in copies(r):
            with contextlib.suppress(psycopg.Error), c.cursor().copy(sql) as cp:
                for _ in cp:
                    pass
            c.rollback()
        with contextlib.suppress(psycopg.Error):
            cur = c.cursor(name="canary_cursor", binary=binary)
            cur.execute(f"SELECT * FROM vis_customers WHERE id = {r.id}")
            cur.fetchall()
        c.rollback()


async def asyncpg_receives(tap: Tap, role: str, r: Customer) -> None:
    conn = await asyncpg.connect(tap.dsn(role))
    try:
        for sql in battery(r):
            with contextlib.suppress(asyncpg.PostgresError):
                await conn.fetch(sql)
        with contextlib.suppress(asyncpg.PostgresError):
            async with conn.transaction():
                cur = await conn.cursor(f"SELECT * FROM vis_customers WHERE id = {r.id}")
                await cur.fetch(1)
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.copy_from_query(
                f"SELECT id, email, ssn, phone FROM vis_customers WHERE id = {r.id}", output=_sink
            )
    finally:
        await conn.close()


async def _sink(data: bytes) -> None:
    pass


def psql_receives(tap: Tap, role: str, r: Customer, out: Path) -> bytes:
    script = ";\n".join([*battery(r), *copies(r)[:2]]) + ";\n"
    run_psql(tap.dsn(role), "-o", str(out), stdin=script, stop_on_error=False)
    return out.read_bytes() if out.exists() else b""


def may_see(role: str, column: str) -> bool:
    g = expected_grant(issue_policy(), role, f"{TABLE}.{column}")
    return g.plaintext or (g.visibility == "ciphertext" and column not in ENCRYPTED)


DRIVERS = ["psycopg-text", "psycopg-binary", "asyncpg", "psql"]


def receive(env: VisEnv, role: str, r: Customer, driver: str, tmp_path: Path) -> bytes:
    with Tap((env.proxy.host, env.proxy.port)) as tap:
        extra = b""
        if driver.startswith("psycopg"):
            psycopg_receives(tap, role, r, driver.endswith("binary"))
        elif driver == "asyncpg":
            asyncio.run(asyncpg_receives(tap, role, r))
        else:
            extra = psql_receives(tap, role, r, tmp_path / f"{role}.out")
        return tap.data() + extra


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("role", ROLES)
def test_the_canary_never_reaches_a_role_that_may_not_see_it(
    env: VisEnv, canary: Customer, role: str, driver: str, tmp_path: Path
) -> None:
    raw = receive(env, role, canary, driver, tmp_path)
    assert len(raw) > 1000, "the battery ran"
    found = [col for col in GOVERNED if not may_see(role, col) and leaked(raw, canary.value(col))]
    assert found == [], f"{role} via {driver} received the plaintext of {found}"


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_search_finds_what_billing_receives(env: VisEnv, canary: Customer, driver: str, tmp_path: Path) -> None:
    raw = receive(env, "billing", canary, driver, tmp_path)
    for col in GOVERNED:
        assert leaked(raw, canary.value(col)), f"control: billing's {col} not found via {driver}: the search is blind"
