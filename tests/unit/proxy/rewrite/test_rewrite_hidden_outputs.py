"""HiddenOutput: which top-level SELECT list entries the session may replace by
``CASE WHEN false THEN <entry> END`` (a NULL ``bytea`` once planned) for a role that sees the column
hidden, and that the substituted text keeps every other byte and the output name."""

from __future__ import annotations

import pytest

from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable

_COLS = {
    "ssn": ProtectedColumn("public", "customers", "ssn", "text"),
    "email": ProtectedColumn("public", "customers", "email", "text"),
    "phone": ProtectedColumn("public", "customers", "phone", "text", encrypted=False),
}
CUSTOMERS = ProtectedTable("public", "customers", _COLS, ("id", "name", "ssn", "email", "phone"))
CATALOG = Catalog({("public", "customers"): CUSTOMERS})


def _hidden_sql(sql: str) -> str:
    plan = analyze(sql, CATALOG)
    (st,) = plan.statements
    assert st.refusal_reason is None
    return plan.rewritten_sql({}, [h.edit() for h in st.hidden_outputs])


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT id, ssn FROM customers", 'SELECT id, CASE WHEN false THEN ssn END AS "ssn" FROM customers'),
        (
            "SELECT c.ssn, c.email FROM customers c",
            'SELECT CASE WHEN false THEN c.ssn END AS "ssn", CASE WHEN false THEN c.email END AS "email" '
            "FROM customers c",
        ),
        ("SELECT ssn AS s FROM customers", "SELECT CASE WHEN false THEN ssn END AS s FROM customers"),
        ("SELECT ssn s, id FROM customers", "SELECT CASE WHEN false THEN ssn END s, id FROM customers"),
        (
            'SELECT "ssn" FROM customers WHERE id = 1',
            'SELECT CASE WHEN false THEN "ssn" END AS "ssn" FROM customers WHERE id = 1',
        ),
        (
            "SELECT public.customers.ssn FROM public.customers ORDER BY id",
            'SELECT CASE WHEN false THEN public.customers.ssn END AS "ssn" FROM public.customers ORDER BY id',
        ),
        (
            "SELECT /* x */ ssn/* y */FROM customers",
            'SELECT /* x */ CASE WHEN false THEN ssn END AS "ssn"/* y */FROM customers',
        ),
        (
            "SELECT s.ssn FROM (SELECT ssn FROM customers) s",
            'SELECT CASE WHEN false THEN s.ssn END AS "ssn" FROM (SELECT ssn FROM customers) s',
        ),
        # Parentheses that wrap only the reference are part of the substituted span; the name goes after.
        ("SELECT (ssn) FROM customers", 'SELECT CASE WHEN false THEN (ssn) END AS "ssn" FROM customers'),
        (
            "SELECT id,( ( c . ssn ) )FROM customers c",
            'SELECT id,CASE WHEN false THEN ( ( c . ssn ) ) END AS "ssn" FROM customers c',
        ),
        ("SELECT(ssn)s FROM customers", "SELECT CASE WHEN false THEN (ssn) END s FROM customers"),
        (
            "SELECT (/*a*/ssn--b\n) AS s FROM customers",
            "SELECT CASE WHEN false THEN (/*a*/ssn--b\n) END AS s FROM customers",
        ),
        ('SELECT U&"s\\0073n"FROM customers', 'SELECT CASE WHEN false THEN U&"s\\0073n" END AS "ssn" FROM customers'),
        ("SELECT c.--x\nssn FROM customers c", 'SELECT CASE WHEN false THEN c.--x\nssn END AS "ssn" FROM customers c'),
        (
            "WITH c AS (SELECT ssn FROM customers) SELECT ssn FROM c",
            'WITH c AS (SELECT ssn FROM customers) SELECT CASE WHEN false THEN ssn END AS "ssn" FROM c',
        ),
    ],
)
def test_bare_encrypted_columns_of_the_top_level_select_list_are_substituted(sql: str, expected: str) -> None:
    assert _hidden_sql(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT phone FROM customers",  # a plain column keeps the server's type: not substituted
        "SELECT * FROM customers",  # only named entries
        "SELECT ssn FROM customers UNION ALL SELECT ssn FROM customers",  # a set operation
        "SELECT ssn INTO TEMP x FROM customers",
        "EXPLAIN SELECT ssn FROM customers",
        "INSERT INTO customers (id) VALUES (1) RETURNING ssn",
        "DECLARE c CURSOR FOR SELECT ssn FROM customers",
        "CREATE VIEW v AS SELECT ssn FROM customers",
        "SELECT id FROM (SELECT ssn, id FROM customers) s",  # a subquery's own list is not the result
    ],
)
def test_nothing_else_is_substituted(sql: str) -> None:
    for st in analyze(sql, CATALOG).statements:
        assert st.hidden_outputs == ()


def test_each_statement_of_a_query_string_has_its_own_entries() -> None:
    plan = analyze("SELECT ssn FROM customers; SELECT id, email FROM customers", CATALOG)
    first, second = plan.statements
    assert [h.column.name for h in first.hidden_outputs] == ["ssn"]
    assert [h.column.name for h in second.hidden_outputs] == ["email"]


def test_an_output_name_needing_quotes_is_quoted() -> None:
    col = ProtectedColumn("public", "odd", 'we"ird', "text")
    catalog = Catalog({("public", "odd"): ProtectedTable("public", "odd", {'we"ird': col}, ('we"ird',))})
    plan = analyze('SELECT "we""ird" FROM odd', catalog)
    (st,) = plan.statements
    assert (
        plan.rewritten_sql({}, [h.edit() for h in st.hidden_outputs])
        == 'SELECT CASE WHEN false THEN "we""ird" END AS "we""ird" FROM odd'
    )
