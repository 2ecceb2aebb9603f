# ruff: noqa: E501 - the case tables keep one statement per line
"""Reads of protected columns: which result columns carry ciphertext, name resolution (aliases,
schemas, quoting, CTEs, subqueries, joins, set operations) and what is let through."""

from __future__ import annotations

import pytest

from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.rewrite.plan import StatementKind, StatementPlan


def _table(schema: str, name: str, columns: list[str], protected: dict[str, str]) -> ProtectedTable:
    cols = {c: ProtectedColumn(schema, name, c, t) for c, t in protected.items()}
    return ProtectedTable(schema, name, cols, tuple(columns))


CUSTOMERS = _table(
    "public",
    "customers",
    ["id", "name", "ssn", "email", "dob", "score", "active", "note"],
    {"ssn": "text", "email": "text", "dob": "date", "score": "integer", "active": "boolean"},
)
ACCOUNTS = _table("public", "accounts", ["id", "customer_id", "iban", "balance"], {"iban": "text"})
CARDS = _table("billing", "cards", ["id", "pan"], {"pan": "text"})
MIXED = _table("public", "Mixed Case", ["id", "secret"], {"secret": "text"})
PARTIAL = ProtectedTable("public", "partial", {"token": ProtectedColumn("public", "partial", "token", "text")})
CATALOG = Catalog({(t.schema, t.name): t for t in (CUSTOMERS, ACCOUNTS, CARDS, MIXED, PARTIAL)})

SSN, EMAIL, DOB, SCORE, ACTIVE = (CUSTOMERS.columns[n] for n in ("ssn", "email", "dob", "score", "active"))
IBAN, PAN, SECRET, TOKEN = (
    ACCOUNTS.columns["iban"],
    CARDS.columns["pan"],
    MIXED.columns["secret"],
    PARTIAL.columns["token"],
)
ALL_CUSTOMERS = (None, None, SSN, EMAIL, DOB, SCORE, ACTIVE, None)
ALL_ACCOUNTS = (None, None, IBAN, None)


def _statement(sql: str) -> StatementPlan:
    plan = analyze(sql, CATALOG)
    refusal = plan.refusal
    assert refusal is None, refusal.message
    assert plan.touches_protected
    (statement,) = plan.statements
    assert statement.touches_protected
    assert not statement.literal_targets
    return statement


