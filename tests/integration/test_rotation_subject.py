"""Rotation by subject kind end to end: a real PostgreSQL, real ``pgveil serve`` instances in front of it,
and the ``pgveil`` commands (``keys rotate --subject-kind``, ``keys destroy --subject-kind``, ``jobs run``,
``jobs status``) as an operator runs them.

Two tables share the kind ``customer`` (``rs_customers`` by ``id``, ``rs_orders`` by ``customer_id``); a
third has the kind ``account``, which a rotation of ``customer`` must leave alone. What was stored is
checked behind the proxy: each envelope's key id (bytes 4..19) names a row of ``pgveil.deks`` whose subject
must be the row's own and whose ``kind_generation`` the kind's current one. What the application sees is
checked through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import ProxyProcess, proxy_config
from test_subject_keys import prepare_database

from keymgmt.envelope import Subject
from keymgmt.errors import KeyDestroyed
from keymgmt.keystore import Keystore
from keymgmt.providers import LocalKeyProvider
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

DB = "rotsubj"
SCOPE = "pgveil.subject.customer"
TABLES: dict[str, Any] = {
    "public.rs_customers": {
        "subject": {"kind": "customer", "column": "id"},
        "columns": {"email": {"type": "text", "encrypt": True}, "score": {"type": "int4", "encrypt": True}},
    },
    "public.rs_orders": {
        "subject": {"kind": "customer", "column": "customer_id"},
        "columns": {"note": {"type": "text", "encrypt": True}},
    },
    "public.rs_accounts": {
        "subject": {"kind": "account", "column": "id"},
        "columns": {"secret": {"type": "text", "encrypt": True}},
    },
    "public.rs_plain": {"columns": {"v": {"type": "text", "encrypt": True}}},
}
DDL = [
    "CREATE TABLE rs_customers (id int PRIMARY KEY, email text, score int, at text)",
    "CREATE TABLE rs_orders (id int PRIMARY KEY, customer_id int NOT NULL, note text, at text)",
    "CREATE TABLE rs_accounts (id int PRIMARY KEY, secret text)",
    "CREATE TABLE rs_plain (id int PRIMARY KEY, v text)",
]
# (column with the envelope, column naming the subject) of every encrypted column of kind customer
CUSTOMER_COLUMNS = (
    ("rs_customers", "email", "id"),
    ("rs_customers", "score", "id"),
    ("rs_orders", "note", "customer_id"),
)


@dataclass
class Env:
    pg: DevCluster
    proxy: ProxyProcess
    workdir: Path

    @property
    def direct_dsn(self) -> str:
        return self.pg.dsn(dbname=DB)

    @property
    def app_dsn(self) -> str:
        return self.proxy.dsn(dbname=DB)

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args, "--config", str(self.proxy.config_path)],
            cwd=self.proxy.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", *args, "--config", str(self.proxy.config_path)],
            cwd=self.proxy.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def status(self, job_id: str | None = None) -> list[dict[str, Any]]:
        out = self.cli("jobs", "status", "--json", *([job_id] if job_id else []))
        assert out.returncode == 0, out.stderr
        jobs: list[dict[str, Any]] = json.loads(out.stdout)["jobs"]
        return jobs


def config_for(pg: DevCluster, key_path: Path) -> dict[str, Any]:
    return proxy_config(
        pg,
        keystore={"dsn": pg.dsn(dbname=DB), "master_key": {"provider": "local", "path": str(key_path)}},
        tables=TABLES,
        roles={"default": "plaintext"},  # these tests check rotation, not visibility
    )


async def probe(dsn: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.fetch("SELECT email FROM rs_customers WHERE id = -1")
                return
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    asyncio.run(prepare_database(pg, DB, DDL, TABLES))
    workdir = tmp_path_factory.mktemp("rot-subject")
    proxy = ProxyProcess(config_for(pg, workdir / "master.key"), workdir / "a").start()
    try:
        asyncio.run(probe(proxy.dsn(dbname=DB)))
        yield Env(pg, proxy, workdir)
    finally:
        proxy.stop()


async def direct_conn(env: Env) -> asyncpg.Connection:
    return await asyncpg.connect(env.direct_dsn)


async def fill(env: Env, customers: range, orders_each: int = 2) -> dict[tuple[str, int], Any]:
    """Customers and their orders through pgveil; returns what was written, by (table.column, id)."""
    last: dict[tuple[str, int], Any] = {}
    conn = await asyncpg.connect(env.app_dsn)
    try:
        rows = [(c, f"c{c}-{uuid.uuid4().hex[:8]}@x.test", c % 97) for c in customers]
        await conn.executemany("INSERT INTO rs_customers (id, email, score) VALUES ($1, $2, $3)", rows)
        for c, email, score in rows:
            last["email", c], last["score", c] = email, score
        orders = [(c * 10 + k, c, f"order {k} of {c}") for c in customers for k in range(orders_each)]
        await conn.executemany("INSERT INTO rs_orders (id, customer_id, note) VALUES ($1, $2, $3)", orders)
        for o, _c, note in orders:
            last["note", o] = note
    finally:
        await conn.close()
    return last


async def read_all(env: Env, customers: range | None = None) -> dict[tuple[str, int], Any]:
    conn = await asyncpg.connect(env.app_dsn)
    try:
        out: dict[tuple[str, int], Any] = {}
        for r in await conn.fetch("SELECT id, email, score FROM rs_customers"):
            out["email", r["id"]], out["score", r["id"]] = r["email"], r["score"]
        for r in await conn.fetch("SELECT id, note FROM rs_orders"):
            out["note", r["id"]] = r["note"]
    finally:
        await conn.close()
    if customers is not None:
        orders = {c * 10 + k for c in customers for k in range(10)}
        out = {k: v for k, v in out.items() if (k[1] in customers if k[0] != "note" else k[1] in orders)}
    return out


async def stored_keys(env: Env) -> list[tuple[str, bytes, int | None, bytes | None, str | None]]:
    """Every stored value of kind customer: (table.column, the row's subject id as pgveil canonicalises an
    integer, the generation of the key its envelope names, that key's subject, its scope)."""
    conn = await direct_conn(env)
    try:
        keys = {
            r["key_id"].bytes: (r["kind_generation"], bytes(r["subject_id"]), r["column_id"])
            for r in await conn.fetch(
                "SELECT key_id, kind_generation, subject_id, column_id FROM pgveil.deks WHERE subject_id IS NOT NULL"
            )
        }
        out = []
        for table, column, subject in CUSTOMER_COLUMNS:
            for r in await conn.fetch(f"SELECT {subject} AS s, {column} AS v FROM {table} WHERE {column} IS NOT NULL"):
                gen, key_subject, scope = keys.get(bytes(r["v"])[4:20], (None, None, None))
                out.append((f"{table}.{column}", str(r["s"]).encode(), gen, key_subject, scope))
        return out
    finally:
        await conn.close()


async def generation(env: Env, kind: str = "customer") -> int:
    conn = await direct_conn(env)
    try:
        return int(
            await conn.fetchval("SELECT coalesce(max(generation), 0) FROM pgveil.subject_kinds WHERE kind = $1", kind)
        )
    finally:
        await conn.close()


def rotate_no_run(env: Env) -> str:
    out = env.cli("keys", "rotate", "--subject-kind", "customer", "--no-run")
    assert out.returncode == 0, out.stderr
    [job] = [j for j in env.status() if j["kind"] == "subject" and j["state"] == "pending"]
    assert job["subject_kind"] == "customer"
    return str(job["job_id"])


async def done_soon(env: Env, job_id: str, rows: int, timeout: float = 120) -> bool:
    conn = await direct_conn(env)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = await conn.fetchval(
                "SELECT rows_done FROM pgveil.rotation_jobs WHERE job_id = $1", uuid.UUID(job_id)
            )
            if done is not None and done >= rows:
                return True
            await asyncio.sleep(0.05)
        return False
    finally:
        await conn.close()


async def shredded_subjects(env: Env) -> set[bytes]:
    """The subjects of kind customer a test marked SHREDDED (their values keep their old keys)."""
    conn = await direct_conn(env)
    try:
        rows = await conn.fetch("SELECT subject_id FROM pgveil.subjects WHERE kind = 'customer' AND state = 'SHREDDED'")
    finally:
        await conn.close()
    return {bytes(r["subject_id"]) for r in rows}


def assert_all_under(stored: list[Any], gen: int, except_subjects: set[bytes]) -> None:
    wrong = [s for s in stored if s[1] not in except_subjects and (s[2] != gen or s[3] != s[1] or s[4] != SCOPE)]
    assert not wrong, (
        f"{len(wrong)} of {len(stored)} values not under their subject's generation-{gen} key: {wrong[:5]}"
    )


# -- tests --------------------------------------------------------------------------------------------------


def test_column_and_table_forms_refuse_a_table_with_subject_keys(env: Env) -> None:
    for args in (("--column", "public.rs_orders.note"), ("--table", "public.rs_customers")):
        out = env.cli("keys", "rotate", *args, "--no-run")
        assert out.returncode == 1
        assert "per-subject keys" in out.stderr
        assert "--subject-kind customer" in out.stderr
    out = env.cli("keys", "rotate", "--subject-kind", "nosuchkind", "--no-run")
    assert out.returncode == 1
    assert "no table of the configuration has subject kind nosuchkind" in out.stderr
    assert "customer" in out.stderr
    destroy = env.cli("keys", "destroy", "--column", "public.rs_orders.note", "--version", "1")
    assert destroy.returncode == 1
    assert "--subject-kind customer" in destroy.stderr


async def test_kind_rotation_while_writers_run_loses_nothing(env: Env) -> None:
    customers = range(1, 301)
    last = await fill(env, customers)
    before = await generation(env)
    accounts_conn = await asyncpg.connect(env.app_dsn)
    try:
        await accounts_conn.executemany("INSERT INTO rs_accounts (id, secret) VALUES ($1, $2)", [(1, "a1"), (2, "a2")])
    finally:
        await accounts_conn.close()
    stop = asyncio.Event()
    writes = 0

    async def writer(w: int, mine: list[int]) -> None:
        nonlocal writes
        conn = await asyncpg.connect(env.app_dsn)
        rng = random.Random(w)
        next_new = 100_000 + w * 10_000
        try:
            while not stop.is_set():
                c = rng.choice(mine)
                r = rng.random()
                if r < 0.1:  # a new subject, written after the rotation began or before
                    next_new += 1
                    email = f"new{next_new}@x.test"
                    await conn.execute(
                        "INSERT INTO rs_customers (id, email, score) VALUES ($1, $2, $3)", next_new, email, 1
                    )
                    last["email", next_new], last["score", next_new] = email, 1
                elif r < 0.55:
                    email = f"upd-{c}-{uuid.uuid4().hex[:8]}@x.test"
                    await conn.execute("UPDATE rs_customers SET email = $2 WHERE id = $1", c, email)
                    last["email", c] = email
                else:
                    o = c * 10 + rng.randrange(2)
                    note = f"upd {o} {uuid.uuid4().hex[:8]}"
                    await conn.execute("UPDATE rs_orders SET note = $3 WHERE id = $1 AND customer_id = $2", o, c, note)
                    last["note", o] = note
                writes += 1
        finally:
            await conn.close()

    writers = [asyncio.create_task(writer(w, list(customers)[w::4])) for w in range(4)]
    try:
        await asyncio.sleep(0.3)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "keys", "rotate", "--subject-kind", "customer",
            "--throttle", "0", "--batch-size", "100", "--config", str(env.proxy.config_path),
            cwd=env.proxy.workdir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 240)
        assert proc.returncode == 0, err.decode()
        assert "generation" in out.decode()
        assert "rs_customers" in out.decode()
        assert "rs_orders" in out.decode()
        await asyncio.sleep(0.3)  # writers keep going after the job finished
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert writes > 0
    gen = await generation(env)
    assert gen == before + 1
    [job] = [j for j in env.status() if j["kind"] == "subject" and j["generation"] == gen]
    assert job["state"] == "done", json.dumps(job)
    assert job["column"] == SCOPE
    assert job["rows_unreadable"] == 0
    assert job["rows_remaining"] == 0
    assert job["rows_done"] > 0
    # everything reads back (through pgveil) as last written ...
    got = await read_all(env)
    assert {k: got.get(k) for k in last} == last
    # ... and every value is under its own subject's key of the new generation
    assert_all_under(await stored_keys(env), gen, await shredded_subjects(env))
    conn = await direct_conn(env)
    try:
        # one current key per subject, of the new generation (the sweep covered subjects whose rows it did not
        # re-encrypt); the other kind was not touched
        stale = await conn.fetchval(
            """SELECT count(*) FROM pgveil.deks d WHERE d.column_id = $1 AND d.kind_generation < $2
               AND NOT EXISTS (SELECT 1 FROM pgveil.deks h WHERE h.column_id = d.column_id
                               AND h.subject_id = d.subject_id AND h.version > d.version)
               AND d.subject_id <> ALL($3::bytea[])""",
            SCOPE,
            gen,
            list(await shredded_subjects(env)),
        )
        assert stale == 0
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pgveil.deks WHERE column_id = 'pgveil.subject.account' AND kind_generation > 0"
            )
            == 0
        )
    finally:
        await conn.close()


