"""Every path a value can leave by (issue 8, item 3): COPY TO in text and CSV (binary refused for a
restricted role), RETURNING, cursors (SQL DECLARE/FETCH, psycopg's named cursors, asyncpg's portals with
partial Execute), views, CTEs and subqueries that pass a column through, UNION ALL, ``t.*``, ``TABLE``,
SQL PREPARE/EXECUTE; and constructs that carry a value out of a column in some other shape (a whole row,
JSON, an array, a UNION ALL branch under another column's name, a view computing on the column, a copy
into an ungoverned column): for a role without plaintext access these are refused or show nothing of the
value, checked byte-wise on everything pgveil sent to the client.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import visfixtures
from encfixtures import run_psql
from visfixtures import (
    ENCRYPTED,
    GOVERNED,
    PLAIN,
    SUPERUSER_ROLE,
    TABLE,
    Customer,
    Session,
    Tap,
    VisEnv,
    check_value,
    expected_grant,
    insert_customers,
    issue_policy,
    leaked,
    make_customer,
    run_as,
    stored,
)

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

# Roles that read (contractor is denied: its own tests).
READERS = ["billing", "support", "backup", "outsider", "fin_noinherit", SUPERUSER_ROLE, "m_hash", "m_partial"]
RESTRICTED = ["support", "outsider", "fin_noinherit", SUPERUSER_ROLE, "m_hash", "m_partial"]
REFUSAL_STATES = {"42501", "0A000"}
PG_DUMP = shutil.which("pg_dump") or "pg_dump"


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def row(env: VisEnv) -> Customer:
    r = make_customer("paths")
    insert_customers(env, [r])
    return r


@pytest.fixture(scope="module")
def envelopes(env: VisEnv, row: Customer) -> dict[str, bytes]:
    (got,) = stored(env, [row.id])
    return {"email": bytes(got[1]), "ssn": bytes(got[2])}


def grant(role: str, column: str) -> visfixtures.Expected:
    return expected_grant(issue_policy(), role, f"{TABLE}.{column}")


def may_see(role: str, column: str) -> bool:
    """Whether ``role`` may receive the value of ``column`` (plaintext, or a plain column as stored)."""
    g = grant(role, column)
    return g.plaintext or (g.visibility == "ciphertext" and column not in ENCRYPTED)


def check_row(
    role: str, values: tuple[Any, ...], cols: tuple[str | None, ...], row: Customer, envs: dict[str, bytes], where: str
) -> None:
    """``values`` came back for ``row``; ``cols`` names the governed column behind each position."""
    assert len(values) == len(cols), f"{where}: {values!r}"
    for v, col in zip(values, cols, strict=True):
        if col is None:
            continue
        check_value(grant(role, col), col, row.value(col), v, envs.get(col), f"{role} {where}")


# -- COPY TO ----------------------------------------------------------------------------------------------


def _unescape_copy_text(field: str) -> str | None:
    if field == "\\N":
        return None
    return field.replace("\\\\", "\\")


def copy_out(env: VisEnv, role: str, sql: str) -> list[tuple[str | None, ...]]:
    with psycopg.connect(env.dsn(role), autocommit=True) as c:
        with c.cursor().copy(sql) as cp:
            data = b"".join(bytes(b) for b in cp).decode()
        assert c.execute("SELECT 1").fetchone() == (1,)
    if "csv" in sql.lower():
        return [tuple(f if f != "" else None for f in r) for r in csv.reader(io.StringIO(data))]
    return [tuple(_unescape_copy_text(f) for f in line.split("\t")) for line in data.splitlines()]


COPIES = {
    "text-table": "COPY vis_customers (id, email, ssn, phone) TO STDOUT",
    "csv-table": "COPY vis_customers (id, email, ssn, phone) TO STDOUT (FORMAT csv)",
    "text-query": "COPY (SELECT id, email, ssn, phone FROM vis_customers WHERE id = {id}) TO STDOUT",
    "csv-query": "COPY (SELECT id, email, ssn, phone FROM vis_customers WHERE id = {id}) TO STDOUT (FORMAT csv)",
    "text-all-columns": "COPY vis_customers TO STDOUT",
}


@pytest.mark.parametrize("role", READERS)
@pytest.mark.parametrize("how", list(COPIES))
def test_copy_to(env: VisEnv, row: Customer, envelopes: dict[str, bytes], role: str, how: str) -> None:
    got = [r for r in copy_out(env, role, COPIES[how].format(id=row.id)) if r[0] == str(row.id)]
    assert len(got) == 1, got
    if how == "text-all-columns":
        check_row(role, got[0][1:], (None, "email", "ssn", "phone"), row, envelopes, how)
    else:
        check_row(role, got[0][1:], ("email", "ssn", "phone"), row, envelopes, how)


@pytest.mark.parametrize("how", list(COPIES))
def test_copy_to_is_refused_to_a_denied_role(env: VisEnv, row: Customer, how: str) -> None:
    with psycopg.connect(env.dsn("contractor"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), c.cursor().copy(COPIES[how].format(id=row.id)) as cp:
            for _ in cp:
                pass
        assert c.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("role", RESTRICTED)
@pytest.mark.parametrize(
    "sql",
    [
        "COPY vis_customers (id, phone) TO STDOUT (FORMAT binary)",
        "COPY (SELECT id, phone FROM vis_customers WHERE id = {id}) TO STDOUT (FORMAT binary)",
        "COPY vis_plain (id, pin) TO STDOUT (FORMAT binary)",
    ],
)
def test_binary_copy_is_refused_to_a_restricted_role(env: VisEnv, row: Customer, role: str, sql: str) -> None:
    """Binary COPY of a plain governed column: pgveil cannot mask it, so a restricted role is refused."""
    with Tap((env.proxy.host, env.proxy.port)) as tap:
        with psycopg.connect(tap.dsn(role), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as e, c.cursor().copy(sql.format(id=row.id)) as cp:
                for _ in cp:
                    pass
            assert e.value.sqlstate in REFUSAL_STATES, f"{e.value.sqlstate}: {e.value}"
            assert c.execute("SELECT 1").fetchone() == (1,)
        assert not leaked(tap.data(), row.phone)


def test_binary_copy_of_a_plain_column_works_for_a_plaintext_role(env: VisEnv, row: Customer) -> None:
    with (
        psycopg.connect(env.dsn("billing"), autocommit=True) as c,
        c.cursor().copy(
            f"COPY (SELECT id, phone FROM vis_customers WHERE id = {row.id}) TO STDOUT (FORMAT binary)"
        ) as cp,
    ):
        data = b"".join(bytes(b) for b in cp)
    assert row.phone.encode() in data


# -- RETURNING and writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", READERS)
def test_returning(env: VisEnv, role: str) -> None:
    new = make_customer("returning")
    if role == "backup":
        insert_customers(env, [new])  # a ciphertext role writes envelopes, not plaintext (its own test)
    else:
        ins = run_as(
            env,
            role,
            f"INSERT INTO vis_customers (id, name, email, ssn, phone) VALUES ({new.id}, '{new.name}', '{new.email}',"
            f" '{new.ssn}', '{new.phone}') RETURNING id, email, ssn, phone",
        )
        assert ins.sqlstate is None, f"{role} may write what it may not read: {ins.sqlstate} {ins.message}"
    (envs,) = stored(env, [new.id])
    e = {"email": bytes(envs[1]), "ssn": bytes(envs[2])}
    if role != "backup":
        assert ins.rows is not None
        check_row(role, ins.rows[0][1:], ("email", "ssn", "phone"), new, e, "INSERT RETURNING")
    upd = run_as(env, role, f"UPDATE vis_customers SET name = 'renamed' WHERE id = {new.id} RETURNING *")
    assert upd.rows is not None, upd.message
    check_row(role, upd.rows[0][2:], ("email", "ssn", "phone"), new, e, "UPDATE RETURNING *")
    dele = run_as(env, role, f"DELETE FROM vis_customers WHERE id = {new.id} RETURNING phone, ssn")
    assert dele.rows is not None, dele.message
    check_row(role, dele.rows[0], ("phone", "ssn"), new, e, "DELETE RETURNING")


def test_a_restricted_role_writes_what_billing_then_reads(env: VisEnv) -> None:
    new = make_customer("write")
    with psycopg.connect(env.dsn("outsider"), autocommit=True) as c:
        c.execute(
            "INSERT INTO vis_customers (id, name, email, ssn, phone) VALUES (%s, %s, %s, %s, %s)",
            [new.id, new.name, new.email, new.ssn, new.phone],
        )
        assert c.execute("SELECT email, ssn, phone FROM vis_customers WHERE id = %s", [new.id]).fetchone() == (
            None,
            None,
            None,
        )
    with psycopg.connect(env.dsn("billing"), autocommit=True) as c:
        got = c.execute("SELECT email, ssn, phone FROM vis_customers WHERE id = %s", [new.id]).fetchone()
    assert got == (new.email, new.ssn, new.phone)
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        raw = c.execute("SELECT ssn FROM vis_customers WHERE id = %s", [new.id]).fetchone()
    assert raw is not None
    assert not leaked(bytes(raw[0]), new.ssn), "written sealed"


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO vis_customers (id, name, ssn) VALUES ({new}, 'x', 'y')",
        "UPDATE vis_customers SET phone = 'x' WHERE id = {id}",
        "UPDATE vis_customers SET name = 'x' WHERE id = {id} RETURNING ssn",
        "DELETE FROM vis_customers WHERE id = {id} RETURNING *",
    ],
)
def test_deny_refuses_writes_and_returning(env: VisEnv, row: Customer, sql: str) -> None:
    got = run_as(env, "contractor", sql.format(id=row.id, new=visfixtures.next_id()))
    assert got.sqlstate == "42501", got
    assert stored(env, [row.id])[0][3] == row.phone, "nothing changed"


# -- cursors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("role", READERS)
def test_psycopg_named_cursor(env: VisEnv, role: str, binary: bool) -> None:
    rows = [make_customer("cursor") for _ in range(3)]
    insert_customers(env, rows)
    envs = {r[0]: {"email": bytes(r[1]), "ssn": bytes(r[2])} for r in stored(env, [r.id for r in rows])}
    with psycopg.connect(env.dsn(role)) as c:
        cur = c.cursor(name="vis_named", binary=binary)
        cur.itersize = 1
        cur.execute(
            "SELECT id, email, ssn, phone FROM vis_customers WHERE id = ANY(%s) ORDER BY id", [[r.id for r in rows]]
        )
        got = [cur.fetchone(), *cur.fetchmany(1), *cur.fetchall()]
    assert [g[0] for g in got if g is not None] == [r.id for r in rows]
    for g, r in zip(got, rows, strict=True):
        assert g is not None
        check_row(role, g[1:], ("email", "ssn", "phone"), r, envs[r.id], "named cursor")


@pytest.mark.parametrize("role", READERS)
def test_sql_declare_fetch(env: VisEnv, row: Customer, envelopes: dict[str, bytes], role: str) -> None:
    with Tap((env.proxy.host, env.proxy.port)) as tap:
        with psycopg.connect(tap.dsn(role)) as c:
            c.execute(f"DECLARE vis_c CURSOR FOR SELECT id, email, ssn, phone FROM vis_customers WHERE id = {row.id}")
            got = c.execute("FETCH 1 FROM vis_c").fetchall()
            assert c.execute("FETCH ALL FROM vis_c").fetchall() == []
            c.execute("MOVE ABSOLUTE 0 IN vis_c")
            again = psycopg.ClientCursor(c).execute("FETCH NEXT FROM vis_c").fetchall()
            c.execute("MOVE ABSOLUTE 0 IN vis_c")
            binary = c.cursor(binary=True).execute("FETCH NEXT FROM vis_c").fetchall()
            c.rollback()
        raw = tap.data()
    assert len(got) == 1
    check_row(role, got[0][1:], ("email", "ssn", "phone"), row, envelopes, "FETCH")
    assert again == got
    assert len(binary) == 1
    check_row(role, binary[0][1:], ("email", "ssn", "phone"), row, envelopes, "FETCH in binary")
    for col in GOVERNED:
        if not may_see(role, col):
            assert not leaked(raw, row.value(col)), f"{role}: {col} left through a cursor"


async def _asyncpg_cursor(env: VisEnv, role: str, ids: list[int]) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(env.dsn(role))
    try:
        sql = "SELECT id, email, ssn, phone FROM vis_customers WHERE id = ANY($1::int[]) ORDER BY id"
        async with conn.transaction():
            cur = await conn.cursor(sql, ids)  # a portal, read by partial Execute
            out = [tuple(r) for r in await cur.fetch(1)]
            out += [tuple(r) for r in await cur.fetch(1)]
            out += [tuple(r) async for r in conn.cursor(sql, ids[2:], prefetch=1)]
        return out
    finally:
        await conn.close()


@pytest.mark.parametrize("role", READERS)
def test_asyncpg_cursor_with_partial_execute(env: VisEnv, role: str) -> None:
    rows = [make_customer("portal") for _ in range(4)]
    insert_customers(env, rows)
    envs = {r[0]: {"email": bytes(r[1]), "ssn": bytes(r[2])} for r in stored(env, [r.id for r in rows])}
    got = asyncio.run(_asyncpg_cursor(env, role, [r.id for r in rows]))
    want = [rows[0], rows[1], rows[2], rows[3]]
    assert [g[0] for g in got] == [r.id for r in want]
    for g, r in zip(got, want, strict=True):
        check_row(role, g[1:], ("email", "ssn", "phone"), r, envs[r.id], "asyncpg cursor")


def test_cursor_of_a_denied_role_is_refused(env: VisEnv, row: Customer) -> None:
    with psycopg.connect(env.dsn("contractor")) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"DECLARE vis_d CURSOR FOR SELECT * FROM vis_customers WHERE id = {row.id}")
        c.rollback()
        assert c.execute("SELECT 1").fetchone() == (1,)


# -- pass-through: views, CTEs, subqueries, UNION ALL, t.*, PREPARE -----------------------------------------


@dataclass(frozen=True)
class Through:
    name: str
    sql: str  # {id}: the row's id
    cols: tuple[str | None, ...]  # the governed column behind each result column
    setup: tuple[str, ...] = ()
    may_refuse: bool = False  # the issue allows refusing it (a view pgveil cannot resolve, a whole row)


EPS = ("email", "ssn", "phone")
ROW = (None, None, "email", "ssn", "phone")  # id, name, email, ssn, phone
W = "FROM vis_customers WHERE id = {id}"
THROUGH = [
    Through("view", "SELECT * FROM vis_view WHERE id = {id}", ROW, may_refuse=True),
    Through(
        "view_renamed", "SELECT tax_id, tel FROM vis_view_renamed WHERE id = {id}", ("ssn", "phone"), may_refuse=True
    ),
    Through("view_of_view", "SELECT tel FROM vis_view_of_view WHERE id = {id}", ("phone",), may_refuse=True),
    Through("cte", f"WITH c AS (SELECT id, email, ssn, phone {W}) SELECT email, ssn, phone FROM c", EPS),
    Through("cte_star", f"WITH c AS (SELECT * {W}) SELECT c.phone, c.ssn FROM c", ("phone", "ssn")),
    Through(
        "cte_materialized",
        f"WITH c AS MATERIALIZED (SELECT phone AS p, ssn AS s {W}) SELECT p, s FROM c",
        ("phone", "ssn"),
    ),
    Through("subquery", "SELECT s.email, s.ssn, s.phone FROM (SELECT * FROM vis_customers) s WHERE s.id = {id}", EPS),
    Through(
        "subquery_alias_list",
        "SELECT s.a, s.b, s.c FROM (SELECT email, ssn, phone, id FROM vis_customers) AS s(a, b, c, i) WHERE s.i = {id}",
        EPS,
    ),
    Through(
        "union_all",
        f"SELECT email, ssn, phone {W} UNION ALL SELECT email, ssn, phone FROM vis_customers WHERE id = -1",
        EPS,
    ),
    Through("t_star", "SELECT t.* FROM vis_customers t WHERE t.id = {id}", ROW),
    Through("alias_and_star", "SELECT t.phone AS p, t.* FROM vis_customers t WHERE t.id = {id}", ("phone", *ROW)),
    Through("table_command", "SELECT * FROM (TABLE vis_customers) x WHERE x.id = {id}", ROW),
    Through(
        "lateral",
        "SELECT l.ssn, l.phone FROM (SELECT {id} AS k) q,"
        " LATERAL (SELECT ssn, phone FROM vis_customers WHERE id = q.k) l",
        ("ssn", "phone"),
    ),
    Through("sql_prepare_execute", "EXECUTE vis_p", EPS, setup=(f"PREPARE vis_p AS SELECT email, ssn, phone {W}",)),
    Through("scalar_subquery", f"SELECT (SELECT phone {W})", ("phone",), may_refuse=True),
]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("role", READERS)
def test_a_column_passed_through(
    env: VisEnv, row: Customer, envelopes: dict[str, bytes], role: str, binary: bool
) -> None:
    problems: list[str] = []
    with Session(env, role) as s:
        for case in THROUGH:
            if binary and case.setup:
                continue  # SQL EXECUTE over the extended protocol is refused for everyone (docs/fail-closed.md)
            got = s.run(case.sql.format(id=row.id), binary=binary, setup=tuple(x.format(id=row.id) for x in case.setup))
            if case.setup:
                s.run("DEALLOCATE ALL")
            if got.sqlstate is not None:
                if not case.may_refuse or got.sqlstate not in REFUSAL_STATES:
                    problems.append(f"{role}: {case.name} refused: {got.sqlstate} {got.message}")
            else:
                assert got.rows is not None
                try:
                    assert len(got.rows) == 1, got.rows
                    check_row(role, got.rows[0], case.cols, row, envelopes, case.name)
                except AssertionError as e:
                    problems.append(str(e))
            for col in {c for c in case.cols if c is not None}:
                if not may_see(role, col) and leaked(got.raw, row.value(col)):
                    problems.append(f"{role}: {col} left through {case.name}")
    assert problems == [], "\n".join(problems)


def test_a_denied_column_passed_through_is_refused(env: VisEnv, row: Customer) -> None:
    problems: list[str] = []
    with Session(env, "contractor") as s:
        for case in THROUGH:
            setup = tuple(x.format(id=row.id) for x in case.setup)
            got = s.run(case.sql.format(id=row.id), setup=setup)  # a PREPARE naming the column: refused already
            if got.sqlstate != "42501":
                problems.append(f"contractor: {case.name}: {got.sqlstate} {got.message or got.rows}")
            if any(leaked(got.raw, row.value(col)) for col in GOVERNED):
                problems.append(f"contractor: {case.name} sent a value")
    assert problems == [], "\n".join(problems)


# -- other shapes a value can take on its way out -------------------------------------------------------------


def make_fresh(env: VisEnv) -> tuple[Customer, int, str]:
    """A customer and a vis_plain row (its pin a canary) of the caller's own."""
    r = make_customer("shape")
    insert_customers(env, [r])
    pid, pin = visfixtures.next_id(), f"PIN{make_customer('pin').ssn}"
    with psycopg.connect(env.dsn("billing"), autocommit=True) as c:
        visfixtures.retry(c, "INSERT INTO vis_plain (id, note, pin) VALUES (%s, 'note', %s)", [pid, pin])
    return r, pid, pin


