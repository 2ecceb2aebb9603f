"""CopyRowRewriter against a real PostgreSQL: the server is the judge of how COPY data reads.

- COPY TO STDOUT output of tricky values, rewritten (protected columns upper-cased) and copied back in,
  reads as the expected values.
- Client-written COPY data goes to the server twice: as sent, into a text table, and rewritten (protected
  fields turned into bytea hex, as ciphertext would be), into a bytea table; then the bytea table's COPY
  TO output is rewritten back (hex to text) into a third table. All three must agree, and whatever the
  server refuses as sent must be refused by the rewriter or by the server after rewriting.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import psycopg
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from proxy.devcluster import DevCluster
from proxy.rewrite.copyrows import BadCopyFileFormat, CopyDataError, CopyOptions, CopyRowRewriter, FieldTransform

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    c = DevCluster()
    c.start()
    try:
        yield c
    finally:
        c.cleanup()


Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture(scope="module")
def conn(cluster: DevCluster) -> Iterator[Conn]:
    with psycopg.connect(cluster.dsn(), autocommit=True, client_encoding="utf8") as c:
        c.execute("CREATE TABLE src (id int, a text, b text, c text)")
        c.execute("CREATE TABLE dst (id int, a text, b text, c text)")
        c.execute("CREATE TABLE plain (seq bigserial, a text, b text, c text)")
        c.execute("CREATE TABLE vault (seq bigserial, a bytea, b text, c bytea)")
        c.execute("CREATE TABLE back (seq bigserial, a text, b text, c text)")
        yield c


def upper(value: bytes) -> bytes:
    return value.decode("utf-8").upper().encode("utf-8")


def to_bytea(value: bytes) -> bytes:
    """What the proxy does on COPY FROM, minus the cipher: plaintext in, bytea text form out."""
    return b"\\x" + value.hex().encode()


def from_bytea(value: bytes) -> bytes:
    assert value.startswith(b"\\x")
    return bytes.fromhex(value[2:].decode())


def rechunk(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def rewrite(options: CopyOptions, transforms: Sequence[FieldTransform | None], chunks: Sequence[bytes]) -> bytes:
    rw = CopyRowRewriter(options, transforms)
    out = b"".join(rw.feed(bytes(c)) for c in chunks)
    return out + rw.finish()


def copy_out(conn: Conn, sql: str) -> list[bytes]:
    with conn.cursor() as cur, cur.copy(sql) as copy:
        return [bytes(chunk) for chunk in copy]


def copy_in(conn: Conn, sql: str, data: bytes, size: int = 8192) -> None:
    with conn.cursor() as cur, cur.copy(sql) as copy:
        for chunk in rechunk(data, size):
            copy.write(chunk)


TRICKY = [
    "plain",
    "",
    None,
    "tab\there",
    "new\nline",
    "cr\rand crlf\r\n",
    "back\\slash \\\\ \\n",
    "\\.",
    "\\N",
    "NULL",
    'quote "double" and ""',
    "comma, semi; pipe|",
    "'single'",
    "unicode é € 😀 ✓ ß",
    "  padded  ",
    "\\x41",
    "ends with backslash\\",
    "\x01\x07\x08\x0b\x0c\x1f control",
]


@dataclass(frozen=True)
class Format:
    name: str
    sql: str  # the COPY option list, without parentheses
    options: CopyOptions


OUT_FORMATS = [
    Format("text", "FORMAT text", CopyOptions()),
    Format("text-pipe", "FORMAT text, DELIMITER '|'", CopyOptions(delimiter="|")),
    Format("csv", "FORMAT csv", CopyOptions(format="csv")),
    Format("csv-header", "FORMAT csv, HEADER", CopyOptions(format="csv", header=True)),
    Format(
        "csv-custom",
        "FORMAT csv, DELIMITER ';', QUOTE '''', ESCAPE '\\', NULL 'NULL'",
        CopyOptions(format="csv", delimiter=";", quote="'", escape="\\", null="NULL"),
    ),
]


@pytest.mark.parametrize("fmt", OUT_FORMATS, ids=lambda f: f.name)
def test_server_output_rewritten_reads_back_as_expected(conn: Conn, fmt: Format) -> None:
    conn.execute("TRUNCATE src, dst")
    rows = [(i, a, b, c) for i, (a, b, c) in enumerate(itertools.product(TRICKY, TRICKY[:6], TRICKY[::-1][:3]))]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO src VALUES (%s, %s, %s, %s)", rows)
    captured = copy_out(conn, f"COPY src (id, a, b, c) TO STDOUT ({fmt.sql})")
    assert len(captured) == len(rows) + fmt.options.header  # the server sends one row per CopyData

    transforms = [None, upper, None, upper]
    out = rewrite(fmt.options, transforms, captured)
    for size in (1, 7, 4096):
        assert rewrite(fmt.options, transforms, rechunk(b"".join(captured), size)) == out
    copy_in(conn, f"COPY dst (id, a, b, c) FROM STDIN ({fmt.sql})", out, size=1000)

    def up(v: str | None) -> str | None:
        return None if v is None else v.upper()

    expected = [(i, up(a), b, up(c)) for i, a, b, c in rows]
    assert conn.execute("SELECT id, a, b, c FROM dst ORDER BY id").fetchall() == expected


# -- client-written data: the server reads the original and the rewritten stream alike -------------------
IN_FORMATS = [
    Format("text", "FORMAT text", CopyOptions()),
    Format("text-pipe", "FORMAT text, DELIMITER '|', NULL 'NULL'", CopyOptions(delimiter="|", null="NULL")),
    Format("text-header", "FORMAT text, HEADER", CopyOptions(header=True)),
    Format("csv", "FORMAT csv", CopyOptions(format="csv")),
    Format("csv-escape", "FORMAT csv, ESCAPE '\\'", CopyOptions(format="csv", escape="\\")),
    Format(
        "csv-force",
        "FORMAT csv, HEADER, FORCE_NOT_NULL (a), FORCE_NULL (c)",
        CopyOptions(format="csv", header=True, force_not_null=frozenset({0}), force_null=frozenset({2})),
    ),
]
# COPY TO cannot take FORCE_NOT_NULL / FORCE_NULL; reading back the vault uses the same format without them.
OUT_OF_VAULT = {
    "csv-force": Format("csv-force-out", "FORMAT csv, HEADER", CopyOptions(format="csv", header=True)),
}

CLIENT_STREAMS: dict[str, list[bytes]] = {
    "text": [
        b"plain\tb\tc\n\\101\\x42\\103\\t\\\\\tb\t\\N\n\\N\t\t\\\n\n",  # octal, hex, escaped newline
        b"crlf\tb\tc\r\n\xc3\xa9\\r\\n\t\\\\.\t\\\r\r\n\\.\r\nignored\tafter\tmarker\r\n",
        b"cr\tb\tc\rlast\tline\tno newline",
        b"a\tb\tc\\",  # a backslash just before the end of data
    ],
    "csv": [
        b'"a,b","c\nd",""\n,,\n"""q""",\\N,"\\."\n\\.x,\\.\\,"\\\n."\n',
        b'1,2,3\r\n"x\r\ny",\xe2\x82\xac,\r\n\\.\r\n',
    ],
    "csv-escape": [b'"a\\"b","\\\\","c\\d"\n"x""y",,\n'],
    "csv-force": [b'h1,h2,h3\n,"",""\n"",x,\n'],
    "text-pipe": [b"NULL|\\NULL|N\\ULL\nx\\|y|\\||NULL\n"],
    "text-header": [b"col a\tcol b\tcol c\nx\ty\tz\n"],
}


def run_differential(conn: Conn, fmt: Format, data: bytes) -> str:
    """The original and the rewritten stream are read alike by the server, or both refused; says which."""
    conn.execute("TRUNCATE plain, vault, back RESTART IDENTITY")
    copy_sql = f"FROM STDIN ({fmt.sql})"
    server_error: psycopg.Error | None = None
    try:
        copy_in(conn, f"COPY plain (a, b, c) {copy_sql}", data)
    except psycopg.Error as e:
        server_error = e
    try:
        rewritten = rewrite(fmt.options, [to_bytea, None, to_bytea], rechunk(data, 5))
    except CopyDataError as e:
        refusal: CopyDataError | None = e
    else:
        refusal = None
    if refusal is not None:
        # The one place the rewriter is stricter than PostgreSQL 15: "\." after data on a line.
        assert server_error is not None or "end-of-copy marker" in str(refusal), (data, refusal)
        return "refused by the rewriter" if server_error is not None else "refused by the stricter rewriter"
    rewritten_error: psycopg.Error | None = None
    try:
        copy_in(conn, f"COPY vault (a, b, c) {copy_sql}", rewritten)
    except psycopg.Error as e:
        rewritten_error = e
    if rewritten_error is not None:
        assert server_error is not None, (data, rewritten, rewritten_error)
        return "refused by the server, as sent and rewritten"
    assert server_error is None, (data, rewritten, server_error)

    plain = conn.execute("SELECT a, b, c FROM plain ORDER BY seq").fetchall()
    vault = conn.execute("SELECT a, b, c FROM vault ORDER BY seq").fetchall()

    def enc(v: object) -> bytes | None:
        return None if v is None else str(v).encode("utf-8")

    assert [(enc(a), b, enc(c)) for a, b, c in plain] == vault

    # ... and back out of the vault, as the proxy does for COPY TO.
    out_fmt = OUT_OF_VAULT.get(fmt.name, fmt)
    captured = copy_out(conn, f"COPY vault (a, b, c) TO STDOUT ({out_fmt.sql})")
    restored = rewrite(out_fmt.options, [from_bytea, None, from_bytea], captured)
    copy_in(conn, f"COPY back (a, b, c) FROM STDIN ({out_fmt.sql})", restored)
    null = out_fmt.options.null_string

    # What the server's text-format COPY TO escapes (CopyAttributeOutText).
    escaped = {"\\", out_fmt.options.delimiter_char, "\b", "\f", "\n", "\r", "\t", "\v"}

    def server_quirk(v: object) -> object:
        # The server's own text-format COPY TO writes a value equal to the NULL string as is when it needs
        # no escape, so it reads back as NULL; that is the unprotected column's fate. Protected values are
        # guarded against it. A value such as \N has its backslash escaped and reads back as itself.
        if out_fmt.options.format != "text" or v != null:
            return v
        return v if any(ch in escaped for ch in str(v)) else None

    expected = [(a, server_quirk(b), c) for a, b, c in plain]
    assert conn.execute("SELECT a, b, c FROM back ORDER BY seq").fetchall() == expected
    return "accepted"


@pytest.mark.parametrize(
    ("fmt", "data"),
    [(f, d) for f in IN_FORMATS for d in CLIENT_STREAMS[f.name]],
    ids=lambda x: x.name if isinstance(x, Format) else None,
)
def test_client_streams_read_alike_in_plaintext_and_rewritten(conn: Conn, fmt: Format, data: bytes) -> None:
    assert run_differential(conn, fmt, data) == "accepted"
    assert conn.execute("SELECT count(*) FROM plain").fetchone() != (0,)


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        (IN_FORMATS[0], b"a\tb\tc\nd\te\n"),
        (IN_FORMATS[0], b"a\tb\tc\td\n"),
        (IN_FORMATS[0], b"a\tb\tc\n1\t2\t3\r\n"),
        (IN_FORMATS[0], b"a\tb\tc\r\n1\t2\r3\r\n"),
        (IN_FORMATS[0], b"a\tb\tc\n\\.x\n"),
        (IN_FORMATS[0], b"a\tb\tc\n\\."),
        (IN_FORMATS[0], b"a\tb\tc\r\n\\.\n"),
        (IN_FORMATS[3], b'a,"b,c\n'),
        (IN_FORMATS[3], b"a,b,c\n1,2,3\r\n"),
    ],
)
def test_malformed_streams_are_refused_by_both(conn: Conn, fmt: Format, data: bytes) -> None:
    with pytest.raises(psycopg.errors.BadCopyFileFormat):
        copy_in(conn, f"COPY plain (a, b, c) FROM STDIN ({fmt.sql})", data)
    with pytest.raises(BadCopyFileFormat):
        rewrite(fmt.options, [to_bytea, None, to_bytea], [data])


ATOMS = [
    b"a", b"Z", b"N", b"x", b"0", b".", b" ", b"\xc3\xa9", b"\xf0\x9f\x98\x80",
    b"\t", b",", b"|", b'"', b"\\", b"\n", b"\r", b"\r\n",
    b"\\N", b"\\.", b"\\\\", b"\\x4", b"\\101", b"\\t", b"\\\n", b'""', b"NULL",
]  # fmt: skip


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[Format, bytes]:
    fmt = draw(st.sampled_from(IN_FORMATS))
    delim = fmt.options.delimiter_char.encode()
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    field = st.lists(st.sampled_from(ATOMS[:9] + ATOMS[17:]), max_size=4).map(b"".join)
    if fmt.options.format == "csv":
        field = st.one_of(field, field.map(lambda f: b'"' + f.replace(b'"', b'""') + b'"'))
    rows = draw(st.lists(st.lists(field, min_size=3, max_size=3), min_size=1, max_size=4))
    data = b"".join(delim.join(r) + eol for r in rows)
    if draw(st.booleans()):  # now and then, a stray byte anywhere
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(ATOMS)) + data[at:]
    return fmt, data


# The server verifies the raw bytes in the client encoding before it reads lines (CopyConvertBuf), and
# stops reading at the end marker: (format, data, what run_differential finds).
ENCODING_CASES = [
    # un-quoting would make the value valid UTF-8 (\xc3 \xa9), but the raw bytes are not
    (IN_FORMATS[3], b',,\xc3""\xa9\n,,\n', "refused by the rewriter"),
    (IN_FORMATS[4], b'a,"\xc3\\"\xa9",c\n', "refused by the rewriter"),
    (IN_FORMATS[0], b"a\tb\t\xc3\\\xa9\n", "refused by the rewriter"),
    (IN_FORMATS[0], b"a\tb\x00\tc\n", "refused by the rewriter"),  # NUL is never valid input
    (IN_FORMATS[0], b"a\tb\tc\xc3", "refused by the rewriter"),  # cut short at the end of data
    (IN_FORMATS[0], b"a\tb\tc\xed\xa0\x80\n", "refused by the rewriter"),  # a surrogate
    (IN_FORMATS[0], b"a\tb\tc\xc3\n", "refused by the rewriter"),
    (IN_FORMATS[0], b"a\tb\tc\n\\.\n\xff\xc3\n", "accepted"),  # after the end marker: never read
    (IN_FORMATS[0], b"abcd\xc3\xa9\tb\tc\n\xe2\x82\xac\t\xf0\x9f\x98\x80\t\n", "accepted"),  # split across chunks
]


@pytest.mark.parametrize(
    ("fmt", "data", "outcome"), ENCODING_CASES, ids=lambda x: x.name if isinstance(x, Format) else None
)
def test_raw_input_is_verified_as_the_server_verifies_it(conn: Conn, fmt: Format, data: bytes, outcome: str) -> None:
    assert run_differential(conn, fmt, data) == outcome
    for size in (1, 2, 3):  # every way of cutting a multibyte sequence between CopyData messages
        try:
            rewrite(fmt.options, [to_bytea, None, to_bytea], rechunk(data, size))
        except CopyDataError:
            assert outcome != "accepted", (data, size)
        else:
            assert outcome == "accepted", (data, size)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(client_streams())
@example(case=(IN_FORMATS[3], b',,\xc3""\xa9\n,,\n'))
@example(case=(IN_FORMATS[0], b"\t\\\\\\N\t\n"))  # the value \N in an unprotected column
def test_random_client_streams_read_alike(conn: Conn, case: tuple[Format, bytes]) -> None:
    fmt, data = case
    event(run_differential(conn, fmt, data))
