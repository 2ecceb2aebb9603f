"""COPY in and out of protected tables through pgveil, checked against PostgreSQL itself.

The oracle: the same COPY data loaded directly into an unprotected table with the same columns
(``copy_oracle``) gives the rows the protected table must give through pgveil, and the same COPY out of
both must give the same bytes. Each case: text and CSV, headers, custom delimiter, NULL string, quote
and escape, FORCE_QUOTE / FORCE_NULL / FORCE_NOT_NULL, permuted and partial column lists; values with
tabs, newlines, backslashes, quotes, the NULL string itself, unicode, empty strings and NULLs; data fed
in odd chunk sizes so that rows, escapes and UTF-8 characters are split across CopyData messages.
Drivers: psycopg ``cursor.copy()`` (``write_row`` and raw ``write``), psql ``\\copy`` both ways, asyncpg.
What is stored is checked directly: envelopes only, with the same canonical plaintext as an INSERT.
A row with a value the declared type cannot hold fails the whole COPY (22007/22P02, naming the column,
not the value), stores nothing and leaves the session usable; binary COPY is refused.

The module owns enc_copy_text, enc_copy_csv and enc_copy_misc, and empties them where a whole-table
result is compared.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import itertools
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import encfixtures
import psycopg
import pytest
from encfixtures import EncEnv, direct_fetch, next_id, next_ids, open_stored, run_psql

from keymgmt.envelope import is_envelope
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

COLS = "id, a, n, d, plain"
ORACLE = "copy_oracle"
# Odd CopyData sizes: rows, escape sequences and multi-byte characters end up split across messages.
CHUNKS = (1, 7, 3, 4093, 2, 13, 65537, 5)

Row = tuple[int, str | None, int | None, datetime.date | None, str | None]

NASTY: list[str | None] = [
    "plain ascii",
    "",
    None,
    "tab\there\tand\tthere",
    "new\nline\r\nand CR\r",
    "back\\slash \\N \\. \\\\ end\\",
    "\\N",
    "\\.",
    "NULL",
    "nil",
    "double \" quote, comma, semicolon; pipe | single ' quote",
    '"quoted"',
    "unicode é ☃ 𝄞 中文 עברית",
    " leading and trailing spaces ",
    "x" * 70000,
]


def nasty_rows(ids: list[int]) -> list[Row]:
    rows: list[Row] = []
    for k, i in enumerate(ids):
        a = NASTY[k % len(NASTY)]
        n = None if k % 5 == 2 else [0, -2147483648, 2147483647, 7, -1][k % 5]
        d = None if k % 4 == 1 else datetime.date(2000, 1, 1) + datetime.timedelta(days=k * 37)
        plain = NASTY[(k + 3) % len(NASTY)]
        rows.append((i, a, n, d, plain))
    return rows


def chunks(data: bytes, sizes: Iterable[int] = CHUNKS) -> Iterator[bytes]:
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(data):
            return
        yield data[pos : pos + size]
        pos += size


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> EncEnv:
    e = encfixtures.shared_env(pg, tmp_path_factory, pytestconfig)
    with psycopg.connect(e.app_direct_dsn, autocommit=True) as c:
        c.execute(f"CREATE TABLE IF NOT EXISTS {ORACLE} (id int, a text, n int4, d date, plain text)")
    return e


@pytest.fixture
def conn(env: EncEnv) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        yield c


@pytest.fixture
def direct(env: EncEnv) -> Iterator[psycopg.Connection[Any]]:
    """The app role straight to PostgreSQL (the oracle's side)."""
    with psycopg.connect(env.app_direct_dsn, autocommit=True) as c:
        yield c


def truncate(direct: psycopg.Connection[Any], *tables: str) -> None:
    direct.execute(f"TRUNCATE {', '.join(tables)}")


def copy_in(c: psycopg.Connection[Any], sql: str, data: bytes, sizes: Iterable[int] = CHUNKS) -> None:
    with c.cursor().copy(sql) as cp:
        for piece in chunks(data, sizes):
            cp.write(piece)


def copy_out(c: psycopg.Connection[Any], sql: str) -> bytes:
    with c.cursor().copy(sql) as cp:
        return b"".join(bytes(b) for b in cp)


def write_rows(c: psycopg.Connection[Any], sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
    with c.cursor().copy(sql) as cp:
        for r in rows:
            cp.write_row(r)


def normalise_copy_output(data: bytes, options: str, *, sort_lines: bool = False) -> bytes:
    """COPY output as compared here.

    pgveil quotes a CSV value ``\\.`` in a row of several columns, where PostgreSQL quotes it only when
    it is the row's only column (CopyAttributeOutCSV): the same data, so that quoting is undone. A whole
    table comes out in heap order, which differs between the protected table (larger rows) and the
    oracle: ``sort_lines`` compares it as a multiset of lines."""
    if "csv" in options:
        quote = b"'" if "QUOTE ''''" in options else b'"'
        escaped = b"\\\\." if "ESCAPE '\\'" in options else b"\\."
        data = data.replace(quote + escaped + quote, b"\\.")
    if sort_lines:
        data = b"\n".join(sorted(data.split(b"\n")))
    return data


def sorted_lines(data: bytes) -> bytes:
    """Text-format COPY output (one row per line, ids of equal width) in id order."""
    return b"".join(sorted(data.splitlines(keepends=True)))


def select_all(c: psycopg.Connection[Any], table: str, ids: list[int] | None = None) -> list[tuple[Any, ...]]:
    if ids is None:
        return c.execute(f"SELECT {COLS} FROM {table} ORDER BY id").fetchall()
    return c.execute(f"SELECT {COLS} FROM {table} WHERE id = ANY(%s) ORDER BY id", [ids]).fetchall()


async def assert_stored_envelopes(env: EncEnv, table: str, ids: list[int]) -> None:
    """Directly in the database, every protected value of these rows is an envelope (or NULL)."""
    rows = await direct_fetch(env, f"SELECT a, n, d FROM {table} WHERE id = ANY($1::int[])", ids)
    assert len(rows) == len(ids)
    for r in rows:
        for col in ("a", "n", "d"):
            assert r[col] is None or is_envelope(bytes(r[col])), (table, col)


# -- the oracle: the same COPY, direct into an unprotected table and through pgveil into a protected one ----


@dataclass(frozen=True)
class Case:
    name: str
    table: str
    options_in: str
    options_out: str
    columns: str = COLS


PIPE_NIL = "(FORMAT text, HEADER, DELIMITER '|', NULL 'nil')"
TAB_BACKSLASH_N = "(FORMAT csv, DELIMITER E'\\t', NULL '\\N')"
CASES = [
    Case("text-default", "enc_copy_text", "", ""),
    Case("text-header-pipe-nil", "enc_copy_text", PIPE_NIL, PIPE_NIL),
    Case("text-encoding-utf8", "enc_copy_text", "(FORMAT text, ENCODING 'UTF8')", "(FORMAT text, ENCODING 'UTF8')"),
    Case("text-permuted-columns", "enc_copy_text", "", "", "plain, d, a, id, n"),
    Case("text-partial-columns", "enc_copy_text", "", "", "id, n, a"),
    Case("csv-default", "enc_copy_csv", "(FORMAT csv)", "(FORMAT csv)"),
    Case(
        "csv-header-semicolon-quote-escape-null",
        "enc_copy_csv",
        "(FORMAT csv, HEADER, DELIMITER ';', QUOTE '''', ESCAPE '\\', NULL 'NULL')",
        "(FORMAT csv, HEADER, DELIMITER ';', QUOTE '''', ESCAPE '\\', NULL 'NULL')",
    ),
    Case("csv-tab-backslash-n", "enc_copy_csv", TAB_BACKSLASH_N, TAB_BACKSLASH_N),
    Case("csv-force-quote-all", "enc_copy_csv", "(FORMAT csv, HEADER MATCH)", "(FORMAT csv, HEADER, FORCE_QUOTE *)"),
    Case("csv-force-quote-some", "enc_copy_csv", "(FORMAT csv)", "(FORMAT csv, FORCE_QUOTE (a, plain))"),
    Case("csv-force-null", "enc_copy_csv", "(FORMAT csv, FORCE_NOT_NULL (a), FORCE_NULL (n, plain))", "(FORMAT csv)"),
    Case("csv-permuted-columns", "enc_copy_csv", "(FORMAT csv, HEADER)", "(FORMAT csv, HEADER)", "d, plain, id, a, n"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_copy_matches_postgresql(env: EncEnv, case: Case) -> None:
    """data = direct COPY out of source rows; that data COPYed in directly (oracle) and through pgveil
    (protected) gives the same rows, and COPY out of both gives the same bytes."""
    ids = next_ids(len(NASTY) * 2)
    rows = nasty_rows(ids)
    with (
        psycopg.connect(env.app_direct_dsn, autocommit=True) as direct,
        psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as conn,
    ):
        truncate(direct, ORACLE)
        direct.execute(f"TRUNCATE {case.table}")  # a whole-table COPY out is compared below
        write_rows(direct, f"COPY {ORACLE} ({COLS}) FROM STDIN", rows)
        with_header = "HEADER" in case.options_in
        source_opts = case.options_out if with_header else case.options_in
        source_opts = source_opts.replace("HEADER MATCH", "HEADER")
        if "FORCE_NULL" in case.options_in:
            source_opts = "(FORMAT csv, FORCE_QUOTE *)"  # quoted empty strings, for FORCE_NULL to act on
        data = copy_out(direct, f"COPY (SELECT {case.columns} FROM {ORACLE} ORDER BY id) TO STDOUT {source_opts}")
        truncate(direct, ORACLE)

        copy_in(direct, f"COPY {ORACLE} ({case.columns}) FROM STDIN {case.options_in}", data, [len(data) or 1])
        copy_in(conn, f"COPY {case.table} ({case.columns}) FROM STDIN {case.options_in}", data)

        want = select_all(direct, ORACLE)
        assert len(want) == len(rows)
        got = select_all(conn, case.table)
        assert got == want

        sql_out = "COPY {t} ({cols}) TO STDOUT {opts}"
        want_out = copy_out(direct, sql_out.format(t=ORACLE, cols=case.columns, opts=case.options_out))
        got_out = copy_out(conn, sql_out.format(t=case.table, cols=case.columns, opts=case.options_out))
        opts = case.options_out
        assert normalise_copy_output(got_out, opts, sort_lines=True) == normalise_copy_output(
            want_out, opts, sort_lines=True
        )
        sql_q = "COPY (SELECT {cols} FROM {t} WHERE id = ANY('{{{ids}}}') ORDER BY id) TO STDOUT {opts}"
        q_ids = ",".join(map(str, ids[::3]))
        want_q = copy_out(direct, sql_q.format(t=ORACLE, cols=case.columns, ids=q_ids, opts=case.options_out))
        got_q = copy_out(conn, sql_q.format(t=case.table, cols=case.columns, ids=q_ids, opts=case.options_out))
        assert normalise_copy_output(got_q, opts) == normalise_copy_output(want_q, opts)
    await assert_stored_envelopes(env, case.table, ids)


def test_write_row_and_copy_rows_round_trip(env: EncEnv, conn: psycopg.Connection[Any]) -> None:
    """psycopg's write_row (it escapes the values itself) in, typed rows() out."""
    ids = next_ids(len(NASTY) * 2)
    rows = nasty_rows(ids)
    write_rows(conn, f"COPY enc_copy_text ({COLS}) FROM STDIN", rows)
    assert select_all(conn, "enc_copy_text", ids) == rows
    with conn.cursor().copy(
        f"COPY (SELECT {COLS} FROM enc_copy_text WHERE id = ANY('{{{','.join(map(str, ids))}}}') ORDER BY id) TO STDOUT"
    ) as cp:
        cp.set_types(["int4", "text", "int4", "date", "text"])
        assert list(cp.rows()) == rows


async def test_copy_stores_the_same_plaintext_as_insert(env: EncEnv, conn: psycopg.Connection[Any]) -> None:
    values = [(v, n, datetime.date(1999, 12, 31)) for v, n in [("", 0), ("é\t\n\\", -5), ("NULL", 2147483647)]]
    copied = next_ids(len(values))
    inserted = next_ids(len(values))
    write_rows(
        conn, "COPY enc_copy_misc (id, a, n, d) FROM STDIN", [(i, *v) for i, v in zip(copied, values, strict=True)]
    )
    for i, v in zip(inserted, values, strict=True):
        conn.execute("INSERT INTO enc_copy_misc (id, a, n, d) VALUES (%s, %s, %s, %s)", [i, *v])
    for col in ("a", "n", "d"):
        stored = {}
        for name, ids in (("copied", copied), ("inserted", inserted)):
            rows = await direct_fetch(
                env, f"SELECT {col} FROM enc_copy_misc WHERE id = ANY($1::int[]) ORDER BY id", ids
            )
            envelopes = [bytes(r[col]) for r in rows]
            assert all(is_envelope(e) for e in envelopes)
            stored[name] = await open_stored(env, f"public.enc_copy_misc.{col}", envelopes)
        assert stored["copied"] == stored["inserted"], col
    assert [r[1] for r in select_all(conn, "enc_copy_misc", copied)] == [v[0] for v in values]


# -- 10,000 rows, streamed both ways, psycopg and psql ------------------------------------------------------


def many_rows(n: int) -> list[Row]:
    """Rows with ids of their own (far above next_id's), so a whole-table result is exactly these."""
    base = datetime.date(1970, 1, 1)
    return [
        (
            i,
            None if i % 97 == 0 else f"row {i} é\t{'x' * (i % 50)}\\{i % 7}",
            None if i % 89 == 0 else (i - 100_000_000) * 7919 - 40_000_000,
            None if i % 83 == 0 else base + datetime.timedelta(days=i - 100_000_000),
            f"plain {i}",
        )
        for i in range(100_000_000, 100_000_000 + n)
    ]


async def test_ten_thousand_rows_streamed_both_ways(
    env: EncEnv, conn: psycopg.Connection[Any], direct: psycopg.Connection[Any], tmp_path: Path
) -> None:
    rows = many_rows(10_000)
    truncate(direct, ORACLE)
    conn.execute("TRUNCATE enc_copy_misc")
    write_rows(direct, f"COPY {ORACLE} ({COLS}) FROM STDIN", rows)
    want = copy_out(direct, f"COPY (SELECT {COLS} FROM {ORACLE} ORDER BY id) TO STDOUT")

    # In: psycopg write_row, streamed; out: raw CopyData, then typed rows.
    write_rows(conn, f"COPY enc_copy_misc ({COLS}) FROM STDIN", rows)
    assert sorted_lines(copy_out(conn, f"COPY enc_copy_misc ({COLS}) TO STDOUT")) == want
    with conn.cursor().copy(f"COPY enc_copy_misc ({COLS}) TO STDOUT") as cp:
        cp.set_types(["int4", "text", "int4", "date", "text"])
        assert sorted(cp.rows()) == rows
    ids = [r[0] for r in rows]
    await assert_stored_envelopes(env, "enc_copy_misc", ids[::1000])

    # psql \copy out to a file, then \copy that file back in (after emptying the table), then out again.
    out_file = tmp_path / "out.tsv"
    p = run_psql(env.dsn(), "-c", f"\\copy enc_copy_misc ({COLS}) TO '{out_file}'")
    assert p.returncode == 0, p.stderr
    assert sorted_lines(out_file.read_bytes()) == want
    conn.execute("TRUNCATE enc_copy_misc")
    p = run_psql(env.dsn(), "-c", f"\\copy enc_copy_misc ({COLS}) FROM '{out_file}'")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "" or "10000" in p.stdout
    assert sorted_lines(copy_out(conn, f"COPY enc_copy_misc ({COLS}) TO STDOUT")) == want

    # Raw writes in odd chunk sizes.
    conn.execute("TRUNCATE enc_copy_misc")
    copy_in(conn, f"COPY enc_copy_misc ({COLS}) FROM STDIN", want)
    assert conn.execute("SELECT count(*) FROM enc_copy_misc").fetchone() == (10_000,)
    assert sorted_lines(copy_out(conn, f"COPY enc_copy_misc ({COLS}) TO STDOUT")) == want
    rows_direct = await direct_fetch(
        env,
        "SELECT count(*) AS n FROM enc_copy_misc WHERE a IS NOT NULL AND substring(a from 1 for 2) <> '\\x5056'::bytea",
    )
    assert rows_direct[0]["n"] == 0


def test_psql_copy_csv_with_header_both_ways(
    env: EncEnv, conn: psycopg.Connection[Any], direct: psycopg.Connection[Any], tmp_path: Path
) -> None:
    ids = next_ids(len(NASTY))
    rows = nasty_rows(ids)
    truncate(direct, ORACLE)
    write_rows(direct, f"COPY {ORACLE} ({COLS}) FROM STDIN", rows)
    opts = "(FORMAT csv, HEADER, DELIMITER ';', NULL '<null>')"
    want = copy_out(direct, f"COPY (SELECT {COLS} FROM {ORACLE} ORDER BY id) TO STDOUT {opts}")
    src = tmp_path / "in.csv"
    src.write_bytes(want)
    p = run_psql(env.dsn(), "-c", f"\\copy enc_copy_csv ({COLS}) FROM '{src}' WITH {opts}")
    assert p.returncode == 0, p.stderr
    assert select_all(conn, "enc_copy_csv", ids) == rows
    out = tmp_path / "out.csv"
    id_list = ",".join(map(str, ids))
    p = run_psql(
        env.dsn(),
        "-c",
        f"\\copy (SELECT {COLS} FROM enc_copy_csv WHERE id IN ({id_list}) ORDER BY id) TO '{out}' WITH {opts}",
    )
    assert p.returncode == 0, p.stderr
    assert normalise_copy_output(out.read_bytes(), opts) == want
    # COPY ... TO STDOUT sent by psql as a query (its output to a file: the data has \r in it).
    query_out = tmp_path / "query-out.csv"
    p = run_psql(
        env.dsn(),
        "-o",
        str(query_out),
        "-c",
        f"COPY (SELECT {COLS} FROM enc_copy_csv WHERE id IN ({id_list}) ORDER BY id) TO STDOUT WITH {opts}",
    )
    assert p.returncode == 0, p.stderr
    assert normalise_copy_output(query_out.read_bytes(), opts) == want


def test_copy_select_with_join_and_plain_expressions(conn: psycopg.Connection[Any]) -> None:
    ids = next_ids(3)
    write_rows(conn, "COPY enc_copy_misc (id, a, n, plain) FROM STDIN", [(i, f"a{i}", i, f"p{i}") for i in ids])
    for i in ids:
        conn.execute("INSERT INTO enc_plain (id, v) VALUES (%s, %s)", [i, f"v{i}"])
    out = copy_out(
        conn,
        "COPY (SELECT t.id, t.a, p.v, upper(t.plain) AS up, t.n FROM enc_copy_misc t JOIN enc_plain p ON p.id = t.id"
        f" WHERE t.id IN ({','.join(map(str, ids))}) ORDER BY t.id) TO STDOUT (FORMAT csv, HEADER)",
    )
    want = "id,a,v,up,n\n" + "".join(f"{i},a{i},v{i},P{i},{i}\n" for i in ids)
    assert out.decode() == want


async def test_asyncpg_copy_text_and_csv(env: EncEnv) -> None:
    ids = next_ids(len(NASTY))
    rows = nasty_rows(ids)
    buf = io.StringIO()
    for r in rows:
        buf.write("\t".join("\\N" if v is None else _text_escape(str(v)) for v in r) + "\n")
    conn = await asyncpg.connect(env.dsn())
    try:
        status = await conn.copy_to_table(
            "enc_copy_text", source=io.BytesIO(buf.getvalue().encode()), columns=["id", "a", "n", "d", "plain"]
        )
        assert status == f"COPY {len(rows)}"
        got = await conn.fetch(f"SELECT {COLS} FROM enc_copy_text WHERE id = ANY($1::int[]) ORDER BY id", ids)
        assert [tuple(r) for r in got] == rows
        out = io.BytesIO()
        await conn.copy_from_query(
            f"SELECT {COLS} FROM enc_copy_text WHERE id = ANY($1::int[]) ORDER BY id", ids, output=out, format="csv"
        )
        with psycopg.connect(env.app_direct_dsn, autocommit=True) as direct:
            truncate(direct, ORACLE)
            write_rows(direct, f"COPY {ORACLE} ({COLS}) FROM STDIN", rows)
            want = copy_out(direct, f"COPY (SELECT {COLS} FROM {ORACLE} ORDER BY id) TO STDOUT (FORMAT csv)")
            assert normalise_copy_output(out.getvalue(), "csv") == want
    finally:
        await conn.close()


async def test_copy_data_sent_before_the_copy_in_response(env: EncEnv) -> None:
    """asyncpg does not wait for CopyInResponse: with an async iterable source, the Query, the CopyData
    and CopyDone leave together, so the data reaches pgveil before the server has said that COPY
    started. It must still be encrypted (never forwarded as is), on the first COPY of a connection too."""
    ids = next_ids(6)
    for pair in (ids[:3], ids[3:]):
        conn = await asyncpg.connect(env.dsn())
        try:
            for i in pair:

                async def source(i: int = i) -> AsyncIterator[bytes]:
                    yield b"%d\tsent early %d\t%d\t2020-01-01\tp\n" % (i, i, i)

                status = await conn.copy_to_table(
                    "enc_copy_misc", source=source(), columns=["id", "a", "n", "d", "plain"]
                )
                assert status == "COPY 1"
        finally:
            await conn.close()
    await assert_stored_envelopes(env, "enc_copy_misc", ids)
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        got = c.execute("SELECT id, a, n FROM enc_copy_misc WHERE id = ANY(%s) ORDER BY id", [ids]).fetchall()
    assert got == [(i, f"sent early {i}", i) for i in ids]


def _text_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# -- failures: bad values, binary, and the session after them ---------------------------------------------


def bad_payload(ids: list[int], column: str, value: str, *, unterminated: bool = False) -> bytes:
    """Text-format rows, one of them with ``value`` in ``column``: the middle one, or with
    ``unterminated`` the last one, without a final newline (pgveil only sees that line at CopyDone)."""
    bad = len(ids) - 1 if unterminated else len(ids) // 2
    lines = []
    for k, i in enumerate(ids):
        vals = {"a": "ok", "n": "1", "d": "2020-01-01", "plain": "p"}
        if k == bad:
            vals[column] = value
        lines.append(f"{i}\t{vals['a']}\t{vals['n']}\t{vals['d']}\t{vals['plain']}")
    return ("\n".join(lines) + ("" if unterminated else "\n")).encode()


BAD_CASES = [
    pytest.param("d", "notadate", "22007", id="date"),
    pytest.param("n", "notanint", "22P02", id="int4"),
    pytest.param("n", "99999999999", "22003", id="int4-out-of-range"),
]


@pytest.mark.parametrize(("column", "value", "sqlstate"), BAD_CASES)
def test_bad_value_fails_the_whole_copy(conn: psycopg.Connection[Any], column: str, value: str, sqlstate: str) -> None:
    ids = next_ids(5)
    with pytest.raises(psycopg.Error) as info:
        copy_in(conn, f"COPY enc_copy_misc ({COLS}) FROM STDIN", bad_payload(ids, column, value))
    e = info.value
    assert e.sqlstate == sqlstate, (e.sqlstate, str(e))
    message = e.diag.message_primary or ""
    assert f"public.enc_copy_misc.{column}" in message, message
    assert value not in str(e), "the error echoes the value"
    assert conn.execute("SELECT count(*) FROM enc_copy_misc WHERE id = ANY(%s)", [ids]).fetchone() == (0,)
    # The session goes on: a statement, then another COPY in and out.
    assert conn.execute("SELECT 1").fetchone() == (1,)
    k = next_id()
    write_rows(conn, "COPY enc_copy_misc (id, a) FROM STDIN", [(k, "after the failure")])
    assert copy_out(conn, f"COPY (SELECT a FROM enc_copy_misc WHERE id = {k}) TO STDOUT") == b"after the failure\n"


async def test_bad_value_in_an_unterminated_last_line(env: EncEnv) -> None:
    """A last line without a newline is only complete at CopyDone, where pgveil finds the bad value. The
    next COPY of the session must work as usual (asyncpg, so that a hang fails after 10 s)."""
    ids = next_ids(3)
    conn = await asyncpg.connect(env.dsn())
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.copy_to_table(
                "enc_copy_misc",
                source=io.BytesIO(bad_payload(ids, "d", "notadate", unterminated=True)),
                columns=["id", "a", "n", "d", "plain"],
            )
        assert info.value.sqlstate == "22007"
        assert "public.enc_copy_misc.d" in str(info.value)
        assert await conn.fetchval("SELECT count(*) FROM enc_copy_misc WHERE id = ANY($1::int[])", ids) == 0
        k = next_id()
        try:
            status = await asyncio.wait_for(
                conn.copy_to_table("enc_copy_misc", source=io.BytesIO(b"%d\tnext\n" % k), columns=["id", "a"]), 10
            )
        except TimeoutError:
            pytest.fail("the COPY after the failed one hangs: its data never reaches the server")
        assert status == "COPY 1"
        assert await conn.fetchval("SELECT a FROM enc_copy_misc WHERE id = $1", k) == "next"
    finally:
        conn.terminate()


def test_bad_value_in_a_transaction_aborts_it(env: EncEnv) -> None:
    ids = next_ids(3)
    with psycopg.connect(env.dsn(connect_timeout="10")) as c:
        c.execute("INSERT INTO enc_copy_misc (id, a) VALUES (%s, 'before')", [ids[0]])
        with pytest.raises(psycopg.errors.InvalidDatetimeFormat):
            copy_in(c, f"COPY enc_copy_misc ({COLS}) FROM STDIN", bad_payload(ids[1:], "d", "notadate"))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
        assert c.execute("SELECT count(*) FROM enc_copy_misc WHERE id = ANY(%s)", [ids]).fetchone() == (0,)


def test_psql_copy_with_a_bad_value(env: EncEnv, tmp_path: Path) -> None:
    ids = next_ids(4)
    src = tmp_path / "bad.tsv"
    src.write_bytes(bad_payload(ids, "d", "notadate"))
    id_list = ",".join(map(str, ids))
    script = (
        f"\\copy enc_copy_misc ({COLS}) FROM '{src}'\n"
        f"SELECT 'still here', count(*) FROM enc_copy_misc WHERE id IN ({id_list});\n"
    )
    p = run_psql(env.dsn(), "-v", "VERBOSITY=verbose", stdin=script, stop_on_error=False)
    assert "ERROR:  22007: " in p.stderr, p.stderr
    assert "public.enc_copy_misc.d" in p.stderr, p.stderr
    assert "notadate" not in p.stderr
    assert p.stdout.split() == ["still", "here|0"], p.stdout


def test_server_side_error_in_a_plain_column(conn: psycopg.Connection[Any]) -> None:
    """A value only the server can reject (an unprotected column): the server's own error, nothing stored."""
    ids = next_ids(3)
    payload = b"".join(b"%d\tok\t1\t2020-01-01\tp\n" % i for i in ids) + b"notanid\tok\t1\t2020-01-01\tp\n"
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        copy_in(conn, f"COPY enc_copy_misc ({COLS}) FROM STDIN", payload)
    assert conn.execute("SELECT count(*) FROM enc_copy_misc WHERE id = ANY(%s)", [ids]).fetchone() == (0,)
    assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_binary_copy_is_refused(env: EncEnv, conn: psycopg.Connection[Any]) -> None:
    k = next_id()
    for sql in (
        f"COPY enc_copy_misc ({COLS}) TO STDOUT (FORMAT binary)",
        "COPY (SELECT id, a FROM enc_copy_misc) TO STDOUT (FORMAT binary)",
    ):
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            copy_out(conn, sql)
        assert "public.enc_copy_misc.a" in str(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with (
        pytest.raises(psycopg.errors.FeatureNotSupported),
        conn.cursor().copy(f"COPY enc_copy_misc ({COLS}) FROM STDIN (FORMAT binary)") as cp,
    ):
        cp.write_row((k, "a", 1, None, None))
    assert conn.execute("SELECT count(*) FROM enc_copy_misc WHERE id = %s", [k]).fetchone() == (0,)
    # asyncpg's copy_records_to_table is a binary COPY FROM STDIN.
    a = await asyncpg.connect(env.dsn())
    try:
        with pytest.raises(asyncpg.FeatureNotSupportedError):
            await a.copy_records_to_table("enc_copy_misc", records=[(k, "a")], columns=["id", "a"])
        assert await a.fetchval("SELECT count(*) FROM enc_copy_misc WHERE id = $1", k) == 0
    finally:
        await a.close()
    rows = await direct_fetch(env, "SELECT count(*) AS n FROM enc_copy_misc WHERE id = $1", k)
    assert rows[0]["n"] == 0


def test_a_second_copy_in_the_same_query_string_is_refused(env: EncEnv, conn: psycopg.Connection[Any]) -> None:
    """Rows are rewritten from the moment the Query is sent, before the server says which COPY it reads
    for: with an unprotected COPY first, the protected table's rewriter would seal the other table's
    rows (an envelope stored in a plain column). Any second COPY next to a protected one is refused."""
    conn.execute("CREATE TABLE IF NOT EXISTS copy_plain_first (id int, a text, n int4, d date, plain text)")
    k, j = next_ids(2)
    data = f"{k}\tfirst-table\t1\t2020-01-01\tp\n\\.\n{j}\tsecond-table\t2\t2020-01-02\tq\n\\.\n"
    for sql in (
        f"COPY copy_plain_first ({COLS}) FROM STDIN; COPY enc_copy_misc ({COLS}) FROM STDIN",
        f"COPY enc_copy_misc ({COLS}) FROM STDIN; COPY copy_plain_first ({COLS}) FROM STDIN",
        f"COPY enc_copy_misc ({COLS}) FROM STDIN; COPY enc_copy_misc ({COLS}) FROM STDIN",
        f"COPY copy_plain_first ({COLS}) TO STDOUT; COPY enc_copy_misc ({COLS}) FROM STDIN",
    ):
        result = run_psql(env.dsn(), "-c", sql, stdin=data)
        assert result.returncode != 0, sql
        assert "may contain no other COPY statement" in result.stderr, (sql, result.stderr)
    assert conn.execute("SELECT count(*) FROM copy_plain_first WHERE id = ANY(%s)", [[k, j]]).fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM enc_copy_misc WHERE id = ANY(%s)", [[k, j]]).fetchone() == (0,)
    # One COPY per query string still works, into either table.
    assert run_psql(env.dsn(), "-c", f"COPY copy_plain_first ({COLS}) FROM STDIN", stdin=data).returncode == 0
    assert run_psql(env.dsn(), "-c", f"COPY enc_copy_misc ({COLS}) FROM STDIN", stdin=data).returncode == 0
    assert conn.execute("SELECT a FROM copy_plain_first WHERE id = %s", [k]).fetchone() == ("first-table",)
    assert conn.execute("SELECT a FROM enc_copy_misc WHERE id = %s", [k]).fetchone() == ("first-table",)
