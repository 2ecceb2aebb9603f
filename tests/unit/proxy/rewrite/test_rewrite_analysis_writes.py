# ruff: noqa: E501 - the case tables keep one statement per line
"""Values written into protected columns: literal targets (offsets, plaintext, casts), parameter targets,
fixed edits, and the rewritten text the server receives."""

from __future__ import annotations

import pglast
import pytest

from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.rewrite.plan import QueryPlan, StatementKind


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
MIXED = _table("public", "Mixed Case", ["id", "secret"], {"secret": "text"})
PARTIAL = ProtectedTable("public", "partial", {"token": ProtectedColumn("public", "partial", "token", "text")})
CATALOG = Catalog({(t.schema, t.name): t for t in (CUSTOMERS, CARDS, MIXED, PARTIAL)})
C = CUSTOMERS.columns


def _plan(sql: str) -> QueryPlan:
    plan = analyze(sql, CATALOG)
    refusal = plan.refusal
    assert refusal is None, refusal.message
    return plan


def _targets(plan: QueryPlan) -> list[tuple[str, str, str, str | None]]:
    return [(plan.sql[t.start : t.end], t.plaintext, t.column.name, t.cast_type) for t in plan.literal_targets]


def _check_rewrite(plan: QueryPlan) -> str:
    """Splices ciphertext for every target; the result must parse, and analysing it again must find the
    same targets, now holding the bytea literals."""
    ciphertexts = {t: bytes([i + 1]) * 3 for i, t in enumerate(plan.literal_targets)}
    rewritten = plan.rewritten_sql(ciphertexts)
    pglast.parse_sql(rewritten)
    again = analyze(rewritten, CATALOG)
    assert again.refusal is None
    assert [(t.column, t.cast_type) for t in again.literal_targets] == [
        (t.column, "bytea") for t in plan.literal_targets
    ]
    assert [t.plaintext for t in again.literal_targets] == [
        "\\x" + (bytes([i + 1]) * 3).hex() for i in range(len(ciphertexts))
    ]
    return rewritten


