"""Literal casts into encrypted columns store what PostgreSQL itself would store: each case is checked
against the server's own conversion (``INSERT`` of the cast literal into a column of the declared type)."""

from __future__ import annotations

import psycopg
import pytest

from proxy.devcluster import DevCluster
from proxy.encrypt.casts import CastNotSupported, canonical_through_cast
from proxy.pgtypes import SessionFormat, codec_for

pytestmark = pytest.mark.integration

FMT = SessionFormat(timezone="Europe/Berlin")

# (SQL literal as written, plaintext the analysis reports, cast type, numeric constant?, declared type)
CASES = [
    ("'Infinity'::float8", "Infinity", "float8", False, "float4"),
    ("'1.5'::float8", "1.5", "float8", False, "float4"),
    ("0.30000000000000004::float8", "0.30000000000000004", "float8", True, "numeric"),
    ("1.7::int", "1.7", "int4", True, "numeric"),
    ("2.5::int", "2.5", "int4", True, "int8"),
    ("'2.5'::float8", "2.5", "float8", False, "int4"),
    ("'3.5'::float8", "3.5", "float8", False, "int4"),
    ("'-2.5'::numeric", "-2.5", "numeric", False, "int2"),
    ("42::int8", "42", "int8", True, "float8"),
    ("'yes'::boolean", "yes", "bool", False, "text"),
    ("DATE '2020-1-1'", "2020-1-1", "date", False, "text"),
    ("DATE '2020-02-29'", "2020-02-29", "date", False, "timestamptz"),
    ("'2020-06-01 10:00:00'::timestamp", "2020-06-01 10:00:00", "timestamp", False, "timestamptz"),
    ("'2020-06-01 10:00:00+00'::timestamptz", "2020-06-01 10:00:00+00", "timestamptz", False, "timestamp"),
    ("'2020-06-01 23:30:00+00'::timestamptz", "2020-06-01 23:30:00+00", "timestamptz", False, "date"),
    ('\'{"b": 1, "a": [1,2]}\'::jsonb', '{"b": 1, "a": [1,2]}', "jsonb", False, "text"),
    ("'abc'::text", "abc", "text", False, "varchar(5)"),
    ("'0.1'::float4", "0.1", "float4", False, "numeric"),
]


@pytest.fixture(scope="module")
def conn(pg: DevCluster) -> psycopg.Connection[tuple[object, ...]]:
    c = psycopg.connect(pg.dsn(), autocommit=True)
    c.execute("SET TimeZone = 'Europe/Berlin'")
    return c


@pytest.mark.parametrize(("sql", "plaintext", "cast", "numeric", "declared"), CASES)
def test_cast_matches_the_server(
    conn: psycopg.Connection[tuple[object, ...]], sql: str, plaintext: str, cast: str, numeric: bool, declared: str
) -> None:
    target = codec_for(declared)
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS cast_probe (v {declared})")
    conn.execute("TRUNCATE cast_probe")
    conn.execute(f"INSERT INTO cast_probe VALUES ({sql})")
    row = conn.execute("SELECT v::text FROM cast_probe").fetchone()
    conn.execute("DROP TABLE cast_probe")
    assert row is not None
    server = str(row[0]).encode()
    ours = target.to_text(
        canonical_through_cast(target, cast, plaintext.encode(), FMT, "public.t.v", numeric_literal=numeric), FMT
    )
    assert ours == server


@pytest.mark.parametrize(
    ("cast", "declared"), [("interval", "text"), ("text", "bytea"), ("uuid", "int4"), ("bytea", "text")]
)
def test_other_casts_are_refused(cast: str, declared: str) -> None:
    with pytest.raises(CastNotSupported, match=r"public\.t\.v"):
        canonical_through_cast(codec_for(declared), cast, b"1", FMT, "public.t.v")
