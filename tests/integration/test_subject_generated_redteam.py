"""Red-team tests of generated subject ids (an INSERT that leaves a per-subject table's subject column to
its database default, for which pgveil runs a query of its own on the session's server connection first).

Each test is an attack or a demanding application's use, against a real PostgreSQL, a real pgveil and real
drivers (psycopg, asyncpg) or raw protocol messages. After the writes every stored envelope of the table
is checked to be under the key of the subject id stored in its own row (``_assert_every_row_sealed_for_itself``),
so a mismatch between pgveil's idea of which row gets which id and the server's is caught even when the
statement appeared to succeed. Tests marked ``xfail(strict=True)`` show a bug found (see the reasons).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, PW_PASSWORD, ProxyProcess
from faultproxy import RawClient
from test_subject_keys import prepare_database, start_proxy

from proxy.devcluster import DevCluster
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.schema import _EVENT_TRIGGER_SQL as EVENT_TRIGGER_SQL

pytestmark = pytest.mark.integration

DB = "subjred"
# table -> (subject kind, subject column)
SUBJECTS = {
    "public.rg_kw": ("a", "order"),
    "public.rg_conf": ("b", "id"),
    "public.rg_sp": ("c", "id"),
    "rg_other.rg_sp": ("d", "id"),
    "public.rg_nolist": ("e", "id"),
    "public.rg_fn": ("f", "id"),
    "public.rg_alt": ("g", "id"),
    "public.rg_cyc": ("h", "id"),
    "public.rg_txt": ("i", "id"),
    "public.rg_part": ("j", "id"),
    "public.rg_null": ("k", "id"),
    "public.rg_late": ("l", "id"),
    "public.rg_enc": ("m", "id"),
    "public.rg_btrig": ("n", "id"),
    "public.rg_butrig": ("o", "id"),
    "public.rg_atrig": ("p", "id"),
    "public.rg_lgiven": ("q", "id"),
}
TABLES: dict[str, Any] = {
    t: {"subject": {"kind": k, "column": col}, "columns": {"email": {"type": "text", "encrypt": True}}}
    for t, (k, col) in SUBJECTS.items()
}
DDL = [
    'CREATE TABLE rg_kw ("order" serial PRIMARY KEY, email text, note text)',
    "CREATE TABLE rg_conf (id serial PRIMARY KEY, tag text UNIQUE, email text, note text)",
    "CREATE TABLE rg_sp (id serial PRIMARY KEY, email text, note text)",
    "CREATE SCHEMA rg_other",
    "CREATE TABLE rg_other.rg_sp (id serial PRIMARY KEY, email text, note text)",
    "ALTER SEQUENCE rg_other.rg_sp_id_seq RESTART 500000",
    "CREATE TABLE rg_nolist (id serial PRIMARY KEY, email text, note text)",
    "CREATE SEQUENCE rg_fn_seq",
    "CREATE FUNCTION rg_next() RETURNS bigint LANGUAGE plpgsql AS $$BEGIN "
    "IF current_setting('rg.fail', true) = 'on' THEN RAISE EXCEPTION 'rg default refused' USING ERRCODE = 'P0001'; "
    "END IF; RAISE NOTICE 'rg default ran'; PERFORM pg_advisory_lock_shared(4242); "
    "PERFORM pg_advisory_unlock_shared(4242); RETURN nextval('rg_fn_seq'); END$$",
    "CREATE TABLE rg_fn (id bigint PRIMARY KEY DEFAULT rg_next(), email text, note text)",
    "CREATE TABLE rg_alt (id serial PRIMARY KEY, email text, note text)",
    "CREATE SEQUENCE rg_alt_seq2 START 900000",
    "CREATE SEQUENCE rg_cyc_seq INCREMENT BY -7 MINVALUE 1 MAXVALUE 50 START 50 CYCLE",
    "CREATE TABLE rg_cyc (id bigint DEFAULT nextval('rg_cyc_seq'), email text, note text)",
    "CREATE TABLE rg_txt (id text PRIMARY KEY DEFAULT upper(gen_random_uuid()::text), email text, note text)",
    "CREATE TABLE rg_part (id bigserial, email text, note text, PRIMARY KEY (id)) PARTITION BY RANGE (id)",
    "CREATE TABLE rg_part_all PARTITION OF rg_part FOR VALUES FROM (MINVALUE) TO (MAXVALUE)",
    "CREATE FUNCTION rg_bump() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN NEW.id := NEW.id + 100000; RETURN NEW; END$$",
    "CREATE TRIGGER rg_bump BEFORE INSERT ON rg_part_all FOR EACH ROW EXECUTE FUNCTION rg_bump()",
    "CREATE TABLE rg_late (id bigserial PRIMARY KEY, email text, note text)",
    "CREATE SEQUENCE rg_enc_seq",
    "CREATE TABLE rg_enc (id text PRIMARY KEY DEFAULT 'Ã©-' || nextval('rg_enc_seq')::text, email text, note text)",
    "CREATE SEQUENCE rg_null_seq",
    "CREATE TABLE rg_null (id bigint DEFAULT nullif(nextval('rg_null_seq') % 2, 0), email text, note text)",
    "CREATE TABLE rg_btrig (id bigint PRIMARY KEY, email text, note text)",
    "CREATE TRIGGER rg_bump BEFORE INSERT ON rg_btrig FOR EACH ROW EXECUTE FUNCTION rg_bump()",
    "CREATE TABLE rg_butrig (id bigint PRIMARY KEY, email text, note text)",
    "CREATE TRIGGER rg_bump BEFORE UPDATE ON rg_butrig FOR EACH ROW EXECUTE FUNCTION rg_bump()",
    "ALTER TABLE rg_butrig DISABLE TRIGGER rg_bump",
    "CREATE TABLE rg_atrig (id bigint PRIMARY KEY, email text, note text)",
    "CREATE FUNCTION rg_after() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$",
    "CREATE TRIGGER rg_after AFTER INSERT OR UPDATE ON rg_atrig FOR EACH ROW EXECUTE FUNCTION rg_after()",
    "CREATE TABLE rg_lgiven (id bigint PRIMARY KEY, email text, note text)",
]


@dataclass
class Env:
    pg: DevCluster
    proxy: ProxyProcess

    def dsn(self) -> str:
        return self.proxy.dsn(dbname=DB)

    @property
    def app_direct(self) -> str:
        return f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{self.pg.port}/{DB}"

    @property
    def direct_dsn(self) -> str:
        return self.pg.dsn(dbname=DB)

    def raw(self) -> RawClient:
        raw = RawClient(self.proxy.host, self.proxy.port)
        raw.login("pwuser", PW_PASSWORD, DB)  # (RawClient speaks cleartext and md5, not SCRAM)
        return raw


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    asyncio.run(prepare_database(pg, DB, DDL, TABLES))
    with psycopg.connect(pg.dsn(dbname=DB), autocommit=True) as su:
        for schema in ("public", "rg_other"):
            su.execute(f"GRANT USAGE ON SCHEMA {schema} TO pwuser")
            su.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO pwuser")
            su.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO pwuser")
        su.execute(EVENT_TRIGGER_SQL)  # DDL made directly reaches pgveil (a superuser's step of schema apply)
    proxy = start_proxy(pg, DB, TABLES, tmp_path_factory.mktemp("subjred-proxy"), "SELECT email FROM rg_kw WHERE false")
    yield Env(pg, proxy)
    proxy.stop()


def _canonical(table: str, value: str) -> bytes:
    if table.endswith(("rg_txt", "rg_enc")):
        return value.encode()
    return str(int(value)).encode()


def _assert_every_row_sealed_for_itself(
    env: Env, table: str, plaintexts: list[str] | None = None, note: str | None = None
) -> int:
    """Every stored email of ``table`` (read directly) is an envelope under the key of the subject id stored
    in its own row, and holds none of ``plaintexts``. Returns how many envelopes were checked."""
    column = SUBJECTS[table if "." in table else f"public.{table}"][1]
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        rows = c.execute(
            f'SELECT t."{column}"::text, t.email, d.subject_id FROM {table} t '
            "LEFT JOIN pgveil.deks d ON d.key_id = encode(substring(t.email FROM 5 FOR 16), 'hex')::uuid "
            "WHERE t.email IS NOT NULL AND (%s::text IS NULL OR t.note = %s)",
            (note, note),
        ).fetchall()
    for row_id, envelope, subject in rows:
        envelope = bytes(envelope)
        assert envelope[:2] == b"PV"
        assert not any(p.encode() in envelope for p in plaintexts or ())
        assert subject is not None, "the envelope names no key of the keystore"
        assert bytes(subject) == _canonical(table, row_id), f"row {row_id}'s value is sealed under another subject"
    return len(rows)


# -- which row gets which id ---------------------------------------------------------------------------------


def test_a_subject_column_named_like_a_keyword(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        simple = c.execute("INSERT INTO rg_kw (email) VALUES ('kw1@x'), ('kw2@x') RETURNING \"order\", email")
        assert [r[1] for r in simple] == ["kw1@x", "kw2@x"]
        ext = c.execute(
            'INSERT INTO rg_kw (note, "order", email) VALUES (%s, DEFAULT, %s), (%s, 77001, %s), (%s, DEFAULT, %s) '
            'RETURNING "order", email',
            ("n", "kw3@x", "n", "kw4@x", "n", "kw5@x"),
        ).fetchall()
        assert [r[1] for r in ext] == ["kw3@x", "kw4@x", "kw5@x"]
        assert ext[1][0] == 77001
        back = c.execute('SELECT "order", email FROM rg_kw WHERE "order" = ANY(%s)', ([r[0] for r in ext],)).fetchall()
        assert sorted(back) == sorted(ext)
    assert _assert_every_row_sealed_for_itself(env, "rg_kw", ["kw1@x", "kw5@x"]) >= 5


@pytest.mark.parametrize("extended", [False, True])
def test_an_insert_without_a_column_list(env: Env, extended: bool) -> None:
    """``INSERT INTO t VALUES (DEFAULT, ...)``: the values are the table's columns in order. pgveil appended
    the id to the row and wrote ``(id)`` as the column list, which the server rejected (42601 "INSERT has
    more expressions than target columns"): now refused (0A000) before pgveil asks the server for an id."""
    email = f"nolist-{extended}@x"
    before = _last_value(env, "rg_nolist_id_seq")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="no column list") as e:
            _execute(
                c,
                extended,
                ("INSERT INTO rg_nolist VALUES (DEFAULT, %s, 'nl') RETURNING id, email", (email,)),
                (f"INSERT INTO rg_nolist VALUES (DEFAULT, '{email}', 'nl') RETURNING id, email",),
            )
        assert email not in str(e.value)
        assert c.execute("SELECT 1").fetchone() == (1,)
        # With the column list it is written.
        row = c.execute("INSERT INTO rg_nolist (id, email, note) VALUES (DEFAULT, %s, 'nl') RETURNING email", (email,))
        assert row.fetchone() == (email,)
    assert _last_value(env, "rg_nolist_id_seq") == (before or 0) + 1
    _assert_every_row_sealed_for_itself(env, "rg_nolist", [email])


