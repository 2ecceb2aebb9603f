"""Functions that run SQL given as a string, or dump a table/cursor/schema/database named by a string
(query_to_xml, table_to_xml, dblink, ...): the server reads governed columns the analysis cannot see, so
each call is an EXPRESSION reference to every plain governed column of the tables its strings name (or of
every governed table). Encrypted columns are left out: such a function can only return their envelopes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.decide import decide
from proxy.policy.model import Grant, ReferenceKind, Visibility
from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.rewrite.constructs import SQL_TEXT_FUNCTIONS
from proxy.rewrite.walker import STATISTICS_RELATIONS


def _table(schema: str, name: str, governed: dict[str, bool]) -> ProtectedTable:
    cols = {c: ProtectedColumn(schema, name, c, "text", encrypted=e) for c, e in governed.items()}
    return ProtectedTable(schema, name, cols, ("id", *governed))


PLAIN = _table("public", "vis_plain", {"pin": False, "note": False})
MIXED = _table("app", "customers", {"phone": False, "ssn": True})
SEALED = _table("public", "vault", {"secret": True})
CATALOG = Catalog({(t.schema, t.name): t for t in (PLAIN, MIXED, SEALED)})
PIN, NOTE, PHONE = PLAIN.columns["pin"], PLAIN.columns["note"], MIXED.columns["phone"]


@dataclass(frozen=True)
class View:
    visibility: Visibility
    login_role: str = "r"
    epoch: int = 1
    label: str = "r"

    def grant(self, column: ProtectedColumn) -> Grant:
        return Grant(self.visibility)


def _refs(sql: str) -> set[tuple[str, ReferenceKind, str]]:
    plan = analyze(sql, CATALOG)
    assert plan.refusal is None, plan.refusal.message
    return {(r.column.column_id, r.kind, r.construct) for r in plan.references}


def _expr(construct: str, *columns: ProtectedColumn) -> set[tuple[str, ReferenceKind, str]]:
    return {(c.column_id, ReferenceKind.EXPRESSION, construct) for c in columns}


CASES = [
    ("SELECT query_to_xml('SELECT pin FROM vis_plain WHERE id = 1', true, false, '')",
     _expr("query_to_xml()", PIN, NOTE)),
    ("SELECT pg_catalog.query_to_xml('select 1 from VIS_PLAIN', true, false, '')", _expr("query_to_xml()", PIN, NOTE)),
    ("SELECT table_to_xml('vis_plain', true, false, '')", _expr("table_to_xml()", PIN, NOTE)),
    ("SELECT table_to_xml('public.vis_plain'::regclass, true, false, '')", _expr("table_to_xml()", PIN, NOTE)),
    ("SELECT table_to_xmlschema('vis_plain', true, false, '')", _expr("table_to_xmlschema()", PIN, NOTE)),
    ("SELECT * FROM query_to_xml_and_xmlschema('TABLE vis_plain', true, false, '')",
     _expr("query_to_xml_and_xmlschema()", PIN, NOTE)),
    # only the plain columns of a table with encrypted ones; a table with encrypted columns only: nothing
    ("SELECT table_to_xml('app.customers', true, false, '')", _expr("table_to_xml()", PHONE)),
    ("SELECT query_to_xml('SELECT secret FROM vault', true, false, '')", set()),
    # no table name: every governed table
    ("SELECT schema_to_xml('public', true, false, '')", _expr("schema_to_xml()", PIN, NOTE, PHONE)),
    ("SELECT database_to_xml(true, false, '')", _expr("database_to_xml()", PIN, NOTE, PHONE)),
    ("SELECT cursor_to_xml('c', 10, true, false, '')", _expr("cursor_to_xml()", PIN, NOTE, PHONE)),
    # a non-constant argument may spell any SQL: every governed table
    ("SELECT query_to_xml($1, true, false, '')", _expr("query_to_xml()", PIN, NOTE, PHONE)),
    ("SELECT query_to_xml('SELECT pin FROM vis_' || 'x', true, false, '') FROM vis_plain WHERE false",
     _expr("query_to_xml()", PIN, NOTE, PHONE)),
    ("SELECT * FROM dblink('dbname=x', 'SELECT pin FROM vis_plain') AS t(pin text)", _expr("dblink()", PIN, NOTE)),
    ("SELECT dblink_exec('dbname=x', 'UPDATE app.customers SET phone = 1')", _expr("dblink_exec()", PHONE)),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "expected"), CASES)
def test_sql_text_function_references(sql: str, expected: set[tuple[str, ReferenceKind, str]]) -> None:
    assert _refs(sql) == expected


def test_plaintext_role_runs_it_restricted_roles_are_refused() -> None:
    plan = analyze("SELECT query_to_xml('SELECT pin FROM vis_plain WHERE id = 1', true, false, '')", CATALOG)
    assert decide(plan.references, View(Visibility.PLAINTEXT)) is None
    for v in (Visibility.MASKED, Visibility.HIDDEN, Visibility.DENY, Visibility.CIPHERTEXT, Visibility.MATCH):
        err = decide(plan.references, View(v))
        assert err is not None, v
        assert err.sqlstate == "42501", v


def test_other_functions_and_strings_make_no_reference() -> None:
    assert analyze("SELECT length('vis_plain')", CATALOG).references == ()
    assert analyze("SELECT xmlelement(name a, 'x')", CATALOG).references == ()


@given(st.sampled_from(sorted(SQL_TEXT_FUNCTIONS)), st.sampled_from(["", "pg_catalog.", "public."]))
def test_every_function_any_schema_names_the_table(name: str, schema: str) -> None:
    refs = _refs(f"SELECT {schema}{name}('vis_plain', 'vis_plain')")
    assert _expr(f"{name}()", PIN, NOTE) <= refs


@given(st.sampled_from(sorted(SQL_TEXT_FUNCTIONS)), st.sampled_from(["", "pg_catalog.", "public."]))
def test_a_call_whose_string_is_a_parameter_reads_every_governed_table(name: str, schema: str) -> None:
    """The text names no governed table (the cheap pre-check must still send it to the analysis)."""
    refs = _refs(f"SELECT * FROM {schema}{name}($1, $2)")
    assert _expr(f"{name}()", PIN, NOTE, PHONE) <= refs


@given(
    st.sampled_from(sorted(STATISTICS_RELATIONS)),
    st.sampled_from(["", "pg_catalog.", '"pg_catalog".']),
    st.sampled_from(["SELECT * FROM {}", "SELECT x FROM (SELECT * FROM {}) s", "WITH s AS (TABLE {}) SELECT 1"]),
)
def test_the_statistics_views_read_every_plain_governed_column(name: str, schema: str, shape: str) -> None:
    refs = _refs(shape.format(schema + name))
    assert refs == _expr(f"the planner statistics view {name}", PIN, NOTE, PHONE)


def test_the_cheap_check_knows_every_name() -> None:
    from proxy.rewrite.analysis import _READS_BY_NAME

    for name in (*SQL_TEXT_FUNCTIONS, *STATISTICS_RELATIONS):
        assert any(marker in name for marker in _READS_BY_NAME), name


@pytest.mark.parametrize(
    ("sql", "construct"),
    [
        ("DO $$BEGIN EXECUTE 'SELECT 1 FROM vis_' || 'plain'; END$$", "a DO block with dynamic SQL"),
        ("DO LANGUAGE plpgsql $$BEGIN RETURN QUERY ExEcUtE 'x'; END$$", "a DO block with dynamic SQL"),
        ("DO LANGUAGE plpython3u $$plpy.cursor('SELECT 1')$$", "a DO block in language plpython3u"),
        ("/* c */ DO 'BEGIN EXECUTE ''x''; END'", "a DO block with dynamic SQL"),
    ],
)
def test_a_do_block_with_dynamic_sql_reads_every_plain_governed_column(sql: str, construct: str) -> None:
    assert _refs(sql) == _expr(construct, PIN, NOTE, PHONE)


def test_a_do_block_naming_a_plain_table_with_dynamic_sql_reads_every_plain_governed_column() -> None:
    refs = _refs("DO $$BEGIN PERFORM pin FROM vis_plain; EXECUTE 'SELECT 1 FROM ' || 'x'; END$$")
    assert {(c, k) for c, k, _ in refs} == {(c.column_id, ReferenceKind.EXPRESSION) for c in (PIN, NOTE, PHONE)}


def test_a_do_block_without_dynamic_sql_or_names_makes_no_reference() -> None:
    assert analyze("DO $$BEGIN RAISE NOTICE 'x %', 1; END$$", CATALOG).references == ()
