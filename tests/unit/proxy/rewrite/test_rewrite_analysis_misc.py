"""COPY plans, text libpg_query cannot parse, and robustness on arbitrary input."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pglast
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.rewrite.plan import CopyDirection, CopyFormat, CopyOptions, CopyPlan, QueryPlan, StatementKind


def _table(schema: str, name: str, columns: list[str], protected: dict[str, str]) -> ProtectedTable:
    cols = {c: ProtectedColumn(schema, name, c, t) for c, t in protected.items()}
    return ProtectedTable(schema, name, cols, tuple(columns))


CUSTOMERS = _table(
    "public",
    "customers",
    ["id", "name", "ssn", "email", "dob", "score", "active", "note"],
    {"ssn": "text", "email": "text", "dob": "date", "score": "integer", "active": "boolean"},
)
CARDS = _table("billing", "cards", ["id", "pan"], {"pan": "text"})
CATALOG = Catalog({(t.schema, t.name): t for t in (CUSTOMERS, CARDS)})
SSN, EMAIL, DOB, SCORE, ACTIVE = (CUSTOMERS.columns[n] for n in ("ssn", "email", "dob", "score", "active"))
MASK = (None, None, SSN, EMAIL, DOB, SCORE, ACTIVE, None)


def _copy(sql: str) -> CopyPlan:
    plan = analyze(sql, CATALOG)
    refusal = plan.refusal
    assert refusal is None, refusal.message
    (statement,) = plan.statements
    assert statement.kind is StatementKind.COPY
    assert statement.copy is not None
    assert not plan.needs_rewrite
    return statement.copy


COPY_CASES: list[tuple[str, CopyPlan]] = [
    (
        "COPY customers FROM STDIN",
        CopyPlan(CUSTOMERS, CopyDirection.FROM, CUSTOMERS.all_columns, MASK, CopyFormat.TEXT, CopyOptions()),
    ),
    (
        "COPY customers (id, ssn) FROM STDIN WITH (FORMAT csv, HEADER, DELIMITER ';', NULL 'x', QUOTE '''', "
        "ESCAPE '\\', ENCODING 'utf8')",
        CopyPlan(
            CUSTOMERS,
            CopyDirection.FROM,
            ("id", "ssn"),
            (None, SSN),
            CopyFormat.CSV,
            CopyOptions(delimiter=";", null="x", quote="'", escape="\\", header=True, encoding="utf8"),
        ),
    ),
    (
        "COPY customers TO STDOUT WITH CSV HEADER DELIMITER ',' NULL 'n' QUOTE '\"' FORCE QUOTE *",
        CopyPlan(
            CUSTOMERS,
            CopyDirection.TO,
            CUSTOMERS.all_columns,
            MASK,
            CopyFormat.CSV,
            CopyOptions(delimiter=",", null="n", quote='"', header=True, force_quote_all=True),
        ),
    ),
    (
        "copy public.customers (ssn, email) to stdout (format csv, force_quote (ssn), header false)",
        CopyPlan(
            CUSTOMERS,
            CopyDirection.TO,
            ("ssn", "email"),
            (SSN, EMAIL),
            CopyFormat.CSV,
            CopyOptions(force_quote=("ssn",)),
        ),
    ),
    (
        "COPY customers (ssn) FROM STDIN (FORMAT csv, HEADER match, FORCE_NOT_NULL (ssn), FORCE_NULL (ssn))",
        CopyPlan(
            CUSTOMERS,
            CopyDirection.FROM,
            ("ssn",),
            (SSN,),
            CopyFormat.CSV,
            CopyOptions(header=True, header_match=True, force_not_null=("ssn",), force_null=("ssn",)),
        ),
    ),
    (
        "COPY customers (id, name) TO '/tmp/plain.csv'",
        CopyPlan(CUSTOMERS, CopyDirection.TO, ("id", "name"), (None, None), CopyFormat.TEXT, CopyOptions()),
    ),
    (
        "COPY customers (id) TO STDOUT (FORMAT binary)",
        CopyPlan(CUSTOMERS, CopyDirection.TO, ("id",), (None,), CopyFormat.BINARY, CopyOptions()),
    ),
    (
        "COPY (SELECT id, ssn FROM customers WHERE id > 5) TO STDOUT WITH (FORMAT csv)",
        CopyPlan(None, CopyDirection.TO, (), (None, SSN), CopyFormat.CSV, CopyOptions()),
    ),
    (
        "COPY (DELETE FROM customers WHERE id = 1 RETURNING ssn) TO STDOUT",
        CopyPlan(None, CopyDirection.TO, (), (SSN,), CopyFormat.TEXT, CopyOptions()),
    ),
    (
        "COPY (SELECT o.* FROM orders o JOIN customers c ON c.id = o.customer_id) TO STDOUT",
        CopyPlan(None, CopyDirection.TO, (), (), CopyFormat.TEXT, CopyOptions()),
    ),
]


@pytest.mark.parametrize(("sql", "expected"), COPY_CASES)
def test_copy_plans(sql: str, expected: CopyPlan) -> None:
    copy = _copy(sql)
    assert copy == expected
    assert copy.needs_rewrite == any(c is not None for c in expected.protected)


def test_copy_query_reports_result_columns() -> None:
    (statement,) = analyze("COPY (SELECT id, ssn FROM customers) TO STDOUT", CATALOG).statements
    assert statement.result_columns == (None, SSN)


def test_copy_of_other_tables_is_not_touched() -> None:
    plan = analyze("COPY orders FROM STDIN -- customers", CATALOG)
    assert not plan.touches_protected
    assert all(s.copy is None for s in plan.statements)


# -- text libpg_query cannot parse ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC * FROM customers",
        "SELECT * FROM customers WHERE",
        'SELECT * FROM "customers" WHERE ssn = \'x',
        "SELECT 'x' FROM customers WHERE $$unterminated",
        "SELECT 1\x00; DELETE FROM customers",
        "SELECT '\ud800' FROM customers",
        'SELEC * FROM U&"cust\\006fmers"',
    ],
)
def test_unparseable_text_naming_a_protected_table_is_refused(sql: str) -> None:
    plan = analyze(sql, CATALOG)
    assert plan.unparseable
    assert plan.touches_protected
    refusal = plan.refusal
    assert refusal is not None
    assert refusal.sqlstate == "0A000"
    assert "could not be parsed" in refusal.message


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 'customers'",
        "SELECT * FROM orders WHERE note = 'customers' AND",
        "SELECT * FROM orders -- customers\nWHERE",
    ],
)
def test_unparseable_text_not_naming_a_protected_table_passes(sql: str) -> None:
    plan = analyze(sql, CATALOG)
    assert plan.unparseable
    assert not plan.touches_protected
    assert plan.refusal is None
    assert plan.statements == ()
    assert plan.rewritten_sql({}) == sql


def test_empty_and_comment_only_text() -> None:
    for sql in ("", ";", "-- customers", "/* customers */ ;"):
        plan = analyze(sql, CATALOG)
        assert not plan.touches_protected
        assert plan.refusal is None


# -- robustness -----------------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _no_internal_errors() -> Iterator[None]:
    """analyze turns an unexpected exception into a refusal and logs it; on fuzzed input that must not
    happen either, so the log is checked too."""
    handler = _Collect()
    logger = logging.getLogger("proxy.rewrite.analysis")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]


def _check_invariants(plan: QueryPlan) -> None:
    assert isinstance(plan, QueryPlan)
    if not plan.touches_protected:
        assert plan.refusal is None
        assert not plan.needs_rewrite
        return
    spans = sorted((t.start, t.end) for t in plan.literal_targets)
    spans += sorted((e.start, e.end) for s in plan.statements for e in s.edits)
    spans.sort()
    for (_s1, e1), (s2, _e2) in itertools.pairwise(spans):
        assert e1 <= s2
    for start, end in spans:
        assert 0 <= start < end <= len(plan.sql)
    if plan.needs_rewrite and plan.refusal is None:
        rewritten = plan.rewritten_sql({t: b"\x00\x01" for t in plan.literal_targets})
        pglast.parse_sql(rewritten)


SQL_WORDS = [
    "SELECT", "INSERT", "INTO", "UPDATE", "DELETE", "FROM", "WHERE", "VALUES", "SET", "RETURNING", "WITH",
    "AS", "ON", "CONFLICT", "DO", "NOTHING", "JOIN", "USING", "UNION", "ALL", "ORDER", "BY", "GROUP",
    "COPY", "STDIN", "STDOUT", "CSV", "HEADER", "NULL", "DEFAULT", "TRUE", "IS", "NOT", "IN", "LIKE",
    "customers", "billing.cards", "c", "ssn", "email", "dob", "id", "name", "c.ssn", "c.*", "*", "excluded.ssn",
    "'x'", "'it''s'", "E'\\n'", "$$y$$", "-5", "1.5", "$1", "$2", "::date", "::text", "(", ")", ",", ";", "=",
    "||", "lower(", "count(", "DATE", "'2020-01-01'", "RECURSIVE", "LATERAL", "EXISTS", "CASE", "WHEN",
    "THEN", "END", "\"customers\"", "U&\"ssn\"", "--", "\n", "/*", "*/",
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_analyze_never_raises_on_arbitrary_text(sql: str) -> None:
    with _no_internal_errors():
        _check_invariants(analyze(sql + " customers", CATALOG))
        _check_invariants(analyze(sql, CATALOG))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(SQL_WORDS), max_size=30))
def test_analyze_never_raises_on_sql_like_text(words: list[str]) -> None:
    with _no_internal_errors():
        _check_invariants(analyze(" ".join(words), CATALOG))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40).filter(lambda s: "\x00" not in s))
def test_any_string_literal_round_trips(value: str) -> None:
    quoted = "'" + value.replace("'", "''") + "'"
    sql = f"INSERT INTO customers (id, ssn) VALUES (1, {quoted}) RETURNING ssn"
    plan = analyze(sql, CATALOG)
    assert plan.refusal is None
    (target,) = plan.literal_targets
    assert target.plaintext == value
    assert sql[target.start : target.end] == quoted
    _check_invariants(plan)


def test_all_statement_kinds_of_the_grammar_are_handled_without_errors() -> None:
    statements = [
        "ALTER TABLE customers RENAME COLUMN note TO remark",
        "CREATE TRIGGER t BEFORE INSERT ON customers FOR EACH ROW EXECUTE FUNCTION f()",
        "CREATE RULE r AS ON INSERT TO customers DO ALSO NOTIFY customers",
        "CREATE POLICY p ON customers USING (id > 0)",
        "CLUSTER customers USING customers_pkey",
        "REINDEX TABLE customers",
        "ANALYZE customers (ssn)",
        "CALL refresh_customers()",
        "NOTIFY customers, 'x'",
        "LISTEN customers",
        "SELECT pg_advisory_lock(1) FROM customers LIMIT 1",
        "CREATE TABLE customers_archive (LIKE customers)",
        "ALTER TABLE accounts ADD FOREIGN KEY (customer_id) REFERENCES customers (id)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT count(*)::int FROM customers $$",
        "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
        "IMPORT FOREIGN SCHEMA s LIMIT TO (customers) FROM SERVER srv INTO public",
        "SECURITY LABEL ON TABLE customers IS 'x'",
    ]
    with _no_internal_errors():
        for sql in statements:
            _check_invariants(analyze(sql, CATALOG))