LITERAL_CASES: list[tuple[str, list[tuple[str, str, str, str | None]]]] = [
    ("INSERT INTO customers (id, ssn) VALUES (1, 'it''s')", [("'it''s'", "it's", "ssn", None)]),
    ("INSERT INTO customers (id, ssn) VALUES (1, E'a\\nb\\x41\\'')", [("E'a\\nb\\x41\\''", "a\nbA'", "ssn", None)]),
    ("INSERT INTO customers (ssn) VALUES ($$x'y$$)", [("$$x'y$$", "x'y", "ssn", None)]),
    ("INSERT INTO customers (ssn) VALUES ($t$a$$b$t$)", [("$t$a$$b$t$", "a$$b", "ssn", None)]),
    ("INSERT INTO customers (ssn) VALUES (U&'d\\0061t')", [("U&'d\\0061t'", "dat", "ssn", None)]),
    ("INSERT INTO customers (ssn) VALUES (U&'d!0061t' UESCAPE '!')", [("U&'d!0061t' UESCAPE '!'", "dat", "ssn", None)]),
    ("INSERT INTO customers (ssn) VALUES ('ab'\n'cd')", [("'ab'\n'cd'", "abcd", "ssn", None)]),
    ("INSERT INTO customers (ssn) VALUES ('')", [("''", "", "ssn", None)]),
    ("INSERT INTO customers (score) VALUES (42)", [("42", "42", "score", None)]),
    ("INSERT INTO customers (score) VALUES (0)", [("0", "0", "score", None)]),
    ("INSERT INTO customers (score) VALUES (-5)", [("-5", "-5", "score", None)]),
    ("INSERT INTO customers (score) VALUES (- 5)", [("- 5", "-5", "score", None)]),
    ("INSERT INTO customers (score) VALUES (+7)", [("+7", "7", "score", None)]),
    ("INSERT INTO customers (score) VALUES (1.5e3)", [("1.5e3", "1.5e3", "score", None)]),
    ("INSERT INTO customers (score) VALUES (-1.50)", [("-1.50", "-1.50", "score", None)]),
    ("INSERT INTO customers (score) VALUES (1_000)", [("1_000", "1000", "score", None)]),
    ("INSERT INTO customers (score) VALUES (0x1F)", [("0x1F", "31", "score", None)]),
    ("INSERT INTO customers (score) VALUES (99999999999)", [("99999999999", "99999999999", "score", None)]),
    ("INSERT INTO customers (score) VALUES (0x1FFFFFFFF)", [("0x1FFFFFFFF", "8589934591", "score", None)]),
    ("INSERT INTO customers (score) VALUES (-5::int)", [("-5::int", "-5", "score", "int4")]),
    ("INSERT INTO customers (active) VALUES (TRUE)", [("TRUE", "true", "active", None)]),
    ("INSERT INTO customers (active) VALUES (false)", [("false", "false", "active", None)]),
    ("INSERT INTO customers (active) VALUES ('t'::boolean)", [("'t'::boolean", "t", "active", "bool")]),
    ("INSERT INTO customers (dob) VALUES ('2020-01-01'::date)", [("'2020-01-01'::date", "2020-01-01", "dob", "date")]),
    ("INSERT INTO customers (dob) VALUES (CAST('2020-01-01' AS date))", [("CAST('2020-01-01' AS date)", "2020-01-01", "dob", "date")]),
    ("INSERT INTO customers (dob) VALUES (DATE '2020-01-01')", [("DATE '2020-01-01'", "2020-01-01", "dob", "date")]),
    ("INSERT INTO customers (dob) VALUES ('2020-01-01'::pg_catalog.date)", [("'2020-01-01'::pg_catalog.date", "2020-01-01", "dob", "date")]),
    ("INSERT INTO customers (dob) VALUES ('2020-01-01' /* c */ :: date /* d */)", [("'2020-01-01' /* c */ :: date", "2020-01-01", "dob", "date")]),
    ("INSERT INTO customers (ssn) VALUES ('x'::character varying(10))", [("'x'::character varying(10)", "x", "ssn", "varchar(10)")]),
    ("INSERT INTO customers (ssn) VALUES (CAST('x' AS varchar(10)))", [("CAST('x' AS varchar(10))", "x", "ssn", "varchar(10)")]),
    ("INSERT INTO customers (dob) VALUES (TIMESTAMP WITH TIME ZONE '2020-01-01 10:00+00')", [("TIMESTAMP WITH TIME ZONE '2020-01-01 10:00+00'", "2020-01-01 10:00+00", "dob", "timestamptz")]),
    ("INSERT INTO customers (ssn) VALUES ('{1,2}'::text[])", [("'{1,2}'::text[]", "{1,2}", "ssn", "text[]")]),
    # Offsets are str indices, not the UTF-8 byte offsets libpg_query reports.
    ("INSERT INTO customers (name, ssn, email) VALUES ('héllo wörld 🎉', 'ü€', 'x')", [("'ü€'", "ü€", "ssn", None), ("'x'", "x", "email", None)]),
    ("INSERT INTO customers (ssn, email) VALUES ('a', 'b'), ('c', DEFAULT), (NULL, 'd')", [("'a'", "a", "ssn", None), ("'b'", "b", "email", None), ("'c'", "c", "ssn", None), ("'d'", "d", "email", None)]),
    ("INSERT INTO customers VALUES (1, 'n', '123', 'e@x', '2020-01-01', 5, true, 'note')", [("'123'", "123", "ssn", None), ("'e@x'", "e@x", "email", None), ("'2020-01-01'", "2020-01-01", "dob", None), ("5", "5", "score", None), ("true", "true", "active", None)]),
    ("INSERT INTO PUBLIC.CUSTOMERS (ID, SSN) VALUES (1, 'x')", [("'x'", "x", "ssn", None)]),
    ('INSERT INTO "customers" ("ssn") VALUES (\'x\')', [("'x'", "x", "ssn", None)]),
    ("WITH customers AS (SELECT 1) INSERT INTO customers (ssn) VALUES ('x')", [("'x'", "x", "ssn", None)]),
    ("INSERT INTO customers (ssn) SELECT 'x' WHERE NOT EXISTS (SELECT 1 FROM customers WHERE id = 3)", [("'x'", "x", "ssn", None)]),
    ("INSERT INTO customers (id, ssn) SELECT 1, 'x' AS s", [("'x'", "x", "ssn", None)]),
    ("INSERT INTO customers (ssn, id) SELECT 'x'::text s, 2", [("'x'::text", "x", "ssn", "text")]),
    ("INSERT INTO customers (ssn) VALUES ('a') ON CONFLICT (id) DO UPDATE SET ssn = 'b'", [("'a'", "a", "ssn", None), ("'b'", "b", "ssn", None)]),
    ("WITH ins AS (INSERT INTO customers (ssn) VALUES ('a') RETURNING id) SELECT id FROM ins", [("'a'", "a", "ssn", None)]),
    ("UPDATE customers SET ssn = 'x', name = 'n' WHERE id = 1", [("'x'", "x", "ssn", None)]),
    ("UPDATE customers SET ssn='x'WHERE id=1", [("'x'", "x", "ssn", None)]),
    ("UPDATE customers SET (ssn, email) = ('a', 'b') WHERE id = 2", [("'a'", "a", "ssn", None), ("'b'", "b", "email", None)]),
    ("UPDATE customers SET dob = '2020-01-01'::date FROM billing.cards k WHERE k.id = customers.id", [("'2020-01-01'::date", "2020-01-01", "dob", "date")]),
    ("UPDATE customers c SET ssn = 'x' WHERE c.ssn IS NULL RETURNING c.ssn", [("'x'", "x", "ssn", None)]),
    ("WITH u AS (UPDATE customers SET ssn = 'x' RETURNING id) SELECT * FROM u", [("'x'", "x", "ssn", None)]),
    ("EXPLAIN ANALYZE INSERT INTO customers (ssn) VALUES ('x')", [("'x'", "x", "ssn", None)]),
    ("PREPARE p AS INSERT INTO customers (ssn, name) VALUES ('x', $1)", [("'x'", "x", "ssn", None)]),
    ('INSERT INTO "Mixed Case" (id, secret) VALUES (1, \'s\')', [("'s'", "s", "secret", None)]),
    ("INSERT INTO partial (token) VALUES ('t')", [("'t'", "t", "token", None)]),
    ("INSERT INTO billing.cards (pan) VALUES ('4111')", [("'4111'", "4111", "pan", None)]),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "expected"), LITERAL_CASES)
