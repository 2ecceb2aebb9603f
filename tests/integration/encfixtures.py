"""Shared setup of the transparent-encryption integration tests: one schema of protected tables in the
session's ``pg`` cluster and one pgveil in front of it, shared by every ``test_encryption_*`` module.

The proxy is started once per test run (the first module that asks for it) and stopped when pytest
ends, so the five modules cost one proxy start, one schema apply and one set of data keys. Tests keep
out of each other's way by taking row ids from :func:`next_id` and by using their own tables where a
whole-table result is asserted.

Besides the proxy this module offers what the tests need to look behind it: a direct connection
(superuser, bypassing pgveil) and :func:`open_stored`, which decrypts a stored envelope with the same
master key and keystore, so a test can compare what was stored rather than what came back.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, ProxyProcess, proxy_config

from keymgmt.envelope import DataKey, column_associated_data, open_envelope
from keymgmt.keystore import Keystore
from keymgmt.providers import LocalKeyProvider
from proxy.config import parse_config
from proxy.devcluster import DevCluster
from proxy.schema import apply_schema, plan_schema

PSQL = shutil.which("psql") or "psql"

# One table per declared type: (table suffix, declared type, the plain type the app created it with).
TYPES: list[tuple[str, str]] = [
    ("text", "text"),
    ("varchar", "varchar(20)"),
    ("char", "char(5)"),
    ("int2", "smallint"),
    ("int4", "integer"),
    ("int8", "bigint"),
    ("numeric", "numeric"),
    ("num102", "numeric(10,2)"),
    ("float4", "real"),
    ("float8", "double precision"),
    ("bool", "bool"),
    ("date", "date"),
    ("ts", "timestamp"),
    ("tstz", "timestamptz"),
    ("uuid", "uuid"),
    ("json", "json"),
    ("jsonb", "jsonb"),
    ("bytea", "bytea"),
]


def type_table(suffix: str) -> str:
    return f"enc_rt_{suffix}"


# Tables with several columns: name -> (CREATE TABLE column list, {protected column: declared type}).
TABLES: dict[str, tuple[str, dict[str, str]]] = {
    "enc_people": (
        "id int PRIMARY KEY, name text, email text, note text, born date",
        {"email": "text", "note": "text", "born": "date"},
    ),
    "enc_orders": ("id int PRIMARY KEY, person_id int, item text, secret text", {"secret": "text"}),
    "enc_copy_text": ("id int, a text, n int4, d date, plain text", {"a": "text", "n": "integer", "d": "date"}),
    "enc_copy_csv": ("id int, a text, n int4, d date, plain text", {"a": "text", "n": "integer", "d": "date"}),
    "enc_copy_misc": ("id int, a text, n int4, d date, plain text", {"a": "text", "n": "integer", "d": "date"}),
    "enc_tamper": ("id int PRIMARY KEY, a text, b text, plain text", {"a": "text", "b": "text"}),
    "enc_tamper_other": ("id int PRIMARY KEY, a text", {"a": "text"}),
    "enc_canary": ("id int PRIMARY KEY, secret text, open text", {"secret": "text"}),
    "enc_refuse": ("id int PRIMARY KEY, grp int, s text, n int4", {"s": "text", "n": "integer"}),
}
PLAIN_TABLE_DDL = "CREATE TABLE enc_plain (id int PRIMARY KEY, v text)"

_ids = itertools.count(1000)


def next_id() -> int:
    """A row id no other test in this run uses."""
    return next(_ids)


def next_ids(n: int) -> list[int]:
    return [next_id() for _ in range(n)]


@dataclass
class EncEnv:
    pg: DevCluster
    proxy: ProxyProcess
    master_key: Path

    @property
    def direct_dsn(self) -> str:
        """The superuser, straight to PostgreSQL: what a DBA, a backup or a thief sees."""
        return self.pg.dsn(dbname="app")

    @property
    def app_direct_dsn(self) -> str:
        return f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{self.pg.port}/app"

    def dsn(self, **params: str) -> str:
        return self.proxy.dsn(**params)


def tables_config() -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for suffix, declared in TYPES:
        tables[f"public.{type_table(suffix)}"] = {"columns": {"v": {"type": declared, "encrypt": True}}}
    for name, (_cols, protected) in TABLES.items():
        tables[f"public.{name}"] = {"columns": {c: {"type": t, "encrypt": True} for c, t in protected.items()}}
    return tables


def encryption_config(pg: DevCluster, master_key: Path, keystore_dsn: str, **overrides: Any) -> dict[str, Any]:
    cfg = proxy_config(
        pg,
        keystore={"dsn": keystore_dsn, "master_key": {"provider": "local", "path": str(master_key)}},
        tables=tables_config(),
        roles={"default": "plaintext"},  # these tests check encryption, not visibility
    )
    cfg.update(overrides)
    return cfg


async def apply_tables(pg: DevCluster, dbname: str, tables: dict[str, Any]) -> None:
    """``pgveil schema apply`` for the ``tables:`` section ``tables`` in database ``dbname``: its encrypted
    columns become bytea with the envelope CHECK (as the superuser, over the service connection)."""
    catalog = parse_config({"tables": tables}, base_dir=Path.cwd(), environ={}).catalog()
    service = await asyncpg.connect(pg.dsn(dbname=dbname))
    try:
        await apply_schema(service, await plan_schema(service, catalog))
    finally:
        await service.close()


async def _create_schema(pg: DevCluster) -> None:
    app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/app")
    try:
        for suffix, declared in TYPES:
            await app.execute(f"CREATE TABLE {type_table(suffix)} (id int PRIMARY KEY, v {declared})")
        for name, (cols, _protected) in TABLES.items():
            await app.execute(f"CREATE TABLE {name} ({cols})")
        await app.execute(PLAIN_TABLE_DDL)
    finally:
        await app.close()
    await apply_tables(pg, "app", tables_config())


_SHARED: dict[str, EncEnv] = {}


def shared_env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, config: pytest.Config) -> EncEnv:
    """The run's one encryption environment, created on first use and stopped when pytest ends."""
    env = _SHARED.get("env")
    if env is not None:
        return env
    asyncio.run(_create_schema(pg))
    workdir = tmp_path_factory.mktemp("enc-proxy")
    master_key = workdir / "master.key"
    proxy = ProxyProcess(encryption_config(pg, master_key, pg.dsn(dbname="app")), workdir)
    proxy.start()

    def stop() -> None:
        proxy.stop()

    config.add_cleanup(stop)
    env = EncEnv(pg, proxy, master_key)
    wait_ready(env)
    _SHARED["env"] = env
    return env


