"""The keystore's versioned migration files: naming, order, and what the runner refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from keymgmt.errors import KeystoreError
from keymgmt.keystore import MIGRATIONS, load_migrations


def test_the_shipped_migrations_keep_the_names_existing_keystores_recorded() -> None:
    # Keystores migrated before the SQL moved into files recorded these names; renaming one would make
    # init_keystore run it again on them.
    assert [m.name for m in MIGRATIONS][:3] == ["0001_keys", "0002_ledger", "0003_rotation_jobs"]
    assert [m.name for m in MIGRATIONS] == sorted(m.name for m in MIGRATIONS)
    assert all(m.sql.strip() for m in MIGRATIONS)


def test_files_apply_in_name_order_and_other_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "0002_b.sql").write_text("SELECT 2;\n")
    (tmp_path / "0001_a.sql").write_text("SELECT 1;\n")
    (tmp_path / "0002_a.sql").write_text("SELECT 3;\n")
    (tmp_path / "README").write_text("not a migration\n")
    assert [(m.name, m.sql) for m in load_migrations(tmp_path)] == [
        ("0001_a", "SELECT 1;\n"),
        ("0002_a", "SELECT 3;\n"),
        ("0002_b", "SELECT 2;\n"),
    ]


@pytest.mark.parametrize("name", ["1_short.sql", "0001-dash.sql", "0001_Upper.sql", "abcd_x.sql"])
def test_a_misnamed_migration_file_is_an_error_not_skipped(tmp_path: Path, name: str) -> None:
    (tmp_path / "0001_ok.sql").write_text("SELECT 1;\n")
    (tmp_path / name).write_text("SELECT 2;\n")
    with pytest.raises(KeystoreError, match=r"NNNN_name\.sql"):
        load_migrations(tmp_path)
