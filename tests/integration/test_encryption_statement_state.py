"""Statement state follows the server's confirmations (issue 7, item 1), proved with the canary method.

Each attack reuses a statement name so that pgveil's model and the server's could disagree: a Parse of a
name that exists (the server answers 42P05 and keeps the first statement), a Close the server skips
because an earlier message of its segment failed, SQL-level EXECUTE / DEALLOCATE / DISCARD ALL, each
sequentially (every Sync answered before the next message) and pipelined (nothing answered yet). The
messages are built with the codec and sent over a socket, a pipelined batch in one write. Every canary
must then be absent from the table read directly, from the data directory and WAL after a CHECKPOINT,
and from the server log, as text and as hex; the controls written beside them in an unprotected column
must be found, so the search is not blind.

Real drivers keep working unchanged: psycopg (server-side prepared statements after five executions,
pipeline mode, executemany), asyncpg (prepared statements, its statement cache closing them, cursors)
and pgbench -M prepared.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import encfixtures
import psycopg
import pytest
from conftest import PW_PASSWORD
from encfixtures import EncEnv, next_id
from faultproxy import RawClient
from test_encryption_canary import distinctive, search, server_files
from test_proxy_pgbench import run_pgbench

from proxy.devcluster import DevCluster
from proxy.protocol import codec
from proxy.protocol import messages as m

pytestmark = pytest.mark.integration

INSERT = "INSERT INTO enc_canary (id, secret, open) VALUES ($1, $2, $3)"
PLAIN = "SELECT $1::text, $2::text, $3::text"
# A plaintext shaped like an envelope header (magic, version, algorithm, 28 more header bytes): it
# passes the CHECK constraint on the column, so only pgveil stands between it and the table.
ENVELOPE_HEADER = b"PV\x01\x01" + b"A" * 28

RUN = (m.Describe(b"P", ""), m.Execute("", 0), m.Sync())


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> EncEnv:
    env = encfixtures.shared_env(pg, tmp_path_factory, pytestconfig)
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        c.execute("GRANT SELECT, INSERT ON enc_canary TO pwuser")
    return env


class Session:
    """A raw protocol session through pgveil: a batch of messages goes out in one write, so pgveil has
    read all of them before the server has answered any."""

    def __init__(self, env: EncEnv) -> None:
        self.raw = RawClient(env.proxy.host, env.proxy.port)
        self.raw.login("pwuser", PW_PASSWORD, "app")

    def exchange(self, *msgs: m.FrontendMessage) -> list[str]:
        """Sends ``msgs`` and reads the replies up to the last ReadyForQuery they are owed. Returns the
        names of the replies that say what happened (``E`` and the SQLSTATE for an error)."""
        self.raw.send(b"".join(codec.encode_frontend(x) for x in msgs))
        owed = sum(isinstance(x, m.Sync | m.Query) for x in msgs)
        out: list[str] = []
        while owed:
            msg = self.raw.read_message()
            assert msg is not None, "pgveil closed the connection"
            t, body = msg
            if t == b"Z":
                owed -= 1
                continue
            if t in (b"T", b"D", b"n", b"S", b"N"):
                continue  # rows, descriptions, parameter changes, notices
            reply = codec.decode_backend(t[0], body)
            out.append(f"E{reply.sqlstate}" if isinstance(reply, m.ErrorResponse) else type(reply).__name__)
        return out

    def close(self) -> None:
        self.raw.close()


@dataclass
class Seen:
    canaries: list[str] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)  # written to the unprotected column: must be found
    written: list[int] = field(default_factory=list)  # ids of the rows written

    def values(self, shape: str) -> tuple[int, str, m.Bind]:
        """A fresh row id and control, and a Bind (of no statement yet) carrying a new canary: as text,
        or after an envelope header in binary."""
        i = next_id()
        canary = distinctive("CANARY", f"stmt-{shape}")
        control = distinctive("CONTROL", f"stmt-{shape}")
        self.canaries.append(canary)
        secret = ENVELOPE_HEADER + canary.encode() if shape == "envelope" else canary.encode()
        formats = (0, 1, 0) if shape == "envelope" else ()
        return i, control, m.Bind("", "", formats, (str(i).encode(), secret, control.encode()), ())

    def stored(self, i: int, control: str) -> None:
        self.written.append(i)
        self.controls.append(control)


def bind(template: m.Bind, statement: str) -> m.Bind:
    return m.Bind(template.portal, statement, template.param_formats, template.params, template.result_formats)


def duplicate_parse(s: Session, seen: Seen, shape: str, pipelined: bool) -> None:
    """Parse S as the protected INSERT, then Parse S again as a plain SELECT: the server keeps the INSERT
    (42P05), so a Bind of S must be sealed for it."""
    name = f"dup_{uuid.uuid4().hex[:8]}"
    i, control, values = seen.values(shape)
    first = (m.Parse(name, INSERT, ()), m.Sync())
    second = (m.Parse(name, PLAIN, ()), m.Sync())
    run = (bind(values, name), *RUN)
    if pipelined:
        # Nothing is answered when the Bind arrives: S is the INSERT or the SELECT. Refused, not guessed.
        assert s.exchange(*first, *second, *run) == ["ParseComplete", "E42P05", "E0A000"]
        return
    assert s.exchange(*first) == ["ParseComplete"]
    assert s.exchange(*second) == ["E42P05"]
    assert s.exchange(*run) == ["BindComplete", "CommandComplete"]
    seen.stored(i, control)


def skipped_close(s: Session, seen: Seen, shape: str, pipelined: bool) -> None:
    """Close S follows a failing message in its segment: the server skips it, S stays the INSERT, and the
    Parse of S as a plain SELECT fails."""
    name = f"close_{uuid.uuid4().hex[:8]}"
    i, control, values = seen.values(shape)
    assert s.exchange(m.Parse(name, INSERT, ()), m.Sync()) == ["ParseComplete"]
    failing = (m.Parse("", "SELEC 1", ()), m.Close(b"S", name), m.Sync())
    again = (m.Parse(name, PLAIN, ()), m.Sync())
    run = (bind(values, name), *RUN)
    if pipelined:
        assert s.exchange(*failing, *again, *run) == ["E42601", "E42P05", "E0A000"]
        return
    assert s.exchange(*failing) == ["E42601"]
    assert s.exchange(*again) == ["E42P05"]
    assert s.exchange(*run) == ["BindComplete", "CommandComplete"]
    seen.stored(i, control)


def sql_execute(s: Session, seen: Seen, shape: str, pipelined: bool) -> None:
    """SQL-level EXECUTE of the protected INSERT would carry its arguments as plaintext literals: refused,
    as a simple Query and inside a Parse, also under EXPLAIN and CREATE TABLE AS."""
    name = f"exe_{uuid.uuid4().hex[:8]}"
    i, control, values = seen.values(shape)
    secret = values.params[1]
    assert secret is not None
    literal = f"'\\x{secret.hex()}'" if shape == "envelope" else f"'{secret.decode()}'"
    args = f"({i}, {literal}, '{control}')"
    texts = [
        f"EXECUTE {name}{args}",
        f"EXPLAIN ANALYZE EXECUTE {name}{args}",
        f"CREATE TEMP TABLE t_{name} AS EXECUTE {name}{args}",
    ]
    prepare = (m.Parse(name, INSERT, ()), m.Sync())
    if pipelined:
        msgs: list[m.FrontendMessage] = [*prepare]
        for text in texts:
            msgs += [m.Query(text), m.Parse("", text, ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync()]
        assert s.exchange(*msgs) == ["ParseComplete", *["E0A000", "E0A000"] * len(texts)]
        return
    assert s.exchange(*prepare) == ["ParseComplete"]
    for text in texts:
        assert s.exchange(m.Query(text)) == ["E0A000"]
        assert s.exchange(m.Parse("", text, ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync()) == ["E0A000"]
    # An EXECUTE in a Parse runs at a later Execute, when the statement it names may have become the
    # INSERT: refused even while that statement is plain.
    later = f"{name}_later"
    assert s.exchange(m.Parse(later, PLAIN, ()), m.Sync()) == ["ParseComplete"]
    assert s.exchange(m.Parse("", f"EXECUTE {later}{args}", ()), m.Sync()) == ["E0A000"]
    assert s.exchange(m.Query(f"EXECUTE {later}('a', 'b', 'c')")) == ["CommandComplete"]


def sql_reset(s: Session, seen: Seen, shape: str, pipelined: bool) -> None:
    """DEALLOCATE S and DISCARD ALL remove S when they complete, as a simple Query and through the
    extended protocol; S parsed again as the INSERT is then sealed. Sent before the reset is answered,
    the Bind could meet either statement: refused."""
    for reset in ("DEALLOCATE {}", "DISCARD ALL"):
        name = f"res_{uuid.uuid4().hex[:8]}"
        i, control, values = seen.values(shape)
        assert s.exchange(m.Parse(name, PLAIN, ()), m.Sync()) == ["ParseComplete"]
        sql = reset.format(name)
        as_query = (m.Query(sql),)
        as_extended = (m.Parse("", sql, ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync())
        again = (m.Parse(name, INSERT, ()), m.Sync())
        run = (bind(values, name), *RUN)
        for way in (as_query, as_extended):
            if pipelined:
                assert s.exchange(*way, *again, *run)[-1] == "E0A000"
                back = s.exchange(m.Close(b"S", name), m.Parse(name, PLAIN, ()), m.Sync())
                assert back == ["CloseComplete", "ParseComplete"]
                continue
            assert s.exchange(*way)[-1] == "CommandComplete"
            assert s.exchange(*again) == ["ParseComplete"]
        if not pipelined:
            assert s.exchange(*run) == ["BindComplete", "CommandComplete"]
            seen.stored(i, control)


Attack = Callable[[Session, Seen, str, bool], None]
ATTACKS: list[Attack] = [duplicate_parse, skipped_close, sql_execute, sql_reset]


def test_statement_state_attacks_leave_no_plaintext(env: EncEnv, pg: DevCluster) -> None:
    seen = Seen()
    for attack in ATTACKS:
        for shape in ("text", "envelope"):
            for pipelined in (False, True):
                s = Session(env)
                try:
                    attack(s, seen, shape, pipelined)
                finally:
                    s.close()
    assert seen.written, "no attack wrote a row: the checks below would prove nothing"
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        stored = c.execute("SELECT secret FROM enc_canary WHERE id = ANY(%s)", [seen.written]).fetchall()
        c.execute("CHECKPOINT")
        c.execute("SELECT pg_switch_wal()")
    # The table read directly holds envelopes only, none containing a canary.
    secrets = [bytes(r[0]) for r in stored]
    assert len(secrets) == len(seen.written)
    assert all(x.startswith(b"PV\x01") for x in secrets)
    assert [c for c in seen.canaries for x in secrets if c.encode() in x] == []
    found = search(server_files(pg), [*seen.canaries, *seen.controls])
    leaks = {c: sorted(str(p) for p in found.files(c)) for c in seen.canaries if found.files(c)}
    assert leaks == {}, f"plaintext sent through pgveil found on the server: {leaks}"
    wal = pg.data_dir / "pg_wal"
    assert [c for c in seen.controls if not any(wal in p.parents for p in found.files(c))] == [], "blind search"
    assert [c for c in seen.controls if pg.log_file not in found.files(c)] == [], "blind search of the log"
    # Each row written reads back through pgveil with its canary.
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        rows = c.execute("SELECT open, secret FROM enc_canary WHERE id = ANY(%s)", [seen.written]).fetchall()
    assert sorted(r[0] for r in rows) == sorted(seen.controls)
    assert all(any(c in r[1] for c in seen.canaries) for r in rows)


def test_sql_prepare_and_execute_of_plain_statements_still_work(env: EncEnv) -> None:
    """SQL-level PREPARE is tracked: EXECUTE and a protocol Bind of a plain SQL-prepared statement run."""
    s = Session(env)
    try:
        assert s.exchange(m.Query("PREPARE plain_sum(int) AS SELECT $1 + 1")) == ["CommandComplete"]
        assert s.exchange(m.Query("EXECUTE plain_sum(41)")) == ["CommandComplete"]
        assert s.exchange(m.Bind("", "plain_sum", (), (b"41",), ()), *RUN) == ["BindComplete", "CommandComplete"]
        assert s.exchange(m.Query("DEALLOCATE plain_sum")) == ["CommandComplete"]
        # Gone now, on the server and in pgveil's model: a Bind of it is refused before it leaves.
        assert s.exchange(m.Bind("", "plain_sum", (), (b"41",), ()), *RUN) == ["E0A000"]
    finally:
        s.close()


# -- real drivers keep working ------------------------------------------------------------------------


def test_psycopg_prepared_pipeline_and_executemany(env: EncEnv) -> None:
    ids = [next_id() for _ in range(12)]
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        # Server-side prepared statements from the sixth execution on (prepare_threshold = 5).
        for i in ids[:8]:
            c.execute(INSERT.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s"), [i, f"s{i}", f"o{i}"])
        with c.pipeline():
            for i in ids[8:10]:
                c.execute("INSERT INTO enc_canary (id, secret, open) VALUES (%s, %s, %s)", [i, f"s{i}", f"o{i}"])
            for i in ids[:3]:
                c.execute("SELECT secret FROM enc_canary WHERE id = %s", [i], prepare=True)
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO enc_canary (id, secret, open) VALUES (%s, %s, %s)",
                [(i, f"s{i}", f"o{i}") for i in ids[10:]],
            )
        for _ in range(7):
            got = c.execute("SELECT id, secret FROM enc_canary WHERE id = ANY(%s) ORDER BY id", [ids]).fetchall()
            assert got == [(i, f"s{i}") for i in ids]


async def test_asyncpg_prepares_caches_closes_and_cursors(env: EncEnv) -> None:
    ids = [next_id() for _ in range(10)]
    # A small statement cache: asyncpg closes the statements it evicts.
    conn = await asyncpg.connect(env.dsn(), statement_cache_size=2)
    try:
        stmt = await conn.prepare("INSERT INTO enc_canary (id, secret, open) VALUES ($1, $2, $3)")
        await stmt.executemany([(i, f"s{i}", f"o{i}") for i in ids])
        for _ in range(3):
            for k, q in enumerate(
                [
                    "SELECT secret FROM enc_canary WHERE id = $1",
                    "SELECT secret, open FROM enc_canary WHERE id = $1",
                    "SELECT id, secret FROM enc_canary WHERE id = $1",
                ]
            ):
                row = await conn.fetchrow(q, ids[k])
                assert row is not None
                assert row["secret"] == f"s{ids[k]}"
        async with conn.transaction():
            got = [
                r["secret"]
                async for r in conn.cursor(
                    "SELECT secret FROM enc_canary WHERE id = ANY($1) ORDER BY id", ids, prefetch=3
                )
            ]
        assert got == [f"s{i}" for i in ids]
    finally:
        await conn.close()


def test_pgbench_prepared_on_a_protected_table(env: EncEnv, tmp_path: Path) -> None:
    ids = [next_id() for _ in range(20)]
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.cursor().executemany(
            "INSERT INTO enc_canary (id, secret, open) VALUES (%s, %s, %s)", [(i, f"s{i}", "pgbench") for i in ids]
        )
    script = tmp_path / "protected.sql"
    script.write_text(
        f"\\set id random({ids[0]}, {ids[-1]})\n"
        "SELECT secret FROM enc_canary WHERE id = :id;\n"
        "UPDATE enc_canary SET secret = 'pgbench' WHERE id = :id;\n"
    )
    r = run_pgbench(env.proxy, "-n", "-M", "prepared", "-c", "2", "-t", "50", "-f", str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "number of failed transactions: 0" in r.stdout
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        got = c.execute("SELECT id, secret FROM enc_canary WHERE id = ANY(%s)", [ids]).fetchall()
    assert all(s in (f"s{i}", "pgbench") for i, s in got)
    assert any(s == "pgbench" for _, s in got)