async def test_job_killed_midway_resumes(env: Env) -> None:
    customers = range(1001, 1601)
    last = await fill(env, customers)
    job_id = rotate_no_run(env)
    gen = await generation(env)
    runner = env.spawn("jobs", "run", job_id, "--throttle", "1000", "--batch-size", "50")
    try:
        assert await done_soon(env, job_id, 400)
        runner.send_signal(signal.SIGKILL)
        runner.wait(30)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    [mid] = env.status(job_id)
    assert mid["state"] == "running"
    assert mid["active"] is False
    assert mid["interrupted"] is True
    assert mid["generation"] == gen
    assert mid["position"]["after"] is not None or mid["position"]["target"] > 0
    stored = await stored_keys(env)
    # batch and progress commit together: what the job counted is exactly what is under the new generation
    moved = sum(1 for s in stored if s[2] == gen)
    assert mid["rows_done"] == moved
    assert 400 <= mid["rows_done"] < len(stored)
    shredded = await shredded_subjects(env)
    live = [s for s in stored if s[1] not in shredded]  # (a shredded subject's values are never re-keyed)
    out = env.cli("jobs", "run", job_id, "--throttle", "0")
    assert out.returncode == 0, out.stderr
    [final] = env.status(job_id)
    assert final["state"] == "done", json.dumps(final)
    assert final["rows_skipped"] == 0
    assert final["rows_done"] == len(live)
    assert final["fraction"] == 1.0
    assert_all_under(await stored_keys(env), gen, shredded)
    assert await read_all(env, customers) == last


