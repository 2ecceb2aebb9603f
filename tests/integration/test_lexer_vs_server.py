"""Differential test: pgveil's PostgreSQL 15 scanner (proxy/rewrite/lexer.py) against the real server's,
on statement boundaries.

Every text of the corpus is made of SELECTs of constants, so that each statement the server finds runs
and answers (a CommandComplete, or one EmptyQueryResponse for a text without statements). The server's
statement count is read from the results of one simple Query sent straight to it, with
standard_conforming_strings on and off and in UTF8 and SJIS; pgveil's count is the number of
non-empty statements its scanner finds under the same settings. A scanner error must match a server
error (nothing runs: PostgreSQL parses the whole text first). A text whose statements the grammar
rejects although the tokens are fine tells nothing about boundaries and is counted as inconclusive;
the corpus is built so that most texts are conclusive.

The corpus: hand-written cases in the style of PostgreSQL's own regression tests (strings.sql,
numerology.sql: quotes, E'' escapes, U&'' with UESCAPE, continuation lines, nested comments, dollar
quotes with tags, numbers with trailing junk), and texts generated from tricky pieces with a fixed seed.

Then PostgreSQL's own SQL as installed with the server (``information_schema.sql``,
``system_functions.sql`` with its ``BEGIN ATOMIC`` bodies, ``system_views.sql``, and every extension
script): pgveil's scanner splits each file into statements, and each statement is sent to the server
as a Parse (parsed, never run). The server must find exactly one statement in each (no "cannot insert
multiple commands", no "syntax error at end of input" from a statement cut short) and no scanner error
that pgveil's scanner did not report.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pglast import parser as pg_parser
from psycopg import pq

from proxy.devcluster import DevCluster, find_bindir
from proxy.rewrite.analysis import scanned_alike
from proxy.rewrite.lexer import scan, statement_spans
from proxy.rewrite.reading import server_view

pytestmark = pytest.mark.integration

# Messages of errors raised by PostgreSQL 15's scanner (as opposed to the grammar).
SCANNER_ERRORS = (
    "unterminated",
    "trailing junk",
    "zero-length delimited identifier",
    "invalid Unicode escape",
    "unsafe use of string constant",
    "invalid Unicode surrogate pair",
    "invalid Unicode escape value",
    "invalid hexadecimal",
    "operator too long",
)

HAND_WRITTEN = [
    "",
    ";",
    " ;; ; ",
    "SELECT 1",
    "SELECT 1; SELECT 2",
    "SELECT 1;; SELECT 2;",
    "SELECT 'semi;colon'; SELECT 2",
    'SELECT 1 AS "semi;colon"; SELECT 2',
    "SELECT $$semi;colon$$; SELECT 2",
    "SELECT $tag$ $$ ; $tag2$ ; $tag$; SELECT 2",
    "SELECT $a$$a$; SELECT $_b1$x;$_b1$",
    "SELECT 1 -- ; SELECT 2\n; SELECT 3",
    "SELECT 1 /* ; */; SELECT 2",
    "SELECT 1 /* /* nested ; */ still ; */; SELECT 2",
    "SELECT 1 /* unterminated /* nested */",
    "SELECT 1; -- comment at the end",
    "SELECT 1 --",
    "SELECT 'it''s; fine'; SELECT 2",
    "SELECT E'\\''; SELECT 2",
    "SELECT E'\\\\'; SELECT 2",
    "SELECT E'\\x41\\101\\u0041\\U00000041'; SELECT 2",
    "SELECT E'\\u12'",
    "SELECT E'\\uD800'",
    "SELECT '\\'; SELECT 2; --'",
    "SELECT 'a\\' AS x, '; SELECT 2; --' AS y",
    "SELECT 'a\\\\' AS x, '; SELECT 2; --' AS y",
    "SELECT 'first'\n'second'; SELECT 2",
    "SELECT 'first' -- comment\n 'second'; SELECT 2",
    "SELECT 'first'  \n\n -- c\n 'second'; SELECT 2",
    "SELECT 'first' 'second'; SELECT 2",
    "SELECT 'first'\n-- only a comment",
    "SELECT U&'d\\0061t\\+000061'; SELECT 2",
    "SELECT U&'d!0061t' UESCAPE '!'; SELECT 2",
    "SELECT U&'d;0061t' UESCAPE ';'; SELECT 2",
    'SELECT 1 AS U&"d\\0061t"; SELECT 2',
    "SELECT U&'x'",
    "SELECT B'0101', X'1F'; SELECT 2",
    "SELECT X'1F''2E'; SELECT 2",
    "SELECT N'nat'; SELECT 2",
    "SELECT 1::text, 1..2; SELECT 2",
    "SELECT 1.5e3, .5, 5., 1.e2, 1e-3; SELECT 2",
    "SELECT 0x1F",
    "SELECT 0o17",
    "SELECT 0b101",
    "SELECT 1_000",
    "SELECT 123abc",
    "SELECT 1e",
    "SELECT 1e+",
    "SELECT 1.5x",
    "SELECT 1e3$1",
    "SELECT 1$1",
    "SELECT 1\v",
    "SELECT ''",
    'SELECT 1 AS ""',
    "SELECT 'unterminated",
    "SELECT $x$ unterminated",
    'SELECT 1 AS "unterminated',
    "SELECT 1 +-- comment\n 2; SELECT 2",
    "SELECT 1 */* comment */ 2; SELECT 2",
    "SELECT 2 +/* comment */ 3; SELECT 2",
    'SELECT 1 AS "a""b"; SELECT \'x\\\'',
    "SELECT 'café'; SELECT 'naïve' AS \"größe\"; SELECT $é$ ; $é$",
    "SELECT E'tab\\there'; SELECT E'\\'';",
    "SELECT 'x'\r'y'; SELECT 2",
    "SELECT 1 ; SELECT 2 -- \\\n; SELECT 3",
]

_PIECES = [
    " ",
    "\n",
    ";",
    "'",
    "''",
    "'a'",
    "E'",
    "\\",
    "\\'",
    "$$",
    "$t$",
    "--",
    "/*",
    "*/",
    '"',
    "1",
    "x",
    "-",
    "+",
    "*",
    "/",
    "U&'",
    ".",
    "é",
    "\u0101",
]


def _generated(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        statements = []
        for _s in range(rng.randint(1, 3)):
            body = "".join(rng.choice(_PIECES) for _p in range(rng.randint(1, 6)))
            statements.append(f"SELECT 1 {body} ")
        texts.append(";".join(statements))
    return texts


CORPUS = HAND_WRITTEN + _generated(400, seed=7)


@dataclass
class ServerReading:
    statements: int  # how many ran
    error: str | None  # the first error's message


def server_reading(conn: psycopg.Connection[object], text: bytes) -> ServerReading:
    pgconn = conn.pgconn
    pgconn.send_query(text)
    ran = 0
    error: str | None = None
    while (res := pgconn.get_result()) is not None:
        if res.status == pq.ExecStatus.FATAL_ERROR:
            if error is None:
                error = (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode(errors="replace")
        elif res.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            ran += 1
    return ServerReading(ran, error)


@pytest.fixture(scope="module")
def direct(pg: DevCluster) -> Iterator[psycopg.Connection[object]]:
    with psycopg.connect(pg.dsn(dbname="app"), autocommit=True) as conn:
        yield conn


def _compare(direct: psycopg.Connection[object], text: bytes, view: str, scs: bool) -> str:
    """ "agree", "inconclusive", or a description of the disagreement."""
    mine = scan(view, standard_conforming_strings=scs)
    server = server_reading(direct, text)
    if mine.error is not None:
        if server.error is None or server.statements:
            return f"pgveil: {mine.error}; the server ran {server.statements} statements"
        return "agree"
    predicted = len(statement_spans(view, mine))
    if server.error is None:
        return "agree" if server.statements == predicted else f"pgveil: {predicted}, server: {server.statements}"
    if any(s in server.error for s in SCANNER_ERRORS):
        if scs and _libpg_query_rejects(view):
            # U&'' escapes are checked after scanning (parser.c); libpg_query rejects them the same way,
            # so pgveil's analysis gives the text no meaning either.
            return "agree"
        return f"server scanner error {server.error!r}, pgveil none"
    if server.statements:
        return f"server ran {server.statements} then failed: {server.error!r}"
    return "inconclusive"


def _libpg_query_rejects(text: str) -> bool:
    try:
        pg_parser.parse_sql_json(text)
    except pg_parser.ParseError:
        return True
    return False


@pytest.mark.parametrize("scs", [True, False], ids=["scs_on", "scs_off"])
def test_statement_boundaries_agree_with_the_server(direct: psycopg.Connection[object], scs: bool) -> None:
    direct.execute(f"SET standard_conforming_strings = {'on' if scs else 'off'}")
    direct.execute("SET escape_string_warning = off")
    disagreements: dict[str, str] = {}
    conclusive = 0
    for text in CORPUS:
        verdict = _compare(direct, text.encode("utf-8"), text, scs)
        if verdict == "agree":
            conclusive += 1
        elif verdict != "inconclusive":
            disagreements[text] = verdict
    assert disagreements == {}
    assert conclusive >= 0.7 * len(CORPUS), f"only {conclusive} of {len(CORPUS)} texts were conclusive"


def test_statement_boundaries_agree_in_sjis(direct: psycopg.Connection[object]) -> None:
    """Client encoding SJIS: the server cuts the bytes into SJIS characters before scanning; pgveil's view
    of that (reading.server_view) must give the server's boundaries."""
    direct.execute("SET standard_conforming_strings = on")
    direct.execute("SET client_encoding = 'SJIS'")
    try:
        texts = [
            "SELECT E'ā\\'; SELECT 2; --'",
            "SELECT E'ā\\\\'; SELECT 2; --'",
            "SELECT 'ā'; SELECT 2",
            "SELECT E'ﾄ\\'; SELECT 2; --'",
            'SELECT 1 AS "ā"; SELECT 2',
            *[t for t in CORPUS if not t.isascii()][:60],
        ]
        disagreements: dict[str, str] = {}
        conclusive = 0
        for text in texts:
            raw = text.encode("utf-8")
            view = server_view(raw, "SJIS")
            verdict = _compare(direct, raw, view, True)
            if verdict == "agree":
                conclusive += 1
            elif verdict != "inconclusive" and "invalid byte sequence" not in verdict:
                disagreements[text] = verdict
        assert disagreements == {}
        assert conclusive >= 3
    finally:
        direct.execute("SET client_encoding = 'UTF8'")


