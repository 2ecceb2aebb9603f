"""Stored ciphertext edited behind pgveil's back must never come back as garbage.

Each tampering is done directly in the database, the way someone with write access to the tables could:
a flipped byte (ciphertext, nonce, tag), a truncated envelope, a value moved to another column of the
same table or to another table, and a value under a key id the keystore does not know. Each is then
read through pgveil with psycopg (text and binary results), psycopg's simple protocol, asyncpg, psql
and COPY TO STDOUT: the client gets XX001 naming the table and column, no row data of that reply, and
the session goes on. A tampered row in the middle of a result: the rows before it may arrive (single-row
mode, COPY), none after it. ``pgveil_decrypt_failures_total`` counts the failures.

The module owns enc_tamper and enc_tamper_other; each test uses its own rows.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import encfixtures
import psycopg
import pytest
from conftest import wait_until
from encfixtures import EncEnv, direct_execute, metric_value, next_id, next_ids, run_psql

from keymgmt.envelope import HEADER_LENGTH, TAG_LENGTH
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

PLAINTEXT_A = "tamper-target-value-a"
PLAINTEXT_B = "tamper-other-value-b"
DECRYPT_FAILURES = "pgveil_decrypt_failures_total"


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> EncEnv:
    return encfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


def insert(env: EncEnv, table: str, rows: list[tuple[Any, ...]], columns: str) -> None:
    marks = ", ".join(["%s"] * len(rows[0]))
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        c.cursor().executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)


@dataclass(frozen=True)
class Tamper:
    """Edits row ``id``'s value directly; the read then targets ``table``.``column``."""

    name: str
    table: str
    column: str
    sql: str  # $1 = id (and $2 = bytes, if given)
    arg: Callable[[], bytes] | None = None


FLIP = "UPDATE enc_tamper SET a = set_byte(a, {pos}, get_byte(a, {pos}) # 1) WHERE id = $1"
TAMPERS = [
    Tamper("flip-ciphertext", "enc_tamper", "a", FLIP.format(pos=HEADER_LENGTH + 3)),
    Tamper("flip-nonce", "enc_tamper", "a", FLIP.format(pos=HEADER_LENGTH - 1)),
    Tamper("flip-key-id", "enc_tamper", "a", FLIP.format(pos=5)),
    Tamper(
        "flip-tag",
        "enc_tamper",
        "a",
        "UPDATE enc_tamper SET a = set_byte(a, octet_length(a) - 1, get_byte(a, octet_length(a) - 1) # 128)"
        " WHERE id = $1",
    ),
    Tamper(
        "truncated",
        "enc_tamper",
        "a",
        f"UPDATE enc_tamper SET a = substring(a from 1 for {HEADER_LENGTH + TAG_LENGTH}) WHERE id = $1",
    ),
    Tamper("moved-to-other-column", "enc_tamper", "b", "UPDATE enc_tamper SET b = a WHERE id = $1"),
    Tamper(
        "moved-to-other-table",
        "enc_tamper_other",
        "a",
        "INSERT INTO enc_tamper_other (id, a) SELECT id, a FROM enc_tamper WHERE id = $1",
    ),
    Tamper(
        "unknown-key-id",
        "enc_tamper",
        "a",
        "UPDATE enc_tamper SET a = overlay(a placing $2 from 5 for 16) WHERE id = $1",
        lambda: os.urandom(16),
    ),
]
TAMPER_IDS = [t.name for t in TAMPERS]


def tampered_row(env: EncEnv, t: Tamper) -> int:
    i = next_id()
    insert(env, "enc_tamper", [(i, PLAINTEXT_A, PLAINTEXT_B, "plain")], "id, a, b, plain")
    args: list[Any] = [i] if t.arg is None else [i, t.arg()]
    status = asyncio.run(direct_execute(env, t.sql, *args))
    assert status.endswith(" 1"), status
    return i


def check_error(sqlstate: str | None, message: str, t: Tamper) -> None:
    assert sqlstate == "XX001", (sqlstate, message)
    assert f"public.{t.table}.{t.column}" in message, message
    assert PLAINTEXT_A not in message
    assert PLAINTEXT_B not in message


