"""A DEK rotation wraps its new key version as the keystore wraps every new key: under the keystore's
primary KEK when the rotating process's provider holds it, else under the provider's newest. A provider
given a newer master key file before `pgveil keys rotate-kek` ran (the old one kept beside it) must not
start wrapping rotated versions under the new KEK while the primary is still the old one."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import asyncpg
import pytest

from keymgmt.keystore import init_keystore
from keymgmt.providers import LocalKeyProvider
from keymgmt.rotation import KeyColumn, RotationTarget, rotate_columns
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

TARGET = RotationTarget("public", "wk_items", "secret", "text", (KeyColumn("id", "integer"),))


def _two_kek_provider(directory: Path) -> tuple[LocalKeyProvider, str, str]:
    """A provider whose key file holds KEK B, with an older KEK A kept beside it (as rotate-kek leaves it)."""
    path = directory / "master.key"
    old = LocalKeyProvider(path).kek_id
    shutil.move(path, path.with_name(f"{path.name}.{old}"))
    provider = LocalKeyProvider(path)
    assert provider.kek_id != old
    assert provider.holds(old)
    return provider, old, provider.kek_id


async def _rotate(dsn: str, provider: LocalKeyProvider, primary: str | None) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await init_keystore(conn)
        await conn.execute("CREATE TABLE IF NOT EXISTS wk_items (id int PRIMARY KEY, secret bytea)")
        if primary is not None:
            await conn.execute(
                "INSERT INTO pgveil.keks (kek_id, provider_id, is_primary) VALUES ($1, 'local', true)", primary
            )
        await rotate_columns(conn, provider, [TARGET])
        kek: str = await conn.fetchval(
            "SELECT kek_id FROM pgveil.deks WHERE column_id = $1 ORDER BY version DESC LIMIT 1", TARGET.column_id
        )
        return kek
    finally:
        await conn.close()


@pytest.mark.parametrize("primary_is_old", [True, False], ids=["primary-held-old", "no-primary"])
def test_a_rotated_version_is_wrapped_under_the_primary_kek_when_held(
    pg: DevCluster, tmp_path: Path, primary_is_old: bool
) -> None:
    db = f"wk_{os.getpid()}_{int(primary_is_old)}"
    pg.psql(f"CREATE DATABASE {db}")
    provider, old, new = _two_kek_provider(tmp_path)
    kek = asyncio.run(_rotate(pg.dsn(dbname=db), provider, old if primary_is_old else None))
    assert kek == (old if primary_is_old else new)


def test_a_primary_the_provider_does_not_hold_leaves_the_newest(pg: DevCluster, tmp_path: Path) -> None:
    db = f"wk_{os.getpid()}_foreign"
    pg.psql(f"CREATE DATABASE {db}")
    provider, _old, new = _two_kek_provider(tmp_path)
    foreign = LocalKeyProvider(tmp_path / "other.key").kek_id  # a KEK this provider has never seen
    assert not provider.holds(foreign)
    assert asyncio.run(_rotate(pg.dsn(dbname=db), provider, foreign)) == new