def test_libpg_query_differences_are_flagged(direct: psycopg.Connection[object]) -> None:
    """Where libpg_query reads a text and PostgreSQL 15's scanner does not, the analysis must know."""
    direct.execute("SET standard_conforming_strings = on")
    major = int(str(direct.execute("SHOW server_version_num").fetchone()[0])) // 10000  # type: ignore[index]
    if major >= 16:
        pytest.skip("the server reads PostgreSQL 16 syntax")
    for text in ["SELECT 0x1F", "SELECT 1_000", "SELECT 0b101", "SELECT 0o17", "SELECT 1\v"]:
        assert server_reading(direct, text.encode()).error is not None
        assert not scanned_alike(text)


def _installed_sql() -> list[Path]:
    pg_config = find_bindir() / "pg_config"
    if not pg_config.exists():
        return []
    share = Path(
        subprocess.run([str(pg_config), "--sharedir"], capture_output=True, text=True, check=True).stdout.strip()
    )
    return sorted(share.glob("*.sql")) + sorted((share / "extension").glob("*.sql"))


def _without_psql_commands(text: str) -> str:
    """Extension scripts start with a psql ``\\echo ... \\quit`` line; the server never sees those."""
    return "\n".join("" if line.startswith("\\") else line for line in text.split("\n"))


