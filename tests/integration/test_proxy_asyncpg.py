"""asyncpg through the pass-through proxy: prepared statements, binary codecs, COPY, transactions,
cursors, notifications, timeouts (which asyncpg implements with a CancelRequest) and auth errors."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import hashlib
import io
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from conftest import MD5_PASSWORD, PW_PASSWORD, ProxyProcess

pytestmark = pytest.mark.integration

TIMEOUT = 10


async def connect(proxy: ProxyProcess, **kw: Any) -> Any:
    return await asyncpg.connect(proxy.dsn(), timeout=TIMEOUT, command_timeout=60, **kw)


@pytest.fixture
async def conn(proxy: ProxyProcess) -> AsyncIterator[Any]:
    c = await connect(proxy)
    try:
        yield c
    finally:
        await c.close(timeout=TIMEOUT)


async def test_backend_pid(conn: Any) -> None:
    assert conn.get_server_pid() == await conn.fetchval("SELECT pg_backend_pid()")


async def test_prepared_statement_reused(conn: Any) -> None:
    stmt = await conn.prepare("SELECT $1::int8 * 2, $2::text")
    for i in range(200):
        assert tuple(await stmt.fetchrow(i, f"t{i}")) == (i * 2, f"t{i}")
    # The same text through the connection's statement cache is prepared once.
    for i in range(50):
        assert await conn.fetchval("SELECT $1::int4 + 1", i) == i + 1
    names = await conn.fetch("SELECT statement FROM pg_prepared_statements")
    assert sum("$1::int4 + 1" in r["statement"] for r in names) == 1
    assert sum("$1::int8 * 2" in r["statement"] for r in names) == 1
    # Re-preparing after the server dropped everything works too.
    await conn.execute("DEALLOCATE ALL")
    await conn.reload_schema_state()
    assert await conn.fetchval("SELECT $1::int4 + 1", 41) == 42


@pytest.mark.parametrize(
    ("type_name", "value"),
    [
        ("int2", -32768),
        ("int2", 32767),
        ("int4", 2147483647),
        ("int4", -2147483648),
        ("int8", -9223372036854775808),
        ("int8", 9223372036854775807),
        ("numeric", decimal.Decimal("NaN")),
        ("numeric", decimal.Decimal("123456789012345678901234567890123456789.000000000000000000001")),
        ("numeric", decimal.Decimal("-0.000000000000000000000000001")),
        ("numeric", decimal.Decimal("1E+100")),
        ("timestamptz", datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)),
        ("timestamptz", datetime.datetime(2038, 1, 19, 3, 14, 8, 999999, tzinfo=datetime.UTC)),
        ("timestamptz", datetime.datetime(1899, 12, 31, 23, 59, 59, 1, tzinfo=datetime.UTC)),
        ("uuid", uuid.UUID("00000000-0000-0000-0000-000000000000")),
        ("uuid", uuid.uuid4()),
        ("int4[]", [1, None, -3, 2147483647]),
        ("int4[]", []),
        ("text[]", ["a", "", None, 'quote " and \\ backslash', "é☃"]),
    ],
)
async def test_binary_codecs_round_trip(conn: Any, type_name: str, value: Any) -> None:
    got = await conn.fetchval(f"SELECT $1::{type_name}", value)
    if isinstance(value, decimal.Decimal) and value.is_nan():
        assert got.is_nan()
    else:
        assert got == value
    # And the server agrees on what it received (its text form, computed server-side).
    text = await conn.fetchval(f"SELECT $1::{type_name}::text", value)
    assert text is not None


async def test_jsonb_and_codec(conn: Any) -> None:
    doc = {"name": "é☃", "list": [1, 2.5, None, True], "nested": {"k": "v"}}
    got = await conn.fetchval("SELECT $1::jsonb", json.dumps(doc))
    assert json.loads(got) == doc
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    assert await conn.fetchval("SELECT $1::jsonb -> 'nested'", doc) == {"k": "v"}


async def test_bytea_one_megabyte(conn: Any) -> None:
    data = os.urandom(1 << 20)
    got = await conn.fetchval("SELECT $1::bytea", data)
    assert got == data
    assert await conn.fetchval("SELECT md5($1::bytea)", data) == hashlib.md5(data).hexdigest()
    await conn.execute("CREATE TEMP TABLE blobs (b bytea)")
    await conn.executemany("INSERT INTO blobs VALUES ($1)", [(data,), (data[::-1],)])
    rows = await conn.fetch("SELECT b FROM blobs")
    assert sorted(r["b"] for r in rows) == sorted([data, data[::-1]])


async def test_copy_records_and_copy_from_query(conn: Any) -> None:
    await conn.execute("CREATE TEMP TABLE cr (id int, name text, at timestamptz, tags text[])")
    at = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    records = [(i, f"name\t{i}", at, [f"t{i}", None]) for i in range(20000)]
    result = await conn.copy_records_to_table("cr", records=records)
    assert result == "COPY 20000"
    assert await conn.fetchval("SELECT sum(id) FROM cr") == sum(range(20000))

    buf = io.BytesIO()
    result = await conn.copy_from_query("SELECT id, name FROM cr WHERE id < $1 ORDER BY id", 1000, output=buf)
    assert result == "COPY 1000"
    lines = buf.getvalue().decode().splitlines()
    assert len(lines) == 1000
    assert lines[5] == "5\tname\\t5"

    chunks: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        chunks.append(chunk)

    await conn.copy_from_query("SELECT * FROM cr", output=sink, format="csv")
    assert b"".join(chunks).count(b"\n") == 20000


async def test_transactions_commit_rollback_savepoint(conn: Any) -> None:
    await conn.execute("CREATE TEMP TABLE tx (v int)")
    async with conn.transaction():
        await conn.execute("INSERT INTO tx VALUES (1)")

    async def insert_then_fail() -> None:
        async with conn.transaction():
            await conn.execute("INSERT INTO tx VALUES (2)")
            raise RuntimeError("boom")

    async def savepoint_that_fails() -> None:
        async with conn.transaction():  # nested: a savepoint
            await conn.execute("INSERT INTO tx VALUES (4)")
            await conn.execute("CREATE TEMP TABLE tx_dup (k int PRIMARY KEY); INSERT INTO tx_dup VALUES (1), (1)")

    with pytest.raises(RuntimeError, match="boom"):
        await insert_then_fail()
    async with conn.transaction():
        await conn.execute("INSERT INTO tx VALUES (3)")
        with pytest.raises(asyncpg.UniqueViolationError):
            await savepoint_that_fails()
        await conn.execute("INSERT INTO tx VALUES (5)")
    assert [r["v"] for r in await conn.fetch("SELECT v FROM tx ORDER BY v")] == [1, 3, 5]
    assert not conn.is_in_transaction()

    tr = conn.transaction(isolation="serializable", readonly=True)
    await tr.start()
    assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await conn.execute("CREATE TABLE tx_read_only (a int)")  # temp tables stay writable
    await tr.rollback()
    assert await conn.fetchval("SELECT count(*) FROM tx") == 3


async def test_cursors(conn: Any) -> None:
    async with conn.transaction():
        cur = await conn.cursor("SELECT g FROM generate_series(1, 1000) g WHERE g > $1", 100)
        first = await cur.fetch(10)
        assert [r["g"] for r in first] == list(range(101, 111))
        await cur.forward(100)
        assert await cur.fetchrow() == (211,)
        rest = await cur.fetch(10000)
        assert len(rest) == 1000 - 211

        total = 0
        async for record in conn.cursor("SELECT g FROM generate_series(1, 5000) g", prefetch=333):
            total += record["g"]
        assert total == 5000 * 5001 // 2


async def test_add_listener(proxy: ProxyProcess, conn: Any) -> None:
    received: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()

    def on_notify(_conn: Any, pid: int, channel: str, payload: str) -> None:
        received.put_nowait((pid, channel, payload))

    await conn.add_listener("pgveil_async", on_notify)
    notifier = await connect(proxy)
    try:
        await notifier.execute("NOTIFY pgveil_async, 'one'")
        await notifier.fetchval("SELECT pg_notify('pgveil_async', $1)", "two")
        got = [await asyncio.wait_for(received.get(), TIMEOUT) for _ in range(2)]
        pid = notifier.get_server_pid()
        assert pid == await notifier.fetchval("SELECT pg_backend_pid()")
        assert got == [(pid, "pgveil_async", "one"), (pid, "pgveil_async", "two")]
    finally:
        await notifier.close(timeout=TIMEOUT)
    await conn.remove_listener("pgveil_async", on_notify)
    assert await conn.fetchval("SELECT 1") == 1


async def test_timeout_cancels_through_proxy(conn: Any) -> None:
    # asyncpg enforces `timeout` by sending a CancelRequest, which the proxy forwards to the server.
    with pytest.raises(asyncio.TimeoutError):
        await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
    assert await asyncio.wait_for(conn.fetchval("SELECT 'usable'"), TIMEOUT) == "usable"


@pytest.mark.parametrize(("user", "password"), [("app", None), ("md5user", MD5_PASSWORD), ("pwuser", PW_PASSWORD)])
async def test_auth_methods(proxy: ProxyProcess, user: str, password: str | None) -> None:
    dsn = proxy.dsn() if password is None else proxy.dsn(user=user, password=password)
    c = await asyncpg.connect(dsn, timeout=TIMEOUT)
    try:
        assert await c.fetchval("SELECT current_user") == user
    finally:
        await c.close(timeout=TIMEOUT)


@pytest.mark.parametrize("user", ["app", "md5user", "pwuser"])
async def test_wrong_password_is_28p01(proxy: ProxyProcess, user: str) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as exc:
        await asyncpg.connect(proxy.dsn(user=user, password="wrong"), timeout=TIMEOUT)
    assert exc.value.sqlstate == "28P01"
    assert f'password authentication failed for user "{user}"' in str(exc.value)


async def test_server_errors_carry_their_fields(conn: Any) -> None:
    with pytest.raises(asyncpg.DivisionByZeroError) as exc:
        await conn.fetchval("SELECT 1 / $1::int", 0)
    assert exc.value.sqlstate == "22012"
    with pytest.raises(asyncpg.UndefinedTableError) as exc2:
        await conn.fetch("SELECT * FROM no_such_table_here")
    assert exc2.value.sqlstate == "42P01"
    assert exc2.value.position == "15"
    assert await conn.fetchval("SELECT 'fine'") == "fine"
