"""One reading of the SQL text: texts that the server would read otherwise than pgveil are refused.

Each attack is a text pgveil (reading it with standard_conforming_strings on and as UTF-8) takes for
one harmless SELECT that names the protected table only inside a string constant, while the server,
under the session's real settings, reads three statements, the second an INSERT of a canary into the
protected column ``enc_canary.secret``. The settings come the ways a session can get them: SET,
``set_config``, startup ``options``, ``ALTER ROLE ... SET``, a SET pipelined in the same TCP write as
the attack (the server applies it before pgveil sees its ParameterStatus), and a client encoding
whose multibyte characters can contain an ASCII backslash (SJIS, BIG5). Then numbers in PostgreSQL 16
syntax (``0x1F``, ``1_000``, ``0b101``, ``0o17``) bound for a protected int column, which libpg_query
accepts and PostgreSQL 15 rejects.

Every attack must be refused (the session stays usable); afterwards no canary is in the table, in the
data directory or WAL after a CHECKPOINT, or in the server log (``log_statement = all``) as text or
hex, while a control value written in the same sessions is found (the search is not blind).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import encfixtures
import psycopg
import pytest
from conftest import PW_PASSWORD
from encfixtures import EncEnv, next_id, run_psql
from faultproxy import frame, parse_error_fields, query, raw_session
from psycopg import pq
from test_encryption_canary import distinctive, search, server_files

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

LEX_ROLE = "lex_scs_off"
LEX_PASSWORD = "lex-secret"


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> EncEnv:
    e = encfixtures.shared_env(pg, tmp_path_factory, pytestconfig)
    with psycopg.connect(e.direct_dsn, autocommit=True) as c:
        c.execute(f"DROP ROLE IF EXISTS {LEX_ROLE}")
        c.execute(f"CREATE ROLE {LEX_ROLE} LOGIN PASSWORD '{LEX_PASSWORD}'")
        c.execute(f"ALTER ROLE {LEX_ROLE} SET standard_conforming_strings = off")
        c.execute(f"GRANT ALL ON enc_canary, enc_refuse TO {LEX_ROLE}, pwuser")
    return e


def scs_attack(row_id: int, canary: str) -> str:
    """One SELECT with standard_conforming_strings on; SELECT, INSERT, comment with it off."""
    return (
        f"SELECT 'a\\' AS x, '; INSERT INTO enc_canary (id, secret, open) VALUES ({row_id}, $${canary}$$, $$c$$); "
        "--' AS y"
    )


def scs_attack_one_statement(row_id: int, canary: str) -> str:
    """One statement for a Parse: with scs on the canary is inside ``open``'s string and ``secret`` is
    NULL; with it off the canary is the value for ``secret``."""
    return f"INSERT INTO enc_canary (id, open, secret) VALUES ({row_id}, 'a\\' || ', $${canary}$$) --', NULL)"


def encoding_attack(row_id: int, canary: str, char: str) -> str:
    """One SELECT read as UTF-8; read in the client encoding, ``char``'s last byte and the backslash are
    one character, so the E'' string ends at the next quote."""
    return (
        f"SELECT E'{char}\\'; INSERT INTO enc_canary (id, secret, open) VALUES ({row_id}, $${canary}$$, $$c$$); "
        "--' AS y"
    )


def encoding_attack_one_statement(row_id: int, canary: str, char: str) -> str:
    """One statement: read as UTF-8 the canary is in a comment and ``secret`` is NULL; read in the client
    encoding the E'' string ends early and the canary is the value for ``secret``."""
    return f"INSERT INTO enc_canary (id, open, secret) VALUES ({row_id}, E'{char}\\' || ', NULL) --', $${canary}$$)"


@dataclass
class Outcome:
    sqlstate: str
    message: str


def simple(conn: psycopg.Connection[object], text: bytes) -> Outcome:
    """Sends ``text`` as one simple Query, byte for byte; the last result's SQLSTATE ("" if none)."""
    res = conn.pgconn.exec_(text)
    state = res.error_field(pq.DiagnosticField.SQLSTATE) or b""
    msg = res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
    return Outcome(state.decode(), msg.decode(errors="replace"))