@pytest.mark.parametrize("scs", [True, False], ids=["scs_on", "scs_off"])
def test_installed_postgresql_sql_splits_as_the_server_does(direct: psycopg.Connection[object], scs: bool) -> None:
    files = _installed_sql()
    if not files:
        pytest.skip("no pg_config: the server's SQL files are not found")
    direct.execute(f"SET standard_conforming_strings = {'on' if scs else 'off'}")
    direct.execute("SET escape_string_warning = off")
    checked = 0
    disagreements: list[str] = []
    for path in files:
        text = _without_psql_commands(path.read_text(encoding="utf-8"))
        result = scan(text, standard_conforming_strings=scs)
        if result.error is not None:
            disagreements.append(f"{path.name}: pgveil: {result.error}")
            continue
        for start, end in statement_spans(text, result):
            piece = text[start:end]
            res = direct.pgconn.prepare(b"", piece.encode("utf-8"))
            checked += 1
            if res.status != pq.ExecStatus.FATAL_ERROR:
                continue
            msg = (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode(errors="replace")
            if "multiple commands" in msg or "at end of input" in msg or any(e in msg for e in SCANNER_ERRORS):
                disagreements.append(f"{path.name} at {start}: {msg}")
    assert disagreements == []
    print(f"{checked} statements from {len(files)} files")
    assert checked > 500, f"only {checked} statements checked"
