"""Red-team probes of the hidden-column substitution (HiddenOutput) and of envelope screening
(Action.SCREEN), as a client that shapes its input so that pgveil's reading differs from the server's.

HiddenOutput: for a role that sees an encrypted column ``hidden``, a bare reference to it in the top-level
SELECT list is sent as ``CASE WHEN false THEN <ref> END AS "<name>"``. Nothing but that column's values
may change: every probe runs one statement as ``billing`` (plaintext) and as ``outsider`` (hidden) and
compares row counts, column names, the other values and errors; the server's own view of the text is
read back from ``pg_stat_activity``. A statement prepared or a portal bound while the column was hidden
must never serve NULL after a reload that reveals the column.

Screening: for a role to which some encrypted column is neither plaintext nor ciphertext, an
unattributed result value that carries an envelope in a form PostgreSQL's output functions give it
comes back NULL, and every other value is untouched. The envelope comes from SECURITY DEFINER functions
(so pgveil's analysis never sees the table); the bytes the client received are searched with a Tap.

A probe that breaks a guarantee on main is marked ``xfail(strict=True)`` with the break as reason.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import visfixtures
from conftest import ProxyProcess
from visfixtures import Customer, Session, VisEnv, insert_customers, issue_policy, make_customer, reload_policy

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

PREFIX = b"PV\x01\x01"
SEEN = "(SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid())"
INNOCENT_NAME = "order ref 0x50560101ff"  # an ordinary text value that happens to contain the hex of the header
FUNCTIONS = (
    "CREATE OR REPLACE FUNCTION rt_ssn(int) RETURNS bytea LANGUAGE sql STABLE SECURITY DEFINER "
    "AS 'SELECT ssn FROM public.vis_customers WHERE id = $1'",
    "CREATE DOMAIN rt_blob AS bytea",
    "CREATE OR REPLACE FUNCTION rt_dom(int) RETURNS rt_blob LANGUAGE sql STABLE SECURITY DEFINER "
    "AS 'SELECT ssn::rt_blob FROM public.vis_customers WHERE id = $1'",
    "CREATE OR REPLACE FUNCTION rt_rows(int) RETURNS public.vis_customers[] LANGUAGE sql STABLE SECURITY DEFINER "
    "AS 'SELECT array_agg(c) FROM public.vis_customers c WHERE id = $1'",
    "CREATE TABLE rt_copy (id int PRIMARY KEY, b bytea)",
    "GRANT SELECT ON rt_copy TO PUBLIC",
)


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    e = visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)
    with psycopg.connect(e.direct_dsn, autocommit=True) as c:
        if c.execute("SELECT to_regclass('rt_copy')").fetchone() == (None,):
            for sql in FUNCTIONS:
                c.execute(sql)
    return e


@pytest.fixture(scope="module")
def rows(env: VisEnv) -> tuple[Customer, Customer]:
    a, b = make_customer("rthidden"), make_customer("rthidden")
    b = Customer(b.id, INNOCENT_NAME, b.email, b.ssn, b.phone)
    insert_customers(env, [a, b])
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        # An envelope copied (behind pgveil) into a table pgveil does not govern.
        c.execute("INSERT INTO rt_copy SELECT id, ssn FROM vis_customers WHERE id = %s", [a.id])
    return a, b


@pytest.fixture(scope="module")
def proxy(env: VisEnv) -> Iterator[ProxyProcess]:
    with visfixtures.own_proxy(env, issue_policy(), "redteam_hidden") as p:
        yield p


def _revealing() -> dict[str, Any]:
    p = copy.deepcopy(issue_policy())
    p["outsider"] = "plaintext"
    return p


def _hiding() -> dict[str, Any]:
    p = copy.deepcopy(issue_policy())
    p["billing"] = {f"{visfixtures.TABLE}.*": "hidden"}
    return p


def _result(env: VisEnv, proxy: ProxyProcess, role: str, sql: str, *, prepare: bool) -> tuple[Any, ...]:
    """(column names, rows) or ("error", SQLSTATE) of ``sql`` as ``role``."""
    with psycopg.connect(env.dsn(role, proxy), autocommit=True) as c:
        try:
            cur = c.execute(sql, prepare=prepare)
        except psycopg.Error as e:
            assert c.execute("SELECT 1").fetchone() == (1,)
            return ("error", e.sqlstate)
        assert cur.description is not None
        return tuple(d.name for d in cur.description), cur.fetchall()


# -- HiddenOutput: nothing but the hidden column's values changes -------------------------------------

# (statement with {a} and {b} for the two rows' ids, the result positions that are encrypted columns)
SAME_RESULT = [
    pytest.param("SELECT ssn s, id FROM vis_customers WHERE id = {a}", (0,), id="bare-alias"),
    pytest.param('SELECT ssn"x"FROM vis_customers WHERE id = {a}', (0,), id="alias-glued-quoted"),
    pytest.param("SELECT ssn   \t\n  AS\n s, id FROM vis_customers WHERE id = {a}", (0,), id="odd-whitespace"),
    pytest.param('SELECT U&"s\\0073n", id FROM vis_customers WHERE id = {a}', (0,), id="unicode-escape-ident"),
    pytest.param(
        "SELECT 'é😀ß' AS m, vis_customers.--c\nssn FROM vis_customers WHERE id = {a}", (1,), id="multibyte-comment"
    ),
    pytest.param("SELECT /* ssn, */ ssn /* , id */ , id FROM vis_customers WHERE id = {a}", (0,), id="comments-around"),
    pytest.param("SELECT $$ssn FROM$$ AS d, ssn FROM vis_customers WHERE id = {a}", (1,), id="dollar-quote-before"),
    pytest.param("SELECT E'\\', ssn', ssn FROM vis_customers WHERE id = {a}", (1,), id="escape-string-before"),
    pytest.param('SELECT ssn AS "end", email "select" FROM vis_customers WHERE id = {a}', (0, 1), id="keyword-alias"),
    pytest.param("SELECT ssn value, id FROM vis_customers WHERE id = {a}", (0,), id="unreserved-keyword-alias"),
    pytest.param(
        "SELECT ssn, id FROM vis_customers WHERE id IN ({a}, {b}) ORDER BY id FOR UPDATE", (0,), id="for-update"
    ),
    pytest.param(
        "WITH u AS (UPDATE vis_customers SET name = name WHERE id IN ({a}, {b}) RETURNING ssn, id) "
        "SELECT ssn, id FROM u ORDER BY id",
        (0,),
        id="data-modifying-cte",
    ),
    pytest.param(
        "SELECT l.x, c.ssn FROM vis_customers c, LATERAL (SELECT c.id AS x) l WHERE c.id = {a}", (1,), id="lateral"
    ),
    pytest.param(
        "SELECT ssn, id FROM vis_customers WHERE id IN ({a}, {b}) GROUP BY id ORDER BY id",
        (0,),
        id="functionally-dependent",
    ),
    pytest.param("SELECT ssn, g FROM vis_customers, generate_series(1, 3) g WHERE id = {a}", (0,), id="srf"),
    pytest.param("SELECT ssn, generate_series(1, 3) AS g FROM vis_customers WHERE id = {a}", (0,), id="srf-in-list"),
    pytest.param("SELECT ssn, count(*) OVER () AS n FROM vis_customers WHERE id IN ({a}, {b})", (0,), id="window"),
    pytest.param(
        "SELECT c.ssn, d.id FROM vis_customers AS c JOIN vis_customers AS d USING (id) WHERE c.id = {a}",
        (0,),
        id="join-using",
    ),
    pytest.param("SELECT ssn, *, ssn FROM vis_customers WHERE id = {a}", (0, 3, 4, 5, 6), id="star-between"),
    pytest.param("SELECT ssn FROM vis_customers HAVING count(*) > 0", (0,), id="ungrouped-error"),
    pytest.param("SELECT ssn FROM vis_customers GROUP BY ()", (0,), id="empty-grouping-error"),
    pytest.param("SELECT ssn::int FROM vis_customers WHERE id = {a}", (0,), id="cast-refused"),
    pytest.param("SELECT id, ssn FROM ONLY vis_customers WHERE id = {a} LIMIT 1 OFFSET 0", (1,), id="only-limit"),
    # Parentheses around the reference: the substitution wraps them, the output name goes after them.
    pytest.param("SELECT (ssn) FROM vis_customers WHERE id = {a}", (0,), id="parenthesised"),
    pytest.param("SELECT id, ((vis_customers.ssn)) FROM vis_customers WHERE id = {a}", (1,), id="double-parenthesised"),
    pytest.param("SELECT ( /* c */ ssn -- x\n ) FROM vis_customers WHERE id = {a}", (0,), id="parenthesised-comments"),
    pytest.param("SELECT (ssn) AS s, (ssn)t FROM vis_customers WHERE id = {a}", (0, 1), id="parenthesised-aliases"),
    pytest.param("SELECT (ssn)::bytea FROM vis_customers WHERE id = {a}", (0,), id="parenthesised-cast-refused"),
]


@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "prepared"])
@pytest.mark.parametrize(("template", "encrypted"), SAME_RESULT)
def test_the_substitution_changes_nothing_but_the_hidden_values(
    env: VisEnv,
    proxy: ProxyProcess,
    rows: tuple[Customer, Customer],
    template: str,
    encrypted: tuple[int, ...],
    prepare: bool,
) -> None:
    a, b = rows
    sql = template.format(a=a.id, b=b.id)
    plain = _result(env, proxy, "billing", sql, prepare=prepare)
    hidden = _result(env, proxy, "outsider", sql, prepare=prepare)
    if plain[0] == "error" or hidden[0] == "error":
        # The same error, or a pgveil refusal of a use the hidden role may not make (never a new error).
        assert hidden == plain or hidden[1] in ("42501", "0A000"), (plain, hidden)
        return
    names, got = hidden
    assert names == plain[0]
    assert len(got) == len(plain[1]), "the same number of rows"
    for mine, theirs in zip(got, plain[1], strict=True):
        for i, (v, w) in enumerate(zip(mine, theirs, strict=True)):
            if i in encrypted:
                assert v is None, (i, v)
                assert w is not None, (i, w)
            else:
                assert v == w, (i, v, w)


SUBSTITUTED = [
    pytest.param("SELECT ssn s, {seen} FROM vis_customers WHERE id = {a}", "CASE WHEN false THEN ssn END s", id="bare"),
    pytest.param(
        'SELECT U&"s\\0073n", {seen} FROM vis_customers WHERE id = {a}',
        'CASE WHEN false THEN U&"s\\0073n" END AS "ssn"',
        id="unicode",
    ),
    pytest.param(
        "SELECT 'é😀', vis_customers.--c\nssn, {seen} FROM vis_customers WHERE id = {a}",
        'CASE WHEN false THEN vis_customers.--c\nssn END AS "ssn"',
        id="multibyte-comment",
    ),
    pytest.param(
        'SELECT ((vis_customers.ssn))AS"ssn", {seen} FROM vis_customers WHERE id = {a}',
        'SELECT CASE WHEN false THEN ((vis_customers.ssn)) END AS"ssn",',
        id="parenthesised",
    ),
    pytest.param(
        "SELECT(ssn)s, {seen} FROM vis_customers WHERE id = {a}",
        "SELECT CASE WHEN false THEN (ssn) END s,",
        id="parenthesised-bare-alias",
    ),
    pytest.param(
        "SELECT 'x'; SELECT 'ü', ssn, {seen} FROM vis_customers WHERE id = {a}",
        'CASE WHEN false THEN ssn END AS "ssn"',
        id="second-statement",
    ),
]


@pytest.mark.parametrize(("template", "expected"), SUBSTITUTED)
def test_the_server_runs_the_substituted_text_and_sends_no_envelope(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer], template: str, expected: str
) -> None:
    """The server's own copy of the text (pg_stat_activity) has the substitution on the right span, and
    no byte of an envelope or of the canary reaches the client."""
    a, _ = rows
    with Session(env, "outsider", proxy) as s:
        cur = psycopg.ClientCursor(s.conn)
        cur.execute(template.format(a=a.id, seen=SEEN))
        while cur.nextset():
            pass  # the last statement's result
        (row,) = cur.fetchall()
        raw = s.tap.data()
    assert row[-2] is None
    assert expected in row[-1], row[-1]
    assert PREFIX not in raw
    assert b"x50560101" not in raw
    assert not visfixtures.leaked(raw, a.ssn)


@pytest.mark.parametrize(
    "sql",
    [
        "EXPLAIN (ANALYZE, VERBOSE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT ssn FROM vis_customers WHERE id = {a}",
        "CREATE VIEW rt_view AS SELECT ssn FROM vis_customers WHERE id = {a}",
        "PREPARE rt_p AS SELECT ssn FROM vis_customers WHERE id = {a}",
    ],
    ids=["explain-analyze", "view", "sql-prepare"],
)
def test_statements_that_keep_a_query_are_not_substituted(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer], sql: str
) -> None:
    """A hidden role's DDL or plan must not bake the NULL into an object others read: the query is sent as
    written (a view made by a hidden role shows the value to a plaintext role)."""
    a, _ = rows
    with psycopg.connect(env.dsn("outsider", proxy), autocommit=True) as c:
        deadline = time.monotonic() + 20
        refused: str | None = None
        while True:
            try:
                out = c.execute(sql.format(a=a.id))
                break
            except psycopg.errors.ObjectNotInPrerequisiteState:  # the catalog is read again after DDL
                assert time.monotonic() < deadline
                time.sleep(0.2)
            except psycopg.Error as e:
                refused = e.sqlstate
                break
        if refused is not None:
            assert refused in ("42501", "0A000"), refused  # refused: nothing kept either
            return
        if sql.startswith("EXPLAIN"):
            plan = "\n".join(r[0] for r in out.fetchall())
            assert "CASE WHEN false" not in plan, plan
        elif "VIEW" in sql:
            with psycopg.connect(env.direct_dsn, autocommit=True) as direct:
                definition = direct.execute("SELECT pg_get_viewdef('rt_view')").fetchone()
                direct.execute("DROP VIEW rt_view")
            assert definition is not None
            assert "CASE" not in definition[0], definition
        else:
            assert c.execute("EXECUTE rt_p").fetchone() == (None,)
            statement = c.execute("SELECT statement FROM pg_prepared_statements WHERE name = 'rt_p'").fetchone()
            assert statement is not None
            assert "CASE" not in statement[0]


def test_sql_prepare_made_hidden_shows_the_value_after_a_reveal(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer]
) -> None:
    a, _ = rows
    try:
        with psycopg.connect(env.dsn("outsider", proxy), autocommit=True) as c:
            c.execute(f"PREPARE rt_q AS SELECT ssn FROM vis_customers WHERE id = {a.id}")
            assert c.execute("EXECUTE rt_q").fetchone() == (None,)
            reload_policy(proxy, _revealing())
            assert c.execute("EXECUTE rt_q").fetchone() == (a.ssn,)
    finally:
        reload_policy(proxy, issue_policy())


# -- reloads: a statement or portal made while hidden never serves NULL once the column is revealed ----


async def _asyncpg_reveal(env: VisEnv, proxy: ProxyProcess, a: Customer) -> list[Any]:
    """asyncpg's statement cache and a portal read in pieces (cursor), across a reveal."""
    seen: list[Any] = []
    conn = await asyncpg.connect(env.dsn("outsider", proxy))
    try:
        sql = "SELECT ssn, g FROM vis_customers, generate_series(1, 4) g WHERE id = $1"
        seen.append((await conn.fetchrow(sql, a.id))[0])
        async with conn.transaction():
            cur = await conn.cursor(sql, a.id)
            seen.append((await cur.fetchrow())[0])
            await asyncio.to_thread(reload_policy, proxy, _revealing())
            try:
                r = await cur.fetchrow()
                seen.append(r[0] if r is not None else "no row")
            except asyncpg.PostgresError as e:
                seen.append(("error", e.sqlstate))
        try:
            seen.append((await conn.fetchrow(sql, a.id))[0])
        except asyncpg.PostgresError as e:
            seen.append(("error", e.sqlstate))
        seen.append(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()
    return seen


def test_asyncpg_cache_and_cursor_never_serve_null_after_a_reveal(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer]
) -> None:
    a, _ = rows
    try:
        seen = asyncio.run(_asyncpg_reveal(env, proxy, a))
    finally:
        reload_policy(proxy, issue_policy())
    assert seen[:2] == [None, None]
    for after in seen[2:4]:
        assert after in (a.ssn, ("error", "0A000")), seen
    assert seen[4] == 1


