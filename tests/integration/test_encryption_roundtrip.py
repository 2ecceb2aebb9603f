"""Round trips through pgveil's transparent encryption, against real PostgreSQL 15 and real drivers.

Every declared type goes in and comes back through psycopg (server-side binding in text and in binary,
and client-side binding, which is the simple protocol with literals), asyncpg (binary, prepared) and
psql (simple protocol), with NULL, empty values, unicode, 1 MB values and the extremes of each numeric
type. What is stored is checked behind the proxy's back: only envelopes, and the same canonical
plaintext whichever format the value was sent in. Then the statement shapes an application uses on a
protected table: RETURNING, UPDATE, ON CONFLICT, DELETE, SELECT * and aliases, joins on plain columns,
CTEs and subqueries, IS NULL, typed literals; pipelines and prepared statements reused thousands of
times.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import encfixtures
import psycopg
import pytest
from encfixtures import TYPES, EncEnv, direct_fetch, next_id, next_ids, open_stored, run_psql, type_table
from psycopg.types.json import Json, Jsonb

from keymgmt.envelope import is_envelope
from proxy.config import parse_config
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

D = decimal.Decimal
UTC = datetime.UTC
MB = 1 << 20
BIG_TEXT = "€☃é-" * (MB // 8)  # about 1 MB of UTF-8, multi-byte characters throughout
BIG_BYTES = os.urandom(MB)
BIG_JSON = {"k": ["x" * 1000] * 1000, "é": None}


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> EncEnv:
    return encfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture
def conn(env: EncEnv) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        yield c


def f32(x: float) -> float:
    """What a float4 column gives back for ``x``."""
    return float(struct.unpack("!f", struct.pack("!f", x))[0])


# Values a driver sends and gets back, per type suffix (see encfixtures.TYPES). JSON values are Python
# objects here; each driver wraps them its own way.
VALUES: dict[str, list[Any]] = {
    "text": [None, "", "plain ascii", "unicode é ☃ 𝄞 中文 עברית", "quote ' dq \" back\\slash\ttab\nnewline", BIG_TEXT],
    "varchar": [None, "", "exactly twenty chars", "é" * 20, "trailing spaces   "],
    "char": [None, "", "ab", "abcde", "é☃ab"],
    "int2": [None, -32768, 32767, 0, -1],
    "int4": [None, -2147483648, 2147483647, 0, 7],
    "int8": [None, -(2**63), 2**63 - 1, 0, 70000],
    "numeric": [
        None,
        D("0"),
        D("-12345678901234567890.000000000001"),
        D("1.50"),
        D("NaN"),
        D("Infinity"),
        D("-Infinity"),
        D("9" * 1000 + "." + "9" * 1000),
        D("1E-1000"),
    ],
    "num102": [None, D("99999999.99"), D("-99999999.99"), D("0.00"), D("1.005"), D("-1.005"), D("3")],
    "float4": [
        None,
        0.0,
        -0.0,
        3.4028234663852886e38,
        -3.4028234663852886e38,
        1.401298464324817e-45,
        1.1754943508222875e-38,
        math.inf,
        -math.inf,
        math.nan,
        0.5,
    ],
    "float8": [
        None,
        0.0,
        -0.0,
        1.7976931348623157e308,
        -1.7976931348623157e308,
        5e-324,
        2.2250738585072014e-308,
        math.inf,
        -math.inf,
        math.nan,
        0.1,
    ],
    "bool": [None, True, False],
    "date": [None, datetime.date.min, datetime.date.max, datetime.date(2000, 2, 29), datetime.date(1970, 1, 1)],
    "ts": [
        None,
        datetime.datetime.min,
        datetime.datetime.max,
        datetime.datetime(2024, 2, 29, 12, 30, 15, 123456),
        datetime.datetime(1999, 12, 31, 23, 59, 59),
    ],
    "tstz": [
        None,
        datetime.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=UTC),
        datetime.datetime(1900, 6, 1, 8, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
        datetime.datetime(1, 1, 2, tzinfo=UTC),
        datetime.datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
    ],
    "uuid": [None, uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")],
    "json": [None, {"a": [1, 2, {"b": None}], "é": "☃"}, [], "string", 1.5, BIG_JSON],
    "jsonb": [None, {"a": [1, 2, {"b": None}], "é": "☃"}, [], "string", 1.5, BIG_JSON],
    "bytea": [None, b"", bytes(range(256)), BIG_BYTES],
}


def expected(suffix: str, sent: Any) -> Any:
    """What PostgreSQL gives back for ``sent`` in a column of this type."""
    if sent is None:
        return None
    if suffix == "char":
        return sent.ljust(5)
    if suffix == "num102":
        return sent.quantize(D("0.01"), rounding=decimal.ROUND_HALF_UP)
    if suffix == "float4":
        return f32(sent)
    return sent


def same(suffix: str, want: Any, got: Any, *, json_text: bool = False) -> bool:
    if want is None or got is None:
        return want is got
    if suffix in ("json", "jsonb") and json_text:
        return bool(json.loads(got) == want)
    if suffix == "float4" and isinstance(got, float) and not math.isnan(got):
        got = f32(got)  # a text float4 ("3.4028235e+38") is parsed by the driver as a double
    if isinstance(want, float):
        if math.isnan(want):
            return isinstance(got, float) and math.isnan(got)
        return bool(got == want and math.copysign(1, got) == math.copysign(1, want))
    if isinstance(want, D):
        if want.is_nan():
            return isinstance(got, D) and got.is_nan()
        return bool(got == want and str(got) == str(want))
    return bool(got == want)


def for_psycopg(suffix: str, value: Any) -> Any:
    if value is None:
        return None
    if suffix == "json":
        return Json(value)
    if suffix == "jsonb":
        return Jsonb(value)
    return value


def for_asyncpg(suffix: str, value: Any) -> Any:
    if value is not None and suffix in ("json", "jsonb"):
        return json.dumps(value)
    return value


def check_rows(suffix: str, sent: list[Any], got: list[Any], *, json_text: bool = False) -> None:
    assert len(got) == len(sent)
    for s, g in zip(sent, got, strict=True):
        want = expected(suffix, s)
        assert same(suffix, want, g, json_text=json_text), f"{suffix}: sent {str(s)[:80]!r}, got {str(g)[:80]!r}"


SUFFIXES = [s for s, _ in TYPES]


def test_short_type_names_are_accepted_in_the_configuration() -> None:
    """config/pgveil.example.yaml documents int2, int4, int8, float4 and float8 as declared types."""
    tables = {
        f"public.t_{n}": {"columns": {"v": {"type": n, "encrypt": True}}}
        for n in ("int2", "int4", "int8", "float4", "float8")
    }
    catalog = parse_config({"tables": tables}, base_dir=Path.cwd(), environ={}).catalog()
    assert sorted(t.columns["v"].declared_type for t in catalog.tables.values()) == [
        "float4",
        "float8",
        "int2",
        "int4",
        "int8",
    ]


# -- every type, every driver --------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_psycopg_round_trip(conn: psycopg.Connection[Any], suffix: str, binary: bool) -> None:
    table = type_table(suffix)
    sent = VALUES[suffix]
    ids = next_ids(len(sent))
    with conn.cursor(binary=binary) as cur:
        for i, v in zip(ids, sent, strict=True):
            cur.execute(f"INSERT INTO {table} (id, v) VALUES (%s, %s)", [i, for_psycopg(suffix, v)])
        cur.execute(f"SELECT v FROM {table} WHERE id = ANY(%s) ORDER BY id", [ids])
        assert cur.pgresult is not None
        assert cur.pgresult.fformat(0) == int(binary)
        check_rows(suffix, sent, [r[0] for r in cur.fetchall()])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_psycopg_client_side_binding_round_trip(env: EncEnv, suffix: str) -> None:
    """psycopg's ClientCursor sends literals in a simple Query: typed literals, E'' strings, negatives."""
    table = type_table(suffix)
    sent = VALUES[suffix]
    ids = next_ids(len(sent))
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
        cur = c.cursor()
        for i, v in zip(ids, sent, strict=True):
            cur.execute(f"INSERT INTO {table} (id, v) VALUES (%s, %s)", [i, for_psycopg(suffix, v)])
        cur.execute(f"SELECT v FROM {table} WHERE id = ANY(%s) ORDER BY id", [ids])
        check_rows(suffix, sent, [r[0] for r in cur.fetchall()])


