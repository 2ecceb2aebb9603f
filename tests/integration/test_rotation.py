"""DEK rotation end to end: a real PostgreSQL, a real ``pgveil serve`` in front of it, and the ``pgveil``
commands (``keys rotate``, ``keys destroy``, ``jobs run|status|pause|resume``) as an operator runs them.

Every test has a table of its own in one database (``rotdb``), whose keystore the proxy and the commands
share. What was stored is checked behind the proxy (the key id in each envelope's header, bytes 4..19);
what the application sees is checked through it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from conftest import APP_PASSWORD, ProxyProcess, proxy_config, wait_until
from encfixtures import apply_tables

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

DB = "rotdb"
TABLES = ("rot_conc", "rot_pickup", "rot_kill", "rot_pause", "rot_destroy", "rot_status")
COMPOSITE = "rot_composite"
BACKGROUND = "rot_background"


@dataclass
class RotEnv:
    pg: DevCluster
    proxy: ProxyProcess

    @property
    def direct_dsn(self) -> str:
        return self.pg.dsn(dbname=DB)

    @property
    def app_dsn(self) -> str:
        return self.proxy.dsn(dbname=DB)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
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


def tables_config() -> dict[str, Any]:
    return {
        f"public.{t}": {"columns": {"v": {"type": "text", "encrypt": True}}} for t in (*TABLES, COMPOSITE, BACKGROUND)
    }


async def _create_schema(pg: DevCluster) -> None:
    app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/{DB}")
    try:
        for t in (*TABLES, BACKGROUND):
            await app.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text, note text)")
        await app.execute(f"CREATE TABLE {COMPOSITE} (a text, b timestamptz, v text, PRIMARY KEY (a, b))")
    finally:
        await app.close()
    await apply_tables(pg, DB, tables_config())


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RotEnv]:
    pg.psql(f"CREATE DATABASE {DB} OWNER app")
    asyncio.run(_create_schema(pg))
    workdir = tmp_path_factory.mktemp("rot-proxy")
    cfg = proxy_config(
        pg,
        keystore={"dsn": pg.dsn(dbname=DB), "master_key": {"provider": "local", "path": str(workdir / "master.key")}},
        tables=tables_config(),
        roles={"default": "plaintext"},  # these tests check rotation, not visibility
    )
    proxy = ProxyProcess(cfg, workdir)
    proxy.start()
    e = RotEnv(pg, proxy)
    try:
        assert wait_until(lambda: _ready(e), timeout=30), proxy.logs()
        yield e
    finally:
        proxy.stop()


async def _probe(env: RotEnv) -> bool:
    try:
        conn = await asyncpg.connect(env.app_dsn, password=APP_PASSWORD)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        await conn.fetch("SELECT v FROM rot_conc WHERE id = -1")
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()


def _ready(env: RotEnv) -> bool:
    return asyncio.run(_probe(env))


async def ready_soon(env: RotEnv, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await _probe(env):
            return True
        await asyncio.sleep(0.2)
    return False


async def app_conn(env: RotEnv) -> asyncpg.Connection:
    return await asyncpg.connect(env.app_dsn)


async def fill(env: RotEnv, table: str, n: int) -> dict[int, str]:
    values = {i: f"{table}-{i}-{uuid.uuid4().hex}" for i in range(1, n + 1)}
    conn = await app_conn(env)
    try:
        await conn.executemany(f"INSERT INTO {table} (id, v) VALUES ($1, $2)", list(values.items()))
    finally:
        await conn.close()
    return values


async def stored_key_ids(env: RotEnv, table: str) -> dict[uuid.UUID, int]:
    conn = await asyncpg.connect(env.direct_dsn)
    try:
        rows = await conn.fetch(f"SELECT substring(v from 5 for 16) AS k, count(*) AS n FROM {table} GROUP BY 1")
    finally:
        await conn.close()
    return {uuid.UUID(bytes=bytes(r["k"])): r["n"] for r in rows}


async def versions(env: RotEnv, column_id: str) -> dict[int, tuple[uuid.UUID, str]]:
    conn = await asyncpg.connect(env.direct_dsn)
    try:
        rows = await conn.fetch(
            "SELECT version, key_id, state FROM pgveil.deks WHERE column_id = $1 AND subject_id IS NULL", column_id
        )
    finally:
        await conn.close()
    return {r["version"]: (r["key_id"], r["state"]) for r in rows}


async def read_all(env: RotEnv, table: str) -> dict[int, str]:
    conn = await app_conn(env)
    try:
        return {r["id"]: r["v"] for r in await conn.fetch(f"SELECT id, v FROM {table}")}
    finally:
        await conn.close()


async def done_soon(env: RotEnv, job_id: str, rows: int, timeout: float = 60) -> bool:
    """Waits until the job has re-encrypted ``rows`` rows (read straight from the keystore: quick)."""
    conn = await asyncpg.connect(env.direct_dsn)
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


def rotate_no_run(env: RotEnv, column: str) -> str:
    out = env.cli("keys", "rotate", "--column", column, "--no-run")
    assert out.returncode == 0, out.stderr
    [job] = [j for j in env.status() if j["column"] == column and j["state"] == "pending"]
    return str(job["job_id"])


# -- tests --------------------------------------------------------------------------------------------------


async def test_rotation_while_writers_run_loses_nothing(env: RotEnv) -> None:
    table, column = "rot_conc", "public.rot_conc.v"
    last = await fill(env, table, 3000)
    [(old_key, n)] = (await stored_key_ids(env, table)).items()
    assert n == 3000
    stop = asyncio.Event()
    writes = 0

    async def writer(w: int, ids: list[int]) -> None:
        nonlocal writes
        conn = await app_conn(env)
        rng = random.Random(w)
        try:
            next_new = 100_000 + w * 100_000
            while not stop.is_set():
                if rng.random() < 0.2:
                    next_new += 1
                    value = f"new-{w}-{next_new}-{uuid.uuid4().hex}"
                    await conn.execute(f"INSERT INTO {table} (id, v) VALUES ($1, $2)", next_new, value)
                    last[next_new] = value
                else:
                    i = rng.choice(ids)
                    value = f"upd-{w}-{i}-{uuid.uuid4().hex}"
                    await conn.execute(f"UPDATE {table} SET v = $2 WHERE id = $1", i, value)
                    last[i] = value  # recorded once committed: each id has one writer
                writes += 1
        finally:
            await conn.close()

    ids = sorted(last)
    writers = [asyncio.create_task(writer(w, ids[w::4])) for w in range(4)]
    try:
        await asyncio.sleep(0.3)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.cli",
            "keys",
            "rotate",
            "--column",
            column,
            "--throttle",
            "0",
            "--batch-size",
            "250",
            "--config",
            str(env.proxy.config_path),
            cwd=env.proxy.workdir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await asyncio.wait_for(proc.communicate(), 240)
        assert proc.returncode == 0, err.decode()
        await asyncio.sleep(0.3)  # writers keep going after the job finished
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert writes > 0
    [job] = [j for j in env.status() if j["column"] == column]
    assert job["state"] == "done", json.dumps(job)
    assert job["rows_remaining"] == 0
    assert job["rows_unreadable"] == 0
    new_key = uuid.UUID(job["to_key_id"])
    assert new_key != old_key
    assert job["from_key_id"] == str(old_key)
    # every stored value is under the new version, and reads back (through pgveil) as last written
    assert await stored_key_ids(env, table) == {new_key: len(last)}
    assert await read_all(env, table) == last
    # Every row the job handled existed under an old key: a rows_total counted at the job's start can
    # miss the few writes sealed under the old version before the proxy heard of the rotation (a later
    # pass re-encrypts them), so the bound is the rows ever written.
    assert job["rows_done"] > 0, json.dumps(job)
    assert job["rows_done"] + job["rows_skipped"] <= 3000 + writes, json.dumps(job)
    assert job["rows_total"] <= 3000 + writes


async def test_new_writes_use_the_new_version_soon_after_rotate(env: RotEnv) -> None:
    table, column = "rot_pickup", "public.rot_pickup.v"
    await fill(env, table, 10)
    stop = asyncio.Event()

    async def writer() -> None:
        conn = await app_conn(env)
        i = 1000
        try:
            while not stop.is_set():
                i += 1
                # note is not protected: the server's clock at the write goes through as it is
                await conn.execute(
                    f"INSERT INTO {table} (id, v, note) VALUES ($1, $2, clock_timestamp()::text)", i, "x"
                )
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(0.3)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "keys", "rotate", "--column", column, "--no-run",
            "--config", str(env.proxy.config_path), cwd=env.proxy.workdir,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        direct = await asyncpg.connect(env.direct_dsn)
        try:
            [(_v, (new_key, _s))] = [x for x in (await versions(env, column)).items() if x[0] == 2]
            rotated = await direct.fetchval("SELECT created_at FROM pgveil.deks WHERE key_id = $1", new_key)
            # keep writing until a write under the new version is stored
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if await direct.fetchval(
                    f"SELECT count(*) FROM {table} WHERE substring(v from 5 for 16) = $1", new_key.bytes
                ):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await task
        try:
            rows = await direct.fetch(
                f"SELECT substring(v from 5 for 16) AS k, note::timestamptz AS at FROM {table} WHERE note IS NOT NULL"
            )
        finally:
            await direct.close()
    finally:
        stop.set()
        await task
    under_new = [r["at"] for r in rows if uuid.UUID(bytes=bytes(r["k"])) == new_key]
    under_old = [r["at"] for r in rows if uuid.UUID(bytes=bytes(r["k"])) != new_key]
    assert under_new, f"the proxy kept sealing under the old version ({len(under_old)} writes)"
    first_new, last_old = min(under_new), max(under_old)
    # once a write was sealed under the new version, no later write went back to the old one
    assert last_old < first_new
    old_s, new_s = (last_old - rotated).total_seconds(), (first_new - rotated).total_seconds()
    print(f"\nrotation began; last write under the old version {old_s:+.3f} s, first under the new {new_s:+.3f} s")
    [job] = [j for j in env.status() if j["column"] == column and j["state"] == "pending"]
    assert env.cli("jobs", "cancel", job["job_id"]).returncode == 0


async def test_job_killed_midway_resumes_with_exact_counts(env: RotEnv) -> None:
    table, column = "rot_kill", "public.rot_kill.v"
    n = 6000
    values = await fill(env, table, n)
    job_id = rotate_no_run(env, column)
    new_key = uuid.UUID(env.status(job_id)[0]["to_key_id"])
    runner = env.spawn("jobs", "run", job_id, "--throttle", "500", "--batch-size", "100")
    try:
        assert await done_soon(env, job_id, 1000)
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
    stored = await stored_key_ids(env, table)
    # batch and progress commit together: the count is exactly the rows under the new key
    assert mid["rows_done"] == stored.get(new_key, 0)
    assert 1000 <= mid["rows_done"] < n
    assert mid["rows_total"] == n
    assert mid["position"]["after"] is not None
    # resumed from the position, to the end
    out = env.cli("jobs", "run", job_id, "--throttle", "0", timeout=240)
    assert out.returncode == 0, out.stderr
    [final] = env.status(job_id)
    assert final["state"] == "done"
    assert final["rows_done"] == n
    assert final["rows_skipped"] == 0
    assert final["rows_remaining"] == 0
    assert final["fraction"] == 1.0
    assert await stored_key_ids(env, table) == {new_key: n}
    assert await read_all(env, table) == values


async def test_pause_and_resume(env: RotEnv) -> None:
    table, column = "rot_pause", "public.rot_pause.v"
    n = 3000
    values = await fill(env, table, n)
    job_id = rotate_no_run(env, column)
    runner = env.spawn("jobs", "run", job_id, "--throttle", "300", "--batch-size", "50")
    try:
        assert await done_soon(env, job_id, 1)
        out = env.cli("jobs", "pause", job_id)
        assert out.returncode == 0, out.stderr
        assert "paused" in out.stdout
        # The pause waits for the batch under way; after it no batch starts.
        [paused] = env.status(job_id)
        await asyncio.sleep(1.5)
        [still] = env.status(job_id)
        assert paused["state"] == still["state"] == "paused"
        assert still["active"] is True  # the runner keeps its claim and waits
        assert still["rows_done"] == paused["rows_done"] < n
        assert runner.poll() is None
        out = env.cli("jobs", "resume", job_id)
        assert out.returncode == 0, out.stderr
        assert "running" in out.stdout
        runner.wait(120)
        assert runner.returncode == 0, runner.stderr.read() if runner.stderr else ""
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    [final] = env.status(job_id)
    assert final["state"] == "done"
    assert final["rows_done"] == n
    assert await read_all(env, table) == values
    # resuming what is not paused is refused
    again = env.cli("jobs", "resume", job_id)
    assert again.returncode == 1
    assert "not paused" in again.stderr


async def test_destroy_refused_while_rows_reference_then_allowed(env: RotEnv) -> None:
    table, column = "rot_destroy", "public.rot_destroy.v"
    values = await fill(env, table, 500)
    job_id = rotate_no_run(env, column)
    vs = await versions(env, column)
    assert sorted(vs) == [1, 2]
    refused = env.cli("keys", "destroy", "--column", column, "--version", "1")
    assert refused.returncode == 1
    assert "500 row(s) still reference it" in refused.stderr
    current = env.cli("keys", "destroy", "--column", column, "--version", "2")
    assert current.returncode == 1
    assert "current data key" in current.stderr
    assert (await versions(env, column))[1][1] == "ENABLED"
    out = env.cli("jobs", "run", job_id, "--throttle", "0")
    assert out.returncode == 0, out.stderr
    allowed = env.cli("keys", "destroy", "--column", column, "--version", "1")
    assert allowed.returncode == 0, allowed.stderr
    vs = await versions(env, column)
    assert vs[1][1] == "DESTROYED"
    assert vs[2][1] == "ENABLED"
    conn = await asyncpg.connect(env.direct_dsn)
    try:
        assert await conn.fetchval("SELECT wrapped FROM pgveil.deks WHERE key_id = $1", vs[1][0]) is None
    finally:
        await conn.close()
    assert await read_all(env, table) == values
    twice = env.cli("keys", "destroy", "--column", column, "--version", "1")
    assert twice.returncode == 1
    assert "already destroyed" in twice.stderr


async def test_jobs_status_json_and_text(env: RotEnv) -> None:
    table, column = "rot_status", "public.rot_status.v"
    await fill(env, table, 250)
    out = env.cli("keys", "rotate", "--table", "public.rot_status", "--throttle", "0", "--batch-size", "100")
    assert out.returncode == 0, out.stderr
    assert "version 2" in out.stdout
    [job] = [j for j in env.status() if j["column"] == column]
    assert set(job) >= {
        "job_id",
        "kind",
        "state",
        "active",
        "rows_done",
        "rows_total",
        "rows_remaining",
        "position",
        "throttle_rows_per_second",
        "batch_size",
        "started_at",
        "finished_at",
        "to_version",
    }
    assert job["kind"] == "dek"
    assert (job["state"], job["rows_done"], job["rows_total"], job["rows_remaining"]) == ("done", 250, 250, 0)
    assert (job["to_version"], job["batch_size"], job["throttle_rows_per_second"]) == (2, 100, None)
    assert job["passes"] == 2, json.dumps(job)  # the second pass found nothing left
    assert job["position"]["after"] is None
    # a second rotation supersedes nothing (the first is done) and starts from version 2
    out = env.cli("keys", "rotate", "--column", column, "--no-run")
    assert out.returncode == 0
    assert "version 3" in out.stdout
    text = env.cli("jobs", "status", "--unfinished")
    assert text.returncode == 0
    assert column in text.stdout
    assert "pending" in text.stdout
    # a newer rotation cancels the unfinished job it supersedes
    pending = [j for j in env.status() if j["column"] == column and j["state"] == "pending"]
    out = env.cli("keys", "rotate", "--column", column, "--no-run")
    assert "supersedes" in out.stdout
    [old] = env.status(pending[0]["job_id"])
    assert old["state"] == "cancelled"
    assert "superseded" in old["last_error"]
    bad = env.cli("keys", "rotate", "--column", "public.rot_status.note")
    assert bad.returncode == 1
    assert "not an encrypted column" in bad.stderr


async def test_composite_text_and_timestamp_key(env: RotEnv) -> None:
    # Keys whose text order differs from their own order ('10' < '9'), and a timestamptz that must
    # round-trip through its text form.
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    rows = {(str(i % 13), base + datetime.timedelta(microseconds=i * 1001)): f"c{i}" for i in range(700)}
    conn = await app_conn(env)
    try:
        await conn.executemany(
            f"INSERT INTO {COMPOSITE} (a, b, v) VALUES ($1, $2, $3)", [(*k, v) for k, v in rows.items()]
        )
    finally:
        await conn.close()
    out = env.cli("keys", "rotate", "--column", f"public.{COMPOSITE}.v", "--throttle", "0", "--batch-size", "37")
    assert out.returncode == 0, out.stderr
    [job] = [j for j in env.status() if j["column"] == f"public.{COMPOSITE}.v"]
    assert (job["state"], job["rows_done"], job["rows_remaining"]) == ("done", 700, 0)
    assert await stored_key_ids(env, COMPOSITE) == {uuid.UUID(job["to_key_id"]): 700}
    conn = await app_conn(env)
    try:
        back = {(r["a"], r["b"]): r["v"] for r in await conn.fetch(f"SELECT a, b, v FROM {COMPOSITE}")}
    finally:
        await conn.close()
    assert back == rows


async def test_prepared_literal_after_rotate(env: RotEnv) -> None:
    """A literal in a prepared statement is sealed once, at Parse, under the key current then. After a
    rotation makes another key current, its Executes are refused (0A000, "prepare the statement again")
    rather than go on storing envelopes under the retiring key; prepared again, it seals under the new one.
    The session stays usable throughout."""
    table, column = "rot_pickup", "public.rot_pickup.v"
    conn = await app_conn(env)
    direct = await asyncpg.connect(env.direct_dsn)
    sql = f"INSERT INTO {table} (id, v) VALUES ($1, 'literal')"
    try:
        insert = await conn.prepare(sql)
        await insert.fetch(50_000)
        out = env.cli("keys", "rotate", "--column", column, "--no-run")
        assert out.returncode == 0, out.stderr
        current = max((await versions(env, column)).items())[1][0]
        refused = None
        for i in range(50_001, 50_101):  # until this instance has heard of the rotation (within a second)
            try:
                await insert.fetch(i)
            except asyncpg.FeatureNotSupportedError as e:
                refused = e
                break
            await asyncio.sleep(0.05)
        assert refused is not None, "the statement kept storing envelopes under the old key"
        assert "prepare the statement again" in (refused.hint or "")
        assert f"column {column}" in str(refused)
        assert await conn.fetchval("SELECT 1") == 1
        again = await conn.prepare(sql + " RETURNING id")
        assert await again.fetchval(50_200) == 50_200
        kid = await direct.fetchval(f"SELECT substring(v from 5 for 16) FROM {table} WHERE id = 50200")
        assert uuid.UUID(bytes=bytes(kid)) == current
        assert await conn.fetchval(f"SELECT v FROM {table} WHERE id = 50200") == "literal"
    finally:
        await conn.close()
        await direct.close()
        for j in env.status():
            if j["column"] == column and j["state"] == "pending":
                env.cli("jobs", "cancel", j["job_id"])


async def test_background_job_outlives_a_proxy_crash(env: RotEnv, make_proxy: Any) -> None:
    table, column = BACKGROUND, f"public.{BACKGROUND}.v"
    values = await fill(env, table, 3000)
    # a second instance on the same keystore, the one the application writes through here
    other = make_proxy(keystore=env.proxy.config["keystore"], tables=tables_config(), roles={"default": "plaintext"})
    assert await ready_soon(RotEnv(env.pg, other)), other.logs()
    log_file = env.proxy.workdir / "bg-job.log"
    out = env.cli(
        "keys", "rotate", "--column", column, "--background", "--throttle", "400", "--batch-size", "100",
        "--log-file", str(log_file),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "in the background" in out.stdout
    [job] = [j for j in env.status() if j["column"] == column]
    job_id = job["job_id"]
    assert await done_soon(env, job_id, 500), log_file.read_text()
    conn = await asyncpg.connect(other.dsn(dbname=DB))
    try:
        for i in range(1, 3001, 7):
            values[i] = f"during-{i}"
            await conn.execute(f"UPDATE {table} SET v = $2 WHERE id = $1", i, values[i])
    finally:
        await conn.close()
    assert other.proc is not None
    other.proc.kill()  # SIGKILL: no shutdown
    other.proc.wait(30)
    other.proc = None
    at_kill = env.status(job_id)[0]["rows_done"]
    assert at_kill < 3000
    assert wait_until(lambda: env.status(job_id)[0]["state"] == "done", timeout=120), log_file.read_text()
    [final] = env.status(job_id)
    assert final["rows_done"] > at_kill
    assert final["rows_done"] + final["rows_skipped"] <= 3000
    assert final["rows_remaining"] == 0
    other.start()
    assert await ready_soon(RotEnv(env.pg, other)), other.logs()
    assert await read_all(RotEnv(env.pg, other), table) == values
    listing = env.cli("keys", "versions", "--column", column, "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {v["version"]: (v["state"], v["current"], v["rows"]) for v in json.loads(listing.stdout)["versions"]}
    assert rows == {1: ("ENABLED", False, 0), 2: ("ENABLED", True, 3000)}