def test_a_psycopg_pipeline_prepared_while_hidden_is_not_served_null_after_a_reveal(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer]
) -> None:
    a, _ = rows
    sql = "SELECT ssn FROM vis_customers WHERE id = %s"
    try:
        with psycopg.connect(env.dsn("outsider", proxy), autocommit=True) as c:
            with c.pipeline():
                first = c.execute(sql, [a.id], prepare=True)
            assert first.fetchone() == (None,)
            reload_policy(proxy, _revealing())
            try:
                with c.pipeline():
                    again = c.execute(sql, [a.id], prepare=True)
                got: Any = again.fetchone()
            except psycopg.Error as e:
                got = ("error", e.sqlstate)
            assert got in ((a.ssn,), ("error", "0A000")), got
    finally:
        reload_policy(proxy, issue_policy())


def test_a_statement_prepared_while_plaintext_is_hidden_after_a_reload(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer]
) -> None:
    """The other direction: not substituted when prepared, the envelope arrives and must be dropped."""
    a, _ = rows
    sql = "SELECT ssn, email FROM vis_customers WHERE id = %s"
    try:
        with Session(env, "billing", proxy) as s:
            first = s.run(sql, [a.id], binary=True)
            assert first.rows == [(a.ssn, a.email)]
            s.conn.prepare_threshold = 0
            assert s.run(sql, [a.id]).rows == [(a.ssn, a.email)]
            reload_policy(proxy, _hiding())
            got = s.run(sql, [a.id])
            assert got.rows == [(None, None)], got.message
            assert not visfixtures.leaked(got.raw, a.ssn)
            assert PREFIX not in got.raw
    finally:
        reload_policy(proxy, issue_policy())