RESULT_CASES: list[tuple[str, tuple[ProtectedColumn | None, ...]]] = [
    ("SELECT ssn FROM customers", (SSN,)),
    ("SELECT id, ssn, email FROM customers WHERE id = 1", (None, SSN, EMAIL)),
    ("SELECT c.ssn AS x, c.id FROM customers c", (SSN, None)),
    ("SELECT customers.ssn FROM customers", (SSN,)),
    ("SELECT public.customers.ssn FROM customers", (SSN,)),
    ("SELECT public.customers.ssn FROM public.customers", (SSN,)),
    ("SELECT SSN FROM CUSTOMERS", (SSN,)),
    ('SELECT "ssn" FROM "customers"', (SSN,)),
    ('SELECT secret FROM "Mixed Case"', (SECRET,)),
    ("SELECT pan FROM billing.cards", (PAN,)),
    ("SELECT * FROM customers", ALL_CUSTOMERS),
    ("TABLE customers", ALL_CUSTOMERS),
    ("SELECT c.* FROM customers c", ALL_CUSTOMERS),
    ("SELECT c.*, a.iban FROM customers c JOIN accounts a ON a.customer_id = c.id", (*ALL_CUSTOMERS, IBAN)),
    ("SELECT * FROM customers c JOIN accounts a ON a.customer_id = c.id", ALL_CUSTOMERS + ALL_ACCOUNTS),
    ("SELECT * FROM customers c LEFT JOIN accounts a ON a.customer_id = c.id AND a.iban IS NOT NULL", ALL_CUSTOMERS + ALL_ACCOUNTS),
    # USING merges the join column: it comes first, once.
    ("SELECT * FROM customers JOIN accounts USING (id)", (None, None, SSN, EMAIL, DOB, SCORE, ACTIVE, None, None, IBAN, None)),
    ("SELECT * FROM customers NATURAL JOIN accounts", (None, None, SSN, EMAIL, DOB, SCORE, ACTIVE, None, None, IBAN, None)),
    ("SELECT j.ssn FROM (customers JOIN accounts USING (id)) AS j", (SSN,)),
    ("SELECT x.s FROM (SELECT ssn AS s FROM customers) x", (SSN,)),
    ("SELECT s, t FROM (SELECT ssn, email FROM customers) AS x(s, t)", (SSN, EMAIL)),
    ("SELECT * FROM (SELECT id, ssn FROM customers) x", (None, SSN)),
    ("SELECT a, b FROM customers AS c(a, b, c)", (None, None)),
    ("SELECT c FROM customers AS x(a, b, c)", (SSN,)),
    ("WITH c AS (SELECT id, email FROM customers) SELECT email, id FROM c", (EMAIL, None)),
    ("WITH c(e) AS (SELECT email FROM customers) SELECT e FROM c", (EMAIL,)),
    ("WITH a AS (SELECT ssn FROM customers), b AS (SELECT ssn AS s FROM a) SELECT s FROM b", (SSN,)),
    ("WITH x AS (SELECT 1) SELECT ssn FROM customers, x", (SSN,)),
    ("WITH d AS (DELETE FROM customers WHERE id = 1 RETURNING ssn) SELECT ssn FROM d", (SSN,)),
    ("SELECT ssn FROM customers UNION ALL SELECT ssn FROM customers", (SSN,)),
    ("SELECT ssn, id FROM customers UNION ALL SELECT NULL, 1", (SSN, None)),
    ("SELECT NULL, id FROM customers UNION ALL SELECT ssn, 1 FROM customers UNION ALL SELECT NULL, 2", (SSN, None)),
    ("SELECT id FROM customers UNION SELECT id FROM accounts", (None,)),
    ("SELECT ssn FROM customers UNION ALL SELECT ssn FROM customers LIMIT 5", (SSN,)),
    ("WITH RECURSIVE r(n, s) AS (SELECT 1, ssn FROM customers UNION ALL SELECT n + 1, s FROM r WHERE n < 3) SELECT s FROM r", (SSN,)),
    ("SELECT id FROM customers WHERE ssn IS NULL AND email IS NOT NULL", (None,)),
    ("SELECT ssn IS NULL AS missing FROM customers", (None,)),
    ("SELECT count(*), count(ssn), count(c.*) FROM customers c", (None, None, None)),
    ("SELECT count(*) FILTER (WHERE ssn IS NULL) FROM customers", (None,)),
    ("SELECT id FROM customers WHERE id IN (SELECT customer_id FROM accounts WHERE iban IS NOT NULL)", (None,)),
    ("SELECT id FROM customers c WHERE EXISTS (SELECT ssn FROM accounts a WHERE a.customer_id = c.id)", (None,)),
    ("SELECT ssn FROM customers ORDER BY id DESC LIMIT 10 OFFSET 5 FOR UPDATE", (SSN,)),
    ("SELECT ssn AS x FROM customers ORDER BY id", (SSN,)),
    ("SELECT lower(name) AS ssn FROM customers ORDER BY ssn", (None,)),
    ("SELECT DISTINCT ON (id) ssn FROM customers ORDER BY id", (SSN,)),
    ("SELECT id, count(*) FROM customers GROUP BY id HAVING count(ssn) > 1", (None, None)),
    ("SELECT ssn FROM customers GROUP BY id", (SSN,)),
    ("SELECT l.s FROM customers c, LATERAL (SELECT c.ssn AS s) l", (SSN,)),
    ("SELECT ssn FROM customers TABLESAMPLE SYSTEM (10)", (SSN,)),
    ("SELECT token FROM partial", (TOKEN,)),
    ("SELECT row_number() OVER (PARTITION BY id ORDER BY name), ssn FROM customers", (None, SSN)),
    ("SELECT c.id FROM customers c WHERE c.id = (SELECT max(id) FROM accounts a WHERE a.customer_id = c.id)", (None,)),
    ("SELECT * FROM accounts WHERE customer_id = ANY(ARRAY(SELECT id FROM customers WHERE ssn IS NULL))", ALL_ACCOUNTS),
    # Qualifying a name that an unknown table may also have removes the doubt.
    ("SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE lower(o.email) = 'x')", (None,)),
    ("SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.id AND email IS NULL)", (None,)),
    ("SELECT c.id, g FROM customers c, generate_series(1, c.id) g", (None, None)),
    # A CTE defined inside a subquery does not shadow the table outside it.
    ("SELECT ssn FROM customers, (WITH customers AS (SELECT 1 AS z) SELECT z FROM customers) s", (SSN,)),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "expected"), RESULT_CASES)
def test_result_columns(sql: str, expected: tuple[ProtectedColumn | None, ...]) -> None:
    st = _statement(sql)
    assert st.result_columns == expected
    assert not st.result_via_row_description


VIA_ROW_DESCRIPTION = [
    "SELECT * FROM orders o JOIN customers c ON c.id = o.customer_id",
    "SELECT o.*, c.ssn FROM orders o JOIN customers c ON c.id = o.customer_id",
    "SELECT * FROM partial",
    "SELECT * FROM customers, generate_series(1, 3)",
    "SELECT * FROM (SELECT * FROM orders o JOIN customers c ON c.id = o.customer_id) x",
    "WITH x AS (SELECT * FROM orders, customers) SELECT * FROM x",
    "INSERT INTO partial (token) VALUES ($1) RETURNING *",
]


@pytest.mark.parametrize("sql", VIA_ROW_DESCRIPTION)
def test_unknown_width_results_rely_on_row_description(sql: str) -> None:
    st = _statement(sql)
    assert st.result_columns is None
    assert st.result_via_row_description


