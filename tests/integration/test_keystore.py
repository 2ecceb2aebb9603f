from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from keymgmt.envelope import DataKey, KeyState, column_associated_data, open_envelope, seal
from keymgmt.errors import DecryptionFailed, KeyDestroyed, KeyDisabled, KeystoreError, MasterKeyError, UnknownKey
from keymgmt.keycache import RefreshResult
from keymgmt.keystore import MIGRATIONS, NOTIFY_CHANNEL, Keystore, init_keystore
from keymgmt.providers import LocalKeyProvider
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

COLUMN = "public.customers.email"
ALL_MIGRATIONS = [m.name for m in MIGRATIONS]
_db_names = itertools.count()


@pytest.fixture(scope="module")
def cluster(pg: DevCluster) -> DevCluster:
    """The test run's shared cluster (tests/conftest.py): one cluster start for the whole suite."""
    return pg


@pytest.fixture
def dsn(cluster: DevCluster) -> str:
    """A fresh database per test, so keystores never see each other's keys."""
    name = f"ks_{next(_db_names)}"
    cluster.psql(f"CREATE DATABASE {name}")
    return cluster.dsn(dbname=name)


@pytest.fixture
def provider(tmp_path: Path) -> LocalKeyProvider:
    return LocalKeyProvider(tmp_path / "master.key")