@pytest.fixture
def fresh(env: VisEnv) -> tuple[Customer, int, str]:
    return make_fresh(env)


SHAPES = [
    "SELECT t FROM vis_customers t WHERE id = {id}",
    "SELECT t FROM vis_plain t WHERE id = {pid}",
    "SELECT row_to_json(t) FROM vis_plain t WHERE id = {pid}",
    "SELECT to_jsonb(t.*) FROM vis_customers t WHERE id = {id}",
    "SELECT jsonb_build_object('p', phone) FROM vis_customers WHERE id = {id}",
    "SELECT ARRAY(SELECT phone FROM vis_customers WHERE id = {id})",
    "SELECT array_agg(pin) FROM vis_plain WHERE id = {pid}",
    "SELECT string_agg(phone, ',') FROM vis_customers WHERE id = {id}",
    "SELECT phone::varchar FROM vis_customers WHERE id = {id}",
    "SELECT COALESCE(phone, '') FROM vis_customers WHERE id = {id}",
    "SELECT CASE WHEN true THEN pin END FROM vis_plain WHERE id = {pid}",
    "SELECT format('%s', phone) FROM vis_customers WHERE id = {id}",
    "SELECT name FROM vis_customers WHERE id = {id} UNION ALL SELECT phone FROM vis_customers WHERE id = {id}",
    "SELECT note FROM vis_plain WHERE id = {pid} UNION ALL SELECT pin FROM vis_plain WHERE id = {pid}",
    "SELECT pin FROM vis_plain WHERE id = {pid} UNION ALL SELECT 'x'",
    "SELECT x FROM vis_customers c, LATERAL (SELECT c.phone AS x) l WHERE c.id = {id}",
    "SELECT * FROM vis_view_expr WHERE id = {id}",
    "SELECT code FROM vis_plain_view WHERE id = {pid}",
    "SELECT (SELECT pin FROM vis_plain WHERE id = {pid}) AS p",
    "SELECT * FROM vis_plain WHERE id = {pid} AND pin IS NOT NULL",
    "UPDATE vis_plain SET note = pin WHERE id = {pid} RETURNING note",
    "INSERT INTO vis_plain (id, note) SELECT id + 1000000000, pin FROM vis_plain WHERE id = {pid} RETURNING note",
    "COPY (SELECT t FROM vis_plain t WHERE id = {pid}) TO STDOUT",
    "COPY (SELECT row_to_json(t) FROM vis_plain t WHERE id = {pid}) TO STDOUT",
    "VALUES ((SELECT pin FROM vis_plain WHERE id = {pid}))",
    "SELECT * FROM (VALUES ((SELECT pin FROM vis_plain WHERE id = {pid}))) v(p)",
    "SELECT x.v FROM vis_plain p, LATERAL (VALUES (p.pin)) x(v) WHERE p.id = {pid}",
    "SELECT ROW(pin, note) FROM vis_plain WHERE id = {pid}",
    'SELECT pin COLLATE "C" FROM vis_plain WHERE id = {pid}',
    "SELECT (pin) FROM vis_plain WHERE id = {pid}",
    "SELECT pin::text FROM vis_plain WHERE id = {pid}",
    'SELECT "pin" FROM vis_plain WHERE id = {pid}',
    "SELECT vis_plain.pin FROM public.vis_plain WHERE id = {pid}",
    "SELECT x.c FROM vis_plain AS x(a, b, c) WHERE x.a = {pid}",
    "SELECT pin FROM ONLY vis_plain WHERE id = {pid}",
    "SELECT * FROM vis_plain NATURAL JOIN (SELECT {pid} AS id) q",
    "SELECT * FROM vis_plain JOIN (SELECT {pid} AS id) q USING (id)",
    "WITH RECURSIVE r(p) AS (SELECT pin FROM vis_plain WHERE id = {pid} UNION ALL SELECT p FROM r WHERE false)"
    " SELECT * FROM r",
    "SELECT pin FROM vis_plain WHERE id = {pid} FOR SHARE",
    "SELECT GREATEST(pin, '') FROM vis_plain WHERE id = {pid}",
    "SELECT pin FROM vis_plain WHERE id = {pid} INTERSECT ALL SELECT pin FROM vis_plain WHERE id = {pid}",
    "SELECT max(pin) FROM vis_plain WHERE id = {pid}",
    "SELECT * FROM vis_plain p1 FULL JOIN vis_plain p2 USING (pin) WHERE p1.id = {pid}",
    "SELECT * FROM json_populate_record(null::vis_plain, (SELECT row_to_json(t) FROM vis_plain t WHERE id = {pid}))",
    "SELECT * FROM vis_plain WHERE id = {pid}",
    "TABLE vis_plain",
    "SELECT * FROM vis_plain_view WHERE id = {pid}",
    "COPY vis_plain TO STDOUT",
    "COPY (SELECT * FROM vis_plain WHERE id = {pid}) TO STDOUT (FORMAT csv, HEADER)",
    "COPY vis_plain (pin) TO STDOUT (FORMAT csv, FORCE_QUOTE *)",
]


