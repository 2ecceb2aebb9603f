"""QueryPlan splicing: replacements keep the rest of the text byte for byte and stay separate tokens."""

from __future__ import annotations

import json

import pglast
import pytest

from proxy.errors import FeatureNotSupported
from proxy.rewrite.catalog import ProtectedColumn
from proxy.rewrite.plan import (
    LiteralTarget,
    QueryPlan,
    Refusal,
    StatementKind,
    StatementPlan,
    TextEdit,
    bytea_literal,
)

SSN = ProtectedColumn("public", "customers", "ssn", "text")


def _plan(sql: str, targets: list[tuple[int, int]], edits: tuple[TextEdit, ...] = ()) -> QueryPlan:
    literal_targets = tuple(LiteralTarget(s, e, sql[s:e], SSN) for s, e in targets)
    statement = StatementPlan(StatementKind.UPDATE, True, literal_targets=literal_targets, edits=edits)
    return QueryPlan(sql, (statement,), True)


def test_bytea_literal_is_independent_of_standard_conforming_strings() -> None:
    assert bytea_literal(b"\x00\xff") == "E'\\\\x00ff'::bytea"
    tree = json.loads(pglast.parser.parse_sql_json("SELECT " + bytea_literal(b"\x00\xff")))
    cast = tree["stmts"][0]["stmt"]["SelectStmt"]["targetList"][0]["ResTarget"]["val"]["TypeCast"]
    assert cast["arg"]["A_Const"]["sval"]["sval"] == "\\x00ff"
    assert cast["typeName"]["names"][-1]["String"]["sval"] == "bytea"


def test_replacement_is_kept_apart_from_adjacent_words() -> None:
    sql = "UPDATE customers SET ssn='x'WHERE id=1"
    start = sql.index("'x'")
    plan = _plan(sql, [(start, start + 3)])
    (target,) = plan.literal_targets
    rewritten = plan.rewritten_sql({target: b"\x01"})
    assert rewritten == "UPDATE customers SET ssn=E'\\\\x01'::bytea WHERE id=1"
    pglast.parse_sql(rewritten)


def test_edits_and_targets_apply_in_text_order() -> None:
    sql = "UPDATE customers SET ssn = $1::text, email = 'a', note = 'b' WHERE id = 1"
    cast = sql.index("$1::text")
    email = sql.index("'a'")
    plan = _plan(sql, [(email, email + 3)], (TextEdit(cast, cast + len("$1::text"), "$1"),))
    (target,) = plan.literal_targets
    assert plan.needs_rewrite
    assert plan.rewritten_sql({target: b"\xab"}) == (
        "UPDATE customers SET ssn = $1, email = E'\\\\xab'::bytea, note = 'b' WHERE id = 1"
    )


def test_overlapping_spans_are_a_bug() -> None:
    sql = "SELECT 'abc'"
    plan = _plan(sql, [(7, 12), (8, 10)])
    with pytest.raises(ValueError, match="overlapping"):
        plan.rewritten_sql(dict.fromkeys(plan.literal_targets, b"\x00"))


def test_plan_without_changes_returns_the_text_itself() -> None:
    sql = "SELECT 1"
    assert QueryPlan(sql).rewritten_sql({}) is sql
    assert not QueryPlan(sql).needs_rewrite


def test_refusal_is_data_until_asked_for() -> None:
    refusal = Refusal("pgveil: no", hint="h")
    plan = QueryPlan("x", (StatementPlan(StatementKind.OTHER, True, refusal),), True)
    error = plan.refusal
    assert isinstance(error, FeatureNotSupported)
    assert (error.message, error.hint, error.sqlstate) == ("pgveil: no", "h", "0A000")
    assert plan.statements[0].refusal is not error
