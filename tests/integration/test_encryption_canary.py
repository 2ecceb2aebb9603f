"""The canary: a distinctive plaintext written through pgveil into a protected column appears nowhere on
the database server: not in the table files, not in the WAL, not in the server log (the session's
cluster runs with ``log_statement = all``).

Each canary goes in the way an application sends values: a literal in a simple query (psql), a
parameter of the extended protocol (psycopg), a COPY row; also in statements that fail (a refused
predicate, a row the server rejects, whose DETAIL lists the failing row). In the same statements a
second distinctive string goes into an unprotected column: the same search must find those controls in
the WAL and in the log, so the test proves it can see what it looks for. The search is for the UTF-8
bytes and for their hex (lower and upper case), over every file under the data directory.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import encfixtures
import psycopg
import pytest
from encfixtures import EncEnv, next_id, run_psql

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> EncEnv:
    return encfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


def distinctive(kind: str, how: str) -> str:
    return f"{kind}-{how}-{uuid.uuid4().hex}"


def encodings(s: str) -> list[bytes]:
    raw = s.encode("utf-8")
    return [raw, raw.hex().encode(), raw.hex().upper().encode()]


@dataclass
class Findings:
    """Which needle was found in which files."""

    where: dict[str, set[Path]] = field(default_factory=dict)

    def files(self, needle: str) -> set[Path]:
        return self.where.get(needle, set())


WAL_SEGMENT = re.compile(r"[0-9A-F]{24}")
XLP_LONG_HEADER = 0x0002


def wal_records(segment: bytes) -> bytes:
    """A WAL segment's record stream: its pages without their page headers. A record that crosses a page
    boundary is split by the next page's header, so a value inside it is contiguous only here."""
    if len(segment) < 40 or not segment[2] & XLP_LONG_HEADER:
        return b""
    page_size = int.from_bytes(segment[36:40], "little")
    if page_size < 1024 or page_size & (page_size - 1):
        return b""
    out = bytearray()
    for start in range(0, len(segment), page_size):
        page = segment[start : start + page_size]
        if len(page) < 24 or page[:2] == b"\0\0":
            continue  # a page not yet written (zeroed) or a partial read
        out += page[40 if page[2] & XLP_LONG_HEADER else 24 :]
    return bytes(out)