@pytest.mark.parametrize("role", ["support", "outsider", SUPERUSER_ROLE])
def test_no_other_shape_carries_the_value_out(env: VisEnv, role: str) -> None:
    problems: list[str] = []
    with Session(env, role) as s:
        for sql in SHAPES:
            r, pid, pin = make_fresh(env)
            got = s.run(sql.format(id=r.id, pid=pid))
            # whatever the statement did, reading the ungoverned note afterwards must not show pin either
            after = s.run("SELECT note FROM vis_plain WHERE id IN (%s, %s)", [pid, pid + 1000000000])
            for secret in (r.ssn, r.phone, pin):
                if leaked(got.raw + after.raw, secret):
                    problems.append(f"{role}: {sql} (answer {got.sqlstate or got.rows}) carried a value out")
            if got.sqlstate is not None and got.sqlstate not in REFUSAL_STATES:
                problems.append(f"{role}: {sql} failed with {got.sqlstate}, neither a refusal nor success")
    assert problems == [], "\n".join(problems)


# Statements whose follow-up reads what the first one may have put somewhere ungoverned: (statement,
# follow-up). Any answer is allowed (a server error too), as long as no value comes back.
INDIRECT = [
    ("CREATE TEMP TABLE vis_tmp_{n} AS SELECT phone FROM vis_customers WHERE id = {id}", "SELECT * FROM vis_tmp_{n}"),
    ("SELECT pin INTO TEMP vis_tmp_{n} FROM vis_plain WHERE id = {pid}", "SELECT * FROM vis_tmp_{n}"),
    (
        "CREATE TEMP VIEW vis_tv_{n} AS SELECT id, phone AS p FROM vis_customers",
        "SELECT p FROM vis_tv_{n} WHERE id = {id}",
    ),
    (
        "WITH x AS (UPDATE vis_plain SET note = pin WHERE id = {pid} RETURNING note) SELECT * FROM x",
        "SELECT note FROM vis_plain WHERE id = {pid}",
    ),
    (
        "DO $$ BEGIN RAISE NOTICE '%', (SELECT pin FROM vis_plain WHERE id = {pid}); END $$",
        "SELECT 1",
    ),
]