def wait_ready(env: EncEnv, timeout: float = 30) -> None:
    """Waits until the proxy serves protected tables (catalog and keys loaded)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(env.dsn(), autocommit=True, connect_timeout=5) as c:
                c.execute("SELECT v FROM enc_rt_text WHERE id = -1").fetchall()
                return
        except psycopg.Error as e:
            last = e
            time.sleep(0.2)
    raise RuntimeError(f"pgveil never became ready: {last}\n{env.proxy.logs()}")


# -- looking behind the proxy --------------------------------------------------------------------------


async def direct_fetch(env: EncEnv, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(env.direct_dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


async def direct_execute(env: EncEnv, sql: str, *args: Any) -> str:
    conn = await asyncpg.connect(env.direct_dsn)
    try:
        status: str = await conn.execute(sql, *args)
        return status
    finally:
        await conn.close()


async def open_stored(env: EncEnv, column_id: str, envelopes: list[bytes]) -> list[bytes]:
    """The canonical plaintexts of stored envelopes, opened with the proxy's master key and keystore."""
    async with Keystore(env.direct_dsn, LocalKeyProvider(env.master_key)) as keystore:
        keys: dict[bytes, DataKey] = {}
        for e in envelopes:
            kid = e[4:20]
            if kid not in keys:
                keys[kid] = await keystore.key_by_id(kid)
        lookup: Callable[[bytes], DataKey] = keys.__getitem__
        ad = column_associated_data(column_id)
        return [open_envelope(lookup, e, ad) for e in envelopes]


def metric_value(env: EncEnv, name: str) -> float:
    """The sum over all label sets of metric ``name`` on the proxy's ``/metrics`` (0 when absent)."""
    with urllib.request.urlopen(env.proxy.admin_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- psql ------------------------------------------------------------------------------------------------


def run_psql(
    dsn: str, *args: str, stdin: str | None = None, stop_on_error: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    argv = [PSQL, "-X", "-q", "-A", "-t", "-v", f"ON_ERROR_STOP={int(stop_on_error)}", "-d", dsn]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        [*argv, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