def test_literal_targets(sql: str, expected: list[tuple[str, str, str, str | None]]) -> None:
    plan = _plan(sql)
    assert plan.touches_protected
    assert _targets(plan) == expected
    assert plan.needs_rewrite
    rewritten = _check_rewrite(plan)
    assert rewritten.count("::bytea") == len(expected)


def test_rewritten_text_keeps_everything_else_byte_for_byte() -> None:
    sql = "INSERT INTO customers (id, name, ssn) VALUES (1, 'Zoë', '123-45-6789') -- trailing 'ssn' comment"
    plan = _plan(sql)
    rewritten = plan.rewritten_sql({plan.literal_targets[0]: b"\xde\xad"})
    assert rewritten == (
        "INSERT INTO customers (id, name, ssn) VALUES (1, 'Zoë', E'\\\\xdead'::bytea) -- trailing 'ssn' comment"
    )


def test_unqualified_names_resolve_whatever_the_search_path() -> None:
    # billing.cards is the only relation named cards: an unqualified name means it under any search_path
    # (SET search_path, startup options, ALTER ROLE ... SET, set_config all leave this reading right).
    plan = _plan("INSERT INTO cards (pan) VALUES ('4111')")
    assert _targets(plan) == [("'4111'", "4111", "pan", None)]


def test_quoted_names_are_case_sensitive() -> None:
    assert not analyze("INSERT INTO \"CUSTOMERS\" (ssn) VALUES ('x')", CATALOG).touches_protected
    assert not analyze("INSERT INTO \"mixed case\" (secret) VALUES ('x')", CATALOG).touches_protected