def extended(conn: psycopg.Connection[object], text: bytes) -> Outcome:
    res = conn.pgconn.exec_params(text, [])
    state = res.error_field(pq.DiagnosticField.SQLSTATE) or b""
    msg = res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
    return Outcome(state.decode(), msg.decode(errors="replace"))


def write_control(conn: psycopg.Connection[object], control: str) -> None:
    """The session works after the refusal; the control goes into the unprotected column."""
    text = f"INSERT INTO enc_canary (id, secret, open) VALUES ({next_id()}, NULL, '{control}')"
    res = conn.pgconn.exec_(text.encode("ascii"))
    assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message


Attack = Callable[[EncEnv, int, str, str], list[Outcome]]


def via_set(env: EncEnv, row_id: int, canary: str, control: str) -> list[Outcome]:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("SET standard_conforming_strings = off")
        out = [
            simple(c, scs_attack(row_id, canary).encode()),
            extended(c, scs_attack_one_statement(row_id, canary).encode()),
        ]
        write_control(c, control)
        return out


def via_set_config(env: EncEnv, row_id: int, canary: str, control: str) -> list[Outcome]:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("SELECT set_config('standard_conforming_strings', 'off', false)")
        out = [simple(c, scs_attack(row_id, canary).encode())]
        write_control(c, control)
        return out


def via_startup_options(env: EncEnv, row_id: int, canary: str, control: str) -> list[Outcome]:
    with psycopg.connect(env.dsn(), options="-c standard_conforming_strings=off", autocommit=True) as c:
        assert c.pgconn.parameter_status(b"standard_conforming_strings") == b"off"
        out = [simple(c, scs_attack(row_id, canary).encode())]
        write_control(c, control)
        return out


def via_alter_role(env: EncEnv, row_id: int, canary: str, control: str) -> list[Outcome]:
    with psycopg.connect(env.proxy.dsn(user=LEX_ROLE, password=LEX_PASSWORD), autocommit=True) as c:
        assert c.pgconn.parameter_status(b"standard_conforming_strings") == b"off"
        out = [simple(c, scs_attack(row_id, canary).encode())]
        write_control(c, control)
        return out


def _pipelined(env: EncEnv, row_id: int, canary: str, control: str, setting: str) -> list[Outcome]:
    """The SET and the attack in one TCP write: the server has applied the SET when it reads the
    attack, pgveil has not seen the ParameterStatus yet."""
    with raw_session(env.proxy.host, env.proxy.port, "pwuser", PW_PASSWORD, "app") as raw:
        raw.send(query(setting) + query(scs_attack(row_id, canary)))
        outcomes: list[Outcome] = []
        for _ in range(2):
            errors: list[dict[str, str]] = []
            while (msg := raw.read_message()) is not None and msg[0] != b"Z":
                if msg[0] == b"E":
                    errors.append(parse_error_fields(msg[1]))
            outcomes.append(Outcome(errors[0]["C"], errors[0]["M"]) if errors else Outcome("", ""))
        assert outcomes[0].sqlstate == "", outcomes[0]  # the SET itself went through
        raw.send(frame(b"Q", f"INSERT INTO enc_canary (id, open) VALUES ({next_id()}, '{control}')".encode() + b"\0"))
        raw.read_until_ready()
        return outcomes[1:]


def via_pipelined_parse(env: EncEnv, row_id: int, canary: str, control: str) -> list[Outcome]:
    """The SET as a simple Query, then Parse/Bind/Execute/Sync of the one-statement attack, one write."""
    attack = scs_attack_one_statement(row_id, canary).encode()
    with raw_session(env.proxy.host, env.proxy.port, "pwuser", PW_PASSWORD, "app") as raw:
        raw.send(
            query("SET standard_conforming_strings = off")
            + frame(b"P", b"\0" + attack + b"\0\0\0")
            + frame(b"B", b"\0\0\0\0\0\0\0\0")
            + frame(b"E", b"\0\0\0\0\0")
            + frame(b"S", b"")
        )
        outcomes: list[Outcome] = []
        for _ in range(2):
            errors: list[dict[str, str]] = []
            while (msg := raw.read_message()) is not None and msg[0] != b"Z":
                if msg[0] == b"E":
                    errors.append(parse_error_fields(msg[1]))
            outcomes.append(Outcome(errors[0]["C"], errors[0]["M"]) if errors else Outcome("", ""))
        assert outcomes[0].sqlstate == "", outcomes[0]
        raw.send(frame(b"Q", f"INSERT INTO enc_canary (id, open) VALUES ({next_id()}, '{control}')".encode() + b"\0"))
        raw.read_until_ready()
        return outcomes[1:]