# -- screening: envelopes in forms PostgreSQL's output functions give them ------------------------------


def _screened(env: VisEnv, proxy: ProxyProcess, sql: str, *, binary: bool, escape: bool) -> tuple[Any, bytes]:
    setup = ("SET bytea_output = escape",) if escape else ()
    with Session(env, "support", proxy) as s:
        got = s.run(sql, binary=binary, setup=setup)
    assert got.rows is not None, got.message
    return got.rows[0][0], got.raw


_PLAIN_FORMS = [
    ("raw", "SELECT rt_ssn({a})", False),
    ("raw-escape", "SELECT rt_ssn({a})", True),
    ("domain-over-bytea", "SELECT rt_dom({a})", False),
    ("2d-array-escape", "SELECT ARRAY[ARRAY[rt_ssn({a})]]", True),
    ("nested-record-hex", "SELECT ROW(1, ROW(rt_ssn({a})))", False),
    ("jsonb-record-escape", "SELECT to_jsonb(ROW(rt_ssn({a})))", True),
    ("json-nested-escape", "SELECT json_build_object('k', json_build_array(rt_ssn({a})))", True),
    ("table-rows-hex", "SELECT rt_rows({a})", False),
    ("ungoverned-table", "SELECT b FROM rt_copy WHERE id = {a}", False),
    ("quote-literal-escape", "SELECT quote_literal(rt_ssn({a}))", True),
]
# Escape text nested two and more levels deep (each backslash doubled per level of quoting).
_ESCAPE_NESTED = [
    ("array-of-records-escape", "SELECT ARRAY[ROW(rt_ssn({a}))]"),
    ("record-in-record-escape", "SELECT ROW(ROW(rt_ssn({a})))"),
    ("table-rows-escape", "SELECT rt_rows({a})"),
    ("json-of-array-text-escape", "SELECT to_json(ARRAY[rt_ssn({a})]::text)"),
    ("json-of-record-in-array-text-escape", "SELECT to_json(ARRAY[ROW(ROW(rt_ssn({a})))]::text)"),
    ("hex-in-json-of-array-text", "SELECT to_json(ARRAY[ROW(rt_ssn({a}))]::text)"),
]
FORMS = [
    pytest.param(sql, escape, binary, id=f"{name}-{'binary' if binary else 'text'}")
    for name, sql, escape in _PLAIN_FORMS
    for binary in (False, True)
] + [
    pytest.param(sql, not name.startswith("hex"), binary, id=f"{name}-{'binary' if binary else 'text'}")
    for name, sql in _ESCAPE_NESTED
    for binary in (False, True)
]