def wait_for_failures(env: EncEnv, before: float, at_least: int) -> None:
    assert wait_until(lambda: metric_value(env, DECRYPT_FAILURES) >= before + at_least, timeout=10), (
        before,
        metric_value(env, DECRYPT_FAILURES),
    )


# -- one tampered value, every way to read it ----------------------------------------------------------


@pytest.mark.parametrize("t", TAMPERS, ids=TAMPER_IDS)
def test_psycopg_text_binary_and_simple(env: EncEnv, t: Tamper) -> None:
    i = tampered_row(env, t)
    before = metric_value(env, DECRYPT_FAILURES)
    query = f"SELECT id, {t.column}, 'marker' FROM {t.table} WHERE id = %s"
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        for binary in (False, True):
            cur = c.cursor(binary=binary)
            with pytest.raises(psycopg.Error) as info:
                cur.execute(query, [i])
            check_error(info.value.sqlstate, info.value.diag.message_primary or "", t)
            assert c.execute("SELECT plain FROM enc_tamper WHERE id = %s", [i]).fetchone() == ("plain",)
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
        with pytest.raises(psycopg.Error) as info:
            c.execute(query, [i])
        check_error(info.value.sqlstate, info.value.diag.message_primary or "", t)
        assert c.execute("SELECT 1").fetchone() == (1,)
    wait_for_failures(env, before, 3)


@pytest.mark.parametrize("t", TAMPERS, ids=TAMPER_IDS)
async def test_asyncpg(env: EncEnv, t: Tamper) -> None:
    i = await asyncio.to_thread(tampered_row, env, t)
    conn = await asyncpg.connect(env.dsn())
    try:
        for call in (conn.fetch, conn.fetchrow, conn.fetchval):
            fetch: Callable[..., Awaitable[Any]] = call
            with pytest.raises(asyncpg.PostgresError) as info:
                await fetch(f"SELECT {t.column}, id FROM {t.table} WHERE id = $1", i)
            check_error(info.value.sqlstate, str(info.value.args[0]), t)
        assert await conn.fetchval("SELECT plain FROM enc_tamper WHERE id = $1", i) == "plain"
    finally:
        await conn.close()


@pytest.mark.parametrize("t", TAMPERS, ids=TAMPER_IDS)
def test_psql(env: EncEnv, t: Tamper) -> None:
    i = tampered_row(env, t)
    check_psql(env, t, f"SELECT id, {t.column} FROM {t.table} WHERE id = {i};\n", i)


def check_psql(env: EncEnv, t: Tamper, statement: str, i: int) -> None:
    script = statement + f"SELECT 'still here', plain FROM enc_tamper WHERE id = {i};\n"
    p = run_psql(env.dsn(), "-v", "VERBOSITY=verbose", stdin=script, stop_on_error=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith(("ERROR:", "FATAL:"))]
    assert len(errors) == 1, p.stderr
    sqlstate, _, message = errors[0].split(":  ", 1)[1].partition(": ")
    check_error(sqlstate, message, t)
    assert p.stdout.split() == ["still", "here|plain"], (p.stdout, p.stderr)


@pytest.mark.parametrize("t", TAMPERS, ids=TAMPER_IDS)
def test_copy_to_stdout(env: EncEnv, t: Tamper) -> None:
    i = tampered_row(env, t)
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        got: list[bytes] = []
        query = f"COPY (SELECT id, {t.column} FROM {t.table} WHERE id = {i}) TO STDOUT"
        with pytest.raises(psycopg.Error) as info, c.cursor().copy(query) as cp:
            got.extend(bytes(chunk) for chunk in cp)
        check_error(info.value.sqlstate, info.value.diag.message_primary or "", t)
        assert got == []
        assert c.execute("SELECT plain FROM enc_tamper WHERE id = %s", [i]).fetchone() == ("plain",)
    check_psql(env, t, f"COPY (SELECT id, {t.column} FROM {t.table} WHERE id = {i}) TO STDOUT;\n", i)


# -- a tampered row in the middle of a result -------------------------------------------------------------


def rows_with_one_tampered(env: EncEnv) -> tuple[list[int], int]:
    ids = next_ids(7)
    insert(env, "enc_tamper", [(i, f"value {i}", None, f"plain {i}") for i in ids], "id, a, b, plain")
    bad = ids[3]
    asyncio.run(direct_execute(env, FLIP.format(pos=HEADER_LENGTH), bad))
    return ids, bad


