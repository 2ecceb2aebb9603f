"""Per-subject keys end to end, through a real pgveil in front of PostgreSQL with psycopg and asyncpg:
every row's encrypted values are sealed with its data subject's own key (one per kind and subject id,
shared by the tables of that kind), read back without the subject column, refused when the subject
cannot be told, and a value moved to another subject's row fails to decrypt (XX001)."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, ProxyProcess, proxy_config
from encfixtures import apply_tables

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

DB = "subjects"
TABLES: dict[str, Any] = {
    "public.sk_customers": {
        "subject": {"kind": "customer", "column": "id"},
        "columns": {"email": {"type": "text", "encrypt": True}, "score": {"type": "int4", "encrypt": True}},
    },
    "public.sk_orders": {
        "subject": {"kind": "customer", "column": "customer_id"},
        "columns": {"note": {"type": "text", "encrypt": True}},
    },
    "public.sk_accounts": {
        "subject": {"kind": "account", "column": "id"},
        "columns": {"secret": {"type": "text", "encrypt": True}},
    },
}
DDL = [
    "CREATE EXTENSION IF NOT EXISTS pgcrypto",
    "CREATE TABLE sk_customers (id serial PRIMARY KEY, email text, score int, name text)",
    "CREATE TABLE sk_orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer_id int NOT NULL, note text)",
    "CREATE TABLE sk_accounts (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), secret text)",
]


@dataclass
class Env:
    pg: DevCluster
    proxy: ProxyProcess

    def dsn(self) -> str:
        return self.proxy.dsn(dbname=DB)

    @property
    def direct_dsn(self) -> str:
        return self.pg.dsn(dbname=DB)


async def prepare_database(pg: DevCluster, db: str, ddl: list[str], tables: dict[str, Any]) -> None:
    """A database of its own, owned by the app role, with pgcrypto, ``ddl`` run as the app role and
    ``tables`` made protected (``pgveil schema apply``)."""
    pg.psql(f"CREATE DATABASE {db} OWNER app")
    su = await asyncpg.connect(pg.dsn(dbname=db))
    try:
        await su.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    finally:
        await su.close()
    app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/{db}")
    try:
        for statement in ddl:
            await app.execute(statement)
    finally:
        await app.close()
    await apply_tables(pg, db, tables)


def start_proxy(pg: DevCluster, db: str, tables: dict[str, Any], workdir: Path, probe: str) -> ProxyProcess:
    """pgveil in front of ``db`` with its keystore there, every role plaintext; returned once ``probe``
    (a SELECT of a protected table) runs through it."""
    cfg = proxy_config(
        pg,
        keystore={"dsn": pg.dsn(dbname=db), "master_key": {"provider": "local", "path": str(workdir / "m.key")}},
        tables=tables,
        roles={"default": "plaintext"},
    )
    proxy = ProxyProcess(cfg, workdir).start()
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(proxy.dsn(dbname=db), autocommit=True, connect_timeout=5) as c:
                c.execute(probe).fetchall()
            return proxy
        except psycopg.Error:
            if time.monotonic() > deadline:
                proxy.stop()
                raise RuntimeError(proxy.logs()) from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    asyncio.run(prepare_database(pg, DB, DDL[1:], TABLES))
    proxy = start_proxy(
        pg, DB, TABLES, tmp_path_factory.mktemp("subject-proxy"), "SELECT email FROM sk_customers WHERE id = -1"
    )
    yield Env(pg, proxy)
    proxy.stop()


def direct(env: Env, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        return c.execute(sql, args or None).fetchall()


def key_ids(env: Env, table: str, column: str, ids: list[Any], id_column: str = "id") -> dict[Any, bytes]:
    rows = direct(env, f"SELECT {id_column}, {column} FROM {table} WHERE {id_column} = ANY(%s)", ids)
    return {r[0]: bytes(r[1])[4:20] for r in rows}


def subject_of_key(env: Env, key_id: bytes) -> tuple[str, bytes]:
    [(kind, subject)] = direct(
        env, "SELECT subject_kind, subject_id FROM pgveil.deks WHERE key_id = %s", uuid.UUID(bytes=key_id)
    )
    return kind, bytes(subject)


def test_literal_writes_use_each_rows_subject_key_shared_across_tables(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        rows = c.execute(
            "INSERT INTO sk_customers (id, email, score) VALUES (101, 'a@x.test', 1), (102, 'b@x.test', 2) "
            "RETURNING id, email, score"
        ).fetchall()
        assert rows == [(101, "a@x.test", 1), (102, "b@x.test", 2)]
        c.execute("INSERT INTO sk_orders (customer_id, note) VALUES (101, 'first order'), (102, 'second')")
        got = c.execute("SELECT email, score FROM sk_customers WHERE id IN (101, 102) ORDER BY id").fetchall()
        assert got == [("a@x.test", 1), ("b@x.test", 2)]
        notes = c.execute("SELECT note FROM sk_orders WHERE customer_id IN (101, 102) ORDER BY id").fetchall()
        assert notes == [("first order",), ("second",)]
    emails = key_ids(env, "sk_customers", "email", [101, 102])
    scores = key_ids(env, "sk_customers", "score", [101, 102])
    notes_k = key_ids(env, "sk_orders", "note", [101, 102], "customer_id")
    assert emails[101] != emails[102]
    assert emails[101] == scores[101] == notes_k[101]  # one key per subject, every column and table of its kind
    assert subject_of_key(env, emails[101]) == ("customer", b"101")
    assert subject_of_key(env, emails[102]) == ("customer", b"102")


async def test_asyncpg_binary_parameters_and_executemany(env: Env) -> None:
    conn = await asyncpg.connect(env.dsn())
    try:
        await conn.executemany(
            "INSERT INTO sk_customers (id, email, score) VALUES ($1, $2, $3)",
            [(201, "c@x.test", 3), (202, "d@x.test", 4), (203, "e@x.test", 5)],
        )
        row = await conn.fetchrow(
            "INSERT INTO sk_orders (customer_id, note) VALUES ($1, $2) RETURNING customer_id, note", 203, "n203"
        )
        assert tuple(row) == (203, "n203")
        got = await conn.fetch("SELECT id, email, score FROM sk_customers WHERE id = ANY($1) ORDER BY id", [201, 203])
        assert [tuple(r) for r in got] == [(201, "c@x.test", 3), (203, "e@x.test", 5)]
        u = uuid.uuid4()
        await conn.execute("INSERT INTO sk_accounts (id, secret) VALUES ($1, $2)", u, "s3cret")
        assert await conn.fetchval("SELECT secret FROM sk_accounts WHERE id = $1", u) == "s3cret"
    finally:
        await conn.close()
    emails = key_ids(env, "sk_customers", "email", [201, 202, 203])
    assert len(set(emails.values())) == 3
    assert key_ids(env, "sk_orders", "note", [203], "customer_id")[203] == emails[203]
    [(stored,)] = direct(env, "SELECT secret FROM sk_accounts WHERE id = %s", u)
    assert subject_of_key(env, bytes(stored)[4:20]) == ("account", str(u).encode())


def test_psycopg_text_and_binary_parameters_give_the_same_subject(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO sk_customers (id, email) VALUES (%s, %s)", (301, "t@x.test"))
        with c.cursor(binary=True) as cur:
            cur.execute("INSERT INTO sk_orders (customer_id, note) VALUES (%b, %b)", (301, "binary"))
        assert c.execute("SELECT note FROM sk_orders WHERE customer_id = 301").fetchall() == [("binary",)]
    assert (
        key_ids(env, "sk_customers", "email", [301])[301]
        == key_ids(env, "sk_orders", "note", [301], "customer_id")[301]
    )


def test_update_pinned_to_the_subject_and_on_conflict(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO sk_customers (id, email) VALUES (401, 'old@x.test')")
        c.execute("UPDATE sk_customers SET email = %s WHERE id = %s", ("new@x.test", 401))
        c.execute(
            "INSERT INTO sk_customers (id, email) VALUES (401, 'upsert@x.test') "
            "ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email"
        )
        assert c.execute("SELECT email FROM sk_customers WHERE id = 401").fetchall() == [("upsert@x.test",)]
    assert subject_of_key(env, key_ids(env, "sk_customers", "email", [401])[401]) == ("customer", b"401")


def test_copy_from_seals_each_row_for_its_subject(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with c.cursor().copy("COPY sk_customers (email, id, score) FROM STDIN") as copy:
            for n in range(501, 521):
                copy.write_row((f"copy{n}@x.test", n, n))
        with c.cursor().copy("COPY sk_orders (customer_id, note) FROM STDIN (FORMAT csv)") as copy:
            copy.write(b'501,"csv, quoted"\n502,plain\n')
        got = c.execute("SELECT id, email, score FROM sk_customers WHERE id BETWEEN 501 AND 520 ORDER BY id").fetchall()
        assert got == [(n, f"copy{n}@x.test", n) for n in range(501, 521)]
        notes = c.execute("SELECT note FROM sk_orders WHERE customer_id IN (501, 502) ORDER BY customer_id").fetchall()
        assert notes == [("csv, quoted",), ("plain",)]
    emails = key_ids(env, "sk_customers", "email", list(range(501, 521)))
    assert len(set(emails.values())) == 20
    assert key_ids(env, "sk_orders", "note", [501], "customer_id")[501] == emails[501]


async def test_asyncpg_copy_records(env: Env) -> None:
    conn = await asyncpg.connect(env.dsn())
    try:
        # copy_records_to_table sends binary COPY, which pgveil refuses for every encrypted column: text here.
        source = io.BytesIO(b"601\tr601@x.test\n602\tr602@x.test\n")
        await conn.copy_to_table("sk_customers", source=source, columns=["id", "email"])
        got = await conn.fetch("SELECT id, email FROM sk_customers WHERE id IN (601, 602) ORDER BY id")
        assert [tuple(r) for r in got] == [(601, "r601@x.test"), (602, "r602@x.test")]
    finally:
        await conn.close()


def test_the_keystore_creates_one_key_for_a_subject_written_by_many_sessions_at_once(env: Env) -> None:
    async def write(n: int) -> None:
        conn = await asyncpg.connect(env.dsn())
        try:
            await conn.execute("INSERT INTO sk_orders (customer_id, note) VALUES ($1, $2)", 777, f"c{n}")
        finally:
            await conn.close()

    async def main() -> None:
        await asyncio.gather(*(write(n) for n in range(8)))

    asyncio.run(main())
    keys = set(key_ids(env, "sk_orders", "note", [777], "customer_id").values())
    rows = direct(env, "SELECT note FROM sk_orders WHERE customer_id = 777")
    assert len({bytes(r[0])[4:20] for r in rows}) == 1
    assert len(keys) == 1
    assert direct(
        env, "SELECT count(*) FROM pgveil.deks WHERE subject_kind = 'customer' AND subject_id = '\\x373737'"
    ) == [(1,)]


@pytest.mark.parametrize(
    ("sql", "construct"),
    [
        # (sk_customers.id is serial: pgveil supplies it, test_subject_generated_ids.py; orders.customer_id
        # has no default, so the database would store NULL.)
        ("INSERT INTO sk_orders (note) VALUES ('x@x.test')", "cannot generate the subject id"),
        ("INSERT INTO sk_orders (customer_id, note) VALUES (DEFAULT, 'x@x.test')", "has no default"),
        ("INSERT INTO sk_customers (id, email) VALUES (1 + 900, 'x@x.test')", "a subject given by"),
        ("INSERT INTO sk_customers (id, email) SELECT 902, 'x@x.test'", "INSERT ... SELECT"),
        ("UPDATE sk_customers SET email = 'x@x.test'", "does not pin id"),
        ("UPDATE sk_orders SET note = 'x' WHERE id = 1", "does not pin customer_id"),
        ("COPY sk_customers (email) FROM STDIN", "a COPY whose column list does not name it"),
    ],
)
def test_a_subject_that_cannot_be_told_is_refused_and_the_session_goes_on(env: Env, sql: str, construct: str) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
            c.execute(sql)
        message = str(e.value)
        assert "cannot tell the data subject" in message or "cannot generate the subject id" in message
        assert construct in message
        assert "sk_" in message
        assert "x@x.test" not in message
        assert c.execute("SELECT 1").fetchall() == [(1,)]


def test_changing_the_subject_column_is_refused(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO sk_customers (id, email) VALUES (801, 'keep@x.test')")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="cannot change subject column id"):
            c.execute("UPDATE sk_customers SET id = 802 WHERE id = 801")
        assert c.execute("SELECT email FROM sk_customers WHERE id = 801").fetchall() == [("keep@x.test",)]


def test_a_bad_subject_id_parameter_is_refused(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="subject id for column id"):
            c.execute("INSERT INTO sk_customers (id, email) VALUES (%s, %s)", ("x1", "y@x.test"))
        with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="is NULL"):
            c.execute("INSERT INTO sk_customers (id, email) VALUES (%s, %s)", (None, "y@x.test"))


def _move(env: Env, sql: str) -> None:
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        c.execute(sql)


async def test_a_value_copied_into_another_subjects_row_fails_to_decrypt(env: Env) -> None:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute("INSERT INTO sk_customers (id, email) VALUES (901, 'alice@x.test'), (902, 'bob@x.test')")
        c.execute("INSERT INTO sk_orders (customer_id, note) VALUES (902, 'bob order')")
    # A DBA (or an attacker with write access) moves alice's envelope into bob's row, bypassing pgveil.
    _move(env, "UPDATE sk_customers SET email = (SELECT email FROM sk_customers WHERE id = 901) WHERE id = 902")
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        for binary in (False, True):
            with pytest.raises(psycopg.errors.DataCorrupted, match=r"public\.sk_customers\.email"):
                c.execute("SELECT id, email FROM sk_customers WHERE id = 902", binary=binary).fetchall()
            assert c.execute("SELECT 1").fetchall() == [(1,)]
        with pytest.raises(psycopg.errors.DataCorrupted):
            c.execute("SELECT email, id FROM sk_customers WHERE id = 902", prepare=True).fetchall()
        # The untouched row still reads.
        assert c.execute("SELECT id, email FROM sk_customers WHERE id = 901").fetchall() == [(901, "alice@x.test")]
    with (
        psycopg.connect(env.dsn(), autocommit=True) as c,
        c.cursor() as cur,
        pytest.raises(psycopg.errors.DataCorrupted),
    ):
        cur.execute("SELECT id, email FROM sk_customers WHERE id = 902; SELECT 1")  # simple protocol, text
    conn = await asyncpg.connect(env.dsn())
    try:
        with pytest.raises(asyncpg.DataCorruptedError):
            await conn.fetch("SELECT id, email FROM sk_customers WHERE id = $1", 902)
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    # Into another table's column: the column identity fails it, whether or not the subject is read.
    _move(env, "UPDATE sk_orders SET note = (SELECT email FROM sk_customers WHERE id = 902) WHERE customer_id = 902")
    with (
        psycopg.connect(env.dsn(), autocommit=True) as c,
        pytest.raises(psycopg.errors.DataCorrupted, match=r"public\.sk_orders\.note"),
    ):
        c.execute("SELECT note FROM sk_orders WHERE customer_id = 902").fetchall()


def test_canary_of_a_subject_keyed_column_is_nowhere_on_the_server(env: Env) -> None:
    """The canary method (test_encryption_canary.py) for a column with per-subject keys: distinctive
    plaintexts written through pgveil (simple, extended, COPY, and a refused write) are nowhere in the table
    files, the WAL or the server log (log_statement = all); controls written to a plain column are found."""
    from test_encryption_canary import distinctive, search, server_files

    ways = ("simple", "extended", "copy", "refused")
    canary = {how: distinctive("SUBJCANARY", how) for how in ways}
    control = {how: distinctive("SUBJCONTROL", how) for how in ("simple", "extended")}
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        c.execute(
            f"INSERT INTO sk_customers (id, email, name) VALUES (1001, '{canary['simple']}', '{control['simple']}')"
        )
        c.execute(
            "INSERT INTO sk_customers (id, email, name) VALUES (%s, %s, %s)",
            (1002, canary["extended"], control["extended"]),
        )
        with c.cursor().copy("COPY sk_customers (id, email) FROM STDIN") as copy:
            copy.write_row((1003, canary["copy"]))
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute(f"INSERT INTO sk_orders (note) VALUES ('{canary['refused']}')")
        rows = c.execute("SELECT email FROM sk_customers WHERE id IN (1001, 1002, 1003) ORDER BY id").fetchall()
        assert rows == [(canary["simple"],), (canary["extended"],), (canary["copy"],)]
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        c.execute("CHECKPOINT")
        c.execute("SELECT pg_switch_wal()")
    found = search(server_files(env.pg), [*canary.values(), *control.values()])
    leaks = {how: sorted(str(p) for p in found.files(v)) for how, v in canary.items() if found.files(v)}
    assert leaks == {}, f"plaintext written through pgveil found on the server: {leaks}"
    for how, v in control.items():
        assert env.pg.log_file in found.files(v), f"control {how} not in the server log: the search is blind"
        assert any(env.pg.data_dir / "pg_wal" in p.parents for p in found.files(v)), f"control {how} not in WAL"