async def test_destroy_refused_while_referenced_then_accepted(env: Env) -> None:
    customers = range(2001, 2101)
    last = await fill(env, customers)
    job_id = rotate_no_run(env)
    gen = await generation(env)
    # One write of subject 2001 after the rotation: its next version is made, and its other rows (still
    # under the old version) are what the destruction must not take away.
    conn = await asyncpg.connect(env.app_dsn)
    try:
        await conn.execute("UPDATE rs_customers SET email = 'moved@x.test' WHERE id = 2001")
        last["email", 2001] = "moved@x.test"
    finally:
        await conn.close()
    refused = env.cli("keys", "destroy", "--subject-kind", "customer")
    assert refused.returncode == 1
    assert "rows still reference them" in refused.stderr
    assert "public.rs_orders.note" in refused.stderr
    dconn = await direct_conn(env)
    try:
        assert (
            await dconn.fetchval("SELECT count(*) FROM pgveil.deks WHERE column_id = $1 AND state = 'DESTROYED'", SCOPE)
            == 0
        )
    finally:
        await dconn.close()
    out = env.cli("jobs", "run", job_id, "--throttle", "0")
    assert out.returncode == 0, out.stderr
    allowed = env.cli("keys", "destroy", "--subject-kind", "customer")
    assert allowed.returncode == 0, allowed.stderr
    assert f"older than generation {gen}" in allowed.stdout
    dconn = await direct_conn(env)
    try:
        old = await dconn.fetch(
            """SELECT state, wrapped FROM pgveil.deks d WHERE column_id = $1 AND kind_generation < $2
               AND EXISTS (SELECT 1 FROM pgveil.deks h WHERE h.column_id = d.column_id AND h.subject_id = d.subject_id
                           AND h.version > d.version)""",
            SCOPE,
            gen,
        )
        assert old
        assert all(r["state"] == "DESTROYED" and r["wrapped"] is None for r in old)
        assert await dconn.fetchval(
            "SELECT count(*) FROM pgveil.deks WHERE column_id = $1 AND kind_generation = $2 AND state = 'ENABLED'",
            SCOPE,
            gen,
        ) >= len(customers)
    finally:
        await dconn.close()
    assert await read_all(env, customers) == last
    versions = env.cli("keys", "versions", "--subject-kind", "customer", "--json")
    assert versions.returncode == 0, versions.stderr
    summary = json.loads(versions.stdout)
    assert summary["generation"] == gen
    by_gen = {g["generation"]: g for g in summary["generations"]}
    stored = await stored_keys(env)
    shredded = await shredded_subjects(env)
    assert by_gen[gen]["rows"] == len([s for s in stored if s[1] not in shredded])
    # of the older generations only shredded subjects' current versions are left, with their values
    assert all(g["enabled"] == g["current"] for n, g in by_gen.items() if n < gen)
    assert sum(g["rows"] for n, g in by_gen.items() if n < gen) == len(stored) - by_gen[gen]["rows"]