@pytest.mark.parametrize("role", ["support", "outsider"])
def test_no_indirect_route_carries_the_value_out(env: VisEnv, role: str) -> None:
    problems: list[str] = []
    with Session(env, role) as s:
        for n, (first, then) in enumerate(INDIRECT):
            r, pid, pin = make_fresh(env)
            got = s.run(first.format(id=r.id, pid=pid, n=n))
            after = s.run(then.format(id=r.id, pid=pid, n=n))
            for secret in (r.ssn, r.phone, pin):
                if leaked(got.raw + after.raw, secret):
                    problems.append(
                        f"{role}: {first} / {then} (answers {got.sqlstate or got.rows}, {after.sqlstate or after.rows})"
                        " carried a value out"
                    )
    assert problems == [], "\n".join(problems)


def test_the_tap_sees_what_a_plaintext_role_receives(env: VisEnv, fresh: tuple[Customer, int, str]) -> None:
    """The control of the byte-wise search: billing receives the very values the other tests look for."""
    r, pid, pin = fresh
    for binary in (False, True):
        got = run_as(env, "billing", f"SELECT pin FROM vis_plain WHERE id = {pid}", binary=binary)
        assert leaked(got.raw, pin), got
        got = run_as(env, "billing", f"SELECT ssn, phone FROM vis_customers WHERE id = {r.id}", binary=binary)
        assert leaked(got.raw, r.ssn)
        assert leaked(got.raw, r.phone)


