from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from keymgmt.envelope import is_envelope
from proxy.catalog_loader import load_catalog
from proxy.config import parse_config
from proxy.devcluster import DevCluster
from proxy.rewrite.catalog import Catalog
from proxy.schema import (
    CATALOG_CHANNEL,
    ENVELOPE_MIN_LENGTH,
    SchemaRefused,
    StepKind,
    apply_schema,
    constraint_name,
    plan_event_trigger,
    plan_schema,
)

pytestmark = pytest.mark.integration

# A well-formed envelope v1 around an empty plaintext: magic, version, algorithm, key id, nonce, tag.
ENVELOPE = b"PV\x01\x01" + bytes(range(16)) + bytes(12) + b"\xaa" * 16


@pytest.fixture(scope="module")
def cluster(pg: DevCluster) -> DevCluster:
    """The test run's shared cluster (tests/conftest.py): one cluster start for the whole suite."""
    return pg


@pytest.fixture
async def conn(cluster: DevCluster) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(cluster.dsn())
    try:
        yield connection
    finally:
        await connection.close()


def catalog_for(table: str, columns: dict[str, str]) -> Catalog:
    data = {"tables": {table: {"columns": {name: {"type": t, "encrypt": True} for name, t in columns.items()}}}}
    return parse_config(data, base_dir=Path.cwd(), environ={}).catalog()


async def column_types(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS t FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
        table,
    )
    return {r["attname"]: r["t"] for r in rows}