async def test_shredded_subject_is_skipped_never_rekeyed(env: Env) -> None:
    customers = range(3001, 3011)
    last = await fill(env, customers)
    shredded = b"3005"
    conn = await direct_conn(env)
    try:
        await conn.execute(
            "UPDATE pgveil.subjects SET state = 'SHREDDED', shredded_at = now() "
            "WHERE kind = 'customer' AND subject_id = $1",
            shredded,
        )
        versions_before = await conn.fetchval(
            "SELECT count(*) FROM pgveil.deks WHERE column_id = $1 AND subject_id = $2", SCOPE, shredded
        )
        keys_before = {s[0] + s[1].decode(): s for s in await stored_keys(env) if s[1] == shredded}
    finally:
        await conn.close()
    assert keys_before
    out = env.cli("keys", "rotate", "--subject-kind", "customer", "--throttle", "0")
    assert out.returncode == 0, out.stderr
    gen = await generation(env)
    [job] = [j for j in env.status() if j["kind"] == "subject" and j["generation"] == gen]
    assert job["state"] == "done", json.dumps(job)
    assert job["position"]["shredded"] == 4  # its email, score and two order notes (in the last pass)
    stored = await stored_keys(env)
    assert_all_under(stored, gen, await shredded_subjects(env))
    conn = await direct_conn(env)
    try:
        # never given a key: the same versions as before the rotation, its values untouched
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pgveil.deks WHERE column_id = $1 AND subject_id = $2", SCOPE, shredded
            )
            == versions_before
        )
    finally:
        await conn.close()
    assert {s[0] + s[1].decode(): s for s in stored if s[1] == shredded} == keys_before
    # a write for it is refused (it would need a key of the new generation), and creates none either
    app = await asyncpg.connect(env.app_dsn)
    try:
        with pytest.raises(asyncpg.PostgresError):
            await app.execute("UPDATE rs_customers SET email = 'again@x.test' WHERE id = 3005")
        assert await app.fetchval("SELECT email FROM rs_customers WHERE id = 3006") == last["email", 3006]
    finally:
        await app.close()
    conn = await direct_conn(env)
    try:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pgveil.deks WHERE column_id = $1 AND subject_id = $2", SCOPE, shredded
            )
            == versions_before
        )
    finally:
        await conn.close()


