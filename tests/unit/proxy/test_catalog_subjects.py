"""The catalog join for per-subject keys: the subject column must exist in the database with a subject
type (its class is recorded), and every table of one kind must use the same class."""

from __future__ import annotations

import pytest

from proxy.catalog_loader import ColumnInfo, TableInfo, resolve_catalog
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable, SubjectColumn


def _table(name: str, kind: str, column: str) -> ProtectedTable:
    cols = {"email": ProtectedColumn("public", name, "email", "text", subject_kind=kind)}
    return ProtectedTable("public", name, cols, subject=SubjectColumn(kind, column))


def _info(name: str, oid: int, subject: tuple[str, str] | None) -> TableInfo:
    columns = [ColumnInfo("email", 2, "bytea", True, False, False, False)]
    if subject is not None:
        columns.insert(0, ColumnInfo(subject[0], 1, subject[1], False, True, False, False))
    return TableInfo("public", name, oid, "r", tuple(columns), ())


@pytest.mark.parametrize(
    ("type_name", "type_class"),
    [("integer", "integer"), ("bigint", "integer"), ("smallint", "integer"), ("uuid", "uuid"), ("text", "text"),
     ("character varying(40)", "text"), ("character varying", "text")],
)  # fmt: skip
def test_subject_column_type_class_is_read_from_the_database(type_name: str, type_class: str) -> None:
    configured = Catalog({("public", "customers"): _table("customers", "customer", "id")})
    catalog, problems = resolve_catalog(
        configured, {("public", "customers"): _info("customers", 10, ("id", type_name))}
    )
    assert problems == []
    subject = catalog.tables[("public", "customers")].subject
    assert subject == SubjectColumn("customer", "id", type_class)


@pytest.mark.parametrize("type_name", ["bytea", "numeric", "date", "jsonb", "character(5)"])
def test_subject_column_of_another_type_is_a_problem(type_name: str) -> None:
    configured = Catalog({("public", "customers"): _table("customers", "customer", "id")})
    _c, problems = resolve_catalog(configured, {("public", "customers"): _info("customers", 10, ("id", type_name))})
    assert len(problems) == 1
    assert problems[0].startswith("tables.public.customers.subject.column: column id of public.customers is")


def test_missing_subject_column_is_a_problem() -> None:
    configured = Catalog({("public", "customers"): _table("customers", "customer", "id")})
    _c, problems = resolve_catalog(configured, {("public", "customers"): _info("customers", 10, None)})
    assert problems == ["tables.public.customers.subject.column: column id of public.customers does not exist"]


def test_one_kind_must_use_one_type_class() -> None:
    configured = Catalog(
        {
            ("public", "customers"): _table("customers", "customer", "id"),
            ("public", "orders"): _table("orders", "customer", "customer_id"),
        }
    )
    found = {
        ("public", "customers"): _info("customers", 10, ("id", "integer")),
        ("public", "orders"): _info("orders", 11, ("customer_id", "uuid")),
    }
    _c, problems = resolve_catalog(configured, found)
    assert len(problems) == 1
    assert "subject kind customer is integer in public.customers but uuid here" in problems[0]
    found[("public", "orders")] = _info("orders", 11, ("customer_id", "bigint"))
    assert resolve_catalog(configured, found)[1] == []
