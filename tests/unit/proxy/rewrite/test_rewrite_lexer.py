"""The PostgreSQL 15 scanner: token boundaries equal libpg_query's wherever the two versions agree, the
errors PostgreSQL 15 raises where newer grammars accept, and the standard_conforming_strings = off mode.
(The scanner is checked against the real server in tests/integration/test_lexer_vs_server.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parser as pg_parser

from proxy.rewrite.analysis import scanned_alike
from proxy.rewrite.lexer import TokenKind, scan, statement_spans


def _pglast_spans(sql: str) -> list[tuple[int, int]]:
    return [(t.start, t.end + 1) for t in pg_parser.scan(sql)]


def _spans(sql: str, scs: bool = True) -> list[tuple[int, int]]:
    result = scan(sql, standard_conforming_strings=scs)
    assert result.error is None, result.error
    return [(t.start, t.end) for t in result.tokens]


# Texts on which PostgreSQL 15 and libpg_query's newer scanner agree.
AGREED = [
    "SELECT 1",
    'select a.b, "Mixed""Case", U&"d\\0061t" UESCAPE \'!\' from t',
    "SELECT 'it''s', E'\\'', E'\\\\', e'\\x41\\101\\u0041\\U00000041', '\\'",
    "SELECT 'a'\n'b', 'a' -- comment\n  'b', 'a'  \n\n -- c\n 'b' x",
    "SELECT 'a' 'b'",  # no newline: two constants (a grammar error, but the tokens are these)
    "SELECT $$a$$, $tag$ $ $$ $tag2$ $tag$, $a$$a$, $_1$x$_1$, a$b$c",
    "SELECT $1, $23::int, 1..2, 1.5, .5, 5., 1e5, 1.5E-3, 1.e2",
    "SELECT /* one /* nested */ still */ 1 /**/ /*/ */ 2",
    "SELECT a=-1, b<>-2, c!=3, d*=>e, f::text, g:=h, i||j, k ~~* l, @-1, |/25, 1+-+2, ?-, a-/**/b",
    "SELECT x'1F', B'0101', X'ab''cd', n'nat', N'x'\n'y'",
    "SELECT U&'d!0061t' UESCAPE '!', U&'\\0041', u&'x'",
    "SELECT 1; SELECT 2;; ;",
    "SELECT 'semi;colon', \"semi;colon\", $$semi;colon$$ -- ;\n; /* ; */ SELECT 3",
    "SELECT café, 'naïve', \"größe\", $é$x$é$, 日本",
    "SELECT 1 --no newline at the end",
    "SELECT E'a\\\nb', E'\\''\n'continued'",
    "SELECT [1], a[1:2], (1), {}",
    "SELECT 'a'\r'b', 'x'\t\n\t'y'",
    "SELECT 'a'  -- c\n-- d\n'b'",
    "SELECT $$\n$$, $abc$ $ab $abc $abc$",
    "SELECT 1 \\",
]


@pytest.mark.parametrize("sql", AGREED)
def test_token_boundaries_equal_libpg_query(sql: str) -> None:
    assert _spans(sql) == _pglast_spans(sql)
    assert scanned_alike(sql)


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("INSERT INTO t VALUES (0x1F)", "trailing junk after numeric literal"),
        ("SELECT 1_000", "trailing junk after numeric literal"),
        ("SELECT 0b101", "trailing junk after numeric literal"),
        ("SELECT 0o17", "trailing junk after numeric literal"),
        ("SELECT 123abc", "trailing junk after numeric literal"),
        ("SELECT 1.5x", "trailing junk after numeric literal"),
        ("SELECT 1e+", "trailing junk after numeric literal"),
        ("SELECT 1ex", "trailing junk after numeric literal"),
        ("SELECT $1a", "trailing junk after parameter"),
        ("SELECT 'abc", "unterminated quoted string"),
        ("SELECT E'abc\\'", "unterminated quoted string"),
        ("SELECT /* /* */", "unterminated /* comment"),
        ("SELECT $a$ x $b$", "unterminated dollar-quoted string"),
        ('SELECT "abc', "unterminated quoted identifier"),
        ('SELECT ""', "zero-length delimited identifier"),
        ("SELECT E'\\u12'", "invalid Unicode escape"),
    ],
)
def test_what_postgresql_15_rejects(sql: str, error: str) -> None:
    assert scan(sql).error == error


@pytest.mark.parametrize("sql", ["SELECT 0x1F", "SELECT 1_000", "SELECT 0b101", "SELECT 0o17", "SELECT 1\v"])
def test_newer_syntax_is_not_read_alike(sql: str) -> None:
    """libpg_query accepts these (PostgreSQL 16 syntax); PostgreSQL 15 rejects them."""
    pg_parser.scan(sql)
    assert not scanned_alike(sql)


def test_vertical_tab_is_not_whitespace_in_postgresql_15() -> None:
    assert [t.kind for t in scan("SELECT\v1").tokens] == [TokenKind.IDENT, TokenKind.OTHER, TokenKind.NUMBER]


def test_standard_conforming_strings_off_moves_the_string_end() -> None:
    sql = "SELECT 'a\\' AS x, '; INSERT INTO t VALUES (1); --' AS y"
    on = scan(sql)
    off = scan(sql, standard_conforming_strings=False)
    assert len(statement_spans(sql, on)) == 1
    assert len(statement_spans(sql, off)) == 2
    assert on.reading() != off.reading()


def test_escape_mode_is_part_of_the_reading() -> None:
    """Same boundaries, different values: '\\n' is two characters with scs on, a newline with it off."""
    sql = "SELECT '\\n'"
    assert _spans(sql) == _spans(sql, scs=False)
    assert scan(sql).reading() != scan(sql, standard_conforming_strings=False).reading()
    no_backslash = "SELECT 'abc', E'\\n'"
    assert scan(no_backslash).reading() == scan(no_backslash, standard_conforming_strings=False).reading()


def test_unicode_strings_are_rejected_with_scs_off() -> None:
    assert scan("SELECT U&'x'", standard_conforming_strings=False).error is not None
    assert scan('SELECT U&"x"', standard_conforming_strings=False).error is None


def test_statement_spans() -> None:
    sql = "SELECT 1; ; /* c */ SELECT ';' -- x\n;SELECT 3"
    spans = statement_spans(sql, scan(sql))
    assert [sql[a:b] for a, b in spans] == ["SELECT 1", "SELECT ';'", "SELECT 3"]


# -- property: random texts from tricky pieces -------------------------------------------------------------

_PIECES = [
    "SELECT",
    " ",
    "\n",
    "\t",
    ";",
    "'",
    "''",
    "'a'",
    "E'",
    "e'\\''",
    "\\",
    "\\'",
    '"',
    '"x"',
    "$",
    "$$",
    "$a$",
    "$1",
    "--",
    "/*",
    "*/",
    "*",
    "/",
    "-",
    "+",
    "=",
    "<",
    ">",
    "!",
    "~",
    "@",
    ":",
    "::",
    ".",
    "..",
    "1",
    "1.5",
    "1e3",
    "a",
    "é",
    "U&",
    "B'",
    "X'",
    "N",
    "x",
    "(",
    ")",
    ",",
    "[",
    "|",
    "#",
    "?",
    "%",
    "^",
    "&",
    "`",
]
_texts = st.lists(st.sampled_from(_PIECES), max_size=25).map("".join)


@settings(max_examples=1500, deadline=None)
@given(_texts)
def test_agrees_with_libpg_query_on_random_texts(sql: str) -> None:
    """Wherever both scan without error, the boundaries are the same; where PostgreSQL 15 fails, so does
    libpg_query, except for the numeric forms PostgreSQL 16 added (none of the pieces can build one)."""
    mine = scan(sql)
    try:
        theirs = _pglast_spans(sql)
    except pg_parser.ParseError:
        theirs = None
    if mine.error is None:
        assert theirs == [(t.start, t.end) for t in mine.tokens]
    else:
        assert theirs is None or "trailing junk" in mine.error, mine.error


@settings(max_examples=500, deadline=None)
@given(_texts)
def test_scan_never_raises_and_tokens_are_ordered(sql: str) -> None:
    for scs in (True, False):
        result = scan(sql, standard_conforming_strings=scs)
        pos = 0
        for t in result.tokens:
            assert pos <= t.start < t.end <= len(sql)
            pos = t.end


def test_statement_spans_keep_begin_atomic_bodies_whole() -> None:
    sql = (
        "CREATE OR REPLACE FUNCTION f(a int) RETURNS int LANGUAGE sql BEGIN ATOMIC "
        "SELECT CASE WHEN a > 0 THEN 1 ELSE 2 END; SELECT 3; END; SELECT 2; BEGIN; END"
    )
    spans = statement_spans(sql, scan(sql))
    assert [sql[a:b] for a, b in spans][1:] == ["SELECT 2", "BEGIN", "END"]
    assert sql[spans[0][0] : spans[0][1]].endswith("SELECT 3; END")


def test_statement_spans_keep_rule_actions_in_parentheses() -> None:
    sql = "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); NOTIFY t); SELECT 2"
    assert [sql[a:b] for a, b in statement_spans(sql, scan(sql))][1:] == ["SELECT 2"]
