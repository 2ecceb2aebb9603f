"""The SQL a column migration runs, built from its target (pure): quoting, the compare-and-set, the
trigger's condition, names within PostgreSQL's identifier limit, and the target's JSON form."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keymgmt.column_migration import (
    Direction,
    MigrationTarget,
    select_batch_sql,
    setup_sql,
    short_name,
    trigger_function_sql,
    update_batch_sql,
)
from keymgmt.rotation import KeyColumn


def _target(direction: Direction = Direction.ENCRYPT, column: str = "email") -> MigrationTarget:
    return MigrationTarget(
        direction, "public", "cust", column, "text", (KeyColumn("id", "integer"),), "pgveil_envelope_email", "{col} ok"
    )


def test_encrypt_batch_reads_text_and_writes_with_compare_and_set() -> None:
    t = _target()
    select = select_batch_sql(t, after=True)
    assert '"email"::text' in select
    assert '"pgveil_mig_email" IS NULL' in select
    assert '(t."id") > ($1::text::integer)' in select
    update = update_batch_sql(t)
    assert 't."pgveil_mig_email" IS NULL' in update
    assert 't."email"::text COLLATE "C" = u.pgveil_old' in update
    assert "$2::text[], $3::bytea[]" in update


def test_decrypt_batch_reads_envelopes_and_casts_to_the_declared_type() -> None:
    t = _target(Direction.DECRYPT)
    assert '"email"::text' not in select_batch_sql(t, after=False)
    update = update_batch_sql(t)
    assert "u.pgveil_new::text" in update
    assert 't."email" = u.pgveil_old' in update


def test_trigger_clears_the_shadow_on_insert_and_on_a_changed_source() -> None:
    sql = trigger_function_sql(_target())
    assert "IF TG_OP = 'INSERT' THEN" in sql
    assert 'NEW."email"::text IS DISTINCT FROM OLD."email"::text COLLATE "C"' in sql
    assert sql.count('NEW."pgveil_mig_email" := NULL;') == 2


def test_encrypt_setup_adds_a_not_valid_envelope_check_on_the_shadow() -> None:
    steps = setup_sql(_target())
    assert any('CHECK ("pgveil_mig_email" ok) NOT VALID' in s for s in steps)
    assert not any("CHECK" in s for s in setup_sql(_target(Direction.DECRYPT)))


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=80))
def test_names_fit_postgresql_identifiers_and_differ_per_column(column: str) -> None:
    name = short_name("pgveil_mig_", column)
    assert len(name.encode()) <= 63
    assert short_name("pgveil_mig_", column + "x") != name or len(("pgveil_mig_" + column).encode()) > 63


def test_quotes_in_names_are_doubled() -> None:
    t = _target(column='we"ird')
    assert '"we""ird"' in select_batch_sql(t, after=False)


def test_target_round_trips_through_json() -> None:
    t = _target()
    assert MigrationTarget.from_json(t.to_json()) == t


def test_every_object_name_fits_for_the_longest_column_name() -> None:
    t = _target(column="c" * 63)
    for name in (t.shadow, t.trigger, t.temp_check):
        assert len(name.encode()) <= 63
    assert len({t.shadow, t.trigger, t.temp_check}) == 3
