"""The SQL-level statements that act on prepared statements, as read from a statement text."""

from __future__ import annotations

import pytest

from proxy.encrypt.sqlnames import MAX_PARSED_TEXT, UNREAD_EXECUTE, namespace_ops
from proxy.protocol.encryption import NamespaceAction, NamespaceOp

PREPARE, EXECUTE = NamespaceAction.PREPARE, NamespaceAction.EXECUTE
DEALLOCATE, ALL = NamespaceAction.DEALLOCATE, NamespaceAction.DEALLOCATE_ALL


@pytest.mark.parametrize(
    ("sql", "ops"),
    [
        ("SELECT 1", ()),
        ("SELECT prepared_at, executed FROM discarded", ()),  # the words inside identifiers
        ("PREPARE p(int) AS SELECT $1", ((PREPARE, "p"),)),
        ('PREPARE "Mixed"(int) AS SELECT $1', ((PREPARE, "Mixed"),)),
        ("prepare LOWERED AS SELECT 1", ((PREPARE, "lowered"),)),  # folded as the server folds it
        ("EXECUTE p(1)", ((EXECUTE, "p"),)),
        ("EXPLAIN ANALYZE EXECUTE p(1)", ((EXECUTE, "p"),)),
        ("CREATE TABLE t AS EXECUTE p(2)", ((EXECUTE, "p"),)),
        ("DEALLOCATE p", ((DEALLOCATE, "p"),)),
        ("DEALLOCATE PREPARE p", ((DEALLOCATE, "p"),)),
        ("DEALLOCATE ALL", ((ALL, ""),)),
        ("DISCARD ALL", ((ALL, ""),)),
        ("DISCARD PLANS", ()),
        ("PREPARE a AS SELECT 1; EXECUTE a; DEALLOCATE a", ((PREPARE, "a"), (EXECUTE, "a"), (DEALLOCATE, "a"))),
        ("EXECUTE", ()),  # a syntax error: the server runs nothing
    ],
)
def test_namespace_operations_of_a_text(sql: str, ops: tuple[tuple[NamespaceAction, str], ...]) -> None:
    assert namespace_ops(sql) == tuple(NamespaceOp(a, n) for a, n in ops)


def test_a_long_text_is_not_parsed_again_and_its_execute_is_unnamed() -> None:
    padding = "/*" + "x" * MAX_PARSED_TEXT + "*/"
    assert namespace_ops(f"{padding} EXECUTE p(1)") == (UNREAD_EXECUTE,)
    assert namespace_ops(f"{padding} DEALLOCATE p") == ()
    assert namespace_ops(padding) == ()


@pytest.mark.parametrize(
    "sql",
    [
        "DO $$BEGIN EXECUTE 'DEALLOCATE s1'; END$$",
        "do $$begin execute format('PREPARE %I AS SELECT 1', 's1'); end$$",
        "DO LANGUAGE plpython3u $$plpy.execute('SELECT 1')$$",
        "DO LANGUAGE plperl $$ spi_exec_query('SELECT 1') $$",
        "SELECT 1; DO $$BEGIN EXECUTE 'x'; END$$",
    ],
)
def test_a_do_block_with_dynamic_sql_may_replace_every_statement(sql: str) -> None:
    assert NamespaceOp(NamespaceAction.REPLACE_ALL) in namespace_ops(sql)


@pytest.mark.parametrize("sql", ["DO $$BEGIN RAISE NOTICE 'x'; END$$", "SELECT 'do'", "SELECT 1 AS do_this"])
def test_other_do_blocks_and_words_replace_nothing(sql: str) -> None:
    assert NamespaceOp(NamespaceAction.REPLACE_ALL) not in namespace_ops(sql)


def test_a_long_text_with_do_in_it_may_replace_every_statement() -> None:
    sql = "DO $$BEGIN PERFORM 1; END$$; SELECT '" + "x" * (MAX_PARSED_TEXT + 1) + "'"
    assert NamespaceOp(NamespaceAction.REPLACE_ALL) in namespace_ops(sql)