def search(paths: Iterator[Path], needles: list[str]) -> Findings:
    """Every file's bytes are searched; WAL segments also as their record stream (wal_records), carried
    over from the segment before, so a value split by a page or segment boundary is still found."""
    forms = {form: n for n in needles for form in encodings(n)}
    pattern = re.compile(b"|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))
    carry = max(map(len, forms)) - 1
    found = Findings()
    segments: list[tuple[Path, bytes]] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            continue  # a file the server removed meanwhile (temporary files, recycled segments)
        for m in pattern.finditer(data):
            found.where.setdefault(forms[m.group()], set()).add(path)
        if path.parent.name == "pg_wal" and WAL_SEGMENT.fullmatch(path.name):
            segments.append((path, wal_records(data)))
    tail = b""
    for path, stream in sorted(segments):
        for m in pattern.finditer(tail + stream):
            found.where.setdefault(forms[m.group()], set()).add(path)
        tail = stream[-carry:]
    return found


def server_files(pg: DevCluster) -> Iterator[Path]:
    yield from (p for p in pg.data_dir.rglob("*") if p.is_file())
    yield pg.log_file


def write_canaries(env: EncEnv, canary: dict[str, str], control: dict[str, str]) -> list[int]:
    """Writes each canary into enc_canary.secret (protected) and its control into .open, together."""
    ids = [next_id() for _ in range(3)]
    # Simple protocol: psql with literals.
    p = run_psql(
        env.dsn(),
        "-c",
        f"INSERT INTO enc_canary (id, secret, open) VALUES ({ids[0]}, '{canary['simple']}', '{control['simple']}')",
    )
    assert p.returncode == 0, p.stderr
    with psycopg.connect(env.dsn(connect_timeout="10"), autocommit=True) as c:
        # Extended protocol: parameters.
        c.execute(
            "INSERT INTO enc_canary (id, secret, open) VALUES (%s, %s, %s)",
            [ids[1], canary["extended"], control["extended"]],
        )
        # COPY FROM STDIN.
        with c.cursor().copy("COPY enc_canary (id, secret, open) FROM STDIN") as cp:
            cp.write_row((ids[2], canary["copy"], control["copy"]))
        # Statements that fail: refused before the server sees them, in both protocols ...
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute("SELECT id FROM enc_canary WHERE secret = %s", [canary["refused-extended"]])
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            psycopg.ClientCursor(c).execute(
                "SELECT id FROM enc_canary WHERE secret LIKE %s", [canary["refused-simple"] + "%"]
            )
        # ... and rejected by the server, which logs the failing row (DETAIL) and the statement.
        with pytest.raises(psycopg.errors.NotNullViolation):
            psycopg.ClientCursor(c).execute(
                "INSERT INTO enc_canary (id, secret, open) VALUES (NULL, %s, %s)",
                [canary["failing-row"], control["failing-row"]],
            )
        # What was written reads back: the canaries went in.
        rows = c.execute("SELECT secret, open FROM enc_canary WHERE id = ANY(%s) ORDER BY id", [ids]).fetchall()
    assert rows == [(canary[h], control[h]) for h in ("simple", "extended", "copy")]
    return ids


def test_canary_is_nowhere_on_the_server(env: EncEnv, pg: DevCluster) -> None:
    ways = ["simple", "extended", "copy", "refused-extended", "refused-simple", "failing-row"]
    canary = {how: distinctive("CANARY", how) for how in ways}
    control = {how: distinctive("CONTROL", how) for how in ("simple", "extended", "copy", "failing-row")}
    write_canaries(env, canary, control)
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        c.execute("CHECKPOINT")
        c.execute("SELECT pg_switch_wal()")

    found = search(server_files(pg), [*canary.values(), *control.values()])

    leaks = {how: sorted(str(p) for p in found.files(c)) for how, c in canary.items() if found.files(c)}
    assert leaks == {}, f"plaintext written through pgveil found on the server: {leaks}"
    wal = pg.data_dir / "pg_wal"
    for how in ("simple", "extended", "copy"):
        files = found.files(control[how])
        assert any(wal in p.parents for p in files), f"control {how} not found in the WAL: the search is blind"
    for how in ("simple", "extended", "failing-row"):
        assert pg.log_file in found.files(control[how]), f"control {how} not in the server log: the search is blind"


async def test_canary_in_a_copy_sent_ahead_of_the_server(env: EncEnv, pg: DevCluster) -> None:
    """asyncpg sends COPY data without waiting for CopyInResponse (see test_encryption_copy): the canary
    must not reach the server that way either, not even the first COPY of each connection."""
    canaries = [distinctive("CANARY", f"asyncpg-copy-{k}") for k in range(4)]
    controls = [distinctive("CONTROL", f"asyncpg-copy-{k}") for k in range(4)]
    for k in (0, 2):
        conn = await asyncpg.connect(env.dsn())
        try:
            for j in (k, k + 1):

                async def source(j: int = j) -> AsyncIterator[bytes]:
                    yield f"{next_id()}\t{canaries[j]}\t{controls[j]}\n".encode()

                try:
                    await conn.copy_to_table("enc_canary", source=source(), columns=["id", "secret", "open"])
                except asyncpg.PostgresError:
                    pass  # whether the server stored it or not, what matters is what it saw
        finally:
            await conn.close()
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        c.execute("CHECKPOINT")
        c.execute("SELECT pg_switch_wal()")
    found = search(server_files(pg), [*canaries, *controls])
    leaks = sorted({str(p) for c in canaries for p in found.files(c)})
    assert leaks == [], f"plaintext sent by asyncpg's COPY found on the server: {leaks}"
    wal = pg.data_dir / "pg_wal"
    assert any(wal in p.parents for c in controls for p in found.files(c)), "no control in the WAL: blind search"


def test_search_finds_hex_and_reads_every_file(tmp_path: Path) -> None:
    """The search itself: hex forms count, nested files are read, a file removed meanwhile is skipped."""
    needle = distinctive("CANARY", "self-test")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "hex").write_bytes(b"xx" + needle.encode().hex().upper().encode() + b"yy")
    (tmp_path / "plain").write_bytes(needle.encode())
    (tmp_path / "none").write_bytes(b"nothing")
    paths: list[Any] = [*sorted(p for p in tmp_path.rglob("*") if p.is_file()), tmp_path / "gone"]
    found = search(iter(paths), [needle])
    assert found.files(needle) == {tmp_path / "a" / "b" / "hex", tmp_path / "plain"}