PARAM_CASES: list[tuple[str, dict[int, str], list[tuple[str, str]]]] = [
    ("INSERT INTO customers (id, ssn, email) VALUES ($1, $2, $3)", {2: "ssn", 3: "email"}, []),
    ("INSERT INTO customers (ssn) VALUES ($1), ($2)", {1: "ssn", 2: "ssn"}, []),
    ("INSERT INTO customers (ssn) VALUES ($1) ON CONFLICT (id) DO UPDATE SET ssn = $1", {1: "ssn"}, []),
    ("INSERT INTO customers (id, ssn) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET ssn = EXCLUDED.ssn", {2: "ssn"}, []),
    ("INSERT INTO customers (ssn) VALUES ($1::text)", {1: "ssn"}, [("$1::text", "$1")]),
    ("INSERT INTO customers (dob) VALUES (CAST($1 AS date))", {1: "dob"}, [("CAST($1 AS date)", "$1")]),
    ("INSERT INTO customers (id, ssn) SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM customers WHERE id = $1)", {2: "ssn"}, []),
    ("UPDATE customers SET ssn = $1, email = NULL::text WHERE id = $2", {1: "ssn"}, [("NULL::text", "NULL")]),
    ("UPDATE customers SET (ssn, score) = ($1, $2::int) WHERE id = $3", {1: "ssn", 2: "score"}, [("$2::int", "$2")]),
    ("UPDATE customers SET ssn = DEFAULT, email = NULL, dob = dob WHERE id = $1", {}, []),
    ("DELETE FROM customers WHERE id = $1 RETURNING ssn", {}, []),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "params", "edits"), PARAM_CASES)
def test_param_targets_and_edits(sql: str, params: dict[int, str], edits: list[tuple[str, str]]) -> None:
    plan = _plan(sql)
    (statement,) = plan.statements
    assert {n: c.name for n, c in statement.param_targets.items()} == params
    assert {n: c.name for n, c in plan.param_targets.items()} == params
    assert [(sql[e.start : e.end], e.replacement) for e in statement.edits] == edits
    assert plan.needs_rewrite == bool(edits)
    rewritten = plan.rewritten_sql({})
    pglast.parse_sql(rewritten)
    for text, replacement in edits:
        assert text not in rewritten
        assert replacement in rewritten


def test_kinds_and_returning() -> None:
    plan = _plan("INSERT INTO customers (ssn) VALUES ($1) RETURNING *")
    (st,) = plan.statements
    assert st.kind is StatementKind.INSERT
    assert st.result_columns == (None, None, C["ssn"], C["email"], C["dob"], C["score"], C["active"], None)
    st = _plan("UPDATE customers AS c SET ssn = $1 RETURNING c.id, ssn AS s, c.email").statements[0]
    assert st.kind is StatementKind.UPDATE
    assert st.result_columns == (None, C["ssn"], C["email"])
    st = _plan("DELETE FROM customers c USING billing.cards k WHERE k.id = c.id RETURNING *").statements[0]
    assert st.kind is StatementKind.DELETE
    assert st.result_columns == (
        None,
        None,
        C["ssn"],
        C["email"],
        C["dob"],
        C["score"],
        C["active"],
        None,
        None,
        CARDS.columns["pan"],
    )
    st = _plan("INSERT INTO customers (ssn) VALUES ($1)").statements[0]
    assert st.result_columns is None
    assert not st.result_via_row_description


def test_missing_ciphertext_is_an_error_not_plaintext() -> None:
    plan = _plan("INSERT INTO customers (ssn) VALUES ('secret')")
    with pytest.raises(KeyError):
        plan.rewritten_sql({})


def test_literal_target_repr_hides_the_plaintext() -> None:
    plan = _plan("INSERT INTO customers (ssn) VALUES ('123-45-6789')")
    assert "123-45-6789" not in repr(plan)
    assert "123-45-6789" not in repr(plan.literal_targets)
    assert "123-45-6789" not in repr(plan.statements)