async def test_second_instance_honours_the_new_generation_soon(env: Env) -> None:
    other = ProxyProcess(config_for(env.pg, env.workdir / "master.key"), env.workdir / "b").start()
    try:
        dsn = other.dsn(dbname=DB)
        await probe(dsn)
        customers = list(range(4001, 4021))
        conn = await asyncpg.connect(dsn)
        try:  # the other instance writes these subjects first, so it has their keys cached as current
            await conn.executemany(
                "INSERT INTO rs_customers (id, email, score) VALUES ($1, $2, $3)",
                [(c, f"{c}@x.test", 0) for c in customers],
            )
        finally:
            await conn.close()
        stop = asyncio.Event()

        async def writer() -> None:
            # new orders of those subjects through the other instance, the server's clock in a plain column
            c = await asyncpg.connect(dsn)
            n = 5_000_000
            try:
                while not stop.is_set():
                    n += 1
                    await c.execute(
                        "INSERT INTO rs_orders (id, customer_id, note, at) "
                        "VALUES ($1, $2, $3, clock_timestamp()::text)",
                        n,
                        customers[n % len(customers)],
                        "w",
                    )
                    await asyncio.sleep(0.003)
            finally:
                await c.close()

        task = asyncio.create_task(writer())
        try:
            await asyncio.sleep(0.5)
            job_id = await asyncio.to_thread(rotate_no_run, env)  # the writer keeps running
            gen = await generation(env)
            dconn = await direct_conn(env)
            try:
                rotated = await dconn.fetchval("SELECT rotated_at FROM pgveil.subject_kinds WHERE kind = 'customer'")
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if await dconn.fetchval(
                        """SELECT count(*) FROM rs_orders o JOIN pgveil.deks d
                             ON d.key_id = encode(substring(o.note from 5 for 16), 'hex')::uuid
                           WHERE o.at IS NOT NULL AND d.kind_generation = $1""",
                        gen,
                    ):
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
            finally:
                await dconn.close()
        finally:
            stop.set()
            await task
        dconn = await direct_conn(env)
        try:
            rows = await dconn.fetch(
                """SELECT d.kind_generation AS g, d.subject_id AS s, o.customer_id AS c, o.at::timestamptz AS at
                   FROM rs_orders o
                   JOIN pgveil.deks d ON d.key_id = encode(substring(o.note from 5 for 16), 'hex')::uuid
                   WHERE o.at IS NOT NULL"""
            )
        finally:
            await dconn.close()
        assert all(bytes(r["s"]) == str(r["c"]).encode() for r in rows)
        under_new = [r["at"] for r in rows if r["g"] == gen]
        under_old = [r["at"] for r in rows if r["g"] < gen]
        assert under_new, f"the other instance kept sealing under the retired versions ({len(under_old)} writes)"
        assert under_old, "no write before the rotation: the test shows nothing"
        # once one write was sealed under the new generation, no later write went back to an old version
        assert max(under_old) < min(under_new)
        old_s = (max(under_old) - rotated).total_seconds()
        new_s = (min(under_new) - rotated).total_seconds()
        print(
            f"\nkind rotated; the other instance's last write under the old generation {old_s:+.3f} s, "
            f"first under the new {new_s:+.3f} s"
        )
        assert env.cli("jobs", "cancel", job_id).returncode == 0
    finally:
        other.stop()