def via_pipelined_set(env: EncEnv, row_id: int, canary: str, control: str) -> list[Outcome]:
    return _pipelined(env, row_id, canary, control, "SET standard_conforming_strings = off")


def via_pipelined_set_config(env: EncEnv, row_id: int, canary: str, control: str) -> list[Outcome]:
    return _pipelined(env, row_id, canary, control, "SELECT set_config('standard_conforming_strings', 'off', false)")


def _encoding(env: EncEnv, row_id: int, canary: str, control: str, encoding: str, char: str) -> list[Outcome]:
    with psycopg.connect(env.dsn(), client_encoding=encoding, autocommit=True) as c:
        assert c.pgconn.parameter_status(b"client_encoding") == encoding.encode()
        attack = encoding_attack(row_id, canary, char).encode("utf-8")
        one = encoding_attack_one_statement(row_id, canary, char).encode("utf-8")
        out = [simple(c, attack), extended(c, one)]
        write_control(c, control)
        return out


def via_sjis(env: EncEnv, row_id: int, canary: str, control: str) -> list[Outcome]:
    return _encoding(env, row_id, canary, control, "SJIS", "\u0101")  # C4 81: 0x81 takes the backslash


def via_big5(env: EncEnv, row_id: int, canary: str, control: str) -> list[Outcome]:
    return _encoding(env, row_id, canary, control, "BIG5", "\u4e21")  # E4 B8 A1: 0xA1 takes the backslash


ATTACKS: dict[str, Attack] = {
    "set": via_set,
    "set_config": via_set_config,
    "startup_options": via_startup_options,
    "alter_role": via_alter_role,
    "pipelined_set": via_pipelined_set,
    "pipelined_set_config": via_pipelined_set_config,
    "pipelined_parse": via_pipelined_parse,
    "sjis": via_sjis,
    "big5": via_big5,
}


def test_attacks_are_refused_and_leave_no_plaintext(env: EncEnv, pg: DevCluster) -> None:
    canaries = {name: distinctive("CANARY", f"lexing-{name}") for name in ATTACKS}
    controls = {name: distinctive("CONTROL", f"lexing-{name}") for name in ATTACKS}
    ids = {name: next_id() for name in ATTACKS}
    outcomes = {name: attack(env, ids[name], canaries[name], controls[name]) for name, attack in ATTACKS.items()}

    not_refused = {n: o for n, o in outcomes.items() if any(x.sqlstate != "0A000" for x in o)}
    assert not_refused == {}, f"attacks pgveil did not refuse: {not_refused}"
    for o in outcomes.values():
        assert all(x.message.startswith("pgveil:") for x in o)
        assert not any("CANARY" in x.message for x in o)
    rows = direct_query(env, "SELECT id FROM enc_canary WHERE id = ANY(%s)", list(ids.values()))
    assert rows == []

    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        c.execute("CHECKPOINT")
        c.execute("SELECT pg_switch_wal()")
    found = search(server_files(pg), [*canaries.values(), *controls.values()])
    leaks = {n: sorted(str(p) for p in found.files(c)) for n, c in canaries.items() if found.files(c)}
    assert leaks == {}, f"plaintext found on the server: {leaks}"
    wal = pg.data_dir / "pg_wal"
    for name, control in controls.items():
        assert pg.log_file in found.files(control), f"control {name} not in the server log: the search is blind"
        assert any(wal in p.parents for p in found.files(control)), f"control {name} not in the WAL"


