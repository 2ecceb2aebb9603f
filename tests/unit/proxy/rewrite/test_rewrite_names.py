"""Name resolution that does not depend on search_path (issue 7, item 3), protected families (item 4) and
what DDL tells the session about the catalog (item 5), at the level of the analysis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.rewrite.analysis import analyze
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable
from proxy.rewrite.plan import StatementPlan


def _table(schema: str, name: str, columns: list[str], protected: dict[str, str], **kw: object) -> ProtectedTable:
    cols = {c: ProtectedColumn(schema, name, c, t) for c, t in protected.items()}
    return ProtectedTable(schema, name, cols, tuple(columns), **kw)  # type: ignore[arg-type]


SECRETS = _table("s1", "secrets", ["id", "c", "open"], {"c": "text"})
LONELY = _table("public", "lonely", ["id", "c"], {"c": "text"})
TWIN_A = _table("a", "twin", ["id", "x"], {"x": "text"})
TWIN_B = _table("b", "twin", ["id", "y"], {"y": "text"})
ROOT_C = SECRETS.columns["c"]
CHILD = ProtectedTable(
    "public",
    "secrets_child",
    {"c": ProtectedColumn("public", "secrets_child", "c", "text", 2, 900, identity=ROOT_C.column_id)},
    ("id", "c", "open", "extra"),
    900,
    (1, 2, 3, 4),
    root="s1.secrets",
)
VIEW = ProtectedTable(
    "public",
    "secrets_v",
    {"hidden": ProtectedColumn("public", "secrets_v", "hidden", "text", 2, 901, identity=ROOT_C.column_id)},
    ("id", "hidden"),
    901,
    (1, 2),
    root="s1.secrets",
    view=True,
)
OPAQUE = ProtectedTable(
    "public", "secrets_o", {}, ("id", "shout"), 902, (1, 2), root="s1.secrets", view=True, opaque=True
)
CATALOG = Catalog(
    {(t.schema, t.name): t for t in (SECRETS, LONELY, TWIN_A, TWIN_B, CHILD, VIEW, OPAQUE)},
    others=frozenset({("s2", "lonely")}),
)


def _one(sql: str) -> StatementPlan:
    plan = analyze(sql, CATALOG)
    assert len(plan.statements) == 1
    return plan.statements[0]


def _refused(sql: str) -> str:
    st = _one(sql)
    assert st.refusal_reason is not None, sql
    return st.refusal_reason.message


# -- search_path does not matter ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO secrets (id, c) VALUES (1, 'x')",
        "INSERT INTO SECRETS (id, c) VALUES (1, 'x')",  # case folding
        "INSERT INTO s1.secrets (id, c) VALUES (1, 'x')",
        "INSERT INTO \"secrets\" (id, c) VALUES (1, 'x')",
    ],
)
def test_unqualified_and_qualified_names_reach_the_protected_table(sql: str) -> None:
    st = _one(sql)
    assert st.refusal_reason is None
    assert [t.column for t in st.literal_targets] == [ROOT_C]


def test_a_quoted_name_in_another_case_is_another_table() -> None:
    assert not analyze("INSERT INTO \"Secrets\" (id, c) VALUES (1, 'x')", CATALOG).touches_protected
    assert not analyze("INSERT INTO s2.secrets (id, c) VALUES (1, 'x')", CATALOG).touches_protected


def test_length_of_a_protected_column_is_refused_without_qualification() -> None:
    assert "length()" in _refused("SELECT length(c) FROM secrets")


# -- ambiguity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO lonely (id, c) VALUES (1, 'x')",
        "INSERT INTO lonely (id, c) VALUES (1, $1)",
        "SELECT c FROM lonely",
        "SELECT * FROM lonely",
        "SELECT length(c) FROM lonely",
        "UPDATE lonely SET c = 'x'",
        "COPY lonely (c) FROM STDIN",
    ],
)
def test_a_name_shared_with_an_unprotected_relation_is_refused_where_it_matters(sql: str) -> None:
    message = _refused(sql)
    assert "s2.lonely" in message
    assert "public.lonely" in message
    assert _one(sql).refusal_reason.hint == "qualify the table name with its schema"  # type: ignore[union-attr]


@pytest.mark.parametrize("sql", ["SELECT id FROM lonely", "SELECT count(*) FROM lonely", "DELETE FROM lonely"])
def test_an_ambiguous_name_that_seals_and_decrypts_nothing_passes(sql: str) -> None:
    assert _one(sql).refusal_reason is None


def test_two_protected_tables_of_one_name_refuse_every_use() -> None:
    for sql in ("SELECT id FROM twin", "INSERT INTO twin (id) VALUES (1)", "INSERT INTO twin (id, y) VALUES (1, 'v')"):
        assert "a.twin" in _refused(sql)
    assert _one("INSERT INTO b.twin (id, y) VALUES (1, 'v')").refusal_reason is None


def test_pg_temp_qualified_protected_name_is_refused_for_protected_columns() -> None:
    assert "temporary" in _refused("INSERT INTO pg_temp.secrets (id, c) VALUES (1, 'x')")
    assert "temporary" in _refused("SELECT c FROM pg_temp.secrets")


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TEMP TABLE secrets (id int, c text)",
        "CREATE TEMPORARY TABLE secrets (LIKE s1.secrets)",
        "CREATE TABLE pg_temp.secrets (id int)",
        "CREATE TEMP VIEW secrets AS SELECT 1",
        "CREATE TEMP SEQUENCE secrets",
        "CREATE TEMP TABLE secrets AS SELECT 1",
        "SELECT 1 INTO TEMP secrets",
    ],
)
def test_temporary_relation_shadowing_a_protected_name_is_refused(sql: str) -> None:
    assert "shadow" in _refused(sql)


def test_temporary_relation_of_another_name_passes() -> None:
    assert not analyze("CREATE TEMP TABLE scratch (id int)", CATALOG).touches_protected


@given(
    st.lists(st.sampled_from(["public", "s1", "s2", "app", "x"]), min_size=1, max_size=4, unique=True),
    st.lists(st.sampled_from(["public", "s1", "s2", "app", "x"]), max_size=4, unique=True),
)
def test_lookup_is_ambiguous_exactly_when_another_relation_shares_the_name(
    protected_in: list[str], others_in: list[str]
) -> None:
    others = [s for s in others_in if s not in protected_in]
    catalog = Catalog(
        {(s, "t"): _table(s, "t", ["id", "c"], {"c": "text"}) for s in protected_in},
        frozenset((s, "t") for s in others),
    )
    table = catalog.lookup(None, "t")
    assert table is not None
    assert (table.schema, table.name) in catalog.tables
    assert (catalog.ambiguity(None, "t") is not None) == (len(protected_in) + len(others) > 1)
    for s in protected_in:
        assert catalog.lookup(s, "t") is catalog.tables[(s, "t")]
        assert catalog.ambiguity(s, "t") is None


# -- the family ----------------------------------------------------------------------------------------------


def test_a_child_is_sealed_with_the_root_identity() -> None:
    st = _one("INSERT INTO secrets_child (id, c) VALUES (1, 'x')")
    assert [t.column.column_id for t in st.literal_targets] == ["s1.secrets.c"]
    assert _one("INSERT INTO secrets_child VALUES (1, 'x', 'o', 2)").literal_targets[0].column.column_id == (
        "s1.secrets.c"
    )


def test_a_view_column_passing_a_protected_column_maps_to_it() -> None:
    st = _one("INSERT INTO secrets_v (id, hidden) VALUES (1, $1)")
    assert st.param_targets[1].column_id == "s1.secrets.c"
    assert "length()" in _refused("SELECT length(hidden) FROM secrets_v")


def test_an_opaque_view_cannot_be_written() -> None:
    assert "cannot be written" in _refused("INSERT INTO secrets_o (id, shout) VALUES (1, 'x')")
    assert "cannot be written" in _refused("INSERT INTO secrets_o VALUES (1, 'x')")
    assert "cannot be written" in _refused("UPDATE secrets_o SET shout = 'x'")


# -- DDL and a stale catalog ---------------------------------------------------------------------------------


def test_a_column_the_catalog_does_not_know_means_stale() -> None:
    st = _one("INSERT INTO secrets (id, c_new) VALUES (1, 'x')")
    assert st.refusal_reason is not None
    assert st.refusal_reason.sqlstate == "55000"
    assert _one("UPDATE secrets SET renamed = 'x'").refusal_reason.sqlstate == "55000"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        ("ALTER TABLE secrets RENAME COLUMN c TO c2", {"secrets"}),
        ("ALTER TABLE secrets RENAME TO secrets2", {"secrets", "secrets2"}),
        ("ALTER TABLE other RENAME TO secrets", {"other", "secrets"}),
        ("CREATE TABLE p2 PARTITION OF s1.secrets FOR VALUES IN (1)", {"p2", "secrets"}),
        ("CREATE TABLE k (x int) INHERITS (secrets)", {"k", "secrets"}),
        ("ALTER TABLE secrets ATTACH PARTITION p3 FOR VALUES IN (2)", {"p3", "secrets"}),
        ("CREATE VIEW v2 AS SELECT c FROM secrets", {"v2", "secrets"}),
        ("DROP TABLE secrets_child", {"secrets_child"}),
        ("ALTER TABLE secrets DROP COLUMN open", {"secrets"}),
    ],
)
def test_ddl_names_the_relations_it_may_change(sql: str, names: set[str]) -> None:
    st = _one(sql)
    assert st.refusal_reason is None
    assert st.touches_protected
    assert names <= st.catalog_names


def test_schema_wide_ddl_stales_every_protected_name() -> None:
    for sql in ("ALTER SCHEMA s1 RENAME TO s9", "DROP SCHEMA s1 CASCADE", "DROP OWNED BY app"):
        assert {"secrets", "lonely", "twin"} <= _one(sql).catalog_names


def test_ddl_on_other_tables_changes_nothing() -> None:
    assert not analyze("ALTER TABLE plain ADD COLUMN x int", CATALOG).touches_protected


def test_insert_without_column_list_must_fill_every_column() -> None:
    # With fewer values than columns, a column dropped before pgveil read the catalog again would shift
    # the values onto the wrong columns.
    assert "each of its 3 columns" in _refused("INSERT INTO secrets VALUES (1, 'x')")
    assert "each of its 3 columns" in _refused("INSERT INTO secrets SELECT 1, 'x'")
    st = _one("INSERT INTO secrets VALUES (1, 'x', 'o')")
    assert [t.column for t in st.literal_targets] == [ROOT_C]