@pytest.mark.parametrize("suffix", SUFFIXES)
async def test_asyncpg_round_trip(env: EncEnv, suffix: str) -> None:
    table = type_table(suffix)
    sent = VALUES[suffix]
    ids = next_ids(len(sent))
    conn = await asyncpg.connect(env.dsn())
    try:
        for i, v in zip(ids, sent, strict=True):
            await conn.execute(f"INSERT INTO {table} (id, v) VALUES ($1, $2)", i, for_asyncpg(suffix, v))
        rows = await conn.fetch(f"SELECT v FROM {table} WHERE id = ANY($1::int[]) ORDER BY id", ids)
        check_rows(suffix, sent, [r["v"] for r in rows], json_text=True)
        # The statement as the client sees it: the declared types, not bytea.
        stmt = await conn.prepare(f"SELECT id, v FROM {table} WHERE id = $1")
        assert [a.type.oid for a in stmt.get_attributes()] == [23, _DECLARED_OID[suffix]]
        ins = await conn.prepare(f"INSERT INTO {table} (id, v) VALUES ($1, $2)")
        assert [t.oid for t in ins.get_parameters()] == [23, _DECLARED_OID[suffix]]
    finally:
        await conn.close()


_DECLARED_OID = {
    "text": 25, "varchar": 1043, "char": 1042, "int2": 21, "int4": 23, "int8": 20, "numeric": 1700,
    "num102": 1700, "float4": 700, "float8": 701, "bool": 16, "date": 1082, "ts": 1114, "tstz": 1184,
    "uuid": 2950, "json": 114, "jsonb": 3802, "bytea": 17,
}  # fmt: skip


