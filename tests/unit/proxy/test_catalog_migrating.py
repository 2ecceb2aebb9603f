"""The catalog join while a column is being migrated (``pgveil encrypt`` / ``decrypt``): the column is
served as the database stores it until the swap, its shadow column is governed as the column, and without
an unfinished migration the mismatch stays a problem (pgveil not ready)."""

from __future__ import annotations

from proxy.catalog_loader import ColumnInfo, ConstraintInfo, TableInfo, resolve_catalog
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.schema import constraint_name

KEY = ("public", "people")


def _configured(encrypted: bool) -> Catalog:
    cols = {"email": ProtectedColumn("public", "people", "email", "text", encrypted=encrypted)}
    return Catalog({KEY: ProtectedTable("public", "people", cols)})


def _info(email_bytea: bool, *, check: bool, shadow: str | None = None) -> dict[tuple[str, str], TableInfo]:
    columns = [
        ColumnInfo("id", 1, "integer", False, False, False, False),
        ColumnInfo("email", 2, "bytea" if email_bytea else "text", email_bytea, False, False, False),
    ]
    if shadow is not None:
        columns.append(ColumnInfo("pgveil_mig_email", 4, shadow, shadow == "bytea", False, False, False))
    constraints = (ConstraintInfo(constraint_name("email"), "c", True),) if check else ()
    return {KEY: TableInfo("public", "people", 4242, "r", tuple(columns), constraints)}


def test_encrypting_column_is_served_plain_and_its_shadow_encrypted() -> None:
    catalog, problems = resolve_catalog(
        _configured(True), _info(False, check=False, shadow="bytea"), migrating={"public.people.email": "encrypt"}
    )
    assert problems == []
    cols = catalog.tables[KEY].columns
    assert (cols["email"].encrypted, cols["email"].attnum) == (False, 2)
    shadow = cols["pgveil_mig_email"]
    assert (shadow.encrypted, shadow.attnum, shadow.column_id) == (True, 4, "public.people.email")


def test_after_the_swap_the_configuration_applies_even_with_the_job_still_open() -> None:
    catalog, problems = resolve_catalog(
        _configured(True), _info(True, check=True), migrating={"public.people.email": "encrypt"}
    )
    assert problems == []
    assert catalog.tables[KEY].columns["email"].encrypted is True
    assert set(catalog.tables[KEY].columns) == {"email"}


def test_without_a_migration_the_mismatch_is_a_problem() -> None:
    _catalog, problems = resolve_catalog(_configured(True), _info(False, check=False, shadow="bytea"))
    assert problems == ["column public.people.email is text, expected bytea; run `pgveil schema apply`"]
    # a migration in the other direction does not excuse it either
    _catalog, problems = resolve_catalog(
        _configured(True), _info(False, check=False), migrating={"public.people.email": "decrypt"}
    )
    assert len(problems) == 1


def test_decrypting_column_is_served_encrypted_and_its_shadow_plain() -> None:
    catalog, problems = resolve_catalog(
        _configured(False), _info(True, check=True, shadow="text"), migrating={"public.people.email": "decrypt"}
    )
    assert problems == []
    cols = catalog.tables[KEY].columns
    assert cols["email"].encrypted is True
    assert cols["pgveil_mig_email"].encrypted is False