@pytest.mark.parametrize(("template", "escape", "binary"), FORMS)
def test_an_envelope_in_any_output_form_is_screened(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer], template: str, escape: bool, binary: bool
) -> None:
    a, _ = rows
    value, raw = _screened(env, proxy, template.format(a=a.id), binary=binary, escape=escape)
    assert value is None, value
    assert PREFIX not in raw
    assert b"x50560101" not in raw
    assert b"PV\\" not in raw


def test_the_premise_the_escape_forms_carry_the_envelope(env: VisEnv, rows: tuple[Customer, Customer]) -> None:
    """Direct: the nested escape text is the whole envelope, backslashes doubled per level."""
    a, _ = rows
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        c.execute("SET bytea_output = escape")
        got = c.execute(f"SELECT ARRAY[ROW(rt_ssn({a.id}))]::text").fetchone()
        assert got is not None
        assert "PV\\\\\\\\001\\\\\\\\001" in got[0]


async def _asyncpg_values(env: VisEnv, proxy: ProxyProcess, a: Customer, *, cursor_sql: str | None) -> list[Any]:
    """asyncpg: Parse and Describe of the statement, then Bind and Execute (no Describe of the portal)."""
    conn = await asyncpg.connect(env.dsn("support", proxy))
    try:
        out: list[Any] = []
        if cursor_sql is None:
            out.append(await conn.fetchval("SELECT rt_ssn($1)", a.id))
            out.append(await conn.fetchval("SELECT b FROM rt_copy WHERE id = $1", a.id))
            got = await conn.fetchrow("SELECT email, rt_ssn(id) FROM vis_customers WHERE id = $1", a.id)
            assert got is not None
            assert got[0] == a.email
            out.append(got[1])
            async with conn.transaction():
                await conn.execute(f"DECLARE rt_c CURSOR FOR SELECT rt_ssn({a.id})")
                out.append(await conn.fetchval("FETCH 1 FROM rt_c"))
        else:
            out.append(await conn.fetchval(cursor_sql, a.id))
            async with conn.transaction():
                cur = await conn.cursor(cursor_sql, a.id)  # a named portal, Execute with a row limit
                out.append((await cur.fetchrow())[0])
        return out
    finally:
        await conn.close()