async def test_two_keystores_make_one_next_version_per_subject(env: Env) -> None:
    """The lazy path, without a proxy: after a rotation, two instances asking for the same subject's key at
    once get one next version (the unique index decides), and a batch creation makes each subject's next
    version once, skipping a shredded subject."""
    subjects = [f"{9000 + i}".encode() for i in range(20)]
    async with (
        Keystore(env.direct_dsn, LocalKeyProvider(env.workdir / "master.key")) as one,
        Keystore(env.direct_dsn, LocalKeyProvider(env.workdir / "master.key")) as two,
    ):
        for s in subjects:
            await one.subject_key(Subject("customer", s))
        conn = await direct_conn(env)
        try:
            await conn.execute(
                "UPDATE pgveil.subjects SET state = 'SHREDDED', shredded_at = now() "
                "WHERE kind = 'customer' AND subject_id = $1",
                subjects[-1],
            )
        finally:
            await conn.close()
        job_id = await asyncio.to_thread(rotate_no_run, env)
        gen = await generation(env)
        one.cache.clear()  # neither listens here: forget what they had cached before the rotation
        two.cache.clear()
        a, b = await asyncio.gather(
            one.subject_key(Subject("customer", subjects[0])), two.subject_key(Subject("customer", subjects[0]))
        )
        assert a.key_id == b.key_id
        assert a.version == 2
        created = await one.create_subject_versions("customer", subjects)
        assert created == len(subjects) - 2  # subjects[0] has its next version already; the last is shredded
        assert await two.create_subject_versions("customer", subjects) == 0
        with pytest.raises(KeyDestroyed):
            await two.subject_key(Subject("customer", subjects[-1]))
    conn = await direct_conn(env)
    try:
        rows = await conn.fetch(
            """SELECT subject_id, count(*) FILTER (WHERE kind_generation = $2) AS new, max(version) AS top
               FROM pgveil.deks WHERE column_id = $1 AND subject_id = ANY($3) GROUP BY subject_id""",
            SCOPE,
            gen,
            subjects,
        )
    finally:
        await conn.close()
    by_subject = {bytes(r["subject_id"]): (r["new"], r["top"]) for r in rows}
    assert all(by_subject[s] == (1, 2) for s in subjects[:-1])
    assert by_subject[subjects[-1]] == (0, 1)
    assert env.cli("jobs", "cancel", job_id).returncode == 0