def _execute(c: psycopg.Connection[Any], extended: bool, with_parameters: tuple[Any, ...], simple: tuple[str]) -> None:
    """The extended-protocol form of a statement (with parameters) or its simple-Query form."""
    if extended:
        c.execute(*with_parameters)
    else:
        c.execute(simple[0])


def _last_value(env: Env, sequence: str) -> int | None:
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        row = d.execute("SELECT last_value FROM pg_sequences WHERE sequencename = %s", (sequence,)).fetchone()
    assert row is not None
    return None if row[0] is None else int(row[0])


@pytest.mark.parametrize("extended", [False, True])
def test_an_insert_without_a_column_list_leaving_out_trailing_columns(env: Env, extended: bool) -> None:
    email = f"nolist2-{extended}@x"
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="no column list"):
            _execute(
                c,
                extended,
                ("INSERT INTO rg_nolist VALUES (DEFAULT, %s)", (email,)),
                (f"INSERT INTO rg_nolist VALUES (DEFAULT, '{email}')",),
            )
        assert c.execute("SELECT 1").fetchone() == (1,)
    _assert_every_row_sealed_for_itself(env, "rg_nolist", [email])


def test_a_cycling_descending_sequence_gives_each_row_its_own_id(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        rows = c.execute(
            "INSERT INTO rg_cyc (email, note) VALUES " + ", ".join(f"('cyc{i}@x', 'c{i}')" for i in range(12)) + " "
            "RETURNING id, email, note"
        ).fetchall()
        assert [r[1] for r in rows] == [f"cyc{i}@x" for i in range(12)]
        # The sequence wraps from 1 back to 50 with a step of -7.
        assert [r[0] for r in rows][:9] == [50, 43, 36, 29, 22, 15, 8, 1, 50]
        got = c.execute("SELECT id, email, note FROM rg_cyc WHERE note LIKE 'c%' ORDER BY note").fetchall()
        assert sorted(got, key=lambda r: r[2]) == sorted(rows, key=lambda r: r[2])
    _assert_every_row_sealed_for_itself(env, "rg_cyc", ["cyc0@x"])


def test_a_text_subject_whose_default_is_upper_case_uuid_text(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        rows = c.execute(
            "INSERT INTO rg_txt (email) VALUES (%s), (%s) RETURNING id, email", ("t1@x", "t2@x")
        ).fetchall()
        assert all(r[0] == r[0].upper() and uuid.UUID(r[0]) for r in rows)
        back = c.execute("SELECT id, email FROM rg_txt WHERE id = ANY(%s)", ([r[0] for r in rows],)).fetchall()
        assert sorted(back) == sorted(rows)
    _assert_every_row_sealed_for_itself(env, "rg_txt", ["t1@x", "t2@x"])


def test_the_search_path_picks_the_table_and_its_default(env: Env) -> None:
    """Two configured tables of one name in two schemas: an unqualified INSERT is refused as ambiguous
    (pgveil cannot tell which the server picks); a qualified one gets its id from that table's own
    sequence (rg_other's starts at 500000), whatever the search_path."""
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("SET search_path TO rg_other, public")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="rg_sp"):
            c.execute("INSERT INTO rg_sp (email, note) VALUES (%s, 'sp') RETURNING id", ("amb@x",))
        simple = c.execute("INSERT INTO rg_other.rg_sp (email, note) VALUES ('sp1@x', 'sp') RETURNING id").fetchone()
        ext = c.execute(
            "INSERT INTO rg_other.rg_sp (email, note) VALUES (%s, 'sp') RETURNING id", ("sp2@x",)
        ).fetchone()
        pub = c.execute("INSERT INTO public.rg_sp (email, note) VALUES (%s, 'sp') RETURNING id", ("sp3@x",)).fetchone()
        c.execute("SET search_path TO public")
        pub2 = c.execute("INSERT INTO public.rg_sp (email, note) VALUES ('sp4@x', 'sp') RETURNING id").fetchone()
    assert simple is not None
    assert ext is not None
    assert pub is not None
    assert pub2 is not None
    assert simple[0] >= 500000
    assert ext[0] >= 500000
    assert pub[0] < 500000
    assert pub2[0] < 500000
    _assert_every_row_sealed_for_itself(env, "rg_other.rg_sp", ["sp1@x", "sp2@x", "amb@x"])
    _assert_every_row_sealed_for_itself(env, "rg_sp", ["sp3@x", "sp4@x", "amb@x"])


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _retrying(attempt: Any) -> Any:
    """``attempt()``, or False while pgveil reads its catalog again after DDL (55000, "retry")."""
    try:
        return attempt()
    except psycopg.errors.ObjectNotInPrerequisiteState:
        return False


def test_a_default_changed_through_pgveil_and_directly_is_followed(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("ALTER TABLE rg_alt ALTER COLUMN id SET DEFAULT nextval('rg_alt_seq2')")

    def through() -> bool:
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            row = c.execute("INSERT INTO rg_alt (email) VALUES (%s) RETURNING id", ("alt1@x",)).fetchone()
            assert row is not None
            assert row[0] >= 900000, "the old default was used after DDL through pgveil"
            return True

    _wait_for(lambda: _retrying(through), "the catalog is never read again")
    with psycopg.connect(env.app_direct, autocommit=True) as d:
        d.execute("ALTER TABLE rg_alt ALTER COLUMN id SET DEFAULT nextval('rg_alt_id_seq')")

    def followed() -> bool:
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            got = c.execute(
                "INSERT INTO rg_alt (email, note) VALUES (%s, 'probe') RETURNING id", ("alt2@x",)
            ).fetchone()
            return got is not None and got[0] < 900000

    _wait_for(lambda: _retrying(followed), "a default changed directly is never followed")
    _assert_every_row_sealed_for_itself(env, "rg_alt", ["alt1@x", "alt2@x"])


def test_a_table_renamed_through_pgveil_keeps_generating(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("ALTER TABLE rg_alt RENAME TO rg_alt_renamed")
        try:

            def insert() -> bool:
                row = c.execute("INSERT INTO rg_alt_renamed (email) VALUES (%s) RETURNING id, email", ("ren@x",))
                got = row.fetchone()
                assert got is not None
                assert got[1] == "ren@x"
                return True

            _wait_for(lambda: _retrying(insert), "the renamed table is never written")
        finally:
            c.execute("ALTER TABLE rg_alt_renamed RENAME TO rg_alt")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        _wait_for(lambda: _retrying(lambda: c.execute("SELECT email FROM rg_alt").fetchall() or True), "no reload")
    _assert_every_row_sealed_for_itself(env, "rg_alt", ["ren@x"])


# -- ON CONFLICT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generated", [True, False])
def test_on_conflict_on_another_key_updates_a_row_of_another_subject(env: Env, generated: bool) -> None:
    """ON CONFLICT (tag) DO UPDATE SET email = EXCLUDED.email: the conflicting row keeps its own id, so the
    value must be sealed for that row's subject (or refused), not for the id of the row never inserted."""
    tag = f"tag-{generated}-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        first = c.execute("INSERT INTO rg_conf (tag, email) VALUES (%s, %s) RETURNING id", (tag, "first@x")).fetchone()
        assert first is not None
        sql = (
            "INSERT INTO rg_conf (tag, email) VALUES (%s, %s) "
            if generated
            else "INSERT INTO rg_conf (id, tag, email) VALUES (%s, %s, %s) "
        ) + "ON CONFLICT (tag) DO UPDATE SET email = EXCLUDED.email RETURNING id"
        args: tuple[Any, ...] = (tag, "second@x") if generated else (880000 + int(first[0]), tag, "second@x")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="ON CONFLICT DO UPDATE whose conflict target"):
            c.execute(sql, args)
        assert c.execute("SELECT 1").fetchone() == (1,)
        # DO NOTHING writes nothing to the existing row: allowed, nothing inserted.
        nothing = "INSERT INTO rg_conf (tag, email) VALUES (%s, %s) ON CONFLICT (tag) DO NOTHING RETURNING id"
        assert c.execute(nothing, (tag, "third@x")).fetchall() == []
    _assert_every_row_sealed_for_itself(env, "rg_conf", ["first@x", "second@x"])


# -- defaults that talk, fail, lock -----------------------------------------------------------------------


@pytest.mark.parametrize("extended", [False, True])
def test_a_notice_of_the_default_reaches_the_client(env: Env, extended: bool) -> None:
    notices: list[str] = []
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        if extended:
            row = c.execute("INSERT INTO rg_fn (email) VALUES (%s) RETURNING id", ("nt@x",)).fetchone()
        else:
            row = c.execute("INSERT INTO rg_fn (email) VALUES ('nt@x') RETURNING id").fetchone()
        assert row is not None
    assert notices == ["rg default ran"]
    _assert_every_row_sealed_for_itself(env, "rg_fn", ["nt@x"])


@pytest.mark.parametrize("extended", [False, True])
def test_an_error_of_the_default_is_the_inserts_error(env: Env, extended: bool) -> None:
    with psycopg.connect(env.dsn()) as c:
        c.execute("SET rg.fail = 'on'")
        c.commit()
        c.execute("SAVEPOINT a")
        with pytest.raises(psycopg.errors.RaiseException, match="rg default refused"):
            _execute(
                c,
                extended,
                ("INSERT INTO rg_fn (email, note) VALUES (%s, 'sv')", ("sv1@x",)),
                ("INSERT INTO rg_fn (email, note) VALUES ('sv1@x', 'sv')",),
            )
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.execute("ROLLBACK TO SAVEPOINT a")
        c.execute("SET LOCAL rg.fail = 'off'")
        row = c.execute("INSERT INTO rg_fn (email, note) VALUES (%s, 'sv') RETURNING id, email", ("sv2@x",)).fetchone()
        assert row is not None
        assert row[1] == "sv2@x"
        c.commit()
        assert c.execute("SELECT email FROM rg_fn WHERE id = %s", (row[0],)).fetchone() == ("sv2@x",)
    _assert_every_row_sealed_for_itself(env, "rg_fn", ["sv1@x", "sv2@x"])


class _Lock:
    """The advisory lock rg_next() waits for, held on a direct connection."""

    def __init__(self, env: Env) -> None:
        self.conn = psycopg.connect(env.direct_dsn, autocommit=True)
        self.conn.execute("SELECT pg_advisory_lock(4242)")

    def release(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(4242)")
        self.conn.close()


def _waiting_on_the_lock(env: Env) -> int:
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        row = d.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_default_that_waits_never_stalls_another_session(env: Env) -> None:
    lock = _Lock(env)
    try:
        held = await asyncpg.connect(env.dsn())
        other = await asyncpg.connect(env.dsn())
        try:
            waiting = asyncio.ensure_future(held.fetchval("INSERT INTO rg_fn (email) VALUES ($1) RETURNING id", "w@x"))
            await asyncio.to_thread(_wait_for, lambda: _waiting_on_the_lock(env) == 1, "the default never waited")
            # Another session is served meanwhile, generated ids included.
            got = await other.fetchval('INSERT INTO rg_kw (email) VALUES ($1) RETURNING "order"', "free@x")
            assert got is not None
            assert await other.fetchval('SELECT email FROM rg_kw WHERE "order" = $1', got) == "free@x"
            assert not waiting.done()
            lock.release()
            lock = None  # type: ignore[assignment]
            row_id = await waiting
            assert await held.fetchval("SELECT email FROM rg_fn WHERE id = $1", row_id) == "w@x"
        finally:
            await held.close()
            await other.close()
    finally:
        if lock is not None:
            lock.release()
    _assert_every_row_sealed_for_itself(env, "rg_fn", ["w@x"])


@pytest.mark.parametrize("extended", [False, True])
def test_a_cancel_while_pgveils_query_runs_cancels_the_insert(env: Env, extended: bool) -> None:
    lock = _Lock(env)
    email = f"cancel-{extended}@x"
    try:
        with psycopg.connect(env.dsn(), autocommit=True) as c:

            def cancel_once_waiting() -> None:
                _wait_for(lambda: _waiting_on_the_lock(env) == 1, "the default never waited")
                c.cancel()

            threading.Thread(target=cancel_once_waiting, daemon=True).start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                _execute(
                    c,
                    extended,
                    ("INSERT INTO rg_fn (email, note) VALUES (%s, 'cancel')", (email,)),
                    (f"INSERT INTO rg_fn (email, note) VALUES ('{email}', 'cancel')",),
                )
            assert c.execute("SELECT 1").fetchone() == (1,)
            row = c.execute("INSERT INTO rg_kw (email) VALUES (%s) RETURNING email", ("aftercancel@x",)).fetchone()
            assert row == ("aftercancel@x",)
    finally:
        lock.release()
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_fn WHERE note = 'cancel'").fetchone() == (0,)


@pytest.mark.parametrize("extended", [False, True])
def test_statement_timeout_hitting_pgveils_query(env: Env, extended: bool) -> None:
    lock = _Lock(env)
    try:
        with psycopg.connect(env.dsn()) as c:
            c.execute("SET statement_timeout = '300ms'")
            c.commit()
            with pytest.raises(psycopg.errors.QueryCanceled):
                _execute(
                    c,
                    extended,
                    ("INSERT INTO rg_fn (email, note) VALUES (%s, 'timeout')", ("to@x",)),
                    ("INSERT INTO rg_fn (email, note) VALUES ('to@x', 'timeout')",),
                )
            c.rollback()
            c.execute("SET statement_timeout = 0")
            assert c.execute("SELECT 1").fetchone() == (1,)
            c.commit()
    finally:
        lock.release()
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_fn WHERE note = 'timeout'").fetchone() == (0,)


def test_a_client_that_disconnects_while_held(env: Env) -> None:
    lock = _Lock(env)
    try:
        raw = env.raw()
        raw.send(codec.encode_frontend(m.Query("INSERT INTO rg_fn (email, note) VALUES ('gone@x', 'gone')")))
        _wait_for(lambda: _waiting_on_the_lock(env) == 1, "the default never waited")
        raw.close()
    finally:
        lock.release()

    def session_gone() -> bool:
        with psycopg.connect(env.direct_dsn, autocommit=True) as d:
            row = d.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgveil-raw-test'"
            ).fetchone()
        return row == (0,)

    _wait_for(session_gone, "the server session of a gone client stays")
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_fn WHERE note = 'gone'").fetchone() == (0,)
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        assert c.execute("INSERT INTO rg_fn (email) VALUES (%s) RETURNING email", ("back@x",)).fetchone() == ("back@x",)


# -- raw protocol: pipelines, Flush, Describe, formats -----------------------------------------------------


def _replies(raw: RawClient, syncs: int = 1) -> list[str]:
    """The replies up to the ``syncs``-th ReadyForQuery: names, ``E<sqlstate>`` for errors, ``Z<status>``."""
    out: list[str] = []
    while syncs:
        msg = raw.read_message()
        assert msg is not None, "pgveil closed the connection"
        t, body = msg
        if t == b"Z":
            syncs -= 1
            out.append("Z" + body.decode())
            continue
        if t in (b"S", b"N", b"K"):
            continue
        reply = codec.decode_backend(t[0], body)
        if isinstance(reply, m.ErrorResponse):
            out.append(f"E{reply.sqlstate}")
        elif isinstance(reply, m.DataRow):
            out.append("D:" + "|".join("" if v is None else v.decode() for v in reply.values))
        elif isinstance(reply, m.ParameterDescription):
            out.append(f"t{list(reply.type_oids)}")
        else:
            out.append(type(reply).__name__)
    return out


def _send(raw: RawClient, *msgs: m.FrontendMessage) -> None:
    raw.send(b"".join(codec.encode_frontend(x) for x in msgs))


INS_KW = 'INSERT INTO rg_kw (email, note) VALUES ($1, $2) RETURNING "order", email'


def test_raw_pipeline_with_an_error_before_a_generated_bind(env: Env) -> None:
    raw = env.raw()
    try:
        _send(
            raw,
            m.Parse("ok", INS_KW, ()),
            m.Bind("", "ok", (), (b"p1@x", b"pipe"), ()),
            m.Execute("", 0),
            m.Parse("", "SELECT 1 / 0", ()),
            m.Bind("", "", (), (), ()),
            m.Execute("", 0),
            m.Bind("", "ok", (), (b"p2@x", b"pipe"), ()),
            m.Execute("", 0),
            m.Sync(),
            m.Bind("", "ok", (), (b"p3@x", b"pipe"), ()),
            m.Execute("", 0),
            m.Sync(),
        )
        first = _replies(raw)
        assert first[:2] == ["ParseComplete", "BindComplete"]
        # (1 / 0 of constants fails when the unnamed statement is planned, at its Bind.)
        assert first[3:] == ["CommandComplete", "ParseComplete", "E22012", "ZI"]
        second = _replies(raw)
        assert second[0] == "BindComplete"
        assert second[1].endswith("|p3@x")
        assert second[-1] == "ZI"
    finally:
        raw.close()
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        # The implicit transaction of the failed pipeline is rolled back: p1 is not stored, p3 is.
        assert d.execute("SELECT count(*) FROM rg_kw WHERE note = 'pipe'").fetchone() == (1,)
    _assert_every_row_sealed_for_itself(env, "rg_kw", ["p1@x", "p3@x"])


def test_raw_generated_bind_with_flush_and_no_sync(env: Env) -> None:
    raw = env.raw()
    try:
        _send(raw, m.Parse("f", INS_KW, ()), m.Bind("", "f", (), (b"fl@x", b"flush"), ()), m.Execute("", 0), m.Flush())
        got: list[str] = []
        while len(got) < 4:
            msg = raw.read_message()
            assert msg is not None
            if msg[0] in (b"S", b"N"):
                continue
            got.append(msg[0].decode())
        assert got == ["1", "2", "D", "C"]
        _send(raw, m.Sync())
        assert _replies(raw) == ["ZI"]
    finally:
        raw.close()
    _assert_every_row_sealed_for_itself(env, "rg_kw", ["fl@x"])


def test_raw_commit_and_rollback_pipelined_with_generated_inserts(env: Env) -> None:
    raw = env.raw()
    try:
        _send(
            raw,
            m.Query("BEGIN"),
            m.Query("INSERT INTO rg_kw (email, note) VALUES ('rb1@x', 'rbq')"),
            m.Query("ROLLBACK"),
            m.Query("INSERT INTO rg_kw (email, note) VALUES ('rb2@x', 'rbq')"),
            m.Query("BEGIN"),
            m.Parse("", "INSERT INTO rg_kw (email, note) VALUES ($1, 'rbq')", ()),
            m.Bind("", "", (), (b"rb3@x",), ()),
            m.Execute("", 0),
            m.Sync(),
            m.Query("COMMIT"),
        )
        replies = _replies(raw, 7)
        assert [r for r in replies if r[0] == "Z"] == ["ZT", "ZT", "ZI", "ZI", "ZT", "ZT", "ZI"]
        assert "E" not in "".join(r[0] for r in replies)
    finally:
        raw.close()
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        got = c.execute("SELECT email FROM rg_kw WHERE note = 'rbq'").fetchall()
    assert sorted(got) == [("rb2@x",), ("rb3@x",)]
    _assert_every_row_sealed_for_itself(env, "rg_kw", ["rb1@x", "rb2@x", "rb3@x"])


def test_raw_error_of_pgveils_query_in_a_pipeline_after_a_good_insert(env: Env) -> None:
    raw = env.raw()
    try:
        _send(raw, m.Query("SET rg.fail = 'on'"))
        assert _replies(raw)[-1] == "ZI"
        _send(
            raw,
            m.Parse("", INS_KW, ()),
            m.Bind("", "", (), (b"ga@x", b"gp"), ()),
            m.Execute("", 0),
            m.Parse("fn", "INSERT INTO rg_fn (email, note) VALUES ($1, 'gp')", ()),
            m.Bind("", "fn", (), (b"gb@x",), ()),
            m.Execute("", 0),
            m.Bind("", "fn", (), (b"gc@x",), ()),
            m.Execute("", 0),
            m.Sync(),
            m.Query("SET rg.fail = 'off'"),
            m.Bind("", "fn", (), (b"gd@x",), ()),
            m.Execute("", 0),
            m.Sync(),
        )
        first = _replies(raw)
        assert first[0:2] == ["ParseComplete", "BindComplete"]
        assert first[3:] == ["CommandComplete", "ParseComplete", "EP0001", "ZI"]
        assert _replies(raw) == ["CommandComplete", "ZI"]
        assert _replies(raw) == ["BindComplete", "CommandComplete", "ZI"]
    finally:
        raw.close()
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_kw WHERE note = 'gp'").fetchone() == (0,)
        assert d.execute("SELECT count(*) FROM rg_fn WHERE note = 'gp'").fetchone() == (1,)
    _assert_every_row_sealed_for_itself(env, "rg_fn", ["gd@x"])


def test_raw_describe_and_declared_types(env: Env) -> None:
    raw = env.raw()
    try:
        # Two declared types though the text uses only $1: the client binds two, pgveil's own is not shown.
        _send(
            raw,
            m.Parse("d", 'INSERT INTO rg_kw (email) VALUES ($1) RETURNING "order"', (25, 25)),
            m.Describe(b"S", "d"),
            m.Sync(),
        )
        assert _replies(raw) == ["ParseComplete", "t[25, 25]", "RowDescription", "ZI"]
        _send(raw, m.Bind("", "d", (), (b"dd@x",), ()), m.Execute("", 0), m.Sync())
        bad = _replies(raw)
        assert bad[0] == "E08P01"
        assert bad[-1] == "ZI"
        _send(raw, m.Bind("", "d", (), (b"dd@x", b"unused"), ()), m.Execute("", 0), m.Sync())
        good = _replies(raw)
        assert good[0] == "BindComplete"
        assert good[-1] == "ZI"
    finally:
        raw.close()
    _assert_every_row_sealed_for_itself(env, "rg_kw", ["dd@x"])


@pytest.mark.parametrize("formats", [(1,), (1, 0), (0, 1), ()])
def test_raw_parameter_formats(env: Env, formats: tuple[int, ...]) -> None:
    email = f"fmt{''.join(map(str, formats))}@x"
    raw = env.raw()
    try:
        _send(
            raw,
            m.Parse("", INS_KW, (25, 25)),
            m.Bind("", "", formats, (email.encode(), b"fmt"), ()),
            m.Describe(b"P", ""),
            m.Execute("", 0),
            m.Sync(),
        )
        got = _replies(raw)
        assert got[0:2] == ["ParseComplete", "BindComplete"]
        assert got[3].endswith(f"|{email}")
    finally:
        raw.close()
    _assert_every_row_sealed_for_itself(env, "rg_kw", [email])


def test_raw_zero_client_parameters_with_one_binary_format_code(env: Env) -> None:
    raw = env.raw()
    try:
        _send(raw, m.Parse("", "INSERT INTO rg_kw (note) VALUES ('zero') RETURNING \"order\"", ()))
        _send(raw, m.Bind("", "", (1,), (), ()), m.Execute("", 0), m.Sync())
        got = _replies(raw)
        assert got[0:2] == ["ParseComplete", "BindComplete"]
        assert got[-1] == "ZI"
    finally:
        raw.close()


# -- drivers: many rows, many executions, pipeline mode ------------------------------------------------------


async def test_asyncpg_executemany_with_many_rows_and_a_prepared_statement_reused(env: Env) -> None:
    values = [(f"em{i}@x", "em") for i in range(200)]
    conn = await asyncpg.connect(env.dsn())
    try:
        await conn.executemany("INSERT INTO rg_kw (email, note) VALUES ($1, $2)", values)
        stmt = await conn.prepare('INSERT INTO rg_kw (email, note) VALUES ($1, $2) RETURNING "order"')
        again = [await stmt.fetchval(f"re{i}@x", "re") for i in range(40)]
        assert len(set(again)) == 40
        rows = await conn.fetch("SELECT email FROM rg_kw WHERE note = 'em'")
        assert sorted(r["email"] for r in rows) == sorted(v[0] for v in values)
    finally:
        await conn.close()
    _assert_every_row_sealed_for_itself(env, "rg_kw", ["em1@x", "re1@x"])


def test_psycopg_prepared_binary_parameters(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        ids = []
        for i in range(8):
            row = c.execute(
                'INSERT INTO rg_kw (email, note) VALUES (%b, %s) RETURNING "order", email',
                (f"bin{i}@x", "bin"),
                prepare=True,
            ).fetchone()
            assert row is not None
            assert row[1] == f"bin{i}@x"
            ids.append(row[0])
        assert len(set(ids)) == 8
    _assert_every_row_sealed_for_itself(env, "rg_kw", ["bin3@x"])


def test_psycopg_pipeline_with_errors_at_several_positions(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:

        def failing() -> None:
            with c.pipeline() as p:
                c.execute("INSERT INTO rg_conf (tag, email, note) VALUES (%s, %s, 'pp')", ("pp-a", "pa@x"))
                p.sync()
                c.execute("INSERT INTO rg_conf (tag, email, note) VALUES (%s, %s, 'pp')", ("pp-b", "pb@x"))
                c.execute("INSERT INTO rg_conf (tag, email, note) VALUES (%s, %s, 'pp')", ("pp-a", "pc@x"))
                c.execute("INSERT INTO rg_conf (tag, email, note) VALUES (%s, %s, 'pp')", ("pp-d", "pd@x"))
                p.sync()

        with pytest.raises(psycopg.errors.UniqueViolation):
            failing()
        with c.pipeline():
            c.execute("INSERT INTO rg_conf (tag, email, note) VALUES (%s, %s, 'pp')", ("pp-e", "pe@x"))
            c.execute("SELECT 1")
            c.execute("INSERT INTO rg_conf (tag, email, note) VALUES ('pp-f', %s, 'pp')", ("pf@x",))
        got = c.execute("SELECT tag, email FROM rg_conf WHERE note = 'pp' ORDER BY tag").fetchall()
    assert got == [("pp-a", "pa@x"), ("pp-e", "pe@x"), ("pp-f", "pf@x")]
    _assert_every_row_sealed_for_itself(env, "rg_conf", ["pa@x", "pe@x"])


def test_a_long_multi_row_insert_analysed_off_the_event_loop(env: Env) -> None:
    n = 400
    sql = "INSERT INTO rg_kw (email, note) VALUES " + ", ".join(f"('long{i}@x', 'long')" for i in range(n))
    assert len(sql) > 8192
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute(sql)
        got = c.execute("SELECT email FROM rg_kw WHERE note = 'long'").fetchall()
    assert sorted(g[0] for g in got) == sorted(f"long{i}@x" for i in range(n))
    _assert_every_row_sealed_for_itself(env, "rg_kw", ["long1@x"])


def test_sql_level_prepare_and_execute(env: Env) -> None:
    """PREPARE of an INSERT that leaves the id to the database: handled or refused (0A000), never stored
    sealed for another subject."""
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        try:
            c.execute("PREPARE rgp(text) AS INSERT INTO rg_kw (email, note) VALUES ($1, 'sqlprep') RETURNING \"order\"")
        except psycopg.errors.FeatureNotSupported:
            return
        try:
            c.execute("EXECUTE rgp('sp@x')")
        except psycopg.errors.FeatureNotSupported:
            pass
        assert c.execute("SELECT 1").fetchone() == (1,)
    _assert_every_row_sealed_for_itself(env, "rg_kw", ["sp@x"])


def test_raw_pipelined_simple_queries_whose_default_fails(env: Env) -> None:
    raw = env.raw()
    try:
        fn = "INSERT INTO rg_fn (email, note) VALUES ('{}', 'pq') RETURNING email"
        _send(
            raw,
            m.Query("SET rg.fail = 'on'"),
            m.Query(fn.format("q1@x")),
            m.Query(fn.format("q2@x")),
            m.Query("RESET rg.fail"),
            m.Query(fn.format("q3@x")),
            m.Parse("", "INSERT INTO rg_fn (email, note) VALUES ($1, 'pq') RETURNING email", ()),
            m.Bind("", "", (), (b"q4@x",), ()),
            m.Execute("", 0),
            m.Sync(),
        )
        assert _replies(raw) == ["CommandComplete", "ZI"]
        assert _replies(raw) == ["EP0001", "ZI"]
        assert _replies(raw) == ["EP0001", "ZI"]
        assert _replies(raw) == ["CommandComplete", "ZI"]
        assert _replies(raw) == ["RowDescription", "D:q3@x", "CommandComplete", "ZI"]
        assert _replies(raw) == ["ParseComplete", "BindComplete", "D:q4@x", "CommandComplete", "ZI"]
    finally:
        raw.close()
    _assert_every_row_sealed_for_itself(env, "rg_fn", ["q1@x", "q2@x", "q3@x", "q4@x"])


def test_raw_generated_bind_after_a_message_pgveil_refused_in_the_same_pipeline(env: Env) -> None:
    """pgveil refuses the first Parse itself (ORDER BY an encrypted column): the server skips the rest of
    the pipeline, so pgveil must not run its query for the Bind after it (no id is consumed)."""
    before = _last_value(env, "rg_kw_order_seq")
    raw = env.raw()
    try:
        _send(
            raw,
            m.Parse("gp", INS_KW, ()),
            m.Sync(),
            m.Parse("", "SELECT email FROM rg_kw ORDER BY email", ()),
            m.Bind("", "", (), (), ()),
            m.Execute("", 0),
            m.Bind("", "gp", (), (b"skip@x", b"skip"), ()),
            m.Execute("", 0),
            m.Sync(),
            m.Bind("", "gp", (), (b"after@x", b"skip"), ()),
            m.Execute("", 0),
            m.Sync(),
        )
        assert _replies(raw) == ["ParseComplete", "ZI"]
        assert _replies(raw) == ["E0A000", "ZI"]
        after = _replies(raw)
        assert after[0] == "BindComplete"
        assert after[1].endswith("|after@x")
    finally:
        raw.close()
    assert _last_value(env, "rg_kw_order_seq") == (before or 0) + 1
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_kw WHERE note = 'skip'").fetchone() == (1,)


@pytest.mark.parametrize("extended", [False, True])
def test_a_before_insert_trigger_on_a_partition_changes_the_generated_id(env: Env, extended: bool) -> None:
    """rg_part's only partition has a BEFORE INSERT row trigger adding 100000 to the id. The INSERT must be
    refused (as for such a trigger on the table itself) or every stored value sealed for its row's id."""
    email = f"part-{extended}@x"
    note = f"part-{extended}"
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        try:
            _execute(
                c,
                extended,
                ("INSERT INTO rg_part (email, note) VALUES (%s, %s)", (email, note)),
                (f"INSERT INTO rg_part (email, note) VALUES ('{email}', '{note}')",),
            )
        except psycopg.errors.FeatureNotSupported:
            return  # refused, as for a trigger on the table itself: fine
    _assert_every_row_sealed_for_itself(env, "rg_part", [email], note)


def test_a_before_insert_trigger_on_a_partition_changes_a_given_id(env: Env) -> None:
    """A BEFORE INSERT row trigger on a partition could change a client-given id after pgveil sealed the
    row's values for it: pgveil refuses (0A000) and the session goes on."""
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            c.execute("INSERT INTO rg_part (id, email, note) VALUES (7, %s, 'part-given')", ("given@x",))
        assert "BEFORE INSERT or UPDATE trigger" in str(refused.value)
        assert "given@x" not in str(refused.value)
        assert c.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_part WHERE note = 'part-given'").fetchone() == (0,)


def _write_btrig(c: psycopg.Connection[Any], how: str, canary: str) -> None:
    if how == "copy":
        with c.cursor().copy("COPY rg_btrig (id, email, note) FROM STDIN") as cp:
            cp.write_row((11, canary, "btrig"))
        return
    _execute(
        c,
        how == "extended",
        ("INSERT INTO rg_btrig (id, email, note) VALUES (11, %s, 'btrig')", (canary,)),
        (f"INSERT INTO rg_btrig (id, email, note) VALUES (11, '{canary}', 'btrig')",),
    )


@pytest.mark.parametrize("how", ["simple", "extended", "copy"])
def test_a_before_insert_trigger_on_the_table_refuses_a_given_id(env: Env, how: str) -> None:
    """The canary method: after the refusal the canary is nowhere in the table read directly."""
    canary = f"canary-btrig-{how}@x"
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            _write_btrig(c, how, canary)
        message = str(refused.value)
        assert "public.rg_btrig" in message
        assert "BEFORE INSERT or UPDATE trigger" in message
        assert canary not in message
        assert c.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_btrig").fetchone() == (0,)
        assert d.execute("SELECT count(*) FROM rg_btrig WHERE email LIKE %s", (f"%{canary}%",)).fetchone() == (0,)


@pytest.mark.parametrize("extended", [False, True])
def test_a_disabled_before_update_trigger_refuses_an_update_of_a_sealed_column(env: Env, extended: bool) -> None:
    """Disabled still counts: the owner may enable it at any time."""
    canary = f"canary-butrig-{extended}@x"
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        d.execute("INSERT INTO rg_butrig (id, note) VALUES (21, 'butrig') ON CONFLICT DO NOTHING")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="BEFORE INSERT or UPDATE trigger"):
            _execute(
                c,
                extended,
                ("UPDATE rg_butrig SET email = %s WHERE id = 21", (canary,)),
                (f"UPDATE rg_butrig SET email = '{canary}' WHERE id = 21",),
            )
        assert c.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_butrig WHERE email IS NOT NULL").fetchone() == (0,)


@pytest.mark.parametrize("extended", [False, True])
def test_an_upsert_under_a_before_update_trigger_refuses_a_given_id(env: Env, extended: bool) -> None:
    """INSERT ... ON CONFLICT DO UPDATE may run the (disabled, so possibly enabled later) BEFORE UPDATE
    trigger of rg_butrig on the conflicting row: refused, and the canary is not stored."""
    canary = f"canary-upsert-{extended}@x"
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        d.execute("INSERT INTO rg_butrig (id, note) VALUES (22, 'upsert') ON CONFLICT DO NOTHING")
    sql = (
        "INSERT INTO rg_butrig (id, email, note) VALUES (22, {v}, 'upsert')"
        " ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email"
    )
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            _execute(c, extended, (sql.format(v="%s"), (canary,)), (sql.format(v=f"'{canary}'"),))
        assert canary not in str(refused.value)
        assert c.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_butrig WHERE id = 22 AND email IS NOT NULL").fetchone() == (0,)


async def test_a_prepared_insert_of_a_given_id_after_a_trigger_was_created(env: Env) -> None:
    """The trigger check is made again at every Bind: a statement prepared before a BEFORE INSERT trigger
    was created directly (not through pgveil) is refused once pgveil has read the catalog again."""
    conn = await asyncpg.connect(env.dsn())
    try:
        stmt = await conn.prepare("INSERT INTO rg_lgiven (id, email, note) VALUES ($1, $2, 'lgiven')")
        await stmt.fetch(1, "lgiven1@x")
        with psycopg.connect(env.app_direct, autocommit=True) as d:
            d.execute("CREATE TRIGGER rg_lg_bump BEFORE INSERT ON rg_lgiven FOR EACH ROW EXECUTE FUNCTION rg_bump()")
        try:

            def refused_now() -> bool:
                with psycopg.connect(env.dsn(), autocommit=True) as c:
                    try:
                        c.execute("INSERT INTO rg_lgiven (id, email, note) VALUES (99, 'probe@x', 'probe')")
                    except psycopg.errors.FeatureNotSupported as e:
                        return "BEFORE INSERT or UPDATE trigger" in str(e)
                    except psycopg.errors.ObjectNotInPrerequisiteState:
                        return False
                    c.execute("DELETE FROM rg_lgiven WHERE note = 'probe'")
                return False

            await asyncio.to_thread(_wait_for, refused_now, "the trigger never reached pgveil")
            for i in range(2, 4):
                with pytest.raises(asyncpg.FeatureNotSupportedError, match="BEFORE INSERT or UPDATE trigger"):
                    await stmt.fetch(i, f"canary-lgiven{i}@x")
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            with psycopg.connect(env.app_direct, autocommit=True) as d:
                d.execute("DROP TRIGGER rg_lg_bump ON rg_lgiven")
    finally:
        await conn.close()
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_lgiven WHERE id IN (2, 3)").fetchone() == (0,)
    _assert_every_row_sealed_for_itself(env, "rg_lgiven", ["lgiven1@x"], "lgiven")


@pytest.mark.parametrize("extended", [False, True])
def test_only_after_triggers_still_take_a_given_id(env: Env, extended: bool) -> None:
    """The control: the refusal is for BEFORE row triggers, not for every trigger."""
    ident = 31 + int(extended)
    email = f"after-{extended}@x"
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        _execute(
            c,
            extended,
            ("INSERT INTO rg_atrig (id, email, note) VALUES (%s, %s, 'atrig')", (ident, email)),
            (f"INSERT INTO rg_atrig (id, email, note) VALUES ({ident}, '{email}', 'atrig')",),
        )
        assert c.execute("SELECT email FROM rg_atrig WHERE id = %s", (ident,)).fetchall() == [(email,)]
    _assert_every_row_sealed_for_itself(env, "rg_atrig", [email], "atrig")


@pytest.mark.parametrize("extended", [False, True])
def test_a_default_that_gives_null_for_some_rows(env: Env, extended: bool) -> None:
    """A NULL id has no subject: the INSERT is refused (the server would store NULL in the subject column)
    and the session goes on."""
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        for i in range(4):
            email = f"null{i}-{extended}@x"
            try:
                _execute(
                    c,
                    extended,
                    ("INSERT INTO rg_null (email, note) VALUES (%s, 'null')", (email,)),
                    (f"INSERT INTO rg_null (email, note) VALUES ('{email}', 'null')",),
                )
            except psycopg.errors.FeatureNotSupported as e:
                refused = str(e)
                assert email not in refused
            assert c.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_null WHERE id IS NULL").fetchone() == (0,)
        assert d.execute("SELECT count(*) FROM rg_null WHERE note = 'null'").fetchone() != (0,)
    _assert_every_row_sealed_for_itself(env, "rg_null", ["null1-True@x"])


def test_a_terminate_pipelined_after_the_held_insert(env: Env) -> None:
    raw = env.raw()
    try:
        raw.send(
            codec.encode_frontend(m.Query("INSERT INTO rg_kw (email, note) VALUES ('term@x', 'term')"))
            + codec.encode_frontend(m.Terminate())
        )
        got = [t for t, _b in raw.read_until_closed()]
        assert b"C" in got
        assert b"E" not in got
    finally:
        raw.close()
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        assert c.execute("SELECT email FROM rg_kw WHERE note = 'term'").fetchall() == [("term@x",)]
    _assert_every_row_sealed_for_itself(env, "rg_kw", ["term@x"])


@pytest.mark.parametrize("conforming", ["on", "off"])
def test_literals_keep_their_values_when_pgveil_rewrites_the_insert(env: Env, conforming: str) -> None:
    """The simple-Query INSERT is written again with the ids (pglast): every other literal must keep the
    value the server would have read from the client's text, whatever standard_conforming_strings says."""
    prefix = "rg-lit-" + uuid.uuid4().hex[:6] + ":"
    expressions = [
        "'a\\b'",
        "E'c\\d\\x41'",
        "$q$e'f\\$q$",
        "B'101'::text",
        "(INTERVAL '1' YEAR)::text",
        "(1.000000000000000000001)::text",
        "(-2147483648)::text",
        "(ARRAY['x', NULL]::text[])::text",
        "'it''s'",
    ]
    if conforming == "on":
        expressions.append("U&'\\0041g'")
    notes = [f"'{prefix}' || {e}" for e in expressions]
    generated = "INSERT INTO rg_kw (email, note) VALUES " + ", ".join(f"('lit@x', {n})" for n in notes)
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        d.execute(f"SET standard_conforming_strings = {conforming}")
        expected = d.execute("SELECT " + ", ".join(notes)).fetchone()
    assert expected is not None
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute(f"SET standard_conforming_strings = {conforming}")
        try:
            c.execute(generated)
        except psycopg.errors.FeatureNotSupported:
            assert conforming == "off"  # refused in such a session: fine
            return
        got = c.execute("SELECT note FROM rg_kw WHERE note LIKE %s", (prefix + "%",)).fetchall()
    assert sorted(g[0] for g in got) == sorted(expected)


async def test_a_prepared_insert_after_a_trigger_was_created(env: Env) -> None:
    """The trigger check and the default were decided once, at Parse: a prepared INSERT kept generating ids
    after a trigger changing them was created (a simple Query was refused by then), and its values were
    stored sealed under the subject of the id pgveil generated. Now its Bind is refused (0A000, as a
    simple Query is) once the catalog read again says so."""
    conn = await asyncpg.connect(env.dsn())
    try:
        stmt = await conn.prepare("INSERT INTO rg_late (email, note) VALUES ($1, 'late') RETURNING id")
        assert await stmt.fetchval("late0@x") is not None
        with psycopg.connect(env.app_direct, autocommit=True) as d:
            d.execute("CREATE TRIGGER rg_late_bump BEFORE INSERT ON rg_late FOR EACH ROW EXECUTE FUNCTION rg_bump()")
        try:

            def refused_now() -> bool:
                with psycopg.connect(env.dsn(), autocommit=True) as c:
                    try:
                        c.execute("INSERT INTO rg_late (email, note) VALUES ('probe@x', 'probe')")
                    except psycopg.errors.FeatureNotSupported as e:
                        return "BEFORE INSERT trigger" in str(e)
                    except psycopg.errors.ObjectNotInPrerequisiteState:
                        return False
                return False

            await asyncio.to_thread(_wait_for, refused_now, "the trigger never reached pgveil")
            for i in range(1, 3):
                with pytest.raises(asyncpg.FeatureNotSupportedError, match="BEFORE INSERT trigger"):
                    await stmt.fetchval(f"late{i}@x")
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            with psycopg.connect(env.app_direct, autocommit=True) as d:
                d.execute("DROP TRIGGER rg_late_bump ON rg_late")
    finally:
        await conn.close()
    # (Only the prepared statement's rows: a probe in the moment before pgveil has read the catalog again
    # may be written with the trigger already there, see the report of this red team.)
    _assert_every_row_sealed_for_itself(env, "rg_late", ["late1@x"], "late")


def test_a_trigger_created_directly_is_followed_by_simple_queries(env: Env) -> None:
    with psycopg.connect(env.app_direct, autocommit=True) as d:
        d.execute("CREATE TABLE rg_late_log (n int)")  # DDL on another table: nothing changes for rg_fn
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        got = _retrying(lambda: c.execute("INSERT INTO rg_fn (email) VALUES ('ll@x') RETURNING email").fetchone())
        assert got in (("ll@x",), False)
    _assert_every_row_sealed_for_itself(env, "rg_fn", ["ll@x"])


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("extended", [False, True])
def test_a_non_ascii_text_id_in_a_latin1_session_is_refused(env: Env, extended: bool, given: bool) -> None:
    """The server stores a text id converted from the client_encoding to UTF-8, so the id's bytes as the
    client sends them (or as pgveil's own query for the default returns them) name another subject than
    the row's. Sealing under them left values that shredding the row's subject did not destroy (read in a
    UTF8 session they failed XX001). Refused (0A000) for a given and a generated id alike; the canary is
    not stored and the session goes on."""
    email = f"canary-enc-{extended}-{given}@x"
    ident = f"Ã©-given-{extended}"
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("SET client_encoding = 'LATIN1'")
        statement: tuple[tuple[Any, ...], tuple[str]]
        if given:
            statement = (
                ("INSERT INTO rg_enc (id, email, note) VALUES (%s, %s, 'enc')", (ident, email)),
                (f"INSERT INTO rg_enc (id, email, note) VALUES ('{ident}', '{email}', 'enc')",),
            )
        else:
            statement = (
                ("INSERT INTO rg_enc (email, note) VALUES (%s, 'enc')", (email,)),
                (f"INSERT INTO rg_enc (email, note) VALUES ('{email}', 'enc')",),
            )
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="client_encoding is LATIN1") as refused:
            _execute(c, extended, *statement)
        assert email not in str(refused.value)
        assert c.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        assert d.execute("SELECT count(*) FROM rg_enc WHERE note = 'enc'").fetchone() == (0,)


@pytest.mark.parametrize("extended", [False, True])
def test_an_ascii_text_id_in_a_latin1_session_is_taken(env: Env, extended: bool) -> None:
    """The control: an ASCII id has the same bytes in every client encoding, so it is taken and the value
    sealed for the row's own subject."""
    email = f"encascii-{extended}@x"
    ident = f"ascii-given-{extended}"
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("SET client_encoding = 'LATIN1'")
        _execute(
            c,
            extended,
            ("INSERT INTO rg_enc (id, email, note) VALUES (%s, %s, 'encascii')", (ident, email)),
            (f"INSERT INTO rg_enc (id, email, note) VALUES ('{ident}', '{email}', 'encascii')",),
        )
        assert c.execute("SELECT email FROM rg_enc WHERE id = %s", (ident,)).fetchall() == [(email,)]
    _assert_every_row_sealed_for_itself(env, "rg_enc", [email], "encascii")


async def test_canary_of_pipelined_and_binary_generated_rows_is_nowhere_on_the_server(env: Env) -> None:
    """The canary method for the paths of this file: asyncpg executemany, psycopg pipeline mode, a raw Bind
    with one binary format code for all parameters and a held simple Query after a COMMIT in one packet.
    No canary in the table files, the WAL or the server log; controls in the plain column are found."""
    from test_encryption_canary import distinctive, search, server_files

    hows = ("executemany", "pipeline", "binary", "packet")
    canary = {how: distinctive("RGCANARY", how) for how in hows}
    control = {how: distinctive("RGCONTROL", how) for how in hows}
    conn = await asyncpg.connect(env.dsn())
    try:
        await conn.executemany(
            "INSERT INTO rg_kw (email, note) VALUES ($1, $2)", [(canary["executemany"], control["executemany"])]
        )
    finally:
        await conn.close()

    def others() -> None:
        with psycopg.connect(env.dsn(), autocommit=True) as c, c.pipeline():
            c.execute("INSERT INTO rg_kw (email, note) VALUES (%s, %s)", (canary["pipeline"], control["pipeline"]))
            c.execute("SELECT 1")
        raw = env.raw()
        try:
            _send(
                raw,
                m.Parse("", "INSERT INTO rg_kw (email, note) VALUES ($1, $2)", (25, 25)),
                m.Bind("", "", (1,), (canary["binary"].encode(), control["binary"].encode()), ()),
                m.Execute("", 0),
                m.Sync(),
                m.Query("BEGIN"),
                m.Query("COMMIT"),
                m.Query(f"INSERT INTO rg_kw (email, note) VALUES ('{canary['packet']}', '{control['packet']}')"),
            )
            replies = _replies(raw, 4)
            assert not [r for r in replies if r.startswith("E")]
        finally:
            raw.close()
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            got = c.execute("SELECT email FROM rg_kw WHERE note LIKE 'RGCONTROL%'").fetchall()
        assert sorted(g[0] for g in got) == sorted(canary.values())
        with psycopg.connect(env.direct_dsn, autocommit=True) as d:
            d.execute("CHECKPOINT")
            d.execute("SELECT pg_switch_wal()")

    await asyncio.to_thread(others)
    found = search(server_files(env.pg), [*canary.values(), *control.values()])
    leaks = {how: sorted(str(p) for p in found.files(v)) for how, v in canary.items() if found.files(v)}
    assert leaks == {}, f"plaintext written through pgveil found on the server: {leaks}"
    for how, v in control.items():
        assert env.pg.log_file in found.files(v), f"control {how} not in the server log: the search is blind"
        assert any(env.pg.data_dir / "pg_wal" in p.parents for p in found.files(v)), f"control {how} not in WAL"
    _assert_every_row_sealed_for_itself(env, "rg_kw", list(canary.values()))


async def test_a_prepared_insert_follows_a_default_changed_after_it_was_prepared(env: Env) -> None:
    """asyncpg keeps its prepared statements: after the default changed (DDL through pgveil) the same
    statement takes its ids from the new default, as the server would."""

    def no_trigger() -> bool:  # (the trigger of the test before is dropped: wait until pgveil has seen it)
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            try:
                c.execute("INSERT INTO rg_late (email, note) VALUES ('probe@x', 'probe')")
            except (psycopg.errors.FeatureNotSupported, psycopg.errors.ObjectNotInPrerequisiteState):
                return False
        return True

    await asyncio.to_thread(_wait_for, no_trigger, "the dropped trigger never reached pgveil")
    conn = await asyncpg.connect(env.dsn())
    try:
        stmt = await conn.prepare("INSERT INTO rg_late (email, note) VALUES ($1, 'follow') RETURNING id")
        first = await stmt.fetchval("follow1@x")
        assert first < 700000
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            c.execute("CREATE SEQUENCE rg_late_seq2 START 700000")
            c.execute("ALTER TABLE rg_late ALTER COLUMN id SET DEFAULT nextval('rg_late_seq2')")

        async def after() -> bool:
            try:
                return bool(await stmt.fetchval("follow2@x") >= 700000)
            except asyncpg.ObjectNotInPrerequisiteStateError:
                return False  # the catalog is being read again

        deadline = time.monotonic() + 30
        while not await after():
            assert time.monotonic() < deadline, "the prepared statement never follows the new default"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
        with psycopg.connect(env.dsn(), autocommit=True) as c:
            c.execute("ALTER TABLE rg_late ALTER COLUMN id SET DEFAULT nextval('rg_late_id_seq')")
    _assert_every_row_sealed_for_itself(env, "rg_late", ["follow1@x", "follow2@x"], "follow")
