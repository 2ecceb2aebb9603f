"""The pure part of generated subject ids: which INSERT rows leave the subject to the database, and the
INSERT rewritten with the generated ids supplied."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pglast import ast, parse_sql

from proxy.encrypt.subjectgen import (
    ColumnDefault,
    GeneratedPlan,
    default_values_query,
    highest_parameter,
    plan_generated_subjects,
    supply_subject_parameters,
    supply_subjects,
)
from proxy.errors import FeatureNotSupported

T = "public.customers"
SERIAL = ColumnDefault("nextval('customers_id_seq'::regclass)")


def _rows(sql: str) -> tuple[list[str], list[list[object]]]:
    stmt = parse_sql(sql)[0].stmt
    assert isinstance(stmt, ast.InsertStmt)
    cols = [c.name for c in stmt.cols or ()]
    select = stmt.selectStmt
    assert isinstance(select, ast.SelectStmt)
    assert select.valuesLists is not None
    rows = [
        [item.val.sval if isinstance(item, ast.A_Const) and isinstance(item.val, ast.String) else item for item in row]
        for row in select.valuesLists
    ]
    return cols, rows


def test_nothing_to_generate_when_every_row_gives_the_subject() -> None:
    assert plan_generated_subjects("INSERT INTO customers (id, email) VALUES (1, $1)", T, "id", SERIAL) is None
    assert plan_generated_subjects("INSERT INTO customers (id) SELECT 1", T, "id", SERIAL) is None


@given(st.integers(min_value=1, max_value=30))
def test_missing_column_is_added_with_one_id_per_row(n: int) -> None:
    sql = "INSERT INTO customers (email) VALUES " + ", ".join(f"(${i + 1})" for i in range(n)) + " RETURNING id"
    plan = plan_generated_subjects(sql, T, "id", SERIAL)
    assert plan == GeneratedPlan(n, tuple(range(n)))
    ids = [str(1000 + i) for i in range(n)]
    out = supply_subjects(sql, T, "id", plan, ids, "")
    cols, rows = _rows(out)
    assert cols == ["email", "id"]
    assert [row[1] for row in rows] == ids
    assert "RETURNING id" in out
    assert "OVERRIDING" not in out


def test_default_keyword_rows_only_are_generated() -> None:
    sql = (
        "INSERT INTO customers (id, email) VALUES (DEFAULT, 'a'), (7, 'b'), (DEFAULT, 'c') ON CONFLICT (id) DO NOTHING"
    )
    plan = plan_generated_subjects(sql, T, "id", SERIAL)
    assert plan == GeneratedPlan(2, (0, 2))
    out = supply_subjects(sql, T, "id", plan, ["11", "12"], "")
    _, rows = _rows(out)
    assert [row[0] for row in rows][0::2] == ["11", "12"]
    assert "ON CONFLICT (id) DO NOTHING" in out


def test_identity_always_gets_overriding_system_value() -> None:
    sql = "INSERT INTO customers (email) VALUES ('x')"
    plan = plan_generated_subjects(sql, T, "id", ColumnDefault("nextval('s'::regclass)", identity="a"))
    assert plan is not None
    assert "OVERRIDING SYSTEM VALUE" in supply_subjects(sql, T, "id", plan, ["1"], "a")


def test_default_values() -> None:
    plan = plan_generated_subjects("INSERT INTO customers DEFAULT VALUES", T, "id", SERIAL)
    assert plan == GeneratedPlan(1, (0,))
    cols, rows = _rows(supply_subjects("INSERT INTO customers DEFAULT VALUES", T, "id", plan, ["9"], ""))
    assert cols == ["id"]
    assert rows == [["9"]]


@pytest.mark.parametrize(
    ("sql", "default", "why"),
    [
        ("INSERT INTO customers (email) SELECT e FROM src", SERIAL, "INSERT … SELECT"),
        ("INSERT INTO customers (email) VALUES ('x')", ColumnDefault(None), "no default"),
        ("INSERT INTO customers (email) VALUES ('x')", ColumnDefault("x + 1", generated="s"), "generated column"),
        ("INSERT INTO customers (email) VALUES ('x')", ColumnDefault("(SELECT max(id) FROM t)"), "subquery"),
        ("INSERT INTO customers (email) VALUES ('x'); SELECT 1", SERIAL, "single INSERT"),
        ("INSERT INTO customers (email) VALUES ('x')", ColumnDefault("1", before_insert_trigger=True), "trigger"),
    ],
)
def test_refusals_name_table_and_column(sql: str, default: ColumnDefault, why: str) -> None:
    with pytest.raises(FeatureNotSupported) as info:
        plan_generated_subjects(sql, T, "id", default)
    assert info.value.sqlstate == "0A000"
    message = str(info.value)
    assert why in message
    assert "public.customers" in message
    assert "column id" in message


def test_id_count_mismatch_is_refused() -> None:
    sql = "INSERT INTO customers (email) VALUES ('x'), ('y')"
    plan = plan_generated_subjects(sql, T, "id", SERIAL)
    assert plan is not None
    with pytest.raises(FeatureNotSupported):
        supply_subjects(sql, T, "id", plan, ["1"], "")


def test_default_values_query_evaluates_once_per_row() -> None:
    q = default_values_query("gen_random_uuid()", 4)
    assert "generate_series(1, 4)" in q
    assert parse_sql(q)
    with pytest.raises(ValueError, match="positive"):
        default_values_query("1", 0)


def test_highest_parameter() -> None:
    assert highest_parameter("INSERT INTO customers (email) VALUES ('x')") == 0
    assert highest_parameter("INSERT INTO customers (email, n) VALUES ($2, $7) RETURNING $1::int") == 7
    assert highest_parameter("INSERT INTO customers (email) SELECT x FROM f($3) WHERE $11 > 0") == 11


@given(st.integers(min_value=1, max_value=6), st.integers(min_value=0, max_value=5))
def test_parameters_of_its_own_follow_the_clients_in_row_order(rows: int, given_params: int) -> None:
    values = ", ".join(f"(${i % given_params + 1})" if given_params else "('v')" for i in range(rows))
    sql = f"INSERT INTO customers (email) VALUES {values} RETURNING id"
    plan = plan_generated_subjects(sql, T, "id", SERIAL)
    assert plan == GeneratedPlan(rows, tuple(range(rows)))
    out = supply_subject_parameters(sql, T, "id", plan, given_params + 1, "")
    cols, got = _rows(out)
    assert cols == ["email", "id"]
    ids = [row[1] for row in got]
    assert [p.number for p in ids if isinstance(p, ast.ParamRef)] == [given_params + 1 + i for i in range(rows)]
    assert "RETURNING id" in out
    assert highest_parameter(out) == given_params + rows


def test_parameters_of_its_own_with_always_identity_override_the_system_value() -> None:
    sql = "INSERT INTO customers (id, email) VALUES (DEFAULT, $1), (5, $2)"
    plan = plan_generated_subjects(sql, T, "id", ColumnDefault("nextval('s'::regclass)", identity="a"))
    assert plan is not None
    out = supply_subject_parameters(sql, T, "id", plan, 3, "a")
    assert "OVERRIDING SYSTEM VALUE" in out
    assert "(5, $2)" in out
    assert "($3, $1)" in out