def test_asyncpg_unattributed_columns_are_screened(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer]
) -> None:
    a, _ = rows
    assert asyncio.run(_asyncpg_values(env, proxy, a, cursor_sql=None)) == [None] * 4


def test_asyncpg_unattributed_columns_of_a_governed_statement_are_screened(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer]
) -> None:
    a, _ = rows
    sql = "SELECT rt_ssn(id) FROM vis_customers WHERE id = $1"
    got = asyncio.run(_asyncpg_values(env, proxy, a, cursor_sql=sql))
    assert [v is None for v in got] == [True, True], [bytes(v[:4]) if v else v for v in got]


def test_psql_cursor_fetch_of_a_function_is_screened(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer]
) -> None:
    a, _ = rows
    with Session(env, "support", proxy, autocommit=False) as s:
        s.conn.execute(f"DECLARE rt_d CURSOR FOR SELECT rt_ssn({a.id}), ARRAY[rt_ssn({a.id})]")
        cur = psycopg.ClientCursor(s.conn)
        assert cur.execute("FETCH 1 FROM rt_d").fetchall() == [(None, None)]
        assert PREFIX not in s.tap.data()
        assert b"x50560101" not in s.tap.data()
        s.conn.rollback()


def test_roles_that_see_every_encrypted_column_still_get_the_envelope(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer]
) -> None:
    """The premise of the screening tests: the function does hand out the envelope."""
    a, _ = rows
    with psycopg.connect(env.dsn("fin_member", proxy), autocommit=True) as c:
        got = c.execute(f"SELECT rt_ssn({a.id})").fetchone()
        assert got is not None
        assert bytes(got[0]).startswith(PREFIX)


