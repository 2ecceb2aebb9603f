"""KEK rotation and destruction with the local provider, against the suite's PostgreSQL and a real pgveil.

Each test has a database of its own (keystore in the same database, as by default): one protected table
served by pgveil, plus a few thousand data keys of other columns seeded straight into the keystore, so a
rotation has enough batches to be watched, interrupted and resumed. ``pgveil keys ...`` runs as the
operator runs it, in a subprocess. The helpers here are shared with ``test_pkcs11_provider.py``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from conftest import APP_PASSWORD, ProxyProcess, proxy_config

from keymgmt.envelope import DEK_LENGTH
from keymgmt.kek_rotation import list_keks, rotate_kek
from keymgmt.keystore import Keystore, init_keystore
from keymgmt.providers import KeyProvider, LocalKeyProvider
from proxy.config import parse_config
from proxy.devcluster import DevCluster
from proxy.schema import apply_schema, plan_schema

pytestmark = pytest.mark.integration

ROTATE = [sys.executable, "-m", "proxy.cli", "keys", "rotate-kek"]
TABLE = "kr_items"
COLUMN_ID = f"public.{TABLE}.secret"


@dataclass
class KekEnv:
    pg: DevCluster
    db: str
    workdir: Path
    proxies: list[ProxyProcess] = field(default_factory=list)

    @property
    def direct_dsn(self) -> str:
        return self.pg.dsn(dbname=self.db)

    def config(self, master_key: dict[str, Any], previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        keystore: dict[str, Any] = {"dsn": self.direct_dsn, "master_key": master_key}
        if previous:
            keystore["previous_master_keys"] = previous
        return proxy_config(
            self.pg,
            service={"dsn": self.direct_dsn},
            keystore=keystore,
            tables={f"public.{TABLE}": {"columns": {"secret": {"type": "text", "encrypt": True}}}},
            roles={"default": "plaintext"},  # the application sees its data (without roles: hidden)
        )

    def write_config(self, name: str, config: dict[str, Any]) -> Path:
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start_proxy(self, config: dict[str, Any]) -> ProxyProcess:
        # A copy: ProxyProcess fills in its listen and admin addresses.
        proxy = ProxyProcess(copy.deepcopy(config), self.workdir / f"proxy{len(self.proxies)}")
        self.proxies.append(proxy.start())
        wait_serving(proxy)
        return proxy

    def start_proxy_unready(self, config: dict[str, Any]) -> ProxyProcess:
        """A pgveil that listens but is not expected to serve protected tables (a broken provider)."""
        proxy = ProxyProcess(copy.deepcopy(config), self.workdir / f"proxy{len(self.proxies)}")
        self.proxies.append(proxy.start())
        return proxy

    def local_key(self) -> dict[str, Any]:
        return {"provider": "local", "path": str(self.workdir / "master.key")}


async def _create_database(pg: DevCluster, db: str) -> None:
    su = await asyncpg.connect(pg.dsn())
    try:
        await su.execute(f"DROP DATABASE IF EXISTS {db}")
        await su.execute(f"CREATE DATABASE {db} OWNER app")
    finally:
        await su.close()
    app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/{db}")
    try:
        await app.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, secret text)")
    finally:
        await app.close()
    tables = {f"public.{TABLE}": {"columns": {"secret": {"type": "text", "encrypt": True}}}}
    catalog = parse_config({"tables": tables}, base_dir=Path.cwd(), environ={}).catalog()
    service = await asyncpg.connect(pg.dsn(dbname=db))
    try:
        await apply_schema(service, await plan_schema(service, catalog))
        await init_keystore(service)
    finally:
        await service.close()


@pytest.fixture
def kek_env(pg: DevCluster, tmp_path: Path) -> Iterator[KekEnv]:
    db = "kek_" + uuid.uuid4().hex[:10]
    asyncio.run(_create_database(pg, db))
    env = KekEnv(pg, db, tmp_path)
    yield env
    for proxy in env.proxies:
        proxy.stop()


def wait_serving(proxy: ProxyProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(proxy.dsn(dbname=_db_of(proxy)), autocommit=True, connect_timeout=5) as c:
                c.execute(f"SELECT secret FROM {TABLE} WHERE id = -1").fetchall()
                return
        except psycopg.Error as e:
            last = e
            time.sleep(0.2)
    raise RuntimeError(f"pgveil never became ready: {last}\n{proxy.logs()}")


def _db_of(proxy: ProxyProcess) -> str:
    dsn: str = proxy.config["keystore"]["dsn"]
    return dsn.rsplit("/", 1)[1].split("?", 1)[0]


def app_dsn(proxy: ProxyProcess) -> str:
    return proxy.dsn(dbname=_db_of(proxy))


def pgveil(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def list_keks_json(config: Path) -> list[dict[str, Any]]:
    run = pgveil("keys", "list-keks", "--config", str(config), "--json")
    assert run.returncode == 0, run.stderr
    rows: list[dict[str, Any]] = json.loads(run.stdout)
    return rows


async def seed_deks(dsn: str, provider: KeyProvider, n: int, prefix: str = "public.kr_bulk") -> None:
    """``n`` data keys of other columns, wrapped the way pgveil wraps them (under the primary KEK)."""
    async with Keystore(dsn, provider) as keystore:
        rows = []
        for i in range(n):
            wrapped, kek_id = await keystore.wrap_for_new_key(os.urandom(DEK_LENGTH))
            rows.append((uuid.uuid4(), f"{prefix}.c{i}", wrapped, kek_id))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            """INSERT INTO pgveil.deks (key_id, scope_kind, column_id, version, state, wrapped, kek_id)
               VALUES ($1, 'column', $2, 1, 'ENABLED', $3, $4)""",
            rows,
        )
    finally:
        await conn.close()


async def seed_blind_index_keys(dsn: str, provider: KeyProvider, n: int) -> None:
    async with Keystore(dsn, provider) as keystore:
        rows = []
        for i in range(n):
            wrapped, kek_id = await keystore.wrap_for_new_key(os.urandom(DEK_LENGTH))
            rows.append((uuid.uuid4(), f"public.kr_search.c{i}", wrapped, kek_id))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            """INSERT INTO pgveil.blind_index_keys (key_id, column_id, version, state, wrapped, kek_id)
               VALUES ($1, $2, 1, 'ENABLED', $3, $4)""",
            rows,
        )
    finally:
        await conn.close()


async def unwrapped_materials(dsn: str, provider: KeyProvider) -> dict[uuid.UUID, bytes]:
    """Every live data key's material, unwrapped under whichever KEK its row names."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT key_id, wrapped, kek_id FROM pgveil.deks WHERE wrapped IS NOT NULL")
    finally:
        await conn.close()
    return {r["key_id"]: provider.unwrap(bytes(r["wrapped"]), r["kek_id"]) for r in rows}