def test_plain_table_view_and_pin(env: VisEnv, fresh: tuple[Customer, int, str]) -> None:
    """A table whose governed columns are all plain: support sees the pin masked, directly and via a view."""
    _, pid, pin = fresh
    g = expected_grant(issue_policy(), "support", f"{PLAIN}.pin")
    got = run_as(env, "support", f"SELECT pin FROM vis_plain WHERE id = {pid}")
    assert got.rows is not None, got.message
    check_value(g, "pin", pin, got.rows[0][0], None, "support on vis_plain")
    view = run_as(env, "support", f"SELECT code FROM vis_plain_view WHERE id = {pid}")
    if view.sqlstate is None:
        assert view.rows is not None
        check_value(g, "pin", pin, view.rows[0][0], None, "support on vis_plain_view")
    else:
        assert view.sqlstate in REFUSAL_STATES


# -- ciphertext: backup and restore through pgveil ------------------------------------------------------------


def test_a_ciphertext_role_copies_out_and_back_in(env: VisEnv) -> None:
    """backup's COPY TO gives the stored envelopes; its COPY FROM of the same data stores them unchanged
    (verified, never re-encrypted), and billing reads the plaintext back."""
    rows = [make_customer("backup") for _ in range(2)]
    insert_customers(env, rows)
    ids = [r.id for r in rows]
    before = stored(env, ids)
    q = f"SELECT id, name, email, ssn, phone FROM vis_customers WHERE id IN ({ids[0]}, {ids[1]}) ORDER BY id"
    with psycopg.connect(env.dsn("backup"), autocommit=True) as c:
        with c.cursor().copy(f"COPY ({q}) TO STDOUT") as cp:
            dump = b"".join(bytes(b) for b in cp)
        for r in rows:
            assert not leaked(dump, r.ssn)
            assert not leaked(dump, r.email)
        c.execute("DELETE FROM vis_customers WHERE id = ANY(%s)", [ids])
        with c.cursor().copy("COPY vis_customers (id, name, email, ssn, phone) FROM STDIN") as cp:
            cp.write(dump)
    assert stored(env, ids) == before, "the envelopes were stored unchanged"
    with psycopg.connect(env.dsn("billing"), autocommit=True) as c:
        got = c.execute(q).fetchall()
    assert got == [(r.id, r.name, r.email, r.ssn, r.phone) for r in rows]


