"""The value codecs against PostgreSQL 15 itself.

For each tricky input the server stores it in a column of the declared type (an INSERT, so the
typmod applies as an assignment, which is what an encrypted column stands in for) and returns it
in text and in binary format. The codec must produce the same text and binary output from its
canonical form, read the server's binary output back to the same canonical form, and fail with the
server's SQLSTATE where the server fails.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from proxy.devcluster import DevCluster
from proxy.pgtypes import PgTypeError, SessionFormat, codec_for

pytestmark = pytest.mark.integration

_table_ids = itertools.count()


@dataclass(frozen=True)
class ServerResult:
    text: bytes | None = None
    binary: bytes | None = None
    sqlstate: str | None = None


@pytest.fixture(scope="module")
def cluster(pg: DevCluster) -> DevCluster:
    """The test run's shared cluster (tests/conftest.py): one cluster start for the whole suite."""
    return pg


@pytest.fixture
def conn(cluster: DevCluster) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as c:
        yield c


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _server(conn: psycopg.Connection[tuple[object, ...]], pg_type: str, values: list[str]) -> list[ServerResult]:
    table = f"pgtypes_{next(_table_ids)}"
    conn.execute(f"CREATE TEMP TABLE {table} (v {pg_type})")
    results = []
    for value in values:
        outputs: list[bytes] = []
        sqlstate = None
        for binary in (False, True):
            cur = conn.cursor()
            try:
                cur.execute(f"INSERT INTO {table} (v) VALUES ({_quote(value)}) RETURNING v", binary=binary)
            except psycopg.Error as exc:
                sqlstate = exc.sqlstate
                break
            assert cur.pgresult is not None
            raw = cur.pgresult.get_value(0, 0)
            assert raw is not None
            outputs.append(raw)
        if sqlstate is not None:
            results.append(ServerResult(sqlstate=sqlstate))
        else:
            results.append(ServerResult(outputs[0], outputs[1]))
    return results


def _compare(
    conn: psycopg.Connection[tuple[object, ...]],
    declared: str,
    values: list[str],
    fmt: SessionFormat,
    pg_type: str | None = None,
) -> None:
    codec = codec_for(declared)
    server = _server(conn, pg_type or declared, values)
    problems = []
    encoding = conn.info.encoding
    for value, expected in zip(values, server, strict=True):
        try:
            canonical = codec.canonical_from_text(value.encode(encoding), fmt)
        except PgTypeError as exc:
            if exc.sqlstate != expected.sqlstate:
                problems.append(f"{value!r}: codec {exc.sqlstate} ({exc}), server {expected}")
            continue
        if expected.sqlstate is not None:
            problems.append(f"{value!r}: codec accepted, server {expected.sqlstate}")
            continue
        assert expected.text is not None
        assert expected.binary is not None
        text, binary = codec.to_text(canonical, fmt), codec.to_binary(canonical, fmt)
        if (text, binary) != (expected.text, expected.binary):
            problems.append(f"{value!r}: codec {text!r} {binary!r}, server {expected.text!r} {expected.binary!r}")
        from_binary = codec.canonical_from_binary(expected.binary, fmt)
        if from_binary != canonical:
            problems.append(f"{value!r}: server binary reads as {from_binary!r}, text as {canonical!r}")
    assert not problems, "\n".join(problems)


UTC = SessionFormat()