NOT_PROTECTED = [
    "SELECT 1",
    "VALUES (1, 'customers')",
    "SELECT * FROM orders WHERE note = 'customers'",
    "INSERT INTO log (msg) VALUES ('customers updated: ssn')",
    'SELECT * FROM "Customers"',
    'SELECT * FROM "CUSTOMERS"',
    "SELECT * FROM other.customers",
    # A CTE named like a protected table shadows it in FROM.
    "WITH customers AS (SELECT 'x' AS ssn) SELECT lower(ssn) FROM customers ORDER BY ssn",
    "WITH customers AS (SELECT 1 AS id) SELECT c.id FROM customers c WHERE c.id = 1",
    "WITH RECURSIVE customers(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM customers) SELECT n FROM customers LIMIT 3",
    "SELECT * FROM orders o WHERE EXISTS (WITH accounts AS (SELECT 1 AS iban) SELECT lower(iban) FROM accounts)",
    "SET search_path = customers",
    "SHOW customers_setting",
    "-- customers\nSELECT 2",
]


@pytest.mark.parametrize("sql", NOT_PROTECTED)
def test_statements_that_touch_no_protected_table_pass_untouched(sql: str) -> None:
    plan = analyze(sql, CATALOG)
    assert not plan.touches_protected
    assert plan.refusal is None
    assert not plan.needs_rewrite
    assert plan.rewritten_sql({}) == sql
    assert all(not s.touches_protected and s.result_columns is None for s in plan.statements)


def test_fast_path_skips_parsing_when_no_protected_name_occurs() -> None:
    plan = analyze("SELECT * FROM orders WHERE id = $1", CATALOG)
    assert plan.statements == ()
    assert not plan.touches_protected
    assert analyze("SELECT * FROM customers", Catalog()).statements == ()


def test_unicode_escaped_identifier_is_resolved() -> None:
    st = _statement('SELECT ssn FROM U&"cust\\006fmers"')
    assert st.result_columns == (SSN,)


def test_unqualified_name_means_the_protected_table_in_any_schema() -> None:
    assert _statement("SELECT pan FROM cards").result_columns == (PAN,)


OTHER_STATEMENTS: list[tuple[str, StatementKind]] = [
    ("TRUNCATE customers", StatementKind.TRUNCATE),
    ("DROP TABLE customers", StatementKind.DDL),
    ("DROP TABLE IF EXISTS billing.cards", StatementKind.DDL),
    ("ALTER TABLE customers ADD COLUMN x int", StatementKind.DDL),
    ("CREATE INDEX ON customers (id)", StatementKind.DDL),
    ("CREATE VIEW v AS SELECT id, ssn FROM customers", StatementKind.DDL),
    ("CREATE TABLE c2 AS SELECT id, name FROM customers", StatementKind.DDL),
    ("COMMENT ON TABLE customers IS 'x'", StatementKind.DDL),
    ("GRANT SELECT ON customers TO app", StatementKind.DDL),
    ("VACUUM customers", StatementKind.OTHER),
    ("LOCK TABLE customers", StatementKind.OTHER),
    ("DECLARE cur CURSOR FOR SELECT * FROM orders WHERE note = 'customers'", StatementKind.OTHER),
    ("PREPARE q AS SELECT ssn FROM customers WHERE id = $1", StatementKind.OTHER),
]


@pytest.mark.parametrize(("sql", "kind"), OTHER_STATEMENTS)
def test_other_statements_pass(sql: str, kind: StatementKind) -> None:
    plan = analyze(sql, CATALOG)
    assert plan.refusal is None
    (st,) = plan.statements
    assert st.kind is kind
    assert not st.literal_targets
    assert not plan.needs_rewrite


def test_explain_returns_plan_text_not_rows() -> None:
    st = _statement("EXPLAIN SELECT ssn FROM customers")
    assert st.kind is StatementKind.OTHER
    assert st.result_columns == (None,)


def test_multi_statement_text() -> None:
    plan = analyze(
        "BEGIN; INSERT INTO customers (ssn) VALUES ('a'); SELECT ssn FROM customers; SELECT 1; COMMIT",
        CATALOG,
    )
    assert [s.kind for s in plan.statements] == [
        StatementKind.OTHER,
        StatementKind.INSERT,
        StatementKind.SELECT,
        StatementKind.SELECT,
        StatementKind.OTHER,
    ]
    assert [s.touches_protected for s in plan.statements] == [False, True, True, False, False]
    assert plan.statements[2].result_columns == (SSN,)
    assert len(plan.literal_targets) == 1
    assert plan.refusal is None
    refused = analyze("SELECT ssn FROM customers; SELECT lower(ssn) FROM customers", CATALOG)
    assert refused.statements[0].refusal is None
    second = refused.statements[1].refusal
    assert second is not None
    refusal = refused.refusal
    assert refusal is not None
    assert refusal.message == second.message