def _segment(body: bytes, page_size: int = 8192) -> bytes:
    """A synthetic WAL segment carrying ``body`` as its record stream: a long header on the first page,
    short ones after (magic, info, timeline, page address, remaining length; the long one adds system id,
    segment size and page size)."""
    out = bytearray()
    pages = 0
    while body or pages < 2:
        long = pages == 0
        header = (0xD110).to_bytes(2, "little") + (XLP_LONG_HEADER if long else 0).to_bytes(2, "little")
        header += (1).to_bytes(4, "little") + (pages * page_size).to_bytes(8, "little") + bytes(4)
        header += bytes(4)  # padding to 24
        if long:
            header += bytes(8) + (16 << 20).to_bytes(4, "little") + page_size.to_bytes(4, "little")
        room = page_size - len(header)
        out += header + body[:room].ljust(room, b"\0")
        body = body[room:]
        pages += 1
    return bytes(out + bytes(page_size))  # and a page not yet written


def test_search_finds_a_value_split_by_a_wal_page_or_segment_boundary(tmp_path: Path) -> None:
    """A WAL record that crosses a page boundary has the next page's header in the middle of it: the raw
    bytes do not contain the value, the record stream does. Also across two segments."""
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    page_needle, segment_needle = distinctive("CANARY", "page"), distinctive("CANARY", "segment")
    first_room = 8192 - 40
    body = b"r" * (first_room - 10) + page_needle.encode()  # 10 bytes on page 1, the rest on page 2
    split = wal / "000000010000000000000001"
    split.write_bytes(_segment(body))
    assert page_needle.encode() not in split.read_bytes()
    a, b = wal / "000000010000000000000002", wal / "000000010000000000000003"
    raw = segment_needle.encode()
    fill = (8192 - 40) + 3 * (8192 - 24) - 12  # four full pages whose last 12 bytes start the value
    a.write_bytes(_segment(b"s" * fill + raw[:12]))
    b.write_bytes(_segment(raw[12:]))
    not_wal = tmp_path / "000000010000000000000004"  # a segment-like name outside pg_wal: bytes only
    not_wal.write_bytes(_segment(page_needle.encode()[:5] + b"x" * (8192 - 45) + page_needle.encode()[5:]))
    found = search(iter(sorted([split, a, b, not_wal])), [page_needle, segment_needle])
    assert found.files(page_needle) == {split}
    assert found.files(segment_needle) == {b}


def test_search_reads_the_real_wal_format(pg: DevCluster) -> None:
    """wal_records against the server's own WAL: 40 rows of ~2 kB each written directly; some of their
    records cross a page boundary (a quarter of them, by size), so the raw bytes miss some values. The
    record stream must find every one of them in the WAL."""
    values = [distinctive("WALFORMAT", str(k)) + "." * 2000 + uuid.uuid4().hex for k in range(40)]
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS canary_wal_format (v text)")
        c.execute("ALTER TABLE canary_wal_format ALTER COLUMN v SET STORAGE PLAIN")  # not compressed
        for v in values:
            c.execute("INSERT INTO canary_wal_format VALUES (%s)", [v])
        c.execute("SELECT pg_switch_wal()")
    wal_dir = pg.data_dir / "pg_wal"
    segments = sorted(p for p in wal_dir.iterdir() if WAL_SEGMENT.fullmatch(p.name))
    found = search(iter(segments), values)
    assert [v[:30] for v in values if not found.files(v)] == []
    raw = b"".join(p.read_bytes() for p in segments)
    split = [v for v in values if v.encode() not in raw]
    assert split, "no record crossed a page boundary: this run did not exercise the record stream"