async def test_a_batch_that_deadlocks_with_the_application_is_retried(env: Env) -> None:
    """An application transaction holds the row the job's compare-and-set reaches last, then asks for the
    rows the job holds: PostgreSQL breaks the deadlock by rolling the job's batch back (the application's
    session waits longer before checking), and the job tries the batch again and finishes."""
    await fill(env, range(6001, 6011))
    job_id = await asyncio.to_thread(rotate_no_run, env)
    app = await direct_conn(env)
    try:
        await app.execute("SET deadlock_timeout = '20s'")  # the job's backend (1 s) detects it first
        top = await app.fetchval("SELECT max(id) FROM rs_customers")
        tx = app.transaction()
        await tx.start()
        await app.execute("UPDATE rs_customers SET at = 'app' WHERE id = $1", top)
        runner = env.spawn("jobs", "run", job_id, "--throttle", "0", "--batch-size", "100000")
        try:
            watch = await direct_conn(env)
            try:
                deadline = time.monotonic() + 60
                while not await watch.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE%'"
                ):
                    assert time.monotonic() < deadline, "the job's batch never waited for the application's row"
                    await asyncio.sleep(0.05)
            finally:
                await watch.close()
            # now the application asks for every other row: a cycle
            await app.execute("UPDATE rs_customers SET at = 'app' WHERE id <> $1", top)
            await tx.commit()
            _out, err = await asyncio.to_thread(runner.communicate, None, 120)
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
    finally:
        await app.close()
    assert runner.returncode == 0, err
    assert "retrying" in err
    assert "DeadlockDetectedError" in err
    [job] = env.status(job_id)
    assert job["state"] == "done", json.dumps(job)
    assert_all_under(await stored_keys(env), job["generation"], await shredded_subjects(env))