@pytest.mark.parametrize(
    "value",
    ["plain text, not an envelope", "swapped"],
)
def test_a_ciphertext_role_cannot_store_what_is_not_the_columns_envelope(env: VisEnv, value: str) -> None:
    r = make_customer("backup-bad")
    insert_customers(env, [r])
    (_, email_env, ssn_env, _phone) = stored(env, [r.id])[0]
    new = visfixtures.next_id()
    ssn: bytes = bytes(email_env) if value == "swapped" else value.encode()  # email's envelope in ssn: wrong column
    with psycopg.connect(env.dsn("backup"), autocommit=True) as c:
        with pytest.raises(psycopg.Error):
            c.execute("INSERT INTO vis_customers (id, name, ssn) VALUES (%s, 'bad', %s)", [new, ssn])
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert stored(env, [new]) == []
    assert bytes(ssn_env) != ssn


def test_pg_dump_through_pgveil_as_backup_restores_through_pgveil(env: VisEnv, tmp_path: Path) -> None:
    """The issue's promise: ``pg_dump`` through pgveil as a ciphertext role restores (through pgveil) into
    a database that pgveil fronts: what billing reads afterwards is the original plaintext."""
    rows = [make_customer("pg_dump") for _ in range(2)]
    insert_customers(env, rows)
    dump = tmp_path / "dump.sql"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    p = subprocess.run(
        [PG_DUMP, "--data-only", "--table=vis_customers", "--file", str(dump), "-d", env.dsn("backup")],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    text = dump.read_bytes()
    for r in rows:
        assert not leaked(text, r.ssn)
        assert not leaked(text, r.email)
    with psycopg.connect(env.dsn("billing"), autocommit=True) as c:
        c.execute("DELETE FROM vis_customers WHERE id = ANY(%s)", [[r.id for r in rows]])
    # Restore only our rows: the dump holds every row of the table; keep the COPY header and ours.
    lines = text.decode().splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("COPY public.vis_customers"))
    end = next(k for k in range(start, len(lines)) if lines[k] == "\\.")
    ours = [line for line in lines[start + 1 : end] if line.split("\t")[0] in {str(r.id) for r in rows}]
    assert len(ours) == len(rows)
    restore = "\n".join([lines[start], *ours, "\\.", ""])
    q = run_psql(env.dsn("backup"), stdin=restore)
    assert q.returncode == 0, q.stderr
    with psycopg.connect(env.dsn("billing"), autocommit=True) as c:
        got = c.execute(
            "SELECT id, name, email, ssn, phone FROM vis_customers WHERE id = ANY(%s) ORDER BY id",
            [[r.id for r in rows]],
        ).fetchall()
    assert got == [(r.id, r.name, r.email, r.ssn, r.phone) for r in rows]
