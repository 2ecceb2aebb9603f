"""``pgveil encrypt`` / ``pgveil decrypt`` end to end: a real PostgreSQL, a real ``pgveil serve`` in front
of it configured for the target state, the commands run as an operator runs them, and applications
writing through pgveil while the column moves.

Every test has tables of its own in one database (``migdb``) and, where it needs one, a pgveil of its
own (a pgveil configured ``encrypt: true`` for a column that is still plaintext is not ready until a
migration job for it exists, so proxies are not shared). What was stored is checked behind the proxy;
what the application sees is checked through it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, ProxyProcess, proxy_config
from encfixtures import apply_tables

from keymgmt.column_migration import ColumnMigration
from keymgmt.keystore import init_keystore
from proxy.cli_encrypt import converters, make_target
from proxy.config import load_config
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

DB = "migdb"
ENVELOPE_PREFIX = b"PV\x01\x01"


@dataclass
class MigEnv:
    pg: DevCluster
    root: Path

    @property
    def direct_dsn(self) -> str:
        return self.pg.dsn(dbname=DB)

    @property
    def master_key(self) -> Path:
        return self.root / "master.key"

    def proxy(
        self, name: str, tables: dict[str, Any], *, start: bool = True, roles: dict[str, Any] | None = None
    ) -> ProxyProcess:
        cfg = proxy_config(
            self.pg,
            keystore={"dsn": self.direct_dsn, "master_key": {"provider": "local", "path": str(self.master_key)}},
            tables=tables,
            roles=roles or {"default": "plaintext"},  # most tests check the migration, not visibility
        )
        p = ProxyProcess(cfg, self.root / name)
        if start:
            p.start()
        return p

    def cli(self, proxy: ProxyProcess, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args, "--config", str(proxy.config_path)],
            cwd=proxy.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def spawn(self, proxy: ProxyProcess, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", *args, "--config", str(proxy.config_path)],
            cwd=proxy.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def jobs(self, proxy: ProxyProcess) -> list[dict[str, Any]]:
        out = self.cli(proxy, "jobs", "status", "--json")
        assert out.returncode == 0, out.stderr
        jobs: list[dict[str, Any]] = json.loads(out.stdout)["jobs"]
        return jobs


@pytest.fixture(scope="module")
def mig(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> MigEnv:
    pg.psql(f"CREATE DATABASE {DB} OWNER app")

    async def init() -> None:
        conn = await asyncpg.connect(pg.dsn(dbname=DB))
        try:
            await init_keystore(conn)
        finally:
            await conn.close()

    asyncio.run(init())
    return MigEnv(pg, tmp_path_factory.mktemp("mig"))


def text_table(column: str = "email") -> dict[str, Any]:
    return {"columns": {column: {"type": "text", "encrypt": True}}}


async def direct(mig: MigEnv) -> asyncpg.Connection:
    return await asyncpg.connect(mig.direct_dsn)


async def create_filled(mig: MigEnv, table: str, n: int, *, nulls: int = 0) -> dict[int, str | None]:
    """A plaintext table (id, email, note) with ``n`` rows written directly (the app before pgveil)."""
    values: dict[int, str | None] = {i: f"user-{i}-{uuid.uuid4().hex[:12]}@example.com" for i in range(1, n + 1)}
    for i in random.Random(table).sample(sorted(values), nulls):
        values[i] = None
    conn = await direct(mig)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, email text, note text)")
        await conn.execute(f"ALTER TABLE {table} OWNER TO app")
        await conn.copy_records_to_table(table, records=list(values.items()), columns=["id", "email"])
    finally:
        await conn.close()
    return values


async def probe(proxy: ProxyProcess, table: str, column: str = "email") -> bool:
    try:
        conn = await asyncpg.connect(proxy.dsn(dbname=DB), statement_cache_size=0)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        await conn.fetch(f"SELECT {column} FROM {table} WHERE id = -1")
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()


async def ready_soon(proxy: ProxyProcess, table: str, timeout: float = 30, column: str = "email") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await probe(proxy, table, column):
            return True
        await asyncio.sleep(0.1)
    return False


async def read_through(proxy: ProxyProcess, table: str, column: str = "email") -> dict[int, Any]:
    conn = await asyncpg.connect(proxy.dsn(dbname=DB), statement_cache_size=0)
    try:
        return {r["id"]: r[column] for r in await conn.fetch(f"SELECT id, {column} FROM {table}")}
    finally:
        await conn.close()


async def stored(mig: MigEnv, table: str, column: str = "email") -> dict[int, Any]:
    conn = await direct(mig)
    try:
        return {r["id"]: r[column] for r in await conn.fetch(f"SELECT id, {column} FROM {table}")}
    finally:
        await conn.close()


async def column_type(mig: MigEnv, table: str, column: str = "email") -> tuple[str, int, int]:
    """(type, position among live columns, how many live columns)."""
    conn = await direct(mig)
    try:
        rows = await conn.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) AS t FROM pg_attribute "
            "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            table,
        )
    finally:
        await conn.close()
    names = [r["attname"] for r in rows]
    return rows[names.index(column)]["t"], names.index(column), len(names)


# -- the online migration of a big column ---------------------------------------------------------------------


async def test_online_encryption_of_100k_rows_while_the_app_writes(mig: MigEnv) -> None:
    """100,000 plaintext rows become envelopes while four asyncpg clients read and write the column (and
    another) through pgveil; nothing is lost, no client ever reads anything but what was last written,
    and the job's exact count is the number of non-NULL values. Measures the job's throughput (printed).
    """
    table, n = "mig_big", 100_000
    last = await create_filled(mig, table, n, nulls=500)
    canary_id, canary = 77, f"canary-{uuid.uuid4().hex}@pgveil.invalid"
    last[canary_id] = canary
    conn = await direct(mig)
    try:
        await conn.execute(f"UPDATE {table} SET email = $1 WHERE id = $2", canary, canary_id)
    finally:
        await conn.close()
    proxy = mig.proxy("big", {f"public.{table}": text_table()})
    try:
        # Throttled so that the writers, who start once pgveil is ready (it retries its catalog every two
        # seconds until the job is recorded), overlap most of the backfill; bench/encrypt_existing.py
        # measures the unthrottled rate.
        job = mig.spawn(
            proxy, "encrypt", f"public.{table}.email", "--json", "--batch-size", "2000", "--throttle", "15000"
        )
        assert await ready_soon(proxy, table), proxy.logs()
        stop = asyncio.Event()
        growing = asyncio.Event()  # inserts and NULLs only while set: the count of values then stays fixed
        growing.set()
        errors: dict[str, int] = {}
        messages: dict[str, str] = {}
        writes = reads = grown = 0

        async def writer(w: int, ids: list[int]) -> None:
            nonlocal writes, reads, grown
            c = await asyncpg.connect(proxy.dsn(dbname=DB), statement_cache_size=0)
            rng = random.Random(w)
            next_new = n + 1000 + w * 100_000
            try:
                while not stop.is_set():
                    op = rng.random()
                    try:
                        if op < 0.1 and growing.is_set():
                            next_new += 1
                            value = f"new-{w}-{next_new}-{uuid.uuid4().hex[:8]}"
                            await c.execute(f"INSERT INTO {table} (id, email) VALUES ($1, $2)", next_new, value)
                            last[next_new] = value
                            ids.append(next_new)
                            grown += 1
                        elif op < 0.15 and growing.is_set():
                            i = rng.choice(ids)
                            await c.execute(f"UPDATE {table} SET email = NULL WHERE id = $1", i)
                            last[i] = None
                            grown += 1
                        elif op < 0.25:
                            i = rng.choice(ids)
                            await c.execute(f"UPDATE {table} SET note = $2 WHERE id = $1", i, f"note-{w}")
                        elif op < 0.6:
                            i = rng.choice(ids)
                            if last[i] is None and not growing.is_set():
                                continue
                            value = f"upd-{w}-{i}-{uuid.uuid4().hex[:8]}"
                            await c.execute(f"UPDATE {table} SET email = $2 WHERE id = $1", i, value)
                            last[i] = value  # recorded once committed: each id has one writer
                        else:
                            i = rng.choice(ids)
                            got = await c.fetchval(f"SELECT email FROM {table} WHERE id = $1", i)
                            assert got == last[i], f"row {i} read back as something else than last written"
                            reads += 1
                            continue
                        writes += 1
                    except asyncpg.PostgresError as e:  # the moments around DDL: refused, never stored
                        errors[e.sqlstate] = errors.get(e.sqlstate, 0) + 1
                        messages.setdefault(e.sqlstate, str(e))
                        await asyncio.sleep(0.01)
            finally:
                await c.close()

        ids = sorted(last)
        t0 = time.monotonic()
        writers = [asyncio.create_task(writer(w, ids[w::4])) for w in range(4)]
        try:
            ks = await direct(mig)
            try:
                while job.poll() is None:
                    await asyncio.sleep(0.05)
                    done = await ks.fetchval(
                        "SELECT rows_done FROM pgveil.rotation_jobs WHERE column_id = $1", f"public.{table}.email"
                    )
                    if done is not None and done > n * 3 // 4 and growing.is_set():
                        growing.clear()
                        print(f"\nrows and NULLs added until {time.monotonic() - t0:.2f} s: {grown}")
            finally:
                await ks.close()
            await asyncio.sleep(0.5)  # the writers go on after the swap
        finally:
            stop.set()
            await asyncio.gather(*writers)
        out, err = job.communicate(timeout=60)
        print(f"the job ended {time.monotonic() - t0:.2f} s after the writers started")
        assert job.returncode == 0, err + out
        result = json.loads(out.splitlines()[-1])
        status = result["result"]
        assert status["state"] == "done", status
        # every row reads back through pgveil as last written; the table holds envelopes only
        assert await read_through(proxy, table) == last
        rows = await stored(mig, table)
        assert set(rows) == set(last)
        assert all((v is None) == (last[i] is None) for i, v in rows.items())
        assert all(bytes(v).startswith(ENVELOPE_PREFIX) for v in rows.values() if v is not None)
        assert not any(canary.encode() in bytes(v) for v in rows.values() if v is not None)
        # the exact count: every non-NULL value, counted under the swap's lock
        assert status["position"]["values"] == sum(v is not None for v in last.values())
        assert status["rows_remaining"] == 0
        assert writes > 100
        assert reads > 100
        kind, position, width = await column_type(mig, table)
        assert kind == "bytea"
        assert position == width - 1
        rate = status["rows_done"] / result["seconds"]
        print(
            f"\nencrypted {status['position']['values']:,} values ({status['rows_done']:,} written by the job, "
            f"{status['rows_skipped']:,} compare-and-set misses, {status['passes']} passes) in "
            f"{result['seconds']:.1f} s: {rate:,.0f} rows/s; the swap locked the table for "
            f"{status['position']['lock_seconds'] * 1000:.0f} ms ({status['position']['caught_up_under_lock']} rows "
            f"caught up under the lock); {writes:,} writes and {reads:,} checked reads "
            f"through pgveil meanwhile; refused around DDL: {errors} {messages}"
        )
        # the canary: behind pgveil the table shows ciphertext; the files only after a rewrite
        conn = await direct(mig)
        try:
            await conn.execute(f"VACUUM FULL {table}")
            await conn.execute("CHECKPOINT")
            path = await conn.fetchval("SELECT pg_relation_filepath($1::regclass)", table)
        finally:
            await conn.close()
        files = [p for p in (mig.pg.data_dir / path).parent.glob(Path(path).name + "*")]
        assert files
        assert not any(canary.encode() in p.read_bytes() for p in files)
    finally:
        proxy.stop()


# -- crash and resume -----------------------------------------------------------------------------------------


async def test_job_killed_midway_resumes_with_an_exact_count(mig: MigEnv) -> None:
    table, n = "mig_kill", 8000
    values = await create_filled(mig, table, n, nulls=37)
    proxy = mig.proxy("kill", {f"public.{table}": text_table()}, start=False)
    column = f"public.{table}.email"
    runner = mig.spawn(proxy, "encrypt", column, "--throttle", "1000", "--batch-size", "100")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = [j for j in mig.jobs(proxy) if j["column"] == column]
            if st and st[0]["rows_done"] >= 1000:
                break
            await asyncio.sleep(0.1)
        runner.send_signal(signal.SIGKILL)
        runner.wait(30)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    [mid] = [j for j in mig.jobs(proxy) if j["column"] == column]
    assert mid["kind"] == "encrypt"
    assert mid["state"] == "running"
    assert mid["interrupted"] is True
    rows = await stored(mig, f"{table}", "pgveil_mig_email")
    assert mid["rows_done"] == sum(v is not None for v in rows.values())  # batch and progress commit together
    assert 1000 <= mid["rows_done"] < n
    out = mig.cli(proxy, "encrypt", column)
    assert out.returncode == 0, out.stderr
    assert "resuming encrypt job" in out.stderr
    assert f"{n - 37:,} values encrypted" in out.stdout
    [final] = [j for j in mig.jobs(proxy) if j["column"] == column]
    assert final["state"] == "done"
    assert final["rows_done"] == n - 37
    assert final["position"]["values"] == n - 37
    assert (await column_type(mig, table))[0] == "bytea"
    proxy.start()
    try:
        assert await ready_soon(proxy, table), proxy.logs()
        assert await read_through(proxy, table) == values
    finally:
        proxy.stop()


# -- the window between the swap and the catalog reload -------------------------------------------------------


async def test_the_window_between_swap_and_reload_fails_closed(mig: MigEnv) -> None:
    """The swap without its notification (and without the event trigger): the running pgveil still
    believes the column plain. Writes of plaintext are refused by PostgreSQL (nothing stored); reads of
    the column are refused by pgveil (55000): the result names another attribute of the table than the
    statement's reading (the renamed shadow column), which starts a reload; after it the column is served
    encrypted."""
    table, n = "mig_window", 50
    values = await create_filled(mig, table, n)
    proxy = mig.proxy("window", {f"public.{table}": text_table()})
    try:
        config = load_config(proxy.config_path)
        from proxy.cli_jobs import connections

        async with connections(config) as c:
            from keymgmt.column_migration import Direction, start_migration

            await init_keystore(c.ks)
            target = await make_target(c.data, config, f"public.{table}.email", Direction.ENCRYPT)
            started = await start_migration(c.ks, c.data, target)
            assert await ready_soon(proxy, table), proxy.logs()
            # served as plaintext during the migration
            async with await psycopg.AsyncConnection.connect(proxy.dsn(dbname=DB), autocommit=True) as app:
                cur = await app.execute(f"SELECT email FROM {table} WHERE id = 1")
                assert await cur.fetchone() == (values[1],)

                async def shadow_known() -> None:
                    # this pgveil has read the catalog with the shadow column (setup notified it)
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline:
                        try:
                            cur = await app.execute(f"SELECT * FROM {table} WHERE id = 1")
                        except psycopg.Error as e:
                            if e.sqlstate != "55000":  # an attribute it does not know yet: reading again
                                raise
                            await asyncio.sleep(0.1)
                            continue
                        if "pgveil_mig_email" in [d.name for d in cur.description or ()]:
                            return
                        await asyncio.sleep(0.1)
                    raise AssertionError(proxy.logs())

                status = await ColumnMigration(
                    c.keystore,
                    c.ks,
                    c.data,
                    started.job_id,
                    converters("text"),
                    notify_swap=False,
                    before_swap=shadow_known,
                ).run()
                assert status.state.value == "done"
                before = await stored(mig, table)
                # writes in the window: refused by the server (type or envelope CHECK), never stored
                for sql, args in (
                    (f"UPDATE {table} SET email = %s WHERE id = 2", ("window-param@example.com",)),
                    (f"UPDATE {table} SET email = 'window-literal@example.com' WHERE id = 3", ()),
                    (f"INSERT INTO {table} (id, email) VALUES (1000, %s)", ("window-insert@example.com",)),
                ):
                    with pytest.raises(psycopg.Error) as e:
                        await app.execute(sql, args)
                    assert e.value.sqlstate in ("23514", "42804", "55000"), e.value
                after = await stored(mig, table)
                assert after == before
                assert not any(b"window-" in bytes(v) for v in after.values() if v is not None)
                # reads in the window: the statement was read against the catalog from before the swap,
                # the result names another attribute (the renamed shadow): refused, never the envelope
                # served as the value (psycopg and asyncpg, whose unnamed statements bind before their
                # description arrives)
                with pytest.raises(psycopg.Error) as e:
                    await app.execute(f"SELECT id, email FROM {table} WHERE id IN (1, 2, 3) ORDER BY id")
                assert e.value.sqlstate == "55000", e.value
                nocache = await asyncpg.connect(proxy.dsn(dbname=DB), statement_cache_size=0)
                try:
                    got_async: Any = await nocache.fetchval(f"SELECT email FROM {table} WHERE id = 1")
                except asyncpg.PostgresError as async_error:
                    got_async = async_error.sqlstate
                finally:
                    await nocache.close()
                assert got_async in ("55000", values[1])
                # then the reload that refusal started: decrypted
                deadline = time.monotonic() + 15
                got: Any = None
                while got is None:
                    try:
                        cur = await app.execute(f"SELECT email FROM {table} WHERE id = 1")
                        got = await cur.fetchone()
                    except psycopg.Error as retry:
                        if retry.sqlstate != "55000" or time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
                assert got == (values[1],)
                await app.execute(f"UPDATE {table} SET email = %s WHERE id = 2", ("after@example.com",))
        rows = await stored(mig, table)
        assert bytes(rows[2]).startswith(ENVELOPE_PREFIX)
        assert (await read_through(proxy, table))[2] == "after@example.com"
    finally:
        proxy.stop()


# -- the way back ------------------------------------------------------------------------------------------------


async def test_decrypt_back_to_plaintext_while_the_app_writes(mig: MigEnv) -> None:
    table, n = "mig_back", 3000
    values = await create_filled(mig, table, n, nulls=10)
    enc = mig.proxy("back-enc", {f"public.{table}": text_table()}, start=False)
    out = mig.cli(enc, "encrypt", f"public.{table}.email")
    assert out.returncode == 0, out.stderr
    assert (await column_type(mig, table))[0] == "bytea"
    dec = mig.proxy("back-dec", {f"public.{table}": {"columns": {"email": {"type": "text"}}}})
    try:
        job = mig.spawn(dec, "decrypt", f"public.{table}.email", "--batch-size", "200", "--throttle", "5000")
        assert await ready_soon(dec, table), dec.logs()
        stop = asyncio.Event()
        errors: dict[str, int] = {}

        async def writer() -> None:
            c = await asyncpg.connect(dec.dsn(dbname=DB), statement_cache_size=0)
            rng = random.Random(5)
            try:
                while not stop.is_set():
                    i = rng.randint(1, n)
                    value = f"back-{i}-{uuid.uuid4().hex[:8]}"
                    try:
                        await c.execute(f"UPDATE {table} SET email = $2 WHERE id = $1", i, value)
                        values[i] = value
                    except asyncpg.PostgresError as e:
                        errors[e.sqlstate] = errors.get(e.sqlstate, 0) + 1
                        await asyncio.sleep(0.01)
            finally:
                await c.close()

        task = asyncio.create_task(writer())
        try:
            await asyncio.get_running_loop().run_in_executor(None, job.wait)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await task
        _o, err = job.communicate(timeout=30)
        assert job.returncode == 0, err
        assert (await column_type(mig, table))[0] == "text"
        assert await stored(mig, table) == values  # plaintext again, as last written
        assert await read_through(dec, table) == values
    finally:
        dec.stop()


# -- refusals ---------------------------------------------------------------------------------------------------


async def test_refusals_change_nothing(mig: MigEnv) -> None:
    conn = await direct(mig)
    try:
        await conn.execute("CREATE TABLE mig_refuse (id int PRIMARY KEY, email text, other text)")
        await conn.execute("INSERT INTO mig_refuse SELECT g, 'r' || g, 'o' FROM generate_series(1, 10) g")
        await conn.execute("CREATE VIEW mig_refuse_v AS SELECT id, email FROM mig_refuse")
        await conn.execute("CREATE TABLE mig_idx (id int PRIMARY KEY, email text UNIQUE)")
        await conn.execute("CREATE TABLE mig_nopk (email text)")
        await conn.execute("CREATE TABLE mig_done (id int PRIMARY KEY, email bytea)")
    finally:
        await conn.close()
    await apply_tables(mig.pg, DB, {"public.mig_done": text_table()})
    tables = {
        "public.mig_refuse": {"columns": {"email": {"type": "text", "encrypt": True}, "other": {"type": "text"}}},
        "public.mig_idx": text_table(),
        "public.mig_nopk": text_table(),
        "public.mig_done": text_table(),
    }
    p = mig.proxy("refuse", tables, start=False)
    cases = [
        ("encrypt", "public.mig_refuse.email", "view mig_refuse_v depends on column public.mig_refuse.email"),
        ("encrypt", "public.mig_refuse.nope", "is not in the configuration"),
        ("encrypt", "public.mig_refuse.other", "is configured plain: set encrypt: true"),
        ("encrypt", "public.mig_idx.email", "depends on column public.mig_idx.email"),
        ("encrypt", "public.mig_nopk.email", "has no primary key"),
        ("encrypt", "public.mig_done.email", "is already encrypted"),
        ("decrypt", "public.mig_refuse.email", "is configured encrypt: true: set encrypt: false"),
    ]
    for command, column, message in cases:
        out = mig.cli(p, command, column)
        assert out.returncode == 1, (column, out.stdout, out.stderr)
        assert message in out.stderr, (column, out.stderr)
    assert (await column_type(mig, "mig_refuse"))[0] == "text"
    conn = await direct(mig)
    try:
        names = {
            r["attname"]
            for r in await conn.fetch("SELECT attname FROM pg_attribute WHERE attrelid = 'mig_refuse'::regclass")
        }
        assert not any(name.startswith("pgveil_") for name in names)
    finally:
        await conn.close()
    assert not [j for j in mig.jobs(p) if j["column"] in ("public.mig_refuse.email", "public.mig_idx.email")]


# -- pause, stop, abort ---------------------------------------------------------------------------------------


async def test_pause_resume_stop_and_abort(mig: MigEnv) -> None:
    """The job machinery applies: ``jobs pause`` holds it (no batch after the pause), ``jobs status`` shows
    it, SIGTERM stops it cleanly (exit 130, resumable), and ``--abort`` undoes it: the table is as before."""
    table, n = "mig_abort", 3000
    values = await create_filled(mig, table, n)
    proxy = mig.proxy("abort", {f"public.{table}": text_table()}, start=False)
    column = f"public.{table}.email"

    async def job() -> dict[str, Any]:
        [found] = [j for j in mig.jobs(proxy) if j["column"] == column and j["state"] not in ("cancelled", "done")]
        return found

    runner = mig.spawn(proxy, "encrypt", column, "--throttle", "400", "--batch-size", "50")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = [j for j in mig.jobs(proxy) if j["column"] == column]
            if jobs and jobs[0]["rows_done"] >= 200:
                break
            await asyncio.sleep(0.1)
        job_id = (await job())["job_id"]
        out = mig.cli(proxy, "jobs", "pause", job_id)
        assert out.returncode == 0, out.stderr
        paused = await job()
        await asyncio.sleep(1.0)
        still = await job()
        assert paused["state"] == still["state"] == "paused"
        assert still["rows_done"] == paused["rows_done"] < n
        text = mig.cli(proxy, "jobs", "status", job_id)
        assert "encrypt" in text.stdout
        assert "paused" in text.stdout
        assert mig.cli(proxy, "jobs", "resume", job_id).returncode == 0
        runner.send_signal(signal.SIGTERM)
        runner.wait(30)
        assert runner.returncode == 130, runner.stderr.read() if runner.stderr else ""
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert (await job())["interrupted"] is True
    out = mig.cli(proxy, "encrypt", column, "--abort")
    assert out.returncode == 0, out.stderr
    [cancelled] = [j for j in mig.jobs(proxy) if j["job_id"] == job_id]
    assert cancelled["state"] == "cancelled"
    assert await column_type(mig, table) == ("text", 1, 3)  # id, email, note: no shadow column left
    conn = await direct(mig)
    try:
        triggers = await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass", table)
    finally:
        await conn.close()
    assert triggers == 0
    assert await stored(mig, table) == values
    # and a new migration runs from the start to the end
    out = mig.cli(proxy, "encrypt", column)
    assert out.returncode == 0, out.stderr
    assert f"{n:,} values encrypted" in out.stdout


# -- visibility through the migration ---------------------------------------------------------------------------


async def test_a_restricted_role_sees_the_column_masked_before_during_and_after(mig: MigEnv) -> None:
    """A role granted ``masked:email`` gets the mask of the value from the plain column during the
    migration, from its shadow column (decrypted, then masked: it is governed as the column), and from the
    encrypted column after the swap; the application role sees the plaintext in all three."""
    table, n = "mig_vis", 200
    values = await create_filled(mig, table, n)
    mig.pg.psql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mig_masked') THEN "
        "CREATE ROLE mig_masked LOGIN PASSWORD 'mig-pw'; END IF; END $$"
    )
    mig.pg.psql(f"GRANT SELECT ON {table} TO mig_masked", dbname=DB)
    roles = {"default": "plaintext", "mig_masked": {f"public.{table}.email": "masked:email"}}
    proxy = mig.proxy("vis", {f"public.{table}": text_table()}, roles=roles)
    masked = "****@example.com"
    try:
        config = load_config(proxy.config_path)
        from keymgmt.column_migration import Direction, start_migration
        from proxy.cli_jobs import connections

        async def read(user: str, password: str, columns: str) -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(proxy.dsn(user=user, password=password, dbname=DB))
            try:
                deadline = time.monotonic() + 15
                while True:
                    try:
                        rows = await conn.fetch(f"SELECT id, {columns} FROM {table} ORDER BY id")
                        return [tuple(r) for r in rows]
                    except asyncpg.PostgresError as e:  # a catalog reload under way
                        if e.sqlstate != "55000" or time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
            finally:
                await conn.close()

        app_user = ("app", APP_PASSWORD)
        async with connections(config) as c:
            target = await make_target(c.data, config, f"public.{table}.email", Direction.ENCRYPT)
            started = await start_migration(c.ks, c.data, target)
            assert await ready_soon(proxy, table), proxy.logs()
            assert await read("mig_masked", "mig-pw", "email") == [(i, masked) for i in sorted(values)]

            async def during() -> None:
                deadline = time.monotonic() + 15
                while True:  # once this pgveil has read the catalog with the shadow column
                    try:
                        got = await read(*app_user, "email, pgveil_mig_email")
                        break
                    except asyncpg.PostgresError as e:
                        if e.sqlstate != "42703" or time.monotonic() > deadline:  # not known to it yet
                            raise
                        await asyncio.sleep(0.1)
                assert got == [(i, values[i], values[i]) for i in sorted(values)]
                both = await read("mig_masked", "mig-pw", "email, pgveil_mig_email")
                assert both == [(i, masked, masked) for i in sorted(values)]

            status = await ColumnMigration(
                c.keystore, c.ks, c.data, started.job_id, converters("text"), before_swap=during
            ).run()
            assert status.state.value == "done"
        assert await read("mig_masked", "mig-pw", "email") == [(i, masked) for i in sorted(values)]
        assert await read(*app_user, "email") == [(i, values[i]) for i in sorted(values)]
    finally:
        proxy.stop()