def direct_query(env: EncEnv, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        return c.execute(sql, params).fetchall()


def test_what_reads_the_same_still_works_with_scs_off(env: EncEnv) -> None:
    """standard_conforming_strings = off is supported for texts whose reading does not depend on it:
    pgveil encrypts a literal without backslashes, and refuses one with a backslash."""
    row_id = next_id()
    with psycopg.connect(env.dsn(), options="-c standard_conforming_strings=off", autocommit=True) as c:
        ok = simple(c, f"INSERT INTO enc_canary (id, secret, open) VALUES ({row_id}, $$dollar$$, 'o')".encode())
        assert ok.sqlstate == ""
        refused = simple(c, f"INSERT INTO enc_canary (id, secret, open) VALUES ({next_id()}, 'a\\nb', 'o')".encode())
        assert refused.sqlstate == "0A000"
        got = c.execute("SELECT secret FROM enc_canary WHERE id = %s", [row_id]).fetchone()
    assert got == ("dollar",)
    stored = direct_query(env, "SELECT secret FROM enc_canary WHERE id = %s", row_id)
    assert stored != [("dollar",)]
    assert isinstance(stored[0][0], bytes)


def test_ascii_text_works_in_a_client_only_encoding(env: EncEnv) -> None:
    """In SJIS pgveil refuses only non-ASCII text; the session can switch back to UTF8."""
    with psycopg.connect(env.dsn(), client_encoding="SJIS", autocommit=True) as c:
        assert simple(c, b"SELECT count(*) FROM enc_canary WHERE secret IS NULL").sqlstate == ""
        assert simple(c, "SELECT 'ā'".encode()).sqlstate == "0A000"
        assert simple(c, b"SET client_encoding = 'UTF8'").sqlstate == ""
        assert simple(c, "SELECT 'ā'".encode()).sqlstate == ""


@pytest.mark.parametrize("literal", ["0x1F", "1_000", "0b101", "0o17"])
def test_postgresql_16_numbers_for_a_protected_int_are_refused(env: EncEnv, literal: str) -> None:
    major = int(str(direct_query(env, "SHOW server_version_num")[0][0])) // 10000
    if major >= 16:
        pytest.skip("the server accepts PostgreSQL 16 numeric literals")
    with psycopg.connect(env.direct_dsn, autocommit=True) as c, pytest.raises(psycopg.errors.SyntaxError):
        c.execute(f"SELECT {literal}")  # the server itself rejects the syntax
    ids = [next_id(), next_id()]
    p = run_psql(env.dsn(), "-c", f"INSERT INTO enc_refuse (id, n) VALUES ({ids[0]}, {literal})")
    assert p.returncode != 0
    assert "42601" in p.stderr or "syntax" in p.stderr, p.stderr
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        out = extended(c, f"INSERT INTO enc_refuse (id, n) VALUES ({ids[1]}, {literal})".encode())
        assert out.sqlstate == "42601"
        assert out.message.startswith("pgveil:")
        assert simple(c, b"SELECT 1").sqlstate == ""
    assert direct_query(env, "SELECT id FROM enc_refuse WHERE id = ANY(%s)", ids) == []


def test_statement_text_is_read_in_a_single_byte_client_encoding(env: EncEnv) -> None:
    """LATIN1 bytes (not UTF-8) in a literal for a protected column: pgveil reads the text in LATIN1, seals
    the value, and leaves the rest of the text byte for byte (the unprotected value arrives intact)."""
    ids = [next_id(), next_id()]
    with psycopg.connect(env.dsn(), client_encoding="LATIN1", autocommit=True) as c:
        for row_id, send in zip(ids, (simple, extended), strict=True):
            text = f"INSERT INTO enc_canary (id, secret, open) VALUES ({row_id}, 'café {row_id}', 'naïve')"
            out = send(c, text.encode("latin-1"))
            assert out.sqlstate == "", out
        res = c.pgconn.exec_(f"SELECT secret FROM enc_canary WHERE id IN ({ids[0]}, {ids[1]}) ORDER BY id".encode())
        assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
        assert [res.get_value(i, 0) for i in range(res.ntuples)] == [f"café {i}".encode("latin-1") for i in ids]
    stored = direct_query(env, "SELECT secret, open FROM enc_canary WHERE id = ANY(%s) ORDER BY id", ids)
    assert [row[1] for row in stored] == ["naïve", "naïve"]
    assert all(isinstance(row[0], bytes) and b"caf" not in row[0] for row in stored)
