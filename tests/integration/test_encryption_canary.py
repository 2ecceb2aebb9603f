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


def search(paths: Iterator[Path], needles: list[str]) -> Findings:
    forms = {form: n for n in needles for form in encodings(n)}
    pattern = re.compile(b"|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))
    found = Findings()
    for path in paths:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            continue  # a file the server removed meanwhile (temporary files, recycled segments)
        for m in pattern.finditer(data):
            found.where.setdefault(forms[m.group()], set()).add(path)
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