async def kek_ids_in_use(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT kek_id, count(*) AS n FROM pgveil.deks WHERE wrapped IS NOT NULL GROUP BY kek_id"
        )
    finally:
        await conn.close()
    return {r["kek_id"]: r["n"] for r in rows}


async def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


class Workload:
    """An application writing and reading through pgveil in a thread: inserts, updates, reads back."""

    def __init__(self, dsn: str, start_id: int = 1) -> None:
        self.dsn = dsn
        self.expected: dict[int, str] = {}
        self.errors: list[str] = []
        self.statements = 0
        self._start = self._next = start_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Workload:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as c:
                while not self._stop.is_set():
                    i = self._next
                    self._next += 1
                    value = f"value-{i}-{uuid.uuid4().hex[:8]}"
                    c.execute(f"INSERT INTO {TABLE} (id, secret) VALUES (%s, %s)", (i, value))
                    self.expected[i] = value
                    j = self._start + (i - self._start) // 2  # a row of this workload, written before
                    changed = f"changed-{j}-{i}"
                    c.execute(f"UPDATE {TABLE} SET secret = %s WHERE id = %s", (changed, j))
                    self.expected[j] = changed
                    got = c.execute(f"SELECT secret FROM {TABLE} WHERE id = %s", (j,)).fetchone()
                    if got is None or got[0] != changed:
                        self.errors.append(f"row {j}: read back {got!r}")
                    self.statements += 3
        except psycopg.Error as e:
            self.errors.append(f"{type(e).__name__}: {e}")

    def wait_for(self, statements: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.statements < statements and not self.errors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not self.errors, self.errors
        assert self.statements >= statements, "the workload made no progress"


def assert_rows(dsn: str, expected: dict[int, str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows: dict[int, str] = dict(c.execute(f"SELECT id, secret FROM {TABLE}").fetchall())
    assert rows == expected


# -- tests ---------------------------------------------------------------------------------------------


def test_rotate_kek_online_while_pgveil_serves_reads_and_writes(kek_env: KekEnv) -> None:
    config = kek_env.config(kek_env.local_key())
    config_path = kek_env.write_config("pgveil", config)
    proxy = kek_env.start_proxy(config)
    key_file = kek_env.workdir / "master.key"
    asyncio.run(seed_deks(kek_env.direct_dsn, LocalKeyProvider(key_file), 3000))
    asyncio.run(seed_blind_index_keys(kek_env.direct_dsn, LocalKeyProvider(key_file), 10))
    before = asyncio.run(unwrapped_materials(kek_env.direct_dsn, LocalKeyProvider(key_file)))
    [old] = list_keks_json(config_path)
    assert (old["version"], old["primary"], old["wrapped_keys"]) == (1, True, 3011)

    with Workload(app_dsn(proxy)) as app:
        app.wait_for(30)
        run = pgveil("keys", "rotate-kek", "--config", str(config_path), "--batch-size", "100")
        assert run.returncode == 0, run.stderr
        done_at = app.statements
        app.wait_for(done_at + 30)  # and it goes on after the rotation
    assert not app.errors, app.errors
    assert "re-wrapped 3011 keys" in run.stdout

    keks = list_keks_json(config_path)
    assert [(k["version"], k["state"], k["primary"], k["wrapped_keys"]) for k in keks] == [
        (1, "ENABLED", False, 0),
        (2, "ENABLED", True, 3011),
    ]
    assert asyncio.run(
        fetchval(kek_env.direct_dsn, "SELECT array_agg(DISTINCT kek_id) FROM pgveil.blind_index_keys")
    ) == [keks[1]["kek_id"]]
    assert asyncio.run(kek_ids_in_use(kek_env.direct_dsn)) == {keks[1]["kek_id"]: 3001}
    # Only the wrapping changed: every data key is the same key, so nothing stored needed rewriting.
    assert asyncio.run(unwrapped_materials(kek_env.direct_dsn, LocalKeyProvider(key_file))) == before
    assert sorted(p.name for p in kek_env.workdir.glob("master.key*")) == ["master.key", f"master.key.{old['kek_id']}"]
    assert_rows(app_dsn(proxy), app.expected)
    # A proxy started now has no cached key: it unwraps under the new KEK from the key file.
    fresh = kek_env.start_proxy(config)
    assert_rows(app_dsn(fresh), app.expected)


def test_a_killed_rotation_resumes_and_finishes_under_the_same_kek(kek_env: KekEnv) -> None:
    config = kek_env.config(kek_env.local_key())
    config_path = kek_env.write_config("pgveil", config)
    proxy = kek_env.start_proxy(config)
    key_file = kek_env.workdir / "master.key"
    asyncio.run(seed_deks(kek_env.direct_dsn, LocalKeyProvider(key_file), 2000))
    before = asyncio.run(unwrapped_materials(kek_env.direct_dsn, LocalKeyProvider(key_file)))
    dsn = kek_env.direct_dsn
    with Workload(app_dsn(proxy)) as app:
        rotation = subprocess.Popen(
            [*ROTATE, "--config", str(config_path), "--batch-size", "20", "--pause", "0.05"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            done = 0
            while done < 200 and time.monotonic() < deadline and rotation.poll() is None:
                done = asyncio.run(fetchval(dsn, "SELECT rows_done FROM pgveil.rotation_jobs WHERE kind = 'kek'")) or 0
                time.sleep(0.05)
        finally:
            rotation.kill()  # SIGKILL: no cleanup of any kind
            rotation.wait()
        assert rotation.returncode == -9
        job = asyncio.run(fetchval(dsn, "SELECT row_to_json(j)::text FROM pgveil.rotation_jobs j WHERE kind = 'kek'"))
        job = json.loads(job)
        assert job["state"] == "running"
        assert 200 <= job["rows_done"] < job["rows_total"] == 2001
        split = asyncio.run(kek_ids_in_use(dsn))
        assert len(split) == 2
        assert split[job["to_kek_id"]] == job["rows_done"]
        app.wait_for(app.statements + 30)  # pgveil serves throughout, half the keys under each KEK

        run = pgveil("keys", "rotate-kek", "--config", str(config_path))
        assert run.returncode == 0, run.stderr
        assert f"resumed KEK rotation {job['job_id']}: re-wrapped {2001 - job['rows_done']} keys" in run.stdout
        app.wait_for(app.statements + 30)
    assert not app.errors, app.errors
    keks = list_keks_json(config_path)
    assert [(k["version"], k["primary"], k["wrapped_keys"]) for k in keks] == [(1, False, 0), (2, True, 2001)]
    assert keks[1]["kek_id"] == job["to_kek_id"]  # resumed to the same KEK: no third version
    final = asyncio.run(fetchval(dsn, "SELECT row_to_json(j)::text FROM pgveil.rotation_jobs j WHERE kind = 'kek'"))
    assert json.loads(final)["state"] == "done"
    assert json.loads(final)["rows_done"] == 2001  # each key re-wrapped exactly once over both runs
    assert asyncio.run(unwrapped_materials(dsn, LocalKeyProvider(key_file))) == before
    assert_rows(app_dsn(proxy), app.expected)


def test_destroy_kek_is_refused_while_keys_depend_on_it_then_allowed(kek_env: KekEnv) -> None:
    config = kek_env.config(kek_env.local_key())
    config_path = kek_env.write_config("pgveil", config)
    proxy = kek_env.start_proxy(config)
    with psycopg.connect(app_dsn(proxy), autocommit=True) as c:
        c.execute(f"INSERT INTO {TABLE} VALUES (1, 'kept across the destruction')")
    refused = pgveil("keys", "destroy-kek", "1", "--config", str(config_path))
    assert refused.returncode == 1
    assert "KEK version 1" in refused.stderr
    assert "is the primary KEK" in refused.stderr

    run = pgveil("keys", "rotate-kek", "--config", str(config_path))
    assert run.returncode == 0, run.stderr
    [old, _new] = list_keks_json(config_path)
    # A proxy still configured with a copy of the old key file (it was not given the new one) creates a
    # data key: it cannot wrap under the primary KEK, so it wraps under the old one.
    lagging = kek_env.workdir / "lagging.key"
    lagging.write_bytes((kek_env.workdir / f"master.key.{old['kek_id']}").read_bytes())
    lagging.chmod(0o600)

    async def lagging_proxy_writes(column_id: str) -> None:
        async with Keystore(kek_env.direct_dsn, LocalKeyProvider(lagging)) as keystore:
            await keystore.active_key(column_id)

    asyncio.run(lagging_proxy_writes("public.kr_lagging.c"))
    refused = pgveil("keys", "destroy-kek", "1", "--config", str(config_path))
    assert refused.returncode == 1
    assert f"KEK version 1 ({old['kek_id']}) still wraps 1 keys: public.kr_lagging.c (1 data keys)" in refused.stderr
    assert "rotate-kek" in refused.stderr
    assert (kek_env.workdir / f"master.key.{old['kek_id']}").exists()

    # Sweeping to the primary KEK again (--to-config naming the same provider) moves the straggler.
    sweep = pgveil("keys", "rotate-kek", "--config", str(config_path), "--to-config", str(config_path))
    assert sweep.returncode == 0, sweep.stderr
    assert "re-wrapped 1 keys" in sweep.stdout
    allowed = pgveil("keys", "destroy-kek", "1", "--config", str(config_path))
    assert allowed.returncode == 0, allowed.stderr
    assert f"KEK version 1 ({old['kek_id']}) destroyed" in allowed.stdout
    assert not (kek_env.workdir / f"master.key.{old['kek_id']}").exists()
    keks = list_keks_json(config_path)
    assert [(k["version"], k["state"], k["primary"]) for k in keks] == [(1, "DESTROYED", False), (2, "ENABLED", True)]
    assert keks[0]["destroyed_at"] is not None
    again = pgveil("keys", "destroy-kek", "1", "--config", str(config_path))
    assert again.returncode == 0
    assert "already destroyed" in again.stdout
    assert pgveil("keys", "destroy-kek", "7", "--config", str(config_path)).returncode == 1

    # Nothing can be wrapped under the destroyed KEK any more, even by a process that still has it.
    with pytest.raises(Exception, match="not enabled in the keystore"):
        asyncio.run(lagging_proxy_writes("public.kr_lagging.d"))
    with psycopg.connect(app_dsn(proxy), autocommit=True) as c:
        assert c.execute(f"SELECT secret FROM {TABLE} WHERE id = 1").fetchone() == ("kept across the destruction",)
    fresh = kek_env.start_proxy(config)
    with psycopg.connect(app_dsn(fresh), autocommit=True) as c:
        assert c.execute(f"SELECT secret FROM {TABLE} WHERE id = 1").fetchone() == ("kept across the destruction",)


async def test_a_running_keystore_follows_the_rotation(kek_env: KekEnv) -> None:
    """What a running proxy does: unwraps re-wrapped keys after a cache miss, wraps new keys under the
    new primary KEK once notified, with a provider object that was built before the rotation."""
    key_file = kek_env.workdir / "master.key"
    running = Keystore(kek_env.direct_dsn, LocalKeyProvider(key_file), refresh_interval=0.01)
    try:
        await running.listen()
        first = await running.active_key("public.kr_running.a")
        conn = await asyncpg.connect(kek_env.direct_dsn)
        try:
            result = await rotate_kek(conn, LocalKeyProvider(key_file), batch_size=7)
            keks = await list_keks(conn)
        finally:
            await conn.close()
        assert result.remaining == 0
        assert not result.resumed
        assert [(k.version, k.is_primary) for k in keks] == [(1, False), (2, True)]
        for _ in range(250):  # the NOTIFY arrives on the listener connection
            if running.notifications:
                break
            await asyncio.sleep(0.02)
        assert running.notifications > 0
        second = await running.active_key("public.kr_running.b")
        kek_of_second = await fetchval(
            kek_env.direct_dsn, "SELECT kek_id FROM pgveil.deks WHERE key_id = $1", uuid.UUID(bytes=second.key_id)
        )
        assert kek_of_second == keks[1].kek_id == result.to_kek_id
        running.cache.clear()
        again = await running.key_by_id(first.key_id)  # wrapped under version 2 now
        assert again.key_id == first.key_id
    finally:
        await running.close()
    materials = await unwrapped_materials(kek_env.direct_dsn, LocalKeyProvider(key_file))
    assert set(materials) == {uuid.UUID(bytes=first.key_id), uuid.UUID(bytes=second.key_id)}


async def test_a_keystore_from_before_kek_versions_gets_them(pg: DevCluster) -> None:
    """Migration 0004 on a keystore that already holds a KEK and data keys: the KEK becomes version 1 and
    primary, and a pgveil of the old kind (registering a KEK without a version) still can."""
    from keymgmt.keystore import MIGRATIONS

    db = "kek_" + uuid.uuid4().hex[:10]
    await asyncio.to_thread(asyncio.run, _plain_database(pg, db))
    conn = await asyncpg.connect(pg.dsn(dbname=db))
    try:
        await conn.execute("CREATE SCHEMA pgveil")
        await conn.execute("CREATE TABLE pgveil.schema_migrations (name text PRIMARY KEY, applied_at timestamptz)")
        for m in MIGRATIONS[:3]:
            await conn.execute(m.sql)
            await conn.execute("INSERT INTO pgveil.schema_migrations VALUES ($1, now())", m.name)
        await conn.execute("INSERT INTO pgveil.keks (kek_id, provider_id) VALUES ('local-old', 'local')")
        await conn.execute(
            """INSERT INTO pgveil.deks (key_id, scope_kind, column_id, version, state, wrapped, kek_id)
               VALUES (gen_random_uuid(), 'column', 'public.t.c', 1, 'ENABLED', '\\x00', 'local-old')"""
        )
        applied = await init_keystore(conn)
        assert applied == [m.name for m in MIGRATIONS[3:]]
        row = await conn.fetchrow("SELECT version, is_primary FROM pgveil.keks WHERE kek_id = 'local-old'")
        assert (row["version"], row["is_primary"]) == (1, True)
        await conn.execute("INSERT INTO pgveil.keks (kek_id, provider_id) VALUES ('local-older-pgveil', 'local')")
        row = await conn.fetchrow("SELECT version, is_primary FROM pgveil.keks WHERE kek_id = 'local-older-pgveil'")
        assert (row["version"], row["is_primary"]) == (2, False)
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("UPDATE pgveil.keks SET is_primary = true WHERE kek_id = 'local-older-pgveil'")
    finally:
        await conn.close()


async def _plain_database(pg: DevCluster, db: str) -> None:
    su = await asyncpg.connect(pg.dsn())
    try:
        await su.execute(f"CREATE DATABASE {db}")
    finally:
        await su.close()