# -- screening must not touch innocent values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "binary", "expected"),
    [
        pytest.param("SELECT 'x5056 0101 PV 1 1'::text", False, "x5056 0101 PV 1 1", id="near-miss-text"),
        pytest.param("SELECT ARRAY[1347813632, 1]::int4[]", True, [1347813632, 1], id="near-miss-int-array"),
        pytest.param("SELECT '\\x50560102'::bytea", False, b"PV\x01\x02", id="near-miss-bytea"),
        pytest.param("SELECT 'see \\x50560' || '10'", False, "see \\x5056010", id="near-miss-hex-text"),
        pytest.param("SELECT E'PV\\\\01\\\\001'", False, "PV\\01\\001", id="near-miss-escape-text"),
        pytest.param("SELECT ARRAY[1347813633]::int8[]", True, [1347813633], id="int8-array-binary"),
        pytest.param(
            "SELECT name FROM vis_customers WHERE id = {b}",
            False,
            INNOCENT_NAME,
            id="ungoverned-text-column",
        ),
        pytest.param(
            "SELECT ARRAY[1347813633]::int4[]",
            True,
            [1347813633],
            id="int-array-binary",
        ),
        pytest.param(
            "SELECT '\\x00ff50560101ee'::bytea",
            True,
            b"\x00\xffPV\x01\x01\xee",
            id="ungoverned-bytea-binary",
        ),
    ],
)
def test_innocent_values_are_not_screened(
    env: VisEnv, proxy: ProxyProcess, rows: tuple[Customer, Customer], sql: str, binary: bool, expected: Any
) -> None:
    _, b = rows
    with psycopg.connect(env.dsn("support", proxy), autocommit=True) as c:
        got = c.cursor(binary=binary).execute(sql.format(b=b.id)).fetchone()
    assert got is not None
    assert got[0] == expected
