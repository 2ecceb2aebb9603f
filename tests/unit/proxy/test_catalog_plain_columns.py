"""The catalog join for plain governed columns (issue 8): attribute numbers are filled in whatever the
column's type, and a column configured plain that the database holds encrypted is a problem."""

from __future__ import annotations

from proxy.catalog_loader import ColumnInfo, ConstraintInfo, TableInfo, resolve_catalog
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.schema import constraint_name


def _configured(**columns: bool) -> Catalog:
    cols = {n: ProtectedColumn("public", "people", n, "text", encrypted=e) for n, e in columns.items()}
    return Catalog({("public", "people"): ProtectedTable("public", "people", cols)})


def _info(types: dict[str, bool], checks: tuple[str, ...] = ()) -> dict[tuple[str, str], TableInfo]:
    columns = tuple(
        ColumnInfo(n, i, "bytea" if b else "text", b, False, False, False) for i, (n, b) in enumerate(types.items(), 1)
    )
    constraints = tuple(ConstraintInfo(constraint_name(c), "c", True) for c in checks)
    return {("public", "people"): TableInfo("public", "people", 4242, "r", columns, constraints)}


def test_plain_column_gets_its_attnum_and_needs_no_bytea() -> None:
    catalog, problems = resolve_catalog(
        _configured(phone=False, ssn=True), _info({"id": False, "phone": False, "ssn": True}, ("ssn",))
    )
    assert problems == []
    phone = catalog.tables[("public", "people")].columns["phone"]
    assert (phone.attnum, phone.table_oid, phone.encrypted) == (2, 4242, False)
    assert catalog.column_by_attr(4242, 2) == phone
    assert catalog.column_by_attr(4242, 3) == catalog.tables[("public", "people")].columns["ssn"]


def test_plain_bytea_without_the_envelope_check_is_a_plain_bytea_column() -> None:
    _catalog, problems = resolve_catalog(_configured(blob=False), _info({"id": False, "blob": True}))
    assert problems == []


def test_column_configured_plain_but_encrypted_in_the_database_is_a_problem() -> None:
    _catalog, problems = resolve_catalog(_configured(ssn=False), _info({"id": False, "ssn": True}, ("ssn",)))
    assert len(problems) == 1
    assert "public.people.ssn is configured plain but encrypted in the database" in problems[0]
    assert problems[0].endswith("set encrypt: true")


def test_encrypted_column_must_still_be_bytea() -> None:
    _catalog, problems = resolve_catalog(_configured(ssn=True), _info({"id": False, "ssn": False}))
    assert problems == ["column public.people.ssn is text, expected bytea; run `pgveil schema apply`"]
