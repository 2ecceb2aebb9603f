"""Per-subject keys in the keystore: one DEK per (kind, subject id), created on first use, race-free
between instances, recorded in pgveil.subjects, and read back by key id with its subject."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from keymgmt.envelope import Subject, column_associated_data, open_envelope, seal
from keymgmt.errors import DecryptionFailed, KeyDestroyed
from keymgmt.keystore import Keystore, init_keystore
from keymgmt.providers import LocalKeyProvider
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

_db_names = itertools.count()


@pytest.fixture
def dsn(pg: DevCluster) -> str:
    name = f"ks_subject_{next(_db_names)}"
    pg.psql(f"CREATE DATABASE {name}")
    return pg.dsn(dbname=name)


@pytest.fixture
async def initialised(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await init_keystore(conn)
    finally:
        await conn.close()
    return dsn


@pytest.fixture
def provider(tmp_path: Path) -> LocalKeyProvider:
    return LocalKeyProvider(tmp_path / "master.key")


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


async def test_a_subject_gets_one_key_of_its_own(keystore: Keystore, initialised: str) -> None:
    alice = await keystore.subject_key(Subject("customer", b"1"))
    again = await keystore.subject_key(Subject("customer", b"1"))
    bob = await keystore.subject_key(Subject("customer", b"2"))
    supplier = await keystore.subject_key(Subject("supplier", b"1"))
    column = await keystore.active_key("public.customers.email")
    assert alice.key_id == again.key_id
    assert len({alice.key_id, bob.key_id, supplier.key_id, column.key_id}) == 4
    assert alice.data_subject == Subject("customer", b"1")
    assert column.data_subject is None
    rows = await fetch(
        initialised,
        "SELECT scope_kind, column_id, subject_kind, subject_id FROM pgveil.deks WHERE subject_id IS NOT NULL "
        "ORDER BY column_id, subject_id",
    )
    assert [tuple(r) for r in rows] == [
        ("subject", "pgveil.subject.customer", "customer", b"1"),
        ("subject", "pgveil.subject.customer", "customer", b"2"),
        ("subject", "pgveil.subject.supplier", "supplier", b"1"),
    ]
    subjects = await fetch(initialised, "SELECT kind, subject_id, state FROM pgveil.subjects ORDER BY 1, 2")
    assert [tuple(r) for r in subjects] == [
        ("customer", b"1", "ACTIVE"),
        ("customer", b"2", "ACTIVE"),
        ("supplier", b"1", "ACTIVE"),
    ]


async def test_a_key_read_by_id_carries_its_subject(
    keystore: Keystore, initialised: str, provider: LocalKeyProvider
) -> None:
    alice = await keystore.subject_key(Subject("customer", b"1"))
    sealed = seal(alice, b"alice@example.com", column_associated_data("public.customers.email"))
    async with Keystore(initialised, LocalKeyProvider(provider.path)) as other:
        key = await other.key_by_id(alice.key_id)
        assert key.data_subject == Subject("customer", b"1")
        opened = open_envelope(lambda _kid: key, sealed, column_associated_data("public.customers.email"))
        assert opened == b"alice@example.com"
        with pytest.raises(DecryptionFailed):
            open_envelope(lambda _kid: key, sealed, column_associated_data("public.orders.note"))


async def test_two_instances_creating_the_same_new_subjects_make_one_key_each(
    initialised: str, provider: LocalKeyProvider
) -> None:
    async with (
        Keystore(initialised, provider, pool_max_size=8) as a,
        Keystore(initialised, LocalKeyProvider(provider.path), pool_max_size=8) as b,
    ):
        subjects = [Subject("customer", str(n).encode()) for n in range(20)]
        keys = await asyncio.gather(*(ks.subject_key(s) for s in subjects for ks in (a, b, a, b)))
    by_subject: dict[bytes, set[bytes]] = {}
    for s, k in zip((s for s in subjects for _ in range(4)), keys, strict=True):
        by_subject.setdefault(s.subject_id, set()).add(k.key_id)
    assert all(len(ids) == 1 for ids in by_subject.values())
    rows = await fetch(initialised, "SELECT subject_id, count(*) AS n FROM pgveil.deks GROUP BY subject_id")
    assert sorted(r["n"] for r in rows) == [1] * 20
    (n,) = await fetch(initialised, "SELECT count(*) AS n FROM pgveil.subjects")
    assert n["n"] == 20


async def test_a_shredded_subject_gets_no_new_key(keystore: Keystore, initialised: str) -> None:
    conn = await asyncpg.connect(initialised)
    try:
        await conn.execute(
            "INSERT INTO pgveil.subjects (kind, subject_id, state, shredded_at) VALUES ('customer', '\\x37', "
            "'SHREDDED', now())"
        )
    finally:
        await conn.close()
    with pytest.raises(KeyDestroyed):
        await keystore.subject_key(Subject("customer", b"7"))
    rows = await fetch(initialised, "SELECT 1 FROM pgveil.deks WHERE subject_id = '\\x37'")
    assert rows == []


async def test_keys_by_ids_loads_many_keys_in_one_query(
    keystore: Keystore, initialised: str, provider: LocalKeyProvider
) -> None:
    made = [await keystore.subject_key(Subject("customer", str(n).encode())) for n in range(50)]
    async with Keystore(initialised, LocalKeyProvider(provider.path)) as other:
        ids = [k.key_id for k in made] + [b"\x00" * 16]  # an unknown id is skipped
        assert await other.keys_by_ids(ids) == 50
        for k in made:
            cached = other.cached_key(k.key_id)
            assert cached is not None
            assert cached.data_subject == k.data_subject
        assert await other.keys_by_ids(ids) == 0  # all cached: no query