def after_stream_error(c: psycopg.Connection[Any], sql: str, params: list[Any]) -> Any:
    """The next statement after an error in stream(). psycopg cancels a stream that ends in an error
    while the connection still looks busy to it (ReadyForQuery not read yet); that CancelRequest can
    reach the server while this statement runs, which is psycopg's doing: it is retried once."""
    try:
        return c.execute(sql, params).fetchone()
    except psycopg.errors.QueryCanceled:
        return c.execute(sql, params).fetchone()


def test_tampered_row_in_the_middle_single_row_mode(env: EncEnv) -> None:
    """psycopg's stream() reads row by row: the rows before the tampered one arrive, none after it."""
    ids, bad = rows_with_one_tampered(env)
    before = metric_value(env, DECRYPT_FAILURES)
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        for binary in (False, True):
            got: list[tuple[Any, ...]] = []
            with pytest.raises(psycopg.Error) as info:  # noqa: PT012 - the error arrives mid-stream
                for row in c.cursor(binary=binary).stream(
                    "SELECT id, a, plain FROM enc_tamper WHERE id = ANY(%s) ORDER BY id", [ids]
                ):
                    got.append(row)
            assert info.value.sqlstate == "XX001"
            assert "public.enc_tamper.a" in str(info.value)
            assert got == [(i, f"value {i}", f"plain {i}") for i in ids if i < bad]
            assert after_stream_error(c, "SELECT count(*) FROM enc_tamper WHERE id = ANY(%s)", [ids]) == (len(ids),)
    wait_for_failures(env, before, 2)


async def test_tampered_row_in_the_middle_whole_result(env: EncEnv) -> None:
    ids, _bad = await asyncio.to_thread(rows_with_one_tampered, env)
    conn = await asyncpg.connect(env.dsn())
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch("SELECT id, a FROM enc_tamper WHERE id = ANY($1::int[]) ORDER BY id", ids)
        assert info.value.sqlstate == "XX001"
        assert await conn.fetchval("SELECT a FROM enc_tamper WHERE id = $1", ids[0]) == f"value {ids[0]}"
    finally:
        await conn.close()
    p = run_psql(env.dsn(), "-c", f"SELECT id, a FROM enc_tamper WHERE id IN ({', '.join(map(str, ids))}) ORDER BY id")
    assert p.returncode != 0
    assert "XX001" in p.stderr or "could not be decrypted" in p.stderr, p.stderr
    assert p.stdout == ""


def test_tampered_row_in_the_middle_of_a_copy(env: EncEnv) -> None:
    """COPY TO STDOUT streams: rows before the tampered one may arrive, none after it, and no ciphertext."""
    ids, bad = rows_with_one_tampered(env)
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        got: list[bytes] = []
        query = f"COPY (SELECT id, a FROM enc_tamper WHERE id IN ({', '.join(map(str, ids))}) ORDER BY id) TO STDOUT"
        with pytest.raises(psycopg.Error) as info, c.cursor().copy(query) as cp:
            got.extend(bytes(chunk) for chunk in cp)
        assert info.value.sqlstate == "XX001"
        assert "public.enc_tamper.a" in str(info.value)
        data = b"".join(got)
        expected = b"".join(b"%d\tvalue %d\n" % (i, i) for i in ids if i < bad)
        assert expected.startswith(data), data
        assert b"\\x5056" not in data
        assert c.execute("SELECT a FROM enc_tamper WHERE id = %s", [ids[-1]]).fetchone() == (f"value {ids[-1]}",)


def test_bytea_output_escape_still_decrypts(env: EncEnv) -> None:
    """A session that sets bytea_output = escape gets the server's envelopes in escape format in simple
    queries; pgveil reads that form too (the value is not reported as tampered)."""
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
        i = next_id()
        c.execute("INSERT INTO enc_tamper (id, a) VALUES (%s, %s)", [i, "escape me"])
        c.execute("SET bytea_output = escape")
        assert c.execute("SELECT a FROM enc_tamper WHERE id = %s", [i]).fetchone() == ("escape me",)