@pytest.fixture
async def initialised(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await init_keystore(conn)
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def keystore(initialised: str, provider: LocalKeyProvider) -> AsyncIterator[Keystore]:
    async with Keystore(initialised, provider) as ks:
        yield ks


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_init_is_idempotent(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        assert await init_keystore(conn) == ALL_MIGRATIONS
        assert await init_keystore(conn) == []
        tables = {
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'pgveil'")
        }
        recorded = [r["name"] for r in await conn.fetch("SELECT name FROM pgveil.schema_migrations ORDER BY name")]
    finally:
        await conn.close()
    assert {"schema_migrations", "keks", "deks", "blind_index_keys", "ledger", "rotation_jobs"} <= tables
    assert recorded == ALL_MIGRATIONS


async def test_concurrent_init_applies_each_migration_once(dsn: str) -> None:
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(init_keystore(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    applied = [name for result in results for name in result]
    assert sorted(applied) == ALL_MIGRATIONS


async def test_ledger_is_append_only(initialised: str) -> None:
    conn = await asyncpg.connect(initialised)
    try:
        await conn.execute(
            "INSERT INTO pgveil.ledger (seq, action, actor, payload, prev_hash, hash) "
            "VALUES (1, 'test', 'test', '\\x00', '\\x00', '\\x01')"
        )
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="append-only"):
            await conn.execute("UPDATE pgveil.ledger SET actor = 'mallory'")
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="append-only"):
            await conn.execute("DELETE FROM pgveil.ledger")
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="append-only"):
            await conn.execute("TRUNCATE pgveil.ledger")
    finally:
        await conn.close()


async def test_uninitialised_keystore_is_a_clear_error(dsn: str, provider: LocalKeyProvider) -> None:
    async with Keystore(dsn, provider) as ks:
        with pytest.raises(KeystoreError, match="schema is missing") as info:
            await ks.active_key(COLUMN)
    assert info.value.sqlstate == "58000"


async def test_active_key_is_stable_across_instances(initialised: str, provider: LocalKeyProvider) -> None:
    async with Keystore(initialised, provider) as first:
        key = await first.active_key(COLUMN)
        assert key.state is KeyState.ENABLED
        assert key.version == 1
        assert first.cached_active_key(COLUMN) is key
        assert first.cached_key(key.key_id) is key
        assert await first.active_key(COLUMN) is key
        sealed = seal(key, b"alice@example.com", column_associated_data(COLUMN))
    async with Keystore(initialised, LocalKeyProvider(provider.path)) as second:
        assert second.cached_active_key(COLUMN) is None
        again = await second.active_key(COLUMN)
        assert again.key_id == key.key_id
        plaintext = open_envelope(lambda _: again, sealed, column_associated_data(COLUMN))
        assert plaintext == b"alice@example.com"
        by_id = await second.key_by_id(key.key_id)
        assert by_id.key_id == key.key_id


async def test_scopes_get_distinct_keys(keystore: Keystore, initialised: str) -> None:
    column_key = await keystore.active_key(COLUMN)
    alice = await keystore.active_key(COLUMN, b"alice")
    bob = await keystore.active_key(COLUMN, b"bob")
    empty_subject = await keystore.active_key(COLUMN, b"")
    other_column = await keystore.active_key("public.customers.phone")
    ids = {k.key_id for k in (column_key, alice, bob, empty_subject, other_column)}
    assert len(ids) == 5
    rows = await fetch(initialised, "SELECT column_id, scope_kind, subject_id FROM pgveil.deks")
    assert sorted(
        (r["column_id"], r["scope_kind"], b"-" if r["subject_id"] is None else r["subject_id"]) for r in rows
    ) == [
        ("public.customers.email", "column", b"-"),
        ("public.customers.email", "subject", b""),
        ("public.customers.email", "subject", b"alice"),
        ("public.customers.email", "subject", b"bob"),
        ("public.customers.phone", "column", b"-"),
    ]


async def test_concurrent_creation_from_two_instances_makes_one_key(
    initialised: str, provider: LocalKeyProvider
) -> None:
    async with Keystore(initialised, provider) as a, Keystore(initialised, LocalKeyProvider(provider.path)) as b:
        for scope in ((COLUMN, None), (COLUMN, b"subject-1")):
            keys = await asyncio.gather(*(ks.active_key(*scope) for _ in range(10) for ks in (a, b)))
            assert len({k.key_id for k in keys}) == 1
    rows = await fetch(initialised, "SELECT count(*) AS n FROM pgveil.deks GROUP BY subject_id")
    assert [r["n"] for r in rows] == [1, 1]


async def test_wrapped_bytes_are_not_the_dek(keystore: Keystore, provider: LocalKeyProvider, initialised: str) -> None:
    key = await keystore.active_key(COLUMN)
    [row] = await fetch(initialised, "SELECT key_id, wrapped, kek_id FROM pgveil.deks")
    wrapped = bytes(row["wrapped"])
    dek = provider.unwrap(wrapped, row["kek_id"])
    assert row["kek_id"] == provider.kek_id
    assert len(dek) == 32
    assert dek not in wrapped
    master = bytes.fromhex(provider.path.read_text())
    assert master not in wrapped
    # the unwrapped bytes really are the key the keystore handed out
    from_row = DataKey.from_material(row["key_id"].bytes, dek)
    sealed = seal(key, b"x", column_associated_data(COLUMN))
    assert open_envelope(lambda _: from_row, sealed, column_associated_data(COLUMN)) == b"x"
    [kek] = await fetch(initialised, "SELECT provider_id, state FROM pgveil.keks")
    assert (kek["provider_id"], kek["state"]) == ("local", "ENABLED")


async def test_another_master_key_cannot_unwrap(keystore: Keystore, initialised: str, tmp_path: Path) -> None:
    key = await keystore.active_key(COLUMN)
    stranger = LocalKeyProvider(tmp_path / "other" / "master.key")
    async with Keystore(initialised, stranger) as other:
        with pytest.raises(MasterKeyError):
            await other.key_by_id(key.key_id)
        with pytest.raises(MasterKeyError):
            await other.active_key(COLUMN)
        assert other.cached_key(key.key_id) is None
    # Even with the KEK id check out of the way, the stranger's KEK does not authenticate the blob.
    [row] = await fetch(initialised, "SELECT wrapped FROM pgveil.deks")
    forged = stranger.wrap(bytes(32))
    with pytest.raises(MasterKeyError):
        stranger.unwrap(bytes(row["wrapped"]), stranger.kek_id)
    assert stranger.unwrap(forged, stranger.kek_id) == bytes(32)


async def test_unknown_key_id(keystore: Keystore) -> None:
    with pytest.raises(UnknownKey):
        await keystore.key_by_id(uuid.uuid4().bytes)
    with pytest.raises(UnknownKey):
        await keystore.key_by_id(b"short")


async def test_destroyed_scope_stays_shredded(keystore: Keystore, initialised: str) -> None:
    key = await keystore.active_key(COLUMN, b"alice")
    await fetch(
        initialised,
        "UPDATE pgveil.deks SET state = 'DESTROYED', wrapped = NULL, destroyed_at = now() WHERE key_id = $1",
        key.key_uuid,
    )
    await keystore.refresh()
    with pytest.raises(KeyDestroyed):
        await keystore.key_by_id(key.key_id)
    with pytest.raises(KeyDestroyed):
        await keystore.active_key(COLUMN, b"alice")  # writes are refused, no new key appears
    assert issubclass(KeyDestroyed, DecryptionFailed)
    [row] = await fetch(initialised, "SELECT count(*) AS n FROM pgveil.deks")
    assert row["n"] == 1
    assert keystore.cached_key(key.key_id) is None


async def test_disabled_current_version_refuses_writes(keystore: Keystore, initialised: str) -> None:
    key = await keystore.active_key(COLUMN)
    sealed = seal(key, b"x", column_associated_data(COLUMN))
    await fetch(initialised, "UPDATE pgveil.deks SET state = 'DISABLED'")
    await keystore.refresh()
    with pytest.raises(KeyDisabled):
        await keystore.active_key(COLUMN)
    disabled = await keystore.key_by_id(key.key_id)
    assert disabled.state is KeyState.DISABLED
    with pytest.raises(KeyDisabled):
        open_envelope(lambda _: disabled, sealed, column_associated_data(COLUMN))


async def test_preload_fills_the_cache(initialised: str, provider: LocalKeyProvider) -> None:
    async with Keystore(initialised, provider) as writer:
        column_key = await writer.active_key(COLUMN)
        subject_key = await writer.active_key(COLUMN, b"alice")
        other = await writer.active_key("public.orders.note")
    async with Keystore(initialised, provider) as reader:
        assert await reader.preload([COLUMN, COLUMN]) == 2
        assert reader.cached_key(column_key.key_id) is not None
        assert reader.cached_key(subject_key.key_id) is not None
        assert reader.cached_key(other.key_id) is None
        active = reader.cached_active_key(COLUMN)
        assert active is not None
        assert active.key_id == column_key.key_id
        alice = reader.cached_active_key(COLUMN, b"alice")
        assert alice is not None
        assert alice.key_id == subject_key.key_id
        assert await reader.preload([]) == 0


async def test_notify_refreshes_what_changed(keystore: Keystore, initialised: str) -> None:
    # A notification is a hint: the keystore re-reads the cached keys' state and drops exactly what
    # changed there, whatever the payload says.
    heard: list[RefreshResult] = []
    await keystore.listen(heard.append)
    assert keystore.listening
    key = await keystore.active_key(COLUMN)
    subject_key = await keystore.active_key(COLUMN, b"alice")
    other = await keystore.active_key("public.orders.note")

    # The payload names the key, but nothing changed: nothing is dropped.
    await fetch(initialised, "SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(key.key_uuid))
    await wait_until(lambda: len(heard) == 1)
    assert heard[0] == RefreshResult(keys_checked=3, keys_dropped=0, pointers_dropped=0)
    assert keystore.cached_key(key.key_id) is key
    assert keystore.cached_active_key(COLUMN) is key

    # A real change, announced with a payload that names something else: the changed key goes.
    await fetch(initialised, "UPDATE pgveil.deks SET state = 'DISABLED' WHERE key_id = $1", subject_key.key_uuid)
    await fetch(initialised, "SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, "public.orders.note")
    await wait_until(lambda: len(heard) == 2)
    assert heard[1].keys_dropped == 1
    assert keystore.cached_key(subject_key.key_id) is None
    assert keystore.cached_active_key(COLUMN, b"alice") is None
    assert keystore.cached_key(key.key_id) is key
    assert keystore.cached_key(other.key_id) is other
    with pytest.raises(KeyDisabled):
        await keystore.active_key(COLUMN, b"alice")

    # A new current version (a rotation): the old version stays for reading, its pointer goes.
    await fetch(
        initialised,
        "INSERT INTO pgveil.deks (key_id, scope_kind, column_id, version, state, wrapped, kek_id) "
        "SELECT $1, scope_kind, column_id, 2, 'ENABLED', wrapped, kek_id FROM pgveil.deks WHERE key_id = $2",
        uuid.uuid4(),
        key.key_uuid,
    )
    await fetch(initialised, "SELECT pg_notify($1, '*')", NOTIFY_CHANNEL)
    await wait_until(lambda: len(heard) == 3)
    assert heard[2].pointers_dropped == 1
    assert keystore.cached_key(key.key_id) is key
    assert keystore.cached_active_key(COLUMN) is None
    assert (await keystore.active_key(COLUMN)).version == 2
    assert keystore.cache.flushes == 1  # only the one when listening started


async def test_listener_loss_degrades_then_recovers(keystore: Keystore, initialised: str, cluster: DevCluster) -> None:
    heard: list[RefreshResult] = []
    await keystore.listen(heard.append)
    key = await keystore.active_key(COLUMN)
    dbname = initialised.rsplit("/", 1)[1]
    # Cut every connection of the keystore database and keep it unreachable, so the degraded state
    # lasts until we end it.
    cluster.psql(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
    cluster.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{dbname}'")
    await wait_until(lambda: not keystore.listening)
    # while deaf, nothing cached survives (a shred elsewhere could go unheard) and the TTL is short
    assert keystore.cached_key(key.key_id) is None
    assert keystore.cache.ttl_seconds <= 1.0
    with pytest.raises(KeystoreError):
        await keystore.active_key(COLUMN)

    cluster.psql(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
    await wait_until(lambda: keystore.listening)
    assert keystore.cache.ttl_seconds == 300.0
    key = await keystore.active_key(COLUMN)
    await fetch(
        initialised,
        "UPDATE pgveil.deks SET state = 'DESTROYED', wrapped = NULL, destroyed_at = now() WHERE key_id = $1",
        key.key_uuid,
    )
    await fetch(initialised, "SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(key.key_uuid))
    await wait_until(lambda: len(heard) == 1)
    assert keystore.cached_key(key.key_id) is None


async def test_failed_first_listen_keeps_trying(
    initialised: str, provider: LocalKeyProvider, cluster: DevCluster
) -> None:
    dbname = initialised.rsplit("/", 1)[1]
    cluster.psql(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
    async with Keystore(initialised, provider) as ks:
        with pytest.raises(KeystoreError):
            await ks.listen()
        assert not ks.listening
        assert ks.cache.ttl_seconds <= 1.0  # a caller that ignores the error still gets a short TTL
        cluster.psql(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
        await wait_until(lambda: ks.listening)
        assert ks.cache.ttl_seconds == 300.0


async def test_keystore_over_a_borrowed_pool(initialised: str, provider: LocalKeyProvider) -> None:
    pool = await asyncpg.create_pool(initialised, min_size=1, max_size=3)
    try:
        ks = Keystore(pool, provider)
        await ks.listen()
        key = await ks.active_key(COLUMN)
        await ks.close()
        # the borrowed pool is still usable, and the keystore dropped its keys
        assert await pool.fetchval("SELECT count(*) FROM pgveil.deks") == 1
        assert ks.cached_key(key.key_id) is None
        with pytest.raises(KeystoreError, match="closed"):
            await ks.active_key(COLUMN)
    finally:
        await pool.close()
