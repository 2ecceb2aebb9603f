"""Every construct a role without plaintext access may not use on a governed column (issue 8, item 3): a
predicate, an ordering, a grouping, a join or a function over the value is an oracle (``WHERE phone LIKE
'1%'`` leaks it one character at a time), so pgveil refuses it with SQLSTATE 42501, a message naming
``schema.table.column`` and the construct (never a literal of the statement), and the session goes on.

The same statements are allowed for billing on the plain column ``phone`` (and give what the server
gives); on the encrypted ``ssn`` what pgveil refused for everyone before stays refused for everyone with
0A000, while what was allowed (``IS NULL``, ``count(ssn)``) is now refused to restricted roles only.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
import visfixtures
from encfixtures import run_psql
from visfixtures import SUPERUSER_ROLE, Customer, Received, Session, VisEnv, insert_customers, leaked, make_customer

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

LIT = "lit-7c1d0e-never-echoed"
PHONE, SSN = "public.vis_customers.phone", "public.vis_customers.ssn"


@dataclass(frozen=True)
class Use:
    name: str
    sql: str  # %s placeholders bound to params; {id}: the test rows' id range
    params: tuple[Any, ...]
    column: str
    construct: tuple[str, ...]  # the message names at least one of these


PHONE_USES = [
    Use("where_like", "SELECT id FROM vis_customers WHERE phone LIKE %s", (LIT + "%",), PHONE, ("LIKE", "WHERE")),
    Use("where_eq", "SELECT id FROM vis_customers WHERE phone = %s", (LIT,), PHONE, ("=", "WHERE", "equal")),
    Use("where_in", "SELECT id FROM vis_customers WHERE phone IN (%s, %s)", (LIT, "x"), PHONE, ("IN", "WHERE")),
    Use(
        "where_is_null", "SELECT id FROM vis_customers WHERE phone IS NULL AND id > %s", (0,), PHONE, ("NULL", "WHERE")
    ),
    Use("where_lt", "SELECT id FROM vis_customers WHERE phone < %s", (LIT,), PHONE, ("<", "WHERE", "comparison")),
    Use(
        "where_subquery",
        "SELECT id FROM vis_customers WHERE id IN (SELECT id FROM vis_customers WHERE phone LIKE %s)",
        (LIT + "%",),
        PHONE,
        ("LIKE", "WHERE"),
    ),
    Use(
        "where_exists",
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM vis_customers WHERE phone > %s)",
        (LIT,),
        PHONE,
        (">", "WHERE", "comparison"),
    ),
    Use(
        "join_on",
        "SELECT c.id FROM vis_customers c JOIN vis_plain p ON p.note = c.phone WHERE c.id > %s",
        (0,),
        PHONE,
        ("JOIN",),
    ),
    Use(
        "join_using",
        "SELECT c.id FROM vis_customers c JOIN (SELECT %s::text AS phone) x USING (phone)",
        (LIT,),
        PHONE,
        ("JOIN", "USING"),
    ),
    Use("order_by", "SELECT id FROM vis_customers WHERE id > %s ORDER BY phone", (0,), PHONE, ("ORDER BY",)),
    Use("order_by_position", "SELECT phone FROM vis_customers WHERE id > %s ORDER BY 1", (0,), PHONE, ("ORDER BY",)),
    Use(
        "group_by",
        "SELECT phone, count(*) FROM vis_customers WHERE id > %s GROUP BY phone",
        (0,),
        PHONE,
        ("GROUP BY",),
    ),
    Use(
        "group_by_position",
        "SELECT phone, count(*) FROM vis_customers WHERE id > %s GROUP BY 1",
        (0,),
        PHONE,
        ("GROUP BY",),
    ),
    Use(
        "having",
        "SELECT id FROM vis_customers GROUP BY id, phone HAVING min(phone) > %s",
        (LIT,),
        PHONE,
        ("HAVING", "GROUP BY", "min"),
    ),
    Use(
        "distinct_on",
        "SELECT DISTINCT ON (phone) id FROM vis_customers WHERE id > %s",
        (0,),
        PHONE,
        ("DISTINCT",),
    ),
    Use("distinct", "SELECT DISTINCT phone FROM vis_customers WHERE id > %s", (0,), PHONE, ("DISTINCT",)),
    Use(
        "window_order_by",
        "SELECT rank() OVER (ORDER BY phone) FROM vis_customers WHERE id > %s",
        (0,),
        PHONE,
        ("window", "ORDER BY", "OVER"),
    ),
    Use(
        "window_partition",
        "SELECT count(*) OVER (PARTITION BY phone) FROM vis_customers WHERE id > %s",
        (0,),
        PHONE,
        ("window", "PARTITION BY", "OVER"),
    ),
    Use(
        "window_clause",
        "SELECT id, row_number() OVER w FROM vis_customers WHERE id > %s WINDOW w AS (ORDER BY phone)",
        (0,),
        PHONE,
        ("window", "WINDOW", "ORDER BY"),
    ),
    Use("function", "SELECT lower(phone) FROM vis_customers WHERE id > %s", (0,), PHONE, ("lower",)),
    Use("length", "SELECT length(phone) FROM vis_customers WHERE id > %s", (0,), PHONE, ("length",)),
    Use("operator", "SELECT phone || %s FROM vis_customers", (LIT,), PHONE, ("||", "operator")),
    Use("cast", "SELECT phone::varchar FROM vis_customers WHERE id > %s", (0,), PHONE, ("cast", "varchar", "::")),
    Use("count", "SELECT count(phone) FROM vis_customers WHERE id > %s", (0,), PHONE, ("count",)),
    Use(
        "case",
        "SELECT CASE WHEN phone = %s THEN 1 END FROM vis_customers",
        (LIT,),
        PHONE,
        ("CASE", "=", "comparison", "equal"),
    ),
    Use(
        "returning_expression",
        "UPDATE vis_customers SET name = name WHERE id = %s RETURNING lower(phone)",
        (-1,),
        PHONE,
        ("RETURNING", "lower"),
    ),
    Use(
        "update_where",
        "UPDATE vis_customers SET name = name WHERE phone LIKE %s",
        (LIT + "%",),
        PHONE,
        ("LIKE", "WHERE"),
    ),
    Use("delete_where", "DELETE FROM vis_customers WHERE phone = %s", (LIT,), PHONE, ("=", "WHERE", "equal")),
    Use(
        "cte_column_in_where",
        "WITH c AS (SELECT id, phone AS p FROM vis_customers) SELECT id FROM c WHERE p LIKE %s",
        (LIT + "%",),
        PHONE,
        ("LIKE", "WHERE"),
    ),
    Use(
        "subquery_column_in_order",
        "SELECT s.id FROM (SELECT id, phone AS p FROM vis_customers) s WHERE s.id > %s ORDER BY s.p",
        (0,),
        PHONE,
        ("ORDER BY",),
    ),
    Use("view_column_in_where", "SELECT id FROM vis_view WHERE phone LIKE %s", (LIT + "%",), PHONE, ("LIKE", "WHERE")),
]

# On the encrypted ssn: what everyone was refused before (0A000 for everyone), and what everyone was
# allowed (a restricted role is now refused with 42501; billing still may).
SSN_REFUSED_FOR_ALL = [
    Use("ssn_like", "SELECT id FROM vis_customers WHERE ssn LIKE %s", (LIT + "%",), SSN, ("LIKE",)),
    Use("ssn_order_by", "SELECT id FROM vis_customers WHERE id > %s ORDER BY ssn", (0,), SSN, ("ORDER BY",)),
    Use("ssn_function", "SELECT lower(ssn) FROM vis_customers WHERE id > %s", (0,), SSN, ("lower",)),
    Use("ssn_group_by", "SELECT ssn FROM vis_customers WHERE id > %s GROUP BY ssn", (0,), SSN, ("GROUP BY",)),
]
SSN_ALLOWED_BEFORE = [
    Use("ssn_is_null", "SELECT id FROM vis_customers WHERE ssn IS NULL AND id > %s", (0,), SSN, ("NULL", "WHERE")),
    Use("ssn_is_not_null", "SELECT id FROM vis_customers WHERE ssn IS NOT NULL AND id > %s", (0,), SSN, ("NULL",)),
    Use("ssn_count", "SELECT count(ssn) FROM vis_customers WHERE id > %s", (0,), SSN, ("count",)),
]

RESTRICTED = ["support", "outsider", "fin_noinherit", SUPERUSER_ROLE, "m_hash", "mixed", "matcher"]


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def rows(env: VisEnv) -> list[Customer]:
    out = [make_customer("refusals") for _ in range(3)]
    insert_customers(env, out)
    return out


def dollar(sql: str) -> str:
    counter = iter(range(1, 100))
    return re.sub(r"%s", lambda _m: f"${next(counter)}", sql)


def check_refusal(err: Any, use: Use, role: str, want: set[str]) -> None:
    state = getattr(err, "sqlstate", None)
    text = str(err)
    assert state in want, f"{role}: {use.name} gave {state}: {text}"
    assert use.column in text, f"{role}: {use.name}: the message does not name {use.column}: {text}"
    if state == "42501":
        assert any(c.lower() in text.lower() for c in use.construct), f"{role}: {use.name}: construct? {text}"
    assert LIT not in text, f"{role}: {use.name}: the message echoes a literal: {text}"


def refusal_problems(got: Received, use: Use, role: str, want: set[str]) -> list[str]:
    """What is wrong with ``got`` as the refusal of ``use`` (empty: a proper refusal)."""
    where = f"{role}: {use.name} ({use.sql})"
    if got.sqlstate is None:
        return [f"{where}: not refused, got {got.rows!r}"]
    out = []
    if got.sqlstate not in want:
        out.append(f"{where}: {got.sqlstate} {got.message}")
    if use.column not in got.message:
        out.append(f"{where}: the message does not name {use.column}: {got.message}")
    if got.sqlstate == "42501" and not any(c.lower() in got.message.lower() for c in use.construct):
        out.append(f"{where}: the message names none of {use.construct}: {got.message}")
    if LIT.encode() in got.raw:
        out.append(f"{where}: a literal of the statement came back: {got.message}")
    return out


@pytest.mark.parametrize("protocol", ["extended", "simple"])
@pytest.mark.parametrize("role", RESTRICTED)
def test_restricted_role_is_refused_every_use_of_the_plain_column(
    env: VisEnv, rows: list[Customer], role: str, protocol: str
) -> None:
    problems: list[str] = []
    with Session(env, role) as s:
        for use in PHONE_USES:
            got = s.run(use.sql, use.params, simple=protocol == "simple")
            problems += refusal_problems(got, use, role, {"42501"})
            for r in rows:
                if leaked(got.raw, r.phone):
                    problems.append(f"{role}: {use.name} sent a phone number")
    assert problems == [], "\n".join(problems)


def test_a_denied_role_is_refused_too(env: VisEnv, rows: list[Customer]) -> None:
    problems: list[str] = []
    with Session(env, "contractor") as s:
        for use in PHONE_USES:
            got = s.run(use.sql, use.params)
            if got.sqlstate != "42501" or "public.vis_customers." not in got.message or LIT in got.message:
                problems.append(f"contractor: {use.name}: {got.sqlstate} {got.message or got.rows}")
    assert problems == [], "\n".join(problems)


async def _asyncpg_refused(env: VisEnv, role: str, uses: list[Use]) -> list[tuple[Use, Any]]:
    conn = await asyncpg.connect(env.dsn(role))
    out: list[tuple[Use, Any]] = []
    try:
        for use in uses:
            try:
                await conn.fetch(dollar(use.sql), *use.params)
                out.append((use, None))
            except asyncpg.PostgresError as e:
                out.append((use, e))
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    return out


@pytest.mark.parametrize("role", ["support", "outsider"])
def test_refusals_through_asyncpg(env: VisEnv, rows: list[Customer], role: str) -> None:
    for use, err in asyncio.run(_asyncpg_refused(env, role, PHONE_USES)):
        assert err is not None, f"{role}: {use.name} was not refused"
        check_refusal(err, use, role, {"42501"})


@pytest.mark.parametrize("role", ["support", "outsider"])
def test_refusals_through_psql(env: VisEnv, rows: list[Customer], role: str) -> None:
    """psql, simple protocol, one statement after another on one session (ON_ERROR_STOP off)."""
    script = ""
    for use in PHONE_USES:
        sql = use.sql
        for p in use.params:
            sql = sql.replace("%s", f"'{p}'" if isinstance(p, str) else str(p), 1)
        script += sql + ";\nSELECT 'after-" + use.name + "';\n"
    p = run_psql(env.dsn(role), "-v", "VERBOSITY=verbose", stdin=script, stop_on_error=False)
    errors = re.findall(r"^ERROR:  ([0-9A-Z]{5}): (.*)$", p.stderr, re.MULTILINE)
    assert len(errors) == len(PHONE_USES), p.stderr
    for use, (state, text) in zip(PHONE_USES, errors, strict=True):
        assert state == "42501", f"{use.name}: {state} {text}"
        assert PHONE in text, f"{use.name}: {text}"
    assert LIT not in p.stderr
    for use in PHONE_USES:
        assert f"after-{use.name}" in p.stdout, "the session goes on after each refusal"


def test_a_refusal_in_a_transaction_aborts_it_like_any_error(env: VisEnv, rows: list[Customer]) -> None:
    with psycopg.connect(env.dsn("support")) as c:
        c.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT id FROM vis_customers ORDER BY phone")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
        assert c.execute("SELECT email FROM vis_customers WHERE id = %s", [rows[0].id]).fetchone() == (rows[0].email,)


def _normal(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(rows, key=repr)


@pytest.mark.parametrize("protocol", ["extended", "simple"])
@pytest.mark.parametrize("role", ["billing", "fin_member"])
def test_a_plaintext_role_may_use_the_plain_column(env: VisEnv, rows: list[Customer], role: str, protocol: str) -> None:
    """The same statements for billing: allowed, and the answer is the server's own."""
    problems: list[str] = []
    with (
        psycopg.connect(env.dsn(role)) as c,
        psycopg.connect(env.direct_dsn) as d,
    ):
        d.execute(f"SET ROLE {role if role != 'fin_member' else 'finance'}")
        for use in PHONE_USES:
            cur = c.cursor() if protocol == "extended" else psycopg.ClientCursor(c)
            try:
                cur.execute(use.sql, use.params)
                got = cur.fetchall() if cur.description is not None else None
            except psycopg.Error as e:
                problems.append(f"{role}: {use.name} refused: {e.sqlstate} {e}")
                c.rollback()
                continue
            c.rollback()  # the writes change nothing
            dcur = d.execute(use.sql, use.params)
            want = dcur.fetchall() if dcur.description is not None else None
            d.rollback()
            d.execute(f"SET ROLE {role if role != 'fin_member' else 'finance'}")
            if want is not None and (got is None or _normal(got) != _normal(want)):
                problems.append(f"{role}: {use.name}: {got!r} != the server's {want!r}")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("role", RESTRICTED)