CASES: dict[str, list[str]] = {
    "int2": [
        "0",
        "-0",
        "+7",
        " 42 ",
        "\t-32768\n",
        "32767",
        "32768",
        "-32769",
        "99999x",
        "12x",
        "",
        " ",
        "1.0",
        "0x10",
        "1_000",
        "00000000000000000000000000001",
        "-",
        "1e3",
    ],
    "int4": ["2147483647", "-2147483648", "2147483648", " +0012 ", "1 2", "٣"],
    "int8": [
        "9223372036854775807",
        "-9223372036854775808",
        "9223372036854775808",
        "-9223372036854775809",
        "99999999999999999999999",
    ],
    "float4": [
        "1.5",
        "0.1",
        "-0",
        "3.4028235e38",
        "3.4028236e38",
        "3.5e38",
        "1e-45",
        "7e-46",
        "1e-46",
        "1e-50",
        "NaN",
        "nan",
        "Infinity",
        "-INF",
        "+inf",
        "infinity",
        "infinit",
        " 1.5 ",
        "1e",
        ".5",
        "5.",
        ".",
        "0x1p3",
        "0x",
        "1e5",
        "1e6",
        "123456",
        "1234567",
        "0.0001",
        "0.00001",
        "16777216",
        "16777217",
        "10.6e9",
        "1.0000001",
        "1_0",
        "1,5",
        "3.14159265358979",
    ],
    "float8": [
        "1.5",
        "0.1",
        "-0",
        "1e308",
        "1.7976931348623157e308",
        "1.8e308",
        "4.9e-324",
        "2e-324",
        "1e-400",
        "5e-324",
        "NaN",
        "-Infinity",
        "inf",
        "1e15",
        "1e16",
        "123456789012345678",
        "0.0001",
        "1e-05",
        "9007199254740993",
        "2.1691341486096248e16",
        "0x1.8p1",
        "-0x10",
        "1e",
        "  -1.25e-3  ",
        "100000000000000",
        "1000000000000000",
        "3.141592653589793238462643",
    ],
    "numeric": [
        "0",
        "-0",
        "-0.00",
        "1.50",
        "+.5",
        "5.",
        ".",
        "1e5",
        "1E-5",
        "1.23e+2",
        "1e 5",
        "1.5e-1",
        "NaN",
        "nan",
        "Infinity",
        "-inf",
        "+Infinity",
        "infinityx",
        "1..2",
        "-",
        "1e",
        "12a",
        " 3.14 ",
        "0.000001000",
        "123456789012345678901234567890.123456789",
        "1e131071",
        "1e131072",
        "1e-16383",
        "1e-16384",
        "9999.99995",
    ],
    "numeric(5,2)": [
        "1.005",
        "1.004",
        "-1.005",
        "999.994",
        "999.995",
        "-999.995",
        "1e2",
        "NaN",
        "Infinity",
        "0.001",
        "12345",
        "1e-20",
    ],
    "numeric(3,-2)": ["12345", "12349", "12350", "99949", "99950", "-12350", "0.5", "49"],
    "numeric(2,4)": ["0.0012", "0.00999", "0.01", "0.00995", "0.00994"],
    "numeric(10)": ["1.5", "2.5", "-2.5", "9999999999", "9999999999.5"],
    "bool": [
        "t",
        "TRUE",
        "tr",
        " yes ",
        "y",
        "on",
        "ON",
        "of",
        "off",
        "o",
        "1",
        "0",
        "2",
        "",
        "truex",
        "f",
        "fal",
        "n",
        "No",
        "10",
    ],
    "uuid": [
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        "a0eebc999c0b4ef8bb6d6bb9bd380a11",
        "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
        "a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11",
        " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
        "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    ],
    "text": ["", "hello", "héllo wörld ✓", "tab\there", "  spaces  ", "𝄞 emoji 😀", "'quote'"],
    "varchar(3)": ["abc", "ab", "abcd", "abc   ", "ab    ", "abc d", "äöü", "äöüß", "äöü  ", "a\t  ", ""],
    "varchar": ["anything goes", "x" * 300],
    "char(3)": ["a", "abc", "abcd", "abc  ", "é", "éé", "ab\t", "", "   "],
    "char": ["a", "ab", "a  ", ""],
    "bytea": [
        "\\x",
        "\\x00ff10",
        "\\xDEADbeef",
        "\\x 00 ff ",
        "\\x0 1",
        "\\x012",
        "\\x0g",
        "abc",
        "a\\\\b",
        "\\001\\377",
        "a\\b",
        "\\X00",
        "héllo",
        "\\400",
        "\\x\tab\ncd\r",
    ],
    "json": [
        '{"a": 1}',
        ' [1, 2.50, -0, 1e5, "x"] ',
        '{"a":1,"a":2}',
        '"\\ud800"',
        '"\\u0000"',
        "true",
        "null",
        "01",
        "[1,]",
        "{'a': 1}",
        "NaN",
        '"\\x"',
        '{"a" 1}',
        "",
        "  ",
        '"a\\u00e9"',
        "[[[[]]]]",
        "1.",
        ".5",
        "-",
        "1e",
        "tru",
        "nul",
        '"é"',
        '{"a":1} x',
        "[1] [2]",
        "{}",
        "[]",
        '{"":0}',
        "-0.0e-0",
        "1E+2",
        '"\\/"',
    ],
    "jsonb": [
        '{"b":1, "a": [1,2.50,1e2], "aa": {}, "a": "\\u00e9\\n\\u001f/"}',
        '{"a":1,"a":2}',
        '"\\ud800"',
        '"\\ud800x"',
        '"\\ud83d\\ude00"',
        '"\\u0000"',
        '"\\u0001\\u007f\\t"',
        "1E400",
        "-0",
        "0.0",
        "[1, 1.0, 1.00, -0.0]",
        '{"aaa":1,"bb":2,"c":3,"ba":4,"é":5,"z":6}',
        "[[], {}, [{}]]",
        "null",
        "  true  ",
        '{"x": {"y": {"z": [1, {"w": null}]}}}',
        '"tab\\there"',
        '"a\\"b\\\\c\\/d"',
        "01",
        "1e",
        "1e999999",
        '{"\\u00e9": 1, "e": 2}',
        "[1,2,3]",
        '{"a":{"b":1,"b":2}}',
    ],
    "date": [
        "2020-01-01",
        "2020-1-2",
        "0044-03-15 BC",
        "0001-01-01",
        "0001-01-01 BC",
        "4713-01-01 BC",
        "4714-11-24 BC",
        "4714-11-23 BC",
        "5874897-12-31",
        "5874898-01-01",
        "10000-01-01",
        "2020-02-29",
        "2019-02-29",
        "2020-13-01",
        "2020-00-10",
        "2020-01-32",
        "0000-01-01",
        "infinity",
        "-infinity",
        "Infinity",
        "epoch",
        "2020-01-01T10:00:00Z",
        "2020-01-01 25:00",
        "2020-01-01 24:00",
        "2020-01-01 10:00 +99",
        "2020-01-01 10:00 Europe/Paris",
        "2020-01-01 10:00 Not/AZone",
        " 2020-01-01 ",
        "2020-01-01x",
        "+infinity",
        "2020-01-01 AD",
    ],
    "timestamp": [
        "2020-01-01",
        "2020-01-01 10:00",
        "2020-01-01T10:00:00",
        "2020-01-01 10:00:00.5",
        "2020-01-01 10:00:00.",
        "2020-01-01 10:00:00.1234565",
        "2020-01-01 10:00:00.1234575",
        "2020-01-01 23:59:59.9999999",
        "2020-01-01 23:59:60",
        "2020-01-01 23:59:60.5",
        "2020-01-01 24:00:00",
        "2020-01-01 24:00:01",
        "2020-01-01 10:60",
        "2020-01-01 10:0",
        "2020-01-01 1:02:03",
        "2020-01-01 10:00+02",
        "2020-01-01 10:00:00 -08:00",
        "2020-01-01 10:00 Z",
        "2020-01-01 10:00 +16",
        "2020-01-01 10:00 +15:59",
        "0044-03-15 10:00 BC",
        "0044-03-15 10:00:00 BC +02",
        "4714-11-24 00:00:00 BC",
        "4714-11-23 23:59:59 BC",
        "294276-12-31 23:59:59.999999",
        "294277-01-01 00:00:00",
        "infinity",
        "-infinity",
        "epoch",
        "2020-01-01 10:00:00.000001",
        "2020-01-01 10:00:00.0000005",
        "2020-01-01 10:00:00.100",
        "2020-01-01 10:00 BC BC",
        "2020-01-01 10:00 +02 +03",
        "2020-01-01 10:00:00.5.5",
        "2020-01-01 10",
        "2020-01-01  10:00",
    ],
}
# Valid for PostgreSQL, refused by the codecs by design (see proxy/pgtypes/temporal.py).
UNSUPPORTED: dict[str, list[str]] = {
    "date": ["01/02/2020", "Jan 2 2020", "20200102", "today", "now", "2020-01-02 PST"],
    "timestamptz": ["now", "2020-01-01 10:00 PST", "2020-01-01 10:00 CEST", "January 8 04:05:06 1999"],
}

TIMESTAMPTZ_VALUES = [
    "2020-01-01 10:00",
    "2020-01-01 10:00+02",
    "2020-01-01 10:00 +0530",
    "2020-01-01 10:00 +530",
    "2020-01-01 10:00 +5",
    "2020-01-01 10:00+05:30:15",
    "2020-01-01 10:00 z",
    "2020-01-01 10:00 UTC",
    "2020-01-01 10:00 Europe/Paris",
    "2020-01-01 10:00 europe/paris",
    "2020-03-08 02:30",
    "2020-11-01 01:30",
    "2020-03-29 02:30",
    "2020-10-25 02:30",
    "1800-01-01 00:00",
    "1800-01-01 00:00+00",
    "0044-03-15 10:00 BC",
    "0044-03-15 10:00+00 BC",
    "2300-07-01 12:00+00",
    "200000-07-01 12:00+00",
    "200000-01-01 12:00+00",
    "294276-12-31 23:59:59.999999+00",
    "294276-12-31 23:59:59.999999-01",
    "4714-11-24 00:00:00+00 BC",
    "4714-11-24 00:00:00+01 BC",
    "4714-11-23 23:00:00-01 BC",
    "epoch",
    "infinity",
    "-infinity",
    "2020-06-15 12:34:56.789",
    "2020-01-01 10:00 America/Argentina/Buenos_Aires",
    "1883-11-18 12:00",
    "2038-03-14 02:30",
    "2100-03-14 02:30",
    "9999-12-31 23:59:59",
    "10000-01-01 00:00",
]
ZONES = [
    "UTC",
    "Etc/UTC",
    "America/New_York",
    "Europe/Paris",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "Europe/Dublin",
    "Europe/Moscow",
    "America/St_Johns",
    "Pacific/Chatham",
    "<+02>-02",
    "UTC+3",
]


@pytest.mark.parametrize("declared", sorted(CASES))
def test_codec_matches_server(conn: psycopg.Connection[tuple[object, ...]], declared: str) -> None:
    _compare(conn, declared, CASES[declared], UTC, pg_type="char(1)" if declared == "char" else None)


@pytest.mark.parametrize("zone", ZONES)
def test_timestamptz_matches_server_in_zone(conn: psycopg.Connection[tuple[object, ...]], zone: str) -> None:
    conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
    reported = conn.info.parameter_status("TimeZone")
    assert reported is not None
    fmt = SessionFormat(timezone=reported)
    _compare(conn, "timestamptz", TIMESTAMPTZ_VALUES + CASES["timestamp"], fmt)


@pytest.mark.parametrize(("declared", "value"), [(d, v) for d, vs in UNSUPPORTED.items() for v in vs])
def test_unsupported_forms_are_refused_not_guessed(
    conn: psycopg.Connection[tuple[object, ...]], declared: str, value: str
) -> None:
    (accepted,) = _server(conn, declared, [value])
    assert accepted.sqlstate is None, "the server accepts this form; the codec refuses it by design"
    with pytest.raises(PgTypeError) as excinfo:
        codec_for(declared).canonical_from_text(value.encode(), UTC)
    assert excinfo.value.sqlstate in ("22007", "0A000")


def test_latin1_client_encoding(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute("SET client_encoding = 'LATIN1'")
    reported = conn.info.parameter_status("client_encoding")
    assert reported == "LATIN1"
    fmt = SessionFormat(client_encoding=reported)
    _compare(conn, "text", ["héllo", "plain", "ÿ"], fmt)
    _compare(conn, "char(3)", ["é", "éé", "éééé"], fmt)
    _compare(conn, "jsonb", ['{"é": "\\u00e9"}'], fmt)
    _compare(conn, "bytea", ["é"], fmt)


def test_bytea_escape_output(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute("SET bytea_output = 'escape'")
    _compare(conn, "bytea", ["\\x00015c7f80ff41", "abc", "\\x"], SessionFormat(bytea_output="escape"))


def _random_floats(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        bits = rng.getrandbits(64)
        if rng.random() < 0.3:
            bits &= 0xFFF0000000000000 | rng.getrandbits(3)  # near powers of two
        value = struct.unpack(">d", bits.to_bytes(8, "big"))[0]
        out.append(repr(value))
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 20)))
        out.append(f"{digits[:3]}.{digits[3:]}e{rng.randint(-60, 45)}")
    return out


def _random_numerics(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 30)))
        cut = rng.randint(0, len(digits))
        text = rng.choice(["", "-", "+"]) + digits[:cut] + "." + digits[cut:]
        if rng.random() < 0.3:
            text += f"e{rng.randint(-30, 30)}"
        out.append(text)
    return out


def _random_timestamps(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        year = rng.choice([rng.randint(1, 9999), rng.randint(1, 4713), rng.randint(10000, 294276)])
        era = " BC" if rng.random() < 0.1 else ""
        out.append(
            f"{year:04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:"
            f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 999999):06d}{era}"
        )
    return out


def test_random_values_match_server(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    rng = random.Random(20240521)
    floats = [v for v in _random_floats(rng, 150) if "inf" not in v and "nan" not in v]
    _compare(conn, "float8", floats, UTC)
    _compare(conn, "float4", floats, UTC)
    numerics = _random_numerics(rng, 300)
    _compare(conn, "numeric", numerics, UTC)
    _compare(conn, "numeric(12,3)", numerics, UTC)
    conn.execute("SET TimeZone = 'America/New_York'")
    stamps = _random_timestamps(rng, 200)
    _compare(conn, "timestamptz", stamps, SessionFormat(timezone="America/New_York"))
    _compare(conn, "timestamp", stamps, UTC)
    _compare(conn, "date", [s.split(" ")[0] + (" BC" if s.endswith("BC") else "") for s in stamps], UTC)
