"""Red-team tests of issue 7's statement state, SQL reading, exceptions and startup (items 1, 2, 7, 9).

Each test is an attack that once made pgveil's reading of a session differ from the server's, sent as
raw protocol messages through pgveil to the real PostgreSQL, then checked with the canary method: the
table read directly, the data directory and WAL after a CHECKPOINT, and the server log as text and hex
must hold no canary, while a control written in the same statements is found (the search is not blind).
"""

from __future__ import annotations

import struct
import time
import uuid

import encfixtures
import psycopg
import pytest
from conftest import ProxyProcess
from encfixtures import EncEnv, next_id
from test_encryption_canary import distinctive, search, server_files
from test_encryption_statement_state import ENVELOPE_HEADER, INSERT, PLAIN, Session
from test_startup_transparency import _EOF, Step, _startup, run_script
from test_startup_transparency import startup_proxy as startup_proxy  # the fixture

from proxy.devcluster import DevCluster
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.encryption import REFUSED_PORTAL_NAME, REFUSED_STATEMENT_NAME

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> EncEnv:
    env = encfixtures.shared_env(pg, tmp_path_factory, pytestconfig)
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        c.execute("GRANT SELECT, INSERT ON enc_canary TO pwuser")
    return env


def assert_no_canary(pg: DevCluster, env: EncEnv, ids: list[int], canaries: list[str], controls: list[str]) -> None:
    """No canary in the rows ``ids`` read directly, the data directory, the WAL or the server log; every
    control (sent beside a canary, to the unprotected column) is in the WAL and the log."""
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        stored = c.execute("SELECT secret FROM enc_canary WHERE id = ANY(%s)", [ids]).fetchall()
        c.execute("CHECKPOINT")
        c.execute("SELECT pg_switch_wal()")
    assert [c for c in canaries for (x,) in stored if x is not None and c.encode() in bytes(x)] == []
    found = search(server_files(pg), [*canaries, *controls])
    leaks = {c: sorted(str(p) for p in found.files(c)) for c in canaries if found.files(c)}
    assert leaks == {}, f"plaintext sent through pgveil found on the server: {leaks}"
    wal = pg.data_dir / "pg_wal"
    assert [c for c in controls if not any(wal in p.parents for p in found.files(c))] == [], "blind search"
    assert [c for c in controls if pg.log_file not in found.files(c)] == [], "blind search of the log"


# -- item 1: names the server truncates ------------------------------------------------------------------
# PostgreSQL keys prepared statements and portals by their first 63 bytes (NAMEDATALEN - 1): two longer
# names that share those bytes are one statement to the server. pgveil keyed them by the whole name, so a
# Close of one name removed the server's statement while pgveil kept the other as a harmless SELECT.


def long_names() -> tuple[str, str]:
    prefix = ("rt_" + uuid.uuid4().hex + "x" * 63)[:63]
    return prefix + "_one", prefix + "_two"


@pytest.mark.parametrize("pipelined", [False, True])
def test_statement_names_beyond_63_bytes_are_one_name(env: EncEnv, pg: DevCluster, pipelined: bool) -> None:
    one, two = long_names()
    i = next_id()
    canary, control = distinctive("CANARY", "longname"), distinctive("CONTROL", "longname")
    values = (str(i).encode(), ENVELOPE_HEADER + canary.encode(), control.encode())
    steps: list[tuple[m.FrontendMessage, ...]] = [
        (m.Parse(two, PLAIN, ()), m.Sync()),  # the server stores it under the shared 63 bytes
        (m.Close(b"S", one), m.Sync()),  # the server closes that statement: the name is free
        (m.Parse(one, INSERT, ()), m.Sync()),  # the same 63 bytes again: the protected INSERT
        (m.Bind("", two, (0, 1, 0), values, ()), m.Execute("", 0), m.Sync()),  # runs the INSERT
    ]
    s = Session(env)
    try:
        if pipelined:
            # When the Bind arrives nothing is answered: the name may be the SELECT or the INSERT.
            replies = s.exchange(*(x for step in steps for x in step))
            assert replies == ["ParseComplete", "CloseComplete", "ParseComplete", "E0A000"]
            # The control goes in the same way, sealed: the searches below then know where to look.
            assert s.exchange(m.Bind("", two, (0, 1, 0), values, ()), m.Execute("", 0), m.Sync()) == [
                "BindComplete",
                "CommandComplete",
            ]
        else:
            replies = [r for step in steps[:3] for r in s.exchange(*step)]
            assert replies == ["ParseComplete", "CloseComplete", "ParseComplete"]
            assert s.exchange(*steps[3]) == ["BindComplete", "CommandComplete"]
        assert s.exchange(m.Query("SELECT 1")) == ["CommandComplete"]
    finally:
        s.close()
    # The row went in sealed, as a Bind of the INSERT: it reads back through pgveil.
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        got = c.execute("SELECT secret, open FROM enc_canary WHERE id = %s", [i]).fetchall()
    assert len(got) == 1
    assert got[0][1] == control
    assert canary in got[0][0]
    assert_no_canary(pg, env, [i], [canary], [control])