def test_uses_of_an_encrypted_column_allowed_before_are_refused_to_restricted_roles(
    env: VisEnv, rows: list[Customer], role: str
) -> None:
    problems: list[str] = []
    with Session(env, role) as s:
        for use in SSN_ALLOWED_BEFORE:
            problems += refusal_problems(s.run(use.sql, use.params), use, role, {"42501"})
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("use", SSN_ALLOWED_BEFORE, ids=[u.name for u in SSN_ALLOWED_BEFORE])
def test_uses_of_an_encrypted_column_allowed_before_stay_allowed_for_billing(
    env: VisEnv, rows: list[Customer], use: Use
) -> None:
    with psycopg.connect(env.dsn("billing"), autocommit=True) as c:
        got = c.execute(use.sql, use.params).fetchall()
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        want = d.execute(use.sql, use.params).fetchall()  # IS NULL and count agree on the envelope
    assert _normal(got) == _normal(want)


@pytest.mark.parametrize("role", ["billing", "support", "outsider"])
def test_uses_refused_for_everyone_stay_refused(env: VisEnv, rows: list[Customer], role: str) -> None:
    """billing: the role-independent 0A000 as before; a restricted role: that or 42501."""
    problems: list[str] = []
    with Session(env, role) as s:
        for use in SSN_REFUSED_FOR_ALL:
            want = {"0A000"} if role == "billing" else {"0A000", "42501"}
            problems += refusal_problems(s.run(use.sql, use.params), use, role, want)
    assert problems == [], "\n".join(problems)


def test_a_masked_role_may_filter_on_ungoverned_columns(env: VisEnv, rows: list[Customer]) -> None:
    """Not everything is refused: predicates, ordering and functions over ungoverned columns work."""
    ids = [r.id for r in rows]
    with psycopg.connect(env.dsn("support"), autocommit=True) as c:
        got = c.execute(
            "SELECT id, upper(name), email FROM vis_customers WHERE id = ANY(%s) AND name LIKE 'name-%%'"
            " ORDER BY name DESC",
            [ids],
        ).fetchall()
    assert got == [(r.id, r.name.upper(), r.email) for r in sorted(rows, key=lambda r: r.name, reverse=True)]
