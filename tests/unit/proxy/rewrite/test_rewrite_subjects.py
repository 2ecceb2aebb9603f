"""The analysis of writes into tables with per-subject keys: each sealed value carries where its row's
subject comes from (a literal or a parameter of the same row), and every write whose subject cannot be
told is refused, naming table, subject column and construct."""

from __future__ import annotations

import pytest

from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable, SubjectColumn
from proxy.rewrite.plan import StatementPlan


def _table(name: str, subject: str, columns: tuple[str, ...]) -> ProtectedTable:
    cols = {
        "email": ProtectedColumn("public", name, "email", "text", subject_kind="customer"),
        "note": ProtectedColumn("public", name, "note", "text", encrypted=False),
    }
    return ProtectedTable("public", name, cols, columns, subject=SubjectColumn("customer", subject, "integer"))


CATALOG = Catalog(
    {
        ("public", "customers"): _table("customers", "id", ("id", "email", "note")),
        ("public", "orders"): _table("orders", "customer_id", ("id", "customer_id", "email", "note")),
    }
)


def _one(sql: str) -> StatementPlan:
    (st,) = analyze(sql, CATALOG).statements
    return st


def _refused(sql: str) -> str:
    st = _one(sql)
    e = st.refusal
    assert e is not None, sql
    assert e.sqlstate == "0A000"
    return e.message


def test_literal_values_carry_their_rows_subject() -> None:
    st = _one("INSERT INTO customers (id, email) VALUES (1, 'a@x'), (2, 'b@x'), ('3', 'c@x')")
    assert st.refusal is None
    assert [(t.plaintext, t.subject.literal if t.subject else None) for t in st.literal_targets] == [
        ("a@x", "1"),
        ("b@x", "2"),
        ("c@x", "3"),
    ]
    assert {t.subject.subject.kind for t in st.literal_targets if t.subject} == {"customer"}


def test_parameters_carry_the_parameter_or_literal_of_their_row() -> None:
    st = _one("INSERT INTO orders (customer_id, email) VALUES ($1, $2), (7, $3)")
    assert st.refusal is None
    assert set(st.param_targets) == {2, 3}
    assert st.param_subjects[2].param == 1
    assert st.param_subjects[3].literal == "7"


def test_a_literal_subject_may_be_cast_and_the_subject_may_come_last() -> None:
    st = _one("INSERT INTO customers (email, id) VALUES ($1, 5::int)")
    assert st.param_subjects[1].literal == "5"


def test_insert_without_column_list_finds_the_subject_by_position() -> None:
    st = _one("INSERT INTO customers VALUES (9, 'x@y', 'n')")
    assert st.refusal is None
    assert st.literal_targets[0].subject is not None
    assert st.literal_targets[0].subject.literal == "9"


def test_update_with_the_subject_pinned_in_where() -> None:
    st = _one("UPDATE customers SET email = $1 WHERE id = $2 AND note IS NULL")
    assert st.refusal is None
    assert st.param_subjects[1].param == 2
    st = _one("UPDATE customers c SET email = 'z' WHERE 4 = c.id")
    assert st.literal_targets[0].subject is not None
    assert st.literal_targets[0].subject.literal == "4"


def test_insert_on_conflict_on_the_subject_column() -> None:
    st = _one("INSERT INTO customers (id, email) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email")
    assert st.refusal is None
    st = _one("INSERT INTO customers (id, email) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET email = 'b'")
    assert st.refusal is None
    assert [t.subject.literal for t in st.literal_targets if t.subject] == ["1", "1"]


def test_writes_that_do_not_touch_encrypted_columns_need_no_subject() -> None:
    assert _one("INSERT INTO customers (note) VALUES ('x')").refusal is None
    assert _one("UPDATE customers SET note = 'x'").refusal is None
    assert _one("INSERT INTO customers (id, email) VALUES (1, NULL)").refusal is None


@pytest.mark.parametrize(
    ("sql", "construct"),
    [
        ("INSERT INTO customers (email) VALUES ('a')", "an INSERT whose column list does not name id"),
        ("INSERT INTO customers (id, email) VALUES (DEFAULT, 'a')", "DEFAULT"),
        ("INSERT INTO customers (id, email) VALUES (NULL, 'a')", "a NULL subject"),
        ("INSERT INTO customers (id, email) VALUES (1 + 1, 'a')", "a subject given by"),
        ("INSERT INTO customers (id, email) VALUES ((SELECT 1), 'a')", "a subject given by"),
        ("INSERT INTO customers (id, email) SELECT 1, 'a'", "INSERT ... SELECT"),
        ("UPDATE customers SET email = 'a'", "an UPDATE whose WHERE clause does not pin id = value"),
        ("UPDATE customers SET email = 'a' WHERE id = 1 OR id = 2", "does not pin id"),
        ("UPDATE customers SET email = 'a' WHERE id > 1", "does not pin id"),
        ("UPDATE orders SET email = $1 WHERE id = $2", "does not pin customer_id"),
        (
            "INSERT INTO customers (id, email) VALUES (1, 'a'), (2, 'b') ON CONFLICT (id) DO UPDATE SET email = 'c'",
            "a multi-row INSERT ... ON CONFLICT DO UPDATE",
        ),
        (
            "INSERT INTO orders (id, customer_id, email) VALUES (1, 2, 'a') ON CONFLICT (id) "
            "DO UPDATE SET email = EXCLUDED.email",
            "conflict target does not list customer_id",
        ),
        ("COPY customers (email) FROM STDIN", "a COPY whose column list does not name it"),
    ],
)
def test_a_subject_that_cannot_be_told_is_refused(sql: str, construct: str) -> None:
    message = _refused(sql)
    assert message.startswith("pgveil: cannot tell the data subject of the row written into encrypted column")
    assert "public.customers.email" in message or "public.orders.email" in message
    assert "subject column id" in message or "subject column customer_id" in message
    assert construct in message


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE customers SET id = 2 WHERE id = 1",
        "UPDATE customers SET id = $1, email = $2 WHERE id = $3",
        "INSERT INTO customers (id, email) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET id = 2",
    ],
)
def test_changing_the_subject_column_is_refused(sql: str) -> None:
    message = _refused(sql)
    assert "cannot change subject column id of table public.customers" in message


def test_a_parameter_for_two_subjects_is_refused() -> None:
    message = _refused("INSERT INTO customers (id, email) VALUES (1, $1), (2, $1)")
    assert "parameter $1" in message
    assert "two rows of different data subjects" in message


def test_copy_from_records_the_subject_position() -> None:
    st = _one("COPY orders (email, customer_id) FROM STDIN")
    assert st.refusal is None
    assert st.copy is not None
    assert st.copy.subject_index == 1
    st = _one("COPY orders TO STDOUT")
    assert st.copy is not None
    assert st.copy.subject_index == -1