# -- item 1: statements changed by server-side code -------------------------------------------------------
# SQL-level PREPARE and DEALLOCATE run through SPI as well (plpgsql EXECUTE, in a DO block or any
# function). Their CommandComplete never reaches the client, so pgveil cannot follow them: a statement it
# knows as a plain SELECT is replaced, on the server, by an INSERT into the protected table, and a Bind of
# it would go out unsealed. The DO block names the table only in pieces, so no analysis of its text sees
# it: pgveil trusts no statement or portal of the session after a DO block with dynamic SQL.


def test_statement_replaced_by_server_side_code_is_not_bound_unsealed(env: EncEnv, pg: DevCluster) -> None:
    name = f"rt_do_{uuid.uuid4().hex[:8]}"
    i = next_id()
    canary, control = distinctive("CANARY", "do-prepare"), distinctive("CONTROL", "do-prepare")
    values = (str(i).encode(), ENVELOPE_HEADER + canary.encode(), control.encode())
    do = (
        f"DO $$ BEGIN EXECUTE 'DEALLOCATE {name}'; EXECUTE 'PREPARE {name} AS INS' || 'ERT INTO enc_' || "
        "'canary (id, secret, open) VALUES ($1, $2, $3)'; END $$"
    )
    s = Session(env)
    try:
        assert s.exchange(m.Parse(name, PLAIN, ()), m.Sync()) == ["ParseComplete"]
        replies = s.exchange(m.Query(do))
        assert replies == ["CommandComplete"]
        # The server now holds the INSERT under the name: after a DO block with dynamic SQL pgveil trusts
        # no statement prepared before it, so the Bind is refused.
        replies = s.exchange(m.Bind("", name, (0, 1, 0), values, ()), m.Execute("", 0), m.Sync())
        assert replies == ["E0A000"]
        # The control, written through the ordinary protected INSERT, so the searches below can see it
        # (once pgveil has read its catalog again: the block counts as DDL on every protected table).
        control_id = str(next_id()).encode()
        deadline = time.monotonic() + 20
        while True:
            replies = s.exchange(
                m.Parse("", INSERT, ()),
                m.Bind("", "", (), (control_id, b"x", control.encode()), ()),
                m.Execute("", 0),
                m.Sync(),
            )
            if replies != ["E55000"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert replies == ["ParseComplete", "BindComplete", "CommandComplete"]
    finally:
        s.close()
    assert_no_canary(pg, env, [i], [canary], [control])


# -- items 1 and 7: the stand-ins of refused messages -------------------------------------------------------
# A refused Bind was replaced by a Bind of the statement "\x01pgveil refused", a refused Execute by an
# Execute of the portal of that name, so that the server fails at the same step and its error can be
# replaced by the refusal. A client may create a statement and a portal of that name itself: the stand-in
# then ran the client's statement, the refusal never reached the client, and a protected value came back as
# the stored envelope.


def read_until_ready(s: Session) -> tuple[list[str], list[tuple[bytes | None, ...]]]:
    """The replies up to the next ReadyForQuery: what happened (``E`` and SQLSTATE for an error), and rows."""
    what: list[str] = []
    rows: list[tuple[bytes | None, ...]] = []
    while True:
        msg = s.raw.read_message()
        assert msg is not None, "pgveil closed the connection"
        t, body = msg
        if t == b"Z":
            return what, rows
        if t == b"D":
            row = codec.decode_backend(t[0], body)
            assert isinstance(row, m.DataRow)
            rows.append(row.values)
        elif t not in (b"T", b"n", b"S", b"N"):
            reply = codec.decode_backend(t[0], body)
            what.append(f"E{reply.sqlstate}" if isinstance(reply, m.ErrorResponse) else type(reply).__name__)


def stored_secret(env: EncEnv) -> tuple[int, str]:
    i = next_id()
    secret = distinctive("SECRET", "stand-in")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO enc_canary (id, secret, open) VALUES (%s, %s, 'o')", [i, secret])
    return i, secret


def test_a_refused_bind_fails_even_when_the_client_owns_the_stand_in_name(env: EncEnv) -> None:
    i, _secret = stored_secret(env)
    s = Session(env)
    try:
        squat = m.Parse(REFUSED_STATEMENT_NAME, f"SELECT secret, open FROM enc_canary WHERE id = {i}", ())
        assert s.exchange(squat, m.Sync()) == ["ParseComplete"]
        # A Bind of a statement pgveil never saw prepared is refused.
        s.raw.send(
            b"".join(
                codec.encode_frontend(x)
                for x in (m.Bind("", "rt_never_prepared", (), (), ()), m.Describe(b"P", ""), m.Execute("", 0), m.Sync())
            )
        )
        assert read_until_ready(s) == (["E0A000"], [])
        assert s.exchange(m.Query("SELECT 1")) == ["CommandComplete"]
    finally:
        s.close()


def test_a_refused_execute_fails_even_when_the_client_owns_the_stand_in_name(env: EncEnv) -> None:
    i, _secret = stored_secret(env)
    s = Session(env)
    try:
        select = f"SELECT secret FROM enc_canary WHERE id = {i}"
        setup = s.exchange(
            m.Query("BEGIN"),
            # (A cursor of a protected table is refused; one of anything else shows the stand-in ran.)
            m.Query(f"DECLARE \"{REFUSED_PORTAL_NAME}\" CURSOR FOR SELECT 'the stand-in ran'::text"),
            m.Parse("rt_plain", "SELECT 'harmless'::text", ()),
            m.Parse("rt_prot", select, ()),
            m.Bind("q", "rt_plain", (), (), ()),
            m.Sync(),
        )
        assert setup == ["CommandComplete", "CommandComplete", "ParseComplete", "ParseComplete", "BindComplete"]
        # Sent before the server has answered: q may be either portal when the Execute runs. Refused.
        pipelined = (m.Close(b"P", "q"), m.Sync(), m.Bind("q", "rt_prot", (), (), ()), m.Sync())
        s.raw.send(b"".join(codec.encode_frontend(x) for x in (*pipelined, m.Execute("q", 0), m.Sync())))
        assert read_until_ready(s)[0] == ["CloseComplete"]
        assert read_until_ready(s)[0] == ["BindComplete"]
        assert read_until_ready(s) == (["E0A000"], [])
        assert s.exchange(m.Query("ROLLBACK")) == ["CommandComplete"]
    finally:
        s.close()


# -- item 9: bytes the server cannot read during authentication -------------------------------------------
# pgveil rejected them itself, in words of its own: an authentication message longer than the server
# reads (FATAL 08P01 "authentication message too long", where PostgreSQL answers 28P01), and a byte that
# is no message type sent in the same write as the StartupMessage (pgveil failed before relaying the
# server's authentication request). The server must see them and answer as to a client connected directly.

STARTUP_SCRIPTS: dict[str, list[Step]] = {
    "sasl-response-too-long": [_startup(), b"p" + struct.pack("!I", 100000) + b"SCRAM-SHA-256\x00", _EOF],
    "sasl-response-length-too-small": [_startup(), b"p" + struct.pack("!I", 2), _EOF],
    "two-startups-in-one-write": [_startup() + _startup()],
    "startup-and-stray-byte": [_startup("pwuser") + b"\xff\x00\x00\x00\x04"],
}


@pytest.mark.parametrize("name", sorted(STARTUP_SCRIPTS))
def test_unreadable_authentication_bytes_answer_as_the_server(
    name: str, pg: DevCluster, startup_proxy: ProxyProcess
) -> None:
    steps = STARTUP_SCRIPTS[name]
    direct = run_script(("127.0.0.1", pg.port), steps)
    proxied = run_script((startup_proxy.host, startup_proxy.port), steps)
    assert proxied == direct
    assert "Traceback" not in startup_proxy.logs()


# -- item 1: names the server reads in the client encoding --------------------------------------------------
# The server converts a statement name from the session's client_encoding: "sé" sent as UTF-8 (c3 a9) and
# as LATIN1 (e9) is one statement to it, two to a model keyed by bytes. Parse the UTF-8 name as a plain
# SELECT, switch to LATIN1, Close and Parse the LATIN1 name as the protected INSERT, switch back, and a
# Bind of the UTF-8 name ran the INSERT unsealed.


def test_statement_names_read_in_the_client_encoding(env: EncEnv, pg: DevCluster) -> None:
    tag = uuid.uuid4().hex[:8]
    utf8 = f"rt_{tag}é"
    latin1 = (f"rt_{tag}".encode() + b"\xe9").decode("utf-8", "surrogateescape")  # how the codec reads e9
    i = next_id()
    canary, control = distinctive("CANARY", "encname"), distinctive("CONTROL", "encname")
    values = (str(i).encode(), ENVELOPE_HEADER + canary.encode(), control.encode())
    s = Session(env)
    try:
        first = s.exchange(m.Parse(utf8, PLAIN, ()), m.Sync())
        assert s.exchange(m.Query("SET client_encoding = 'LATIN1'")) == ["CommandComplete"]
        s.exchange(m.Close(b"S", latin1), m.Sync())
        second = s.exchange(m.Parse(latin1, INSERT, ()), m.Sync())
        assert s.exchange(m.Query("SET client_encoding = 'UTF8'")) == ["CommandComplete"]
        bound = s.exchange(m.Bind("", utf8, (0, 1, 0), values, ()), m.Execute("", 0), m.Sync())
        # Sealed, or refused at any step; never run unsealed.
        assert "E0A000" in first + second + bound or bound == ["BindComplete", "CommandComplete"]
        # The control, through the ordinary protected INSERT, so that the searches below can see it.
        control_row = (str(next_id()).encode(), b"x", control.encode())
        assert s.exchange(m.Parse("", INSERT, ()), m.Bind("", "", (), control_row, ()), m.Execute("", 0), m.Sync()) == [
            "ParseComplete",
            "BindComplete",
            "CommandComplete",
        ]
    finally:
        s.close()
    assert_no_canary(pg, env, [i], [canary], [control])


def test_a_driver_sees_why_its_statement_is_refused_after_a_dynamic_do_block(env: EncEnv) -> None:
    """psycopg: a statement prepared before a DO block with dynamic SQL is refused after it (0A000, with
    the way out in the hint); the session stays usable, and a statement prepared afterwards runs."""
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        sql = "SELECT open FROM enc_canary WHERE id = %s"
        c.execute(sql, [0], prepare=True).fetchall()
        c.execute("DO $$BEGIN EXECUTE 'SELECT 1'; END$$")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
            c.execute(sql, [0], prepare=True).fetchall()
        assert "DO block" in (e.value.diag.message_hint or "")
        deadline = time.monotonic() + 20
        while True:  # the block also counts as DDL: the catalog is read again first
            try:
                again = c.execute("SELECT open FROM enc_canary WHERE id = %s AND true", [0], prepare=True)
                assert again.fetchall() == []
                break
            except psycopg.errors.ObjectNotInPrerequisiteState:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert c.execute("SELECT 1").fetchall() == [(1,)]