async def test_apply_prepares_a_fresh_table_and_is_idempotent(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE fresh (id serial PRIMARY KEY, name text, email text, ssn varchar(11))")
    catalog = catalog_for("fresh", {"email": "text", "ssn": "varchar(11)", "birth_date": "date"})

    steps = await plan_schema(conn, catalog)
    assert [(s.kind, s.column) for s in steps] == [
        (StepKind.ALTER_TYPE, "email"),
        (StepKind.ADD_CONSTRAINT, "email"),
        (StepKind.ALTER_TYPE, "ssn"),
        (StepKind.ADD_CONSTRAINT, "ssn"),
        (StepKind.ADD_COLUMN, "birth_date"),
        (StepKind.ADD_CONSTRAINT, "birth_date"),
    ]
    assert steps[0].sql == 'ALTER TABLE "public"."fresh" ALTER COLUMN "email" TYPE bytea USING NULL'
    assert (
        steps[2].description
        == "change column public.fresh.ssn from character varying(11) to bytea (it holds no values)"
    )
    assert steps[4].description == "add column public.fresh.birth_date as bytea"

    await apply_schema(conn, steps)
    assert await column_types(conn, "fresh") == {
        "id": "integer",
        "name": "text",
        "email": "bytea",
        "ssn": "bytea",
        "birth_date": "bytea",
    }
    constraints = await conn.fetch(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'fresh'::regclass AND contype = 'c' ORDER BY conname"
    )
    assert [r["conname"] for r in constraints] == [
        "pgveil_envelope_birth_date",
        "pgveil_envelope_email",
        "pgveil_envelope_ssn",
    ]
    assert await plan_schema(conn, catalog) == []
    await apply_schema(conn, [])


async def test_postgresql_refuses_plaintext_and_accepts_envelopes(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE guarded (id int, email text)")
    await apply_schema(conn, await plan_schema(conn, catalog_for("guarded", {"email": "text"})))

    for bad in (
        b"alice@example.com",
        ENVELOPE[: ENVELOPE_MIN_LENGTH - 1],  # one byte short
        b"PV\x02" + ENVELOPE[3:],  # unknown version
        b"XV" + ENVELOPE[2:],  # wrong magic
        b"alice@example.com".ljust(64, b"!"),  # long enough, but not an envelope
    ):
        assert not is_envelope(bad)  # the database and keymgmt agree on what an envelope is
        with pytest.raises(asyncpg.CheckViolationError) as info:
            await conn.execute("INSERT INTO guarded VALUES (1, $1)", bad)
        assert info.value.sqlstate == "23514"
        assert info.value.constraint_name == "pgveil_envelope_email"

    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO guarded VALUES (1, 'alice@example.com'::bytea)")

    assert is_envelope(ENVELOPE)
    await conn.execute("INSERT INTO guarded VALUES (1, $1), (2, $2), (3, NULL)", ENVELOPE, ENVELOPE + b"ciphertext")
    assert await conn.fetchval("SELECT count(*) FROM guarded") == 3


async def test_columns_holding_plaintext_are_refused_and_left_alone(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE occupied (id int, email text, ssn text, dob date DEFAULT current_date)")
    await conn.execute("INSERT INTO occupied (id, email, ssn) VALUES (1, 'alice@example.com', NULL)")
    await conn.execute("CREATE TABLE raw (id int, blob bytea)")
    await conn.execute("INSERT INTO raw VALUES (1, 'not an envelope'::bytea)")
    catalog = Catalog(
        {
            **catalog_for("occupied", {"email": "text", "ssn": "text", "dob": "date"}).tables,
            **catalog_for("raw", {"blob": "bytea"}).tables,
            **catalog_for("nowhere", {"x": "text"}).tables,
        }
    )
    with pytest.raises(SchemaRefused) as info:
        await plan_schema(conn, catalog)
    reasons = info.value.reasons
    assert reasons == [
        "column public.occupied.email is text and holds values: `pgveil encrypt` encrypts them online"
        " (docs/encrypt-existing.md)",
        "column public.occupied.dob is date with a DEFAULT, which would store plaintext; drop the default first",
        "column public.raw.blob holds values that are not pgveil envelopes: if they are its plaintext,"
        " `pgveil encrypt` encrypts them online (docs/encrypt-existing.md); otherwise move them out first",
        "table public.nowhere does not exist; create it first",
    ]
    assert info.value.sqlstate == "55000"
    assert "alice" not in str(info.value)
    assert await column_types(conn, "occupied") == {"id": "integer", "email": "text", "ssn": "text", "dob": "date"}


async def test_values_written_after_planning_are_never_overwritten(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE racing (id int, email text)")
    steps = await plan_schema(conn, catalog_for("racing", {"email": "text"}))
    await conn.execute("INSERT INTO racing VALUES (1, 'late@example.com')")
    with pytest.raises(SchemaRefused, match="received values since the plan was made"):
        await apply_schema(conn, steps)
    assert await column_types(conn, "racing") == {"id": "integer", "email": "text"}
    assert await conn.fetchval("SELECT email FROM racing") == "late@example.com"


async def test_a_failing_step_rolls_back_the_whole_apply(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE viewed (id int, email text, ssn text)")
    await conn.execute("CREATE VIEW viewed_ssn AS SELECT ssn FROM viewed")
    steps = await plan_schema(conn, catalog_for("viewed", {"email": "text", "ssn": "text"}))
    with pytest.raises(SchemaRefused, match=r"change column public\.viewed\.ssn .*PostgreSQL refused it \(0A000\)"):
        await apply_schema(conn, steps)
    assert await column_types(conn, "viewed") == {"id": "integer", "email": "text", "ssn": "text"}


async def test_quoted_names_and_an_existing_bytea_column(conn: asyncpg.Connection) -> None:
    await conn.execute('CREATE SCHEMA crm; CREATE TABLE crm."order" ("user" bytea, note text)')
    await conn.execute("INSERT INTO crm.\"order\" VALUES ($1, 'hello'), (NULL, NULL)", ENVELOPE)
    catalog = catalog_for("crm.order", {"user": "text"})
    steps = await plan_schema(conn, catalog)
    assert [s.kind for s in steps] == [StepKind.ADD_CONSTRAINT]
    await apply_schema(conn, steps)
    assert await plan_schema(conn, catalog) == []


async def test_an_unvalidated_constraint_is_validated(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE lax (secret bytea)")
    name = constraint_name("secret")
    await conn.execute(f"ALTER TABLE lax ADD CONSTRAINT {name} CHECK (secret IS NULL) NOT VALID")
    steps = await plan_schema(conn, catalog_for("lax", {"secret": "bytea"}))
    assert [s.kind for s in steps] == [StepKind.VALIDATE_CONSTRAINT]
    await apply_schema(conn, steps)
    assert await conn.fetchval("SELECT convalidated FROM pg_constraint WHERE conname = $1", name) is True


async def test_load_catalog_fills_in_oids_and_names_problems(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE people (id serial, name text, email text, dropme int, phone text)")
    await conn.execute("ALTER TABLE people DROP COLUMN dropme")
    await conn.execute("CREATE VIEW people_view AS SELECT 'x'::text AS email")
    catalog = Catalog(
        {
            **catalog_for("people", {"email": "text", "phone": "text", "birth_date": "date"}).tables,
            **catalog_for("ghost", {"x": "text"}).tables,
            **catalog_for("people_view", {"email": "text"}).tables,
        }
    )
    loaded, problems = await load_catalog(conn, catalog)
    assert problems == [
        "column public.people.email is text, expected bytea; run `pgveil schema apply`",
        "column public.people.phone is text, expected bytea; run `pgveil schema apply`",
        "column public.people.birth_date does not exist; run `pgveil schema apply`",
        "table public.ghost does not exist; create it, then run `pgveil schema apply`",
        "public.people_view is a view; only tables can hold protected columns",
    ]
    assert set(loaded.tables) == set(catalog.tables)  # nothing configured is forgotten

    people_only = catalog_for("people", {"email": "text", "phone": "text", "birth_date": "date"})
    await apply_schema(conn, await plan_schema(conn, people_only))
    loaded, problems = await load_catalog(conn, people_only)
    assert problems == []
    oid = await conn.fetchval("SELECT 'people'::regclass::oid")
    people = loaded.tables[("public", "people")]
    assert people.oid == oid
    assert people.all_columns == ("id", "name", "email", "phone", "birth_date")
    assert {c.name: c.attnum for c in people.columns.values()} == {"email": 3, "phone": 5, "birth_date": 6}
    assert loaded.column_by_attr(oid, 5) == people.columns["phone"]
    assert loaded.by_oid(oid) is people


# -- the event trigger and the protected family (issue 7, items 4 and 5) ------------------------------------


@pytest.fixture
async def evt_db(cluster: DevCluster) -> AsyncIterator[asyncpg.Connection]:
    """A database of its own: its event triggers must not notify the other tests' DDL."""
    admin = await asyncpg.connect(cluster.dsn())
    await admin.execute("DROP DATABASE IF EXISTS veil_evt")
    await admin.execute("CREATE DATABASE veil_evt")
    connection = await asyncpg.connect(cluster.dsn(dbname="veil_evt"))
    try:
        yield connection
    finally:
        await connection.close()
        await admin.execute("DROP DATABASE veil_evt WITH (FORCE)")
        await admin.close()


async def test_event_trigger_notifies_the_relations_that_ddl_touched(
    cluster: DevCluster, evt_db: asyncpg.Connection
) -> None:
    steps = await plan_event_trigger(evt_db)
    assert [s.kind for s in steps] == [StepKind.EVENT_TRIGGER]
    await apply_schema(evt_db, steps)
    assert await plan_event_trigger(evt_db) == []
    payloads: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(cluster.dsn(dbname="veil_evt"))
    try:
        await listener.add_listener(CATALOG_CHANNEL, lambda _c, _p, _ch, payload: payloads.put_nowait(payload))

        async def next_payload() -> str:
            return await asyncio.wait_for(payloads.get(), 10)

        await evt_db.execute("CREATE TABLE evt_a (id int)")
        assert await next_payload() == "evt_a"
        await evt_db.execute("ALTER TABLE evt_a RENAME TO evt_b")
        assert await next_payload() == "evt_b"
        await evt_db.execute("CREATE TEMP TABLE evt_tmp (id int)")  # temporary: no notification
        tx = evt_db.transaction()
        await tx.start()
        await evt_db.execute("CREATE TABLE evt_rolled_back (id int)")
        await tx.rollback()  # a notification is delivered at commit only
        await evt_db.execute("CREATE TABLE evt_c (id int)")
        assert await next_payload() == "evt_c"
        await evt_db.execute("CREATE TABLE evt_p (id int) PARTITION BY LIST (id)")
        await evt_db.execute("CREATE TABLE evt_q (id int)")
        assert [await next_payload(), await next_payload()] == ["evt_p", "evt_q"]
        await evt_db.execute("ALTER TABLE evt_p ATTACH PARTITION evt_q FOR VALUES IN (1)")
        assert set((await next_payload()).split(",")) == {"evt_p", "evt_q"}  # the partition, not only the parent
        await evt_db.execute("DROP TABLE evt_b")
        assert "evt_b" in (await next_payload()).split(",")
        assert payloads.empty()
    finally:
        await listener.close()


def _text_columns_c(*tables: str) -> Catalog:
    data = {"tables": {t: {"columns": {"c": {"type": "text", "encrypt": True}}} for t in tables}}
    return parse_config(data, base_dir=Path.cwd(), environ={}).catalog()


async def test_load_catalog_adds_the_family_and_the_namesakes(evt_db: asyncpg.Connection) -> None:
    await evt_db.execute(
        """
        CREATE SCHEMA other;
        CREATE TABLE fam (id int, c bytea, open text) PARTITION BY LIST (id);
        CREATE TABLE fam_1 PARTITION OF fam FOR VALUES IN (1) PARTITION BY LIST (id);
        CREATE TABLE fam_1a PARTITION OF fam_1 FOR VALUES IN (1);
        CREATE TABLE base (id int, c bytea);
        CREATE TABLE kid (x int, c bytea) INHERITS (base);
        CREATE TABLE grandkid () INHERITS (kid);
        CREATE VIEW fam_v AS SELECT open, c AS hidden, id FROM fam;
        CREATE VIEW fam_vv AS SELECT hidden FROM fam_v;
        CREATE VIEW fam_f AS SELECT id, length(c) AS n FROM fam;
        CREATE TABLE other.fam (id int);
        CREATE TABLE fam_2 (open text, id int, c bytea);
        ALTER TABLE fam ATTACH PARTITION fam_2 FOR VALUES IN (2);
        """
    )
    configured = parse_config(
        {
            "tables": {
                "public.fam": {"columns": {"c": {"type": "text", "encrypt": True}}},
                "public.base": {"columns": {"c": {"type": "text", "encrypt": True}}},
            }
        },
        base_dir=Path.cwd(),
        environ={},
    ).catalog()
    catalog, problems = await load_catalog(evt_db, configured)
    assert problems == []
    by_name = {name: t for (_s, name), t in catalog.tables.items()}
    assert set(by_name) == {"fam", "fam_1", "fam_1a", "fam_2", "base", "kid", "grandkid", "fam_v", "fam_vv", "fam_f"}
    assert by_name["fam_2"].columns["c"].attnum == 3  # another column order than the root's
    assert by_name["fam_2"].all_columns == ("open", "id", "c")
    assert by_name["fam_1a"].root == "public.fam"
    assert by_name["grandkid"].root == "public.base"
    for name in ("fam_1", "fam_1a", "fam_vv"):
        (col,) = by_name[name].columns.values()
        assert col.column_id == "public.fam.c"
        assert col.table_oid == by_name[name].oid
    assert by_name["kid"].columns["c"].attnum == 2  # its own attribute number, the root's identity
    assert by_name["kid"].columns["c"].column_id == "public.base.c"
    assert set(by_name["fam_v"].columns) == {"hidden"}
    assert by_name["fam_v"].columns["hidden"].attnum == 2
    assert by_name["fam_f"].opaque
    assert catalog.others == frozenset({("other", "fam")})
    assert catalog.ambiguity(None, "fam") is not None

    # A member configured on its own is a catalog problem (its identity would differ from the root's).
    configured = parse_config(
        {
            "tables": {
                "public.fam": {"columns": {"c": {"type": "text", "encrypt": True}}},
                "public.fam_1a": {"columns": {"c": {"type": "text", "encrypt": True}}},
            }
        },
        base_dir=Path.cwd(),
        environ={},
    ).catalog()
    _catalog, problems = await load_catalog(evt_db, configured)
    assert any("fam_1a" in p and "configured separately" in p for p in problems)


async def test_load_catalog_follows_a_renamed_table_and_column(evt_db: asyncpg.Connection) -> None:
    await evt_db.execute("CREATE TABLE moving (id int, gone int, c bytea)")
    configured = catalog_for("moving", {"c": "text"})
    first, problems = await load_catalog(evt_db, configured)
    assert problems == []
    await evt_db.execute("ALTER TABLE moving DROP COLUMN gone")
    await evt_db.execute("ALTER TABLE moving RENAME COLUMN c TO c2")
    await evt_db.execute("ALTER TABLE moving RENAME TO moved")
    second, problems = await load_catalog(evt_db, configured, first)
    assert problems == []
    (table,) = second.tables.values()
    assert table.qualified_name == "public.moved"
    assert table.all_columns == ("id", "c2")
    assert table.attnums == (1, 3)
    assert table.columns["c2"].column_id == "public.moving.c"  # what was written before still decrypts
    third, problems = await load_catalog(evt_db, configured, second)  # and again, from the new names
    assert problems == []
    assert third.tables == second.tables
    _lost, problems = await load_catalog(evt_db, configured)  # without the earlier catalog: not ready
    assert problems
