"""Every use of a governed column is recorded as a Reference (issue 8), so that the per-role decision
can be made per statement while the analysis stays cached per statement text.

Plain governed columns (``encrypted=False``) are never refused by the analysis and never sealed: every
use of one is a reference. Encrypted columns keep today's refusals (0A000, for every role); their uses
that are allowed today (output, write, nullness, ``count(col)``) become references.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.model import Reference, ReferenceKind
from proxy.rewrite.analysis import UNANALYSED, analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.rewrite.plan import StatementPlan

OUTPUT, WRITE, EQUALITY, EXPRESSION = (
    ReferenceKind.OUTPUT,
    ReferenceKind.WRITE,
    ReferenceKind.EQUALITY,
    ReferenceKind.EXPRESSION,
)


def _table(schema: str, name: str, columns: list[str], governed: dict[str, tuple[str, bool]]) -> ProtectedTable:
    cols = {c: ProtectedColumn(schema, name, c, t, encrypted=e) for c, (t, e) in governed.items()}
    return ProtectedTable(schema, name, cols, tuple(columns))


# customers: encrypted ssn and email, plain phone and name; contacts: plain columns only.
CUSTOMERS = _table(
    "public",
    "customers",
    ["id", "name", "ssn", "email", "phone", "note"],
    {"name": ("text", False), "ssn": ("text", True), "email": ("text", True), "phone": ("text", False)},
)
CONTACTS = _table(
    "public", "contacts", ["id", "mobile", "city", "note"], {"mobile": ("text", False), "city": ("text", False)}
)
MOBILE, CITY = CONTACTS.columns["mobile"], CONTACTS.columns["city"]
NAME, SSN, EMAIL, PHONE = (CUSTOMERS.columns[n] for n in ("name", "ssn", "email", "phone"))


def _member(
    root: ProtectedTable,
    name: str,
    columns: dict[str, ProtectedColumn],
    all_columns: list[str],
    *,
    view: bool = False,
    opaque: bool = False,
) -> ProtectedTable:
    mapped = {
        n: dataclasses.replace(c, table=name, name=n, identity=c.column_id) for n, c in columns.items()
    }  # fmt: skip
    return ProtectedTable(
        root.schema, name, mapped, tuple(all_columns), root=root.qualified_name, view=view, opaque=opaque
    )


CONTACTS_OPAQUE = _member(CONTACTS, "contacts_opaque", {}, ["id", "x"], view=True, opaque=True)
CUSTOMERS_OPAQUE = _member(CUSTOMERS, "customers_opaque", {}, ["id", "x"], view=True, opaque=True)
CONTACTS_VIEW = _member(CONTACTS, "contacts_view", {"m": MOBILE}, ["id", "m"], view=True)
CONTACTS_PARENT = _member(CONTACTS, "contacts_parent", {}, ["id", "mobile", "city", "note"], opaque=True)
# A view computing from a plain column (``SELECT id, lower(mobile) AS lm FROM contacts``): no column maps.
CONTACTS_DERIVED = dataclasses.replace(
    _member(CONTACTS, "contacts_derived", {}, ["id", "lm"], view=True), uses=(MOBILE,)
)
CATALOG = Catalog(
    {
        (t.schema, t.name): t
        for t in (
            CUSTOMERS,
            CONTACTS,
            CONTACTS_OPAQUE,
            CUSTOMERS_OPAQUE,
            CONTACTS_VIEW,
            CONTACTS_PARENT,
            CONTACTS_DERIVED,
        )
    }
)
VIEW_M = CONTACTS_VIEW.columns["m"]


def _plan(sql: str) -> StatementPlan:
    plan = analyze(sql, CATALOG)
    refusal = plan.refusal
    assert refusal is None, refusal.message
    assert plan.touches_protected
    (statement,) = plan.statements
    assert plan.references == statement.references
    assert len(set(statement.references)) == len(statement.references)  # no duplicates
    return statement


def _refs(sql: str) -> set[tuple[str, ReferenceKind, str]]:
    return {(r.column.column_id, r.kind, r.construct) for r in _plan(sql).references}


M, C, P, N, S, E = (c.column_id for c in (MOBILE, CITY, PHONE, NAME, SSN, EMAIL))

# (statement, the exact set of references)
PLAIN_CASES: list[tuple[str, set[tuple[str, ReferenceKind, str]]]] = [
    # OUTPUT: passes unchanged into a result column
    ("SELECT mobile FROM contacts", {(M, OUTPUT, "SELECT list")}),
    ("SELECT id, note FROM contacts", set()),
    ("SELECT c.mobile AS x FROM contacts c", {(M, OUTPUT, "SELECT list")}),
    ("SELECT * FROM contacts", {(M, OUTPUT, "SELECT *"), (C, OUTPUT, "SELECT *")}),
    ("SELECT c.* FROM contacts c", {(M, OUTPUT, "SELECT *"), (C, OUTPUT, "SELECT *")}),
    ("SELECT x FROM (SELECT mobile AS x FROM contacts) s", {(M, OUTPUT, "SELECT list")}),
    ("WITH w AS (SELECT city FROM contacts) SELECT * FROM w", {(C, OUTPUT, "SELECT list"), (C, OUTPUT, "SELECT *")}),
    ("SELECT mobile FROM contacts UNION ALL SELECT mobile FROM contacts", {(M, OUTPUT, "SELECT list")}),
    ("DELETE FROM contacts WHERE id = 1 RETURNING mobile", {(M, OUTPUT, "RETURNING list")}),
    ("DELETE FROM contacts WHERE id = 1 RETURNING *", {(M, OUTPUT, "RETURNING *"), (C, OUTPUT, "RETURNING *")}),
    # EQUALITY
    ("SELECT id FROM contacts WHERE mobile = 'x'", {(M, EQUALITY, "= comparison (in WHERE)")}),
    ("SELECT id FROM contacts WHERE 'x' = mobile", {(M, EQUALITY, "= comparison (in WHERE)")}),
    ("SELECT id FROM contacts WHERE mobile IN ('x', 'y')", {(M, EQUALITY, "IN (in WHERE)")}),
    ("SELECT id FROM contacts WHERE mobile = ANY($1)", {(M, EQUALITY, "= ANY (in WHERE)")}),
    (
        "SELECT id FROM contacts WHERE mobile IN (SELECT note FROM contacts)",
        {(M, EQUALITY, "IN (subquery) (in WHERE)")},
    ),
    (
        "SELECT 1 FROM contacts a JOIN contacts b ON a.mobile = b.city",
        {(M, EQUALITY, "= comparison (in JOIN ON)"), (C, EQUALITY, "= comparison (in JOIN ON)")},
    ),
    # EXPRESSION
    ("SELECT id FROM contacts WHERE mobile LIKE '1%'", {(M, EXPRESSION, "LIKE (in WHERE)")}),
    ("SELECT id FROM contacts WHERE mobile <> 'x'", {(M, EXPRESSION, "<> comparison (in WHERE)")}),
    ("SELECT id FROM contacts WHERE mobile < 'x'", {(M, EXPRESSION, "< comparison (in WHERE)")}),
    ("SELECT id FROM contacts WHERE mobile NOT IN ('x')", {(M, EXPRESSION, "NOT IN (in WHERE)")}),
    ("SELECT id FROM contacts ORDER BY mobile", {(M, EXPRESSION, "ORDER BY")}),
    ("SELECT mobile FROM contacts ORDER BY 1", {(M, OUTPUT, "SELECT list"), (M, EXPRESSION, "ORDER BY")}),
    ("SELECT mobile AS m FROM contacts ORDER BY m DESC", {(M, OUTPUT, "SELECT list"), (M, EXPRESSION, "ORDER BY")}),
    ("SELECT city, count(*) FROM contacts GROUP BY city", {(C, OUTPUT, "SELECT list"), (C, EXPRESSION, "GROUP BY")}),
    (
        "SELECT count(*) FROM contacts GROUP BY 1 HAVING count(mobile) > 1",
        {(M, EXPRESSION, "aggregate count() (in HAVING)")},
    ),
    ("SELECT DISTINCT ON (city) id FROM contacts", {(C, EXPRESSION, "DISTINCT ON")}),
    ("SELECT DISTINCT city FROM contacts", {(C, OUTPUT, "SELECT list"), (C, EXPRESSION, "DISTINCT")}),
    ("SELECT row_number() OVER (PARTITION BY city) FROM contacts", {(C, EXPRESSION, "window PARTITION BY")}),
    ("SELECT rank() OVER w FROM contacts WINDOW w AS (ORDER BY mobile)", {(M, EXPRESSION, "window ORDER BY")}),
    ("SELECT lower(mobile) FROM contacts", {(M, EXPRESSION, "function lower() (in SELECT list)")}),
    ("SELECT id FROM contacts WHERE lower(city) = 'x'", {(C, EXPRESSION, "function lower() (in WHERE)")}),
    ("SELECT mobile || 'x' FROM contacts", {(M, EXPRESSION, "operator || (in SELECT list)")}),
    ("SELECT mobile::int FROM contacts", {(M, EXPRESSION, "cast to int4 (in SELECT list)")}),
    ("SELECT max(city) FROM contacts", {(C, EXPRESSION, "aggregate max() (in SELECT list)")}),
    ("SELECT count(DISTINCT city) FROM contacts", {(C, EXPRESSION, "count(DISTINCT ...) (in SELECT list)")}),
    ("SELECT coalesce(city, 'x') FROM contacts", {(C, EXPRESSION, "COALESCE (in SELECT list)")}),
    ("SELECT id FROM contacts WHERE mobile IS NULL", {(M, EXPRESSION, "IS NULL (in WHERE)")}),
    ("SELECT id FROM contacts WHERE mobile IS NOT NULL", {(M, EXPRESSION, "IS NOT NULL (in WHERE)")}),
    ("SELECT count(mobile) FROM contacts", {(M, EXPRESSION, "aggregate count() (in SELECT list)")}),
    ("SELECT 1 FROM contacts a JOIN contacts b USING (city)", {(C, EXPRESSION, "JOIN USING")}),
    (
        "SELECT 1 FROM contacts a JOIN contacts b ON a.id = b.id AND a.city LIKE 'x'",
        {(C, EXPRESSION, "LIKE (in JOIN ON)")},
    ),
    (
        "SELECT (SELECT city FROM contacts LIMIT 1)",
        {(C, OUTPUT, "SELECT list"), (C, EXPRESSION, "scalar subquery (in SELECT list)")},
    ),
    (
        "SELECT id FROM contacts WHERE EXISTS (SELECT 1 FROM contacts c2 WHERE c2.city LIKE 'x')",
        {(C, EXPRESSION, "LIKE (in WHERE)")},
    ),
    (
        "SELECT mobile FROM contacts UNION SELECT mobile FROM contacts",
        {(M, OUTPUT, "SELECT list"), (M, EXPRESSION, "UNION")},
    ),
    (
        "SELECT mobile FROM contacts UNION ALL SELECT city FROM contacts",
        {
            (M, OUTPUT, "SELECT list"),
            (C, OUTPUT, "SELECT list"),
            (M, EXPRESSION, "UNION ALL of different columns in result column 1"),
            (C, EXPRESSION, "UNION ALL of different columns in result column 1"),
        },
    ),
    (
        "DELETE FROM contacts WHERE id = 1 RETURNING lower(mobile)",
        {(M, EXPRESSION, "function lower() (in RETURNING list)")},
    ),
    (
        "CREATE TABLE copy_of AS SELECT mobile FROM contacts",
        {(M, OUTPUT, "SELECT list"), (M, EXPRESSION, "CREATE TABLE AS")},
    ),
    ("SELECT mobile INTO copy_of FROM contacts", {(M, OUTPUT, "SELECT list"), (M, EXPRESSION, "SELECT INTO")}),
    ("EXPLAIN ANALYZE SELECT id FROM contacts WHERE mobile LIKE '1%'", {(M, EXPRESSION, "LIKE (in WHERE)")}),
    # whole-row references
    (
        "SELECT c FROM contacts c",
        {
            (M, EXPRESSION, "whole-row reference (in SELECT list)"),
            (C, EXPRESSION, "whole-row reference (in SELECT list)"),
        },
    ),
    (
        "SELECT row(c.*) FROM contacts c",
        {
            (M, EXPRESSION, "whole-row reference (in row constructor (in SELECT list))"),
            (C, EXPRESSION, "whole-row reference (in row constructor (in SELECT list))"),
        },
    ),
    (
        "SELECT to_json(c) FROM contacts c",
        {
            (M, EXPRESSION, "whole-row reference (in function to_json() (in SELECT list))"),
            (C, EXPRESSION, "whole-row reference (in function to_json() (in SELECT list))"),
        },
    ),
    # WRITE
    ("INSERT INTO contacts (id, mobile) VALUES (1, 'x')", {(M, WRITE, "INSERT")}),
    (
        "INSERT INTO contacts VALUES (1, 'x', 'y', 'z')",
        {(M, WRITE, "INSERT without a column list"), (C, WRITE, "INSERT without a column list")},
    ),
    ("INSERT INTO contacts (id, mobile) SELECT id, note FROM contacts", {(M, WRITE, "INSERT")}),
    (
        "INSERT INTO contacts (id, note) SELECT id, city FROM contacts",
        {(C, OUTPUT, "SELECT list"), (C, EXPRESSION, "INSERT ... SELECT")},
    ),
    ("INSERT INTO contacts (id, mobile) VALUES (1, lower('X'))", {(M, WRITE, "INSERT")}),
    ("UPDATE contacts SET mobile = 'x' WHERE id = 1", {(M, WRITE, "UPDATE SET")}),
    ("UPDATE contacts SET mobile = mobile", {(M, WRITE, "UPDATE SET")}),
    (
        "UPDATE contacts SET city = mobile",
        {(C, WRITE, "UPDATE SET"), (M, EXPRESSION, "assignment to column city (in SET)")},
    ),
    ("UPDATE contacts SET note = city", {(C, EXPRESSION, "assignment to column note (in SET)")}),
    (
        "UPDATE contacts SET mobile = upper(city)",
        {(M, WRITE, "UPDATE SET"), (C, EXPRESSION, "function upper() (in SET)")},
    ),
    (
        "INSERT INTO contacts (id, mobile) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET mobile = EXCLUDED.mobile",
        {(M, WRITE, "INSERT"), (M, WRITE, "ON CONFLICT DO UPDATE SET")},
    ),
    ("INSERT INTO contacts (id) VALUES (1) ON CONFLICT (mobile) DO NOTHING", {(M, EXPRESSION, "ON CONFLICT target")}),
    ("COPY contacts FROM STDIN", {(M, WRITE, "COPY FROM"), (C, WRITE, "COPY FROM")}),
    ("COPY contacts (id, city) TO STDOUT", {(C, OUTPUT, "COPY TO")}),
    (
        "COPY contacts TO '/tmp/x'",
        {
            (M, OUTPUT, "COPY TO"),
            (C, OUTPUT, "COPY TO"),
            (M, EXPRESSION, "COPY TO a server file or program"),
            (C, EXPRESSION, "COPY TO a server file or program"),
        },
    ),
    ("COPY (SELECT mobile FROM contacts) TO STDOUT", {(M, OUTPUT, "SELECT list")}),
    # views and other family members
    ("SELECT m FROM contacts_view", {(M, OUTPUT, "SELECT list")}),
    (
        "SELECT * FROM contacts_opaque",
        {(M, EXPRESSION, "opaque view public.contacts_opaque"), (C, EXPRESSION, "opaque view public.contacts_opaque")},
    ),
    (
        "SELECT id FROM contacts_parent",
        {
            (M, EXPRESSION, "opaque relation public.contacts_parent"),
            (C, EXPRESSION, "opaque relation public.contacts_parent"),
        },
    ),
    (
        "INSERT INTO contacts_parent (id, mobile) VALUES (1, 'x')",
        {
            (M, WRITE, "write through opaque relation public.contacts_parent"),
            (C, WRITE, "write through opaque relation public.contacts_parent"),
        },
    ),
    (
        "SELECT lm FROM contacts_derived",
        {(M, EXPRESSION, "view public.contacts_derived (its definition uses the column)")},
    ),
    # statements the walker cannot analyse column by column: every governed column, EXPRESSION
    (
        "MERGE INTO contacts t USING contacts s ON t.id = s.id WHEN MATCHED THEN UPDATE SET mobile = s.mobile",
        {(M, EXPRESSION, UNANALYSED), (C, EXPRESSION, UNANALYSED)},
    ),
    ("DO $$BEGIN PERFORM 1 FROM contacts; END$$", {(M, EXPRESSION, UNANALYSED), (C, EXPRESSION, UNANALYSED)}),
]


@pytest.mark.parametrize(("sql", "expected"), PLAIN_CASES)
def test_plain_references(sql: str, expected: set[tuple[str, ReferenceKind, str]]) -> None:
    plan = _plan(sql)
    assert {(r.column.column_id, r.kind, r.construct) for r in plan.references} == expected
    # Nothing of a plain column is ever sealed or rewritten.
    assert not plan.literal_targets
    assert not plan.param_targets
    assert not plan.edits
    if plan.copy is not None:
        assert not plan.copy.needs_rewrite


RESULTS: list[tuple[str, tuple[ProtectedColumn | None, ...]]] = [
    ("SELECT mobile FROM contacts", (MOBILE,)),
    ("SELECT * FROM contacts", (None, MOBILE, CITY, None)),
    ("SELECT x FROM (SELECT mobile AS x FROM contacts) s", (MOBILE,)),
    ("SELECT mobile FROM contacts UNION ALL SELECT note FROM contacts", (MOBILE,)),
    ("SELECT c FROM contacts c", (None,)),
    ("SELECT lower(mobile) FROM contacts", (None,)),
    ("SELECT ssn, phone, id FROM customers", (SSN, PHONE, None)),
    ("SELECT m FROM contacts_view", (VIEW_M,)),
    ("DELETE FROM contacts RETURNING city", (CITY,)),
    ("SELECT * FROM contacts a JOIN contacts b USING (city)", (CITY, None, MOBILE, None, None, MOBILE, None)),
]


@pytest.mark.parametrize(("sql", "expected"), RESULTS)
def test_result_columns_carry_plain_columns(sql: str, expected: tuple[ProtectedColumn | None, ...]) -> None:
    assert _plan(sql).result_columns == expected


def test_plain_literals_and_parameters_are_never_sealed() -> None:
    plan = _plan("UPDATE customers SET phone = 'p', ssn = 's', name = $1 WHERE phone = 'q' RETURNING phone")
    assert [t.column for t in plan.literal_targets] == [SSN]
    assert dict(plan.param_targets) == {}
    plan = _plan("INSERT INTO customers (id, name, ssn, email, phone) VALUES ($1, $2, $3, $4, $5)")
    assert dict(plan.param_targets) == {3: SSN, 4: EMAIL}
    assert {(r.column, r.kind) for r in plan.references} == {(c, WRITE) for c in (NAME, SSN, EMAIL, PHONE)}
    # A parameter used for a plain column and elsewhere is no conflict (it is not sealed).
    assert not _plan("UPDATE contacts SET mobile = $1 WHERE city = $1").param_targets


def test_copy_plan_separates_governed_from_encrypted() -> None:
    plan = _plan("COPY customers FROM STDIN")
    assert plan.copy is not None
    assert plan.copy.protected == (None, None, SSN, EMAIL, None, None)
    assert plan.copy.governed_columns == (None, NAME, SSN, EMAIL, PHONE, None)
    assert plan.copy.needs_rewrite
    plan = _plan("COPY contacts (mobile, id) TO STDOUT")
    assert plan.copy is not None
    assert plan.copy.protected == (None, None)
    assert plan.copy.governed_columns == (MOBILE, None)
    assert not plan.copy.needs_rewrite
    plan = _plan("COPY (SELECT ssn, phone FROM customers) TO STDOUT")
    assert plan.copy is not None
    assert (plan.copy.protected, plan.copy.governed_columns) == ((SSN, None), (SSN, PHONE))
    # Binary COPY of plain columns is not refused by the analysis (the role decides).
    assert _plan("COPY contacts TO STDOUT (FORMAT binary)").copy is not None


ENCRYPTED_CASES: list[tuple[str, set[tuple[str, ReferenceKind, str]]]] = [
    ("SELECT ssn FROM customers", {(S, OUTPUT, "SELECT list")}),
    ("SELECT * FROM customers", {(c, OUTPUT, "SELECT *") for c in (N, S, E, P)}),
    ("SELECT id FROM customers WHERE ssn IS NULL", {(S, EXPRESSION, "IS NULL (in WHERE)")}),
    ("SELECT count(email) FROM customers", {(E, EXPRESSION, "aggregate count() (in SELECT list)")}),
    ("INSERT INTO customers (id, ssn) VALUES (1, 'x')", {(S, WRITE, "INSERT")}),
    ("UPDATE customers SET ssn = $1", {(S, WRITE, "UPDATE SET")}),
    ("UPDATE customers SET ssn = ssn", {(S, WRITE, "UPDATE SET")}),
    ("COPY customers (id, email) TO STDOUT", {(E, OUTPUT, "COPY TO")}),
    (
        "SELECT phone, ssn FROM customers WHERE phone LIKE 'x'",
        {(P, OUTPUT, "SELECT list"), (S, OUTPUT, "SELECT list"), (P, EXPRESSION, "LIKE (in WHERE)")},
    ),
    ("SELECT * FROM customers_opaque", {(c, EXPRESSION, "opaque view public.customers_opaque") for c in (N, S, E, P)}),
    ("DECLARE cur CURSOR FOR SELECT ssn FROM customers", {(S, OUTPUT, "SELECT list")}),
]


@pytest.mark.parametrize(("sql", "expected"), ENCRYPTED_CASES)
def test_encrypted_references(sql: str, expected: set[tuple[str, ReferenceKind, str]]) -> None:
    assert _refs(sql) == expected


@pytest.mark.parametrize(
    ("sql", "fragments"),
    [
        ("SELECT id FROM customers WHERE ssn = 'x'", ["public.customers.ssn", "not searchable"]),
        ("SELECT id FROM customers WHERE phone = 'x' ORDER BY email", ["public.customers.email", "ORDER BY"]),
        ("SELECT lower(ssn), lower(phone) FROM customers", ["public.customers.ssn", "function lower()"]),
        ("SELECT c FROM customers c", ["whole-row", "public.customers.ssn"]),
        ("SELECT ssn FROM customers UNION SELECT phone FROM customers", ["public.customers.ssn", "UNION"]),
        (
            "SELECT ssn FROM customers UNION ALL SELECT phone FROM customers",
            ["UNION ALL", "public.customers.ssn", "plain column public.customers.phone"],
        ),
        ("MERGE INTO customers t USING contacts s ON t.id = s.id WHEN MATCHED THEN DELETE", ["MERGE"]),
        (
            "INSERT INTO customers (id, ssn) VALUES (1, 'x') ON CONFLICT (ssn) DO NOTHING",
            ["public.customers.ssn", "ON CONFLICT target"],
        ),
        (
            "DECLARE cur CURSOR FOR SELECT ssn FROM customers UNION ALL SELECT ssn FROM customers",
            ["DECLARE CURSOR cur", "public.customers.ssn", "FETCH cannot show"],
        ),
    ],
)
def test_encrypted_refusals_stay(sql: str, fragments: list[str]) -> None:
    refusal = analyze(sql, CATALOG).refusal
    assert refusal is not None
    assert refusal.sqlstate == "0A000"
    for fragment in fragments:
        assert fragment in refusal.message


def test_cursor_declaration_is_exposed() -> None:
    plan = _plan("DECLARE cur CURSOR WITH HOLD FOR SELECT id, ssn, phone FROM customers WHERE phone LIKE 'x'")
    assert plan.declares_cursor
    assert plan.cursor == "cur"
    assert plan.result_columns is None  # the DECLARE returns no rows; FETCH does, named by RowDescription
    assert plan.cursor_columns == (None, SSN, PHONE)
    assert Reference(PHONE, EXPRESSION, "LIKE (in WHERE)") in plan.references
    # A plain column FETCH cannot attribute: not refused, but a use the role decides on.
    plan = _plan("DECLARE cur CURSOR FOR SELECT mobile FROM contacts UNION ALL SELECT mobile FROM contacts")
    assert Reference(MOBILE, EXPRESSION, "DECLARE CURSOR (a result column FETCH cannot attribute)") in plan.references
    assert not _plan("SELECT ssn FROM customers").declares_cursor
    # FETCH and MOVE name no table: not analysed (their RowDescription carries the origins).
    assert not analyze("FETCH 10 FROM cur", CATALOG).statements


def test_prepare_of_a_plain_column_is_a_reference() -> None:
    plan = _plan("PREPARE p AS SELECT mobile FROM contacts UNION ALL SELECT mobile FROM contacts")
    assert any(r.kind is EXPRESSION and r.column == MOBILE for r in plan.references)


def test_references_are_per_text_not_per_role() -> None:
    a = analyze("SELECT mobile FROM contacts WHERE city = $1", CATALOG)
    b = analyze("SELECT mobile FROM contacts WHERE city = $1", CATALOG)
    assert a.references == b.references
    assert [r.kind for r in a.references] == [EQUALITY, OUTPUT]


def test_ambiguous_name_does_not_refuse_plain_columns() -> None:
    other = Catalog(CATALOG.tables, frozenset({("other", "contacts")}))
    plan = analyze("SELECT mobile FROM contacts", other)
    assert plan.refusal is None
    assert plan.statements[0].result_columns == (MOBILE,)
    refused = analyze("SELECT ssn FROM customers", Catalog(CATALOG.tables, frozenset({("other", "customers")})))
    assert refused.refusal is not None


# -- a property: random statements from a small grammar -------------------------------------------------

_COLUMNS = {"id": None, "mobile": MOBILE, "city": CITY, "note": None}
_OPS = {"=": EQUALITY, "IN": EQUALITY, "LIKE": EXPRESSION, "<": EXPRESSION, "IS NULL": EXPRESSION}


@settings(max_examples=300, deadline=None)
@given(
    select=st.lists(st.sampled_from(sorted(_COLUMNS)), min_size=1, max_size=4),
    where=st.none() | st.tuples(st.sampled_from(sorted(_COLUMNS)), st.sampled_from(sorted(_OPS))),
    order=st.none() | st.sampled_from(sorted(_COLUMNS)),
    wrap=st.booleans(),
)
def test_every_use_is_recorded_with_its_kind(
    select: list[str], where: tuple[str, str] | None, order: str | None, wrap: bool
) -> None:
    inner = "(SELECT * FROM contacts) AS c" if wrap else "contacts c"
    sql = f"SELECT {', '.join('c.' + s for s in select)} FROM {inner}"
    expected: set[tuple[ProtectedColumn, ReferenceKind]] = set()
    if wrap:
        expected |= {(MOBILE, OUTPUT), (CITY, OUTPUT)}  # the subquery's SELECT *
    for s in select:
        if _COLUMNS[s] is not None:
            expected.add((_COLUMNS[s], OUTPUT))  # type: ignore[arg-type]
    if where is not None:
        col, op = where
        cond = {"=": "= 'x'", "IN": "IN ('x', 'y')", "LIKE": "LIKE 'x%'", "<": "< 'x'", "IS NULL": "IS NULL"}[op]
        sql += f" WHERE c.{col} {cond}"
        if _COLUMNS[col] is not None:
            expected.add((_COLUMNS[col], _OPS[op]))  # type: ignore[arg-type]
    if order is not None:
        sql += f" ORDER BY c.{order}"
        if _COLUMNS[order] is not None:
            expected.add((_COLUMNS[order], EXPRESSION))  # type: ignore[arg-type]
    plan = _plan(sql)
    assert {(r.column, r.kind) for r in plan.references} == expected
    assert plan.result_columns == tuple(_COLUMNS[s] for s in select)
    assert not plan.literal_targets


_ENC = {"id": None, "ssn": SSN, "phone": PHONE}


@settings(max_examples=200, deadline=None)
@given(
    select=st.lists(st.sampled_from(sorted(_ENC)), min_size=1, max_size=3),
    where=st.none() | st.tuples(st.sampled_from(sorted(_ENC)), st.sampled_from(sorted(_OPS))),
)
def test_encrypted_columns_are_refused_or_recorded(select: list[str], where: tuple[str, str] | None) -> None:
    sql = f"SELECT {', '.join(select)} FROM customers"
    refused = False
    if where is not None:
        col, op = where
        cond = {"=": "= 'x'", "IN": "IN ('x', 'y')", "LIKE": "LIKE 'x%'", "<": "< 'x'", "IS NULL": "IS NULL"}[op]
        sql += f" WHERE {col} {cond}"
        refused = col == "ssn" and op != "IS NULL"
    plan = analyze(sql, CATALOG)
    refusal = plan.refusal
    if refused:
        assert refusal is not None
        assert refusal.sqlstate == "0A000"
        assert "public.customers.ssn" in refusal.message
        return
    assert refusal is None
    (statement,) = plan.statements
    outputs = {r.column for r in statement.references if r.kind is OUTPUT}
    assert outputs == {_ENC[s] for s in select} - {None}
    assert statement.result_columns == tuple(_ENC[s] for s in select)


def test_unparseable_text_on_plain_tables_is_left_to_the_server() -> None:
    plan = analyze("SELECT mobile FROM contacts WHERE", CATALOG)
    assert plan.unparseable
    assert plan.refusal is None
    assert {(r.column, r.kind, r.construct) for r in plan.references} == {
        (MOBILE, EXPRESSION, UNANALYSED),
        (CITY, EXPRESSION, UNANALYSED),
    }
    refused = analyze("SELECT ssn FROM customers WHERE", CATALOG)
    assert refused.refusal is not None
    assert refused.refusal.sqlstate == "0A000"


def test_uncertain_plain_result_column_is_a_use_not_a_result_column() -> None:
    plan = _plan("SELECT s.mobile FROM contacts c, LATERAL (SELECT mobile FROM elsewhere) s")
    assert plan.result_columns == (None,)
    assert Reference(MOBILE, EXPRESSION, "a result column") in plan.references