@dataclass(frozen=True)
class Lit:
    sql: str  # the literal as written in a simple query
    out: str  # what psql prints for it (unaligned, NULL shown as <NULL>)


PSQL_LITERALS: dict[str, list[Lit]] = {
    "text": [
        Lit("NULL", "<NULL>"),
        Lit("''", ""),
        Lit("'it''s'", "it's"),
        Lit("E'tab\\there\\\\'", "tab\there\\"),
        Lit("'é ☃ 𝄞 中文'", "é ☃ 𝄞 中文"),
        Lit("U&'\\00e9t\\00e9'", "été"),
        Lit("$$dollar 'quoted'$$", "dollar 'quoted'"),
        Lit("'" + BIG_TEXT + "'", BIG_TEXT),
    ],
    "varchar": [Lit("'abc'", "abc"), Lit("''", ""), Lit("'exactly twenty chars'", "exactly twenty chars")],
    "char": [Lit("'ab'", "ab   "), Lit("''", "     "), Lit("'abcde'", "abcde")],
    "int2": [
        Lit("-32768", "-32768"),
        Lit("32767", "32767"),
        Lit("'12'::int2", "12"),
        Lit("CAST('-5' AS smallint)", "-5"),
    ],
    "int4": [Lit("-2147483648", "-2147483648"), Lit("2147483647", "2147483647"), Lit("- 7", "-7")],
    "int8": [Lit("-9223372036854775808", "-9223372036854775808"), Lit("9223372036854775807", "9223372036854775807")],
    "numeric": [
        Lit("12345678901234567890.000000000001", "12345678901234567890.000000000001"),
        Lit("-0.5", "-0.5"),
        Lit("1.50", "1.50"),
        Lit("1e3", "1000"),
        Lit("'NaN'", "NaN"),
        Lit("'-Infinity'::numeric", "-Infinity"),
    ],
    "num102": [Lit("1.005", "1.01"), Lit("-99999999.99", "-99999999.99"), Lit("3", "3.00")],
    "float4": [
        Lit("3.4028235e38", "3.4028235e+38"),
        Lit("'-Infinity'", "-Infinity"),
        Lit("'NaN'::real", "NaN"),
        Lit("0.1", "0.1"),
        Lit("'-0'", "-0"),
        Lit("1.4e-45", "1e-45"),
    ],
    "float8": [
        Lit("1.7976931348623157e308", "1.7976931348623157e+308"),
        Lit("5e-324", "5e-324"),
        Lit("-0.1", "-0.1"),
        Lit("'Infinity'::float8", "Infinity"),
    ],
    "bool": [Lit("true", "t"), Lit("false", "f"), Lit("'yes'", "t"), Lit("'off'::boolean", "f")],
    "date": [
        Lit("'2020-01-01'::date", "2020-01-01"),
        Lit("DATE '1999-12-31'", "1999-12-31"),
        Lit("'infinity'", "infinity"),
        Lit("'-infinity'::date", "-infinity"),
        Lit("'4713-01-01 BC'", "4713-01-01 BC"),
        Lit("'5874897-12-31'", "5874897-12-31"),
    ],
    "ts": [
        Lit("'2024-02-29 12:30:15.123456'", "2024-02-29 12:30:15.123456"),
        Lit("TIMESTAMP '294276-12-31 23:59:59.999999'", "294276-12-31 23:59:59.999999"),
        Lit("'infinity'::timestamp", "infinity"),
        Lit("'4713-01-01 00:00:00 BC'", "4713-01-01 00:00:00 BC"),
    ],
    "tstz": [
        Lit("'2024-02-29 12:30:15.123456+00'", "2024-02-29 12:30:15.123456+00"),
        Lit("'2024-06-01 00:00:00-07'::timestamptz", "2024-06-01 07:00:00+00"),
        Lit("TIMESTAMPTZ '2000-01-01 00:00:00+05:30'", "1999-12-31 18:30:00+00"),
    ],
    "uuid": [
        Lit("'00000000-0000-0000-0000-000000000000'", "00000000-0000-0000-0000-000000000000"),
        Lit("'{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}'::uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ],
    "json": [Lit('\'{"b": 1,  "a": [1, 2]}\'', '{"b": 1,  "a": [1, 2]}'), Lit("'[]'::json", "[]")],
    "jsonb": [Lit('\'{"b": 1,  "a": [1, 2]}\'', '{"a": [1, 2], "b": 1}'), Lit("'\"é\"'::jsonb", '"é"')],
    "bytea": [
        Lit("'\\x00ff'::bytea", "\\x00ff"),
        Lit("E'\\\\x4142'", "\\x4142"),
        Lit("''", "\\x"),
        Lit("'abc'", "\\x616263"),
    ],
}


def psql_rows(out: str) -> list[str]:
    """Records of ``psql -A -t -0`` output (NUL-separated, so values may contain newlines)."""
    records = out.split("\0")
    if records and records[-1] in ("", "\n"):
        records.pop()
    return [r.removesuffix("\n") if i == len(records) - 1 else r for i, r in enumerate(records)]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_psql_round_trip(env: EncEnv, suffix: str) -> None:
    table = type_table(suffix)
    lits = PSQL_LITERALS[suffix]
    ids = next_ids(len(lits))
    inserts = "\n".join(
        f"INSERT INTO {table} (id, v) VALUES ({i}, {lit.sql});" for i, lit in zip(ids, lits, strict=True)
    )
    script = (
        "\\pset null <NULL>\nSET timezone = 'UTC';\n"
        + inserts
        + f"\nSELECT v FROM {table} WHERE id IN ({', '.join(map(str, ids))}) ORDER BY id;\n"
    )
    r = run_psql(env.dsn(), "-0", stdin=script)
    assert r.returncode == 0, r.stderr[:2000]
    assert psql_rows(r.stdout) == [lit.out for lit in lits]


# -- what is stored --------------------------------------------------------------------------------------


# asyncpg sends date.min/max and datetime.min/max as -infinity/infinity, by design.
_ASYNCPG_INFINITIES = (datetime.date.min, datetime.date.max, datetime.datetime.min, datetime.datetime.max)


@pytest.mark.parametrize("suffix", SUFFIXES)
async def test_text_and_binary_store_the_same_plaintext(env: EncEnv, suffix: str) -> None:
    """A value sent in text, in binary (psycopg), by asyncpg and as a literal is normalised to one
    canonical form before encryption: decrypting what is stored gives identical bytes."""
    table = type_table(suffix)
    values = [v for v in VALUES[suffix] if v is not None and v not in _ASYNCPG_INFINITIES]
    ids = {mode: next_ids(len(values)) for mode in ("text", "binary", "literal", "asyncpg")}
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        for mode in ("text", "binary"):
            with c.cursor(binary=mode == "binary") as cur:
                for i, v in zip(ids[mode], values, strict=True):
                    cur.execute(f"INSERT INTO {table} (id, v) VALUES (%s, %s)", [i, for_psycopg(suffix, v)])
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
        for i, v in zip(ids["literal"], values, strict=True):
            c.execute(f"INSERT INTO {table} (id, v) VALUES (%s, %s)", [i, for_psycopg(suffix, v)])
    a = await asyncpg.connect(env.dsn())
    try:
        await a.executemany(
            f"INSERT INTO {table} (id, v) VALUES ($1, $2)",
            [(i, for_asyncpg(suffix, v)) for i, v in zip(ids["asyncpg"], values, strict=True)],
        )
    finally:
        await a.close()

    plaintexts: dict[str, list[bytes]] = {}
    for mode, mode_ids in ids.items():
        rows = await direct_fetch(env, f"SELECT v FROM {table} WHERE id = ANY($1::int[]) ORDER BY id", mode_ids)
        envelopes = [bytes(r["v"]) for r in rows]
        assert len(envelopes) == len(values)
        assert all(is_envelope(e) for e in envelopes)
        assert len(set(envelopes)) == len(envelopes)  # a fresh nonce per value
        plaintexts[mode] = await open_stored(env, f"public.{table}.v", envelopes)
    assert plaintexts["binary"] == plaintexts["text"], suffix
    assert plaintexts["literal"] == plaintexts["text"], suffix
    assert plaintexts["asyncpg"] == plaintexts["text"], suffix


async def test_direct_reads_show_only_envelopes(env: EncEnv) -> None:
    """Behind the proxy every protected column is bytea holding envelopes, and no plaintext is in them."""
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        i = next_id()
        c.execute("INSERT INTO enc_rt_text (id, v) VALUES (%s, %s)", [i, "visible-only-through-pgveil"])
        assert c.execute("SELECT v FROM enc_rt_text WHERE id = %s", [i]).fetchone() == ("visible-only-through-pgveil",)
    types = await direct_fetch(
        env,
        "SELECT c.relname, format_type(a.atttypid, a.atttypmod) AS t FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid WHERE c.relname LIKE 'enc\\_rt\\_%' AND a.attname = 'v'",
    )
    assert len(types) == len(TYPES)
    assert {r["t"] for r in types} == {"bytea"}
    for suffix, _declared in TYPES:
        rows = await direct_fetch(env, f"SELECT v FROM {type_table(suffix)} WHERE v IS NOT NULL")
        for r in rows:
            assert is_envelope(bytes(r["v"])), suffix
    row = await direct_fetch(env, "SELECT v FROM enc_rt_text WHERE id = $1", i)
    assert b"visible-only" not in bytes(row[0]["v"])


def test_values_out_of_range_fail_like_postgresql(conn: psycopg.Connection[Any]) -> None:
    """A value the declared type cannot hold is rejected with the SQLSTATE PostgreSQL would give, and
    the session goes on."""
    cases = [
        ("int2", 32768, "22003"),
        ("int4", 2**31, "22003"),
        ("varchar", "twenty-one characters", "22001"),
        ("char", "abcdef", "22001"),
        ("num102", D("100000000.00"), "22003"),
        ("date", "not a date", "22007"),
        ("uuid", "not-a-uuid", "22P02"),
        ("jsonb", "{not json", "22P02"),
    ]
    for suffix, value, sqlstate in cases:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(
                f"INSERT INTO {type_table(suffix)} (id, v) VALUES (%s, %s)",
                [next_id(), value],
            )
        assert info.value.sqlstate == sqlstate, (suffix, info.value.sqlstate, str(info.value))
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- statement shapes --------------------------------------------------------------------------------------


def test_insert_returning_update_delete(conn: psycopg.Connection[Any]) -> None:
    i, j = next_ids(2)
    row = conn.execute(
        "INSERT INTO enc_people (id, name, email, note, born) VALUES (%s, %s, %s, %s, %s)"
        " RETURNING id, email, note AS n, born",
        [i, "Ada", "ada@example.com", None, datetime.date(1815, 12, 10)],
    ).fetchone()
    assert row == (i, "ada@example.com", None, datetime.date(1815, 12, 10))
    row = conn.execute(
        "INSERT INTO enc_people VALUES (%s, 'Alan', 'alan@example.org', E'line1\\nline2', '1912-06-23') RETURNING *",
        [j],
    ).fetchone()
    assert row == (j, "Alan", "alan@example.org", "line1\nline2", datetime.date(1912, 6, 23))

    row = conn.execute(
        "UPDATE enc_people SET email = %s, note = 'literal note' WHERE id = %s RETURNING email, note",
        ["ada@new.example", i],
    ).fetchone()
    assert row == ("ada@new.example", "literal note")
    conn.execute("UPDATE enc_people SET born = DATE '1815-12-11', note = NULL WHERE id = %s", [i])
    assert conn.execute("SELECT born, note FROM enc_people WHERE id = %s", [i]).fetchone() == (
        datetime.date(1815, 12, 11),
        None,
    )
    row = conn.execute("DELETE FROM enc_people WHERE id = %s RETURNING email, note, born", [j]).fetchone()
    assert row == ("alan@example.org", "line1\nline2", datetime.date(1912, 6, 23))
    assert conn.execute("SELECT count(*) FROM enc_people WHERE id = %s", [j]).fetchone() == (0,)


def test_multi_row_values_and_on_conflict(conn: psycopg.Connection[Any]) -> None:
    i, j = next_ids(2)
    conn.execute(
        "INSERT INTO enc_people (id, name, email) VALUES (%s, 'a', %s), (%s, 'b', 'b@example.com')",
        [i, "a@example.com", j],
    )
    row = conn.execute(
        "INSERT INTO enc_people AS p (id, name, email, note) VALUES (%s, 'a2', %s, 'upserted')"
        " ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, note = EXCLUDED.note, name = EXCLUDED.name"
        " RETURNING p.name, p.email, p.note",
        [i, "a2@example.com"],
    ).fetchone()
    assert row == ("a2", "a2@example.com", "upserted")
    conn.execute(
        "INSERT INTO enc_people (id, email) VALUES (%s, 'ignored@example.com') ON CONFLICT (id) DO NOTHING", [j]
    )
    conn.execute(
        "INSERT INTO enc_people (id, email) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET email = %s",
        [j, "unused@example.com", "b2@example.com"],
    )
    rows = conn.execute("SELECT id, email FROM enc_people WHERE id IN (%s, %s) ORDER BY id", [i, j]).fetchall()
    assert rows == [(i, "a2@example.com"), (j, "b2@example.com")]


def test_select_star_aliases_joins_cte_subquery(conn: psycopg.Connection[Any]) -> None:
    pid, oid1, oid2 = next_ids(3)
    conn.execute(
        "INSERT INTO enc_people (id, name, email, note, born) VALUES (%s, 'Grace', %s, NULL, %s)",
        [pid, "grace@example.net", datetime.date(1906, 12, 9)],
    )
    conn.execute(
        "INSERT INTO enc_orders (id, person_id, item, secret) VALUES (%s, %s, 'book', %s), (%s, %s, 'pen', %s)",
        [oid1, pid, "s1", oid2, pid, "s2"],
    )
    assert conn.execute("SELECT * FROM enc_people WHERE id = %s", [pid]).fetchone() == (
        pid,
        "Grace",
        "grace@example.net",
        None,
        datetime.date(1906, 12, 9),
    )
    assert conn.execute("SELECT p.email AS mail, p.* FROM enc_people p WHERE p.id = %s", [pid]).fetchone() == (
        "grace@example.net",
        pid,
        "Grace",
        "grace@example.net",
        None,
        datetime.date(1906, 12, 9),
    )
    rows = conn.execute(
        "SELECT p.email, o.secret, o.item FROM enc_people p JOIN enc_orders o ON o.person_id = p.id"
        " WHERE p.id = %s ORDER BY o.id",
        [pid],
    ).fetchall()
    assert rows == [("grace@example.net", "s1", "book"), ("grace@example.net", "s2", "pen")]
    rows = conn.execute(
        "SELECT o.secret, p.email FROM enc_orders o LEFT JOIN enc_people p USING (id) WHERE o.id = %s", [oid1]
    ).fetchall()
    assert rows == [("s1", None)]
    rows = conn.execute(
        "WITH mine AS (SELECT id, email, born FROM enc_people WHERE id = %s)"
        " SELECT m.email, x.secret FROM mine m, (SELECT id, secret, person_id FROM enc_orders) x"
        " WHERE x.person_id = m.id ORDER BY x.id",
        [pid],
    ).fetchall()
    assert rows == [("grace@example.net", "s1"), ("grace@example.net", "s2")]
    row = conn.execute(
        "SELECT e.email, (SELECT count(*) FROM enc_orders WHERE person_id = e.id) AS n"
        " FROM (SELECT * FROM enc_people) e WHERE e.id = %s",
        [pid],
    ).fetchone()
    assert row == ("grace@example.net", 2)


def test_is_null_on_a_protected_column(conn: psycopg.Connection[Any]) -> None:
    i, j = next_ids(2)
    conn.execute("INSERT INTO enc_people (id, email, note) VALUES (%s, NULL, 'n'), (%s, 'x@example.com', NULL)", [i, j])
    assert conn.execute("SELECT id FROM enc_people WHERE id IN (%s, %s) AND email IS NULL", [i, j]).fetchall() == [(i,)]
    assert conn.execute(
        "SELECT id, email FROM enc_people WHERE id IN (%s, %s) AND note IS NULL AND email IS NOT NULL", [i, j]
    ).fetchall() == [(j, "x@example.com")]


def test_timezone_of_the_session_is_honoured(env: EncEnv) -> None:
    """timestamptz comes back in the session's TimeZone, as PostgreSQL would print it."""
    i = next_id()
    r = run_psql(
        env.dsn(),
        "-c", f"INSERT INTO enc_rt_tstz (id, v) VALUES ({i}, '2024-01-15 12:00:00+00')",
        "-c", "SET timezone = 'America/New_York'",
        "-c", "SET datestyle = 'ISO, DMY'",
        "-c", f"SELECT v FROM enc_rt_tstz WHERE id = {i}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2024-01-15", "07:00:00-05"]


def test_typed_literal_of_another_type_is_stored_as_postgresql_would(conn: psycopg.Connection[Any]) -> None:
    """``DATE '2020-1-1'`` into a text column: PostgreSQL stores the date's output, '2020-01-01'. The
    proxy must store the same, or refuse the cast; storing the raw literal text would differ."""
    i = next_id()
    try:
        conn.execute(f"INSERT INTO enc_rt_text (id, v) VALUES ({i}, DATE '2020-1-1')")
        conn.execute(f"INSERT INTO enc_rt_numeric (id, v) VALUES ({i}, 1.7::int)")
    except psycopg.errors.FeatureNotSupported:
        return
    assert conn.execute("SELECT v FROM enc_rt_text WHERE id = %s", [i]).fetchone() == ("2020-01-01",)
    assert conn.execute("SELECT v FROM enc_rt_numeric WHERE id = %s", [i]).fetchone() == (D("2"),)


# -- prepared and pipelined ----------------------------------------------------------------------------------


def test_psycopg_prepared_statement_reused_thousands_of_times(env: EncEnv) -> None:
    base = next_ids(3000)
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True, prepare_threshold=0) as c:
        with c.transaction():
            for n, i in enumerate(base):
                c.execute(
                    "INSERT INTO enc_people (id, email, born) VALUES (%s, %s, %s)",
                    [i, f"user{n}@example.com", datetime.date(2000, 1, 1) + datetime.timedelta(days=n)],
                    prepare=True,
                )
        for n, i in enumerate(base):
            row = c.execute("SELECT email, born FROM enc_people WHERE id = %s", [i], prepare=True).fetchone()
            assert row == (f"user{n}@example.com", datetime.date(2000, 1, 1) + datetime.timedelta(days=n))


def test_psycopg_pipeline(env: EncEnv) -> None:
    ids = next_ids(2000)
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        with c.pipeline():
            with c.cursor(binary=True) as cur:
                cur.executemany(
                    "INSERT INTO enc_people (id, email, note) VALUES (%s, %s, %s)",
                    [(i, f"p{i}@example.com", None if i % 3 else f"note {i}") for i in ids],
                )
            cursors = [c.execute("SELECT id, email, note FROM enc_people WHERE id = %s", [i]) for i in ids[:200]]
        for i, cur in zip(ids[:200], cursors, strict=True):
            assert cur.fetchone() == (i, f"p{i}@example.com", None if i % 3 else f"note {i}")
        rows = c.execute(
            "SELECT id, email FROM enc_people WHERE id BETWEEN %s AND %s ORDER BY id", [ids[0], ids[-1]]
        ).fetchall()
    assert rows == [(i, f"p{i}@example.com") for i in ids]


async def test_asyncpg_prepared_and_executemany(env: EncEnv) -> None:
    ids = next_ids(3000)
    conn = await asyncpg.connect(env.dsn())
    try:
        await conn.executemany(
            "INSERT INTO enc_people (id, email, born) VALUES ($1, $2, $3)",
            [(i, f"a{i}@example.com", datetime.date(1990, 1, 1)) for i in ids],
        )
        stmt = await conn.prepare("SELECT email, born FROM enc_people WHERE id = $1")
        for i in ids:
            assert tuple(await stmt.fetchrow(i)) == (f"a{i}@example.com", datetime.date(1990, 1, 1))
        upd = await conn.prepare("UPDATE enc_people SET note = $2 WHERE id = $1 RETURNING note")
        for i in ids[:500]:
            assert await upd.fetchval(i, f"n{i}") == f"n{i}"
        rows = await conn.fetch("SELECT id, note FROM enc_people WHERE id = ANY($1::int[]) ORDER BY id", ids)
        assert [(r["id"], r["note"]) for r in rows] == [(i, f"n{i}" if k < 500 else None) for k, i in enumerate(ids)]
    finally:
        await conn.close()


async def test_asyncpg_cursor(env: EncEnv) -> None:
    """asyncpg's cursor binds a named portal, waits for BindComplete, then sends Execute with a row
    limit: the rows of the Execute that follows must be decrypted like any other."""
    ids = next_ids(30)
    conn = await asyncpg.connect(env.dsn())
    try:
        await conn.executemany(
            "INSERT INTO enc_people (id, email, born) VALUES ($1, $2, $3)",
            [(i, f"c{i}@example.com", datetime.date(1990, 1, 1)) for i in ids],
        )
        async with conn.transaction():
            cursor = await conn.cursor(
                "SELECT id, email, born FROM enc_people WHERE id = ANY($1::int[]) ORDER BY id", ids
            )
            got = await cursor.fetch(10)
            got += await cursor.fetch(100)
        assert [tuple(r) for r in got] == [(i, f"c{i}@example.com", datetime.date(1990, 1, 1)) for i in ids]
    finally:
        await conn.close()


def test_psycopg_server_side_cursor(env: EncEnv) -> None:
    """psycopg's named cursor (DECLARE ... CURSOR and FETCH): plaintext rows, or a clean refusal
    (0A000, the session goes on), never ciphertext."""
    ids = next_ids(30)
    with psycopg.connect(env.dsn(connect_timeout="10")) as c:
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO enc_people (id, email) VALUES (%s, %s)", [(i, f"d{i}@example.com") for i in ids]
            )
        c.commit()
        try:
            with c.cursor("enc_named") as cur:
                cur.execute("SELECT id, email FROM enc_people WHERE id = ANY(%s) ORDER BY id", [ids])
                got = cur.fetchmany(10) + cur.fetchall()
        except psycopg.errors.FeatureNotSupported:
            c.rollback()
            assert c.execute("SELECT count(*) FROM enc_people WHERE id = ANY(%s)", [ids]).fetchone() == (30,)
            return
        c.rollback()
    assert got == [(i, f"d{i}@example.com") for i in ids]
