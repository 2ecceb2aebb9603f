"""What an operator sees of pgveil under a known workload, and what a stranger can do to its key cache.

Metrics: after a workload whose refusals, repeated statements and sealed values are counted here,
``/metrics`` moves by exactly those amounts (``pgveil_statements_refused_total`` by reason and SQLSTATE
class, the SQL analysis cache, the key cache), with one process and with worker processes.

Key notifications: any role may NOTIFY ``pgveil_keys``. A flood of them from an unprivileged role,
with newlines and garbage (and the payloads that once meant "forget everything"), while clients insert
into a protected table: every insert succeeds, the key cache is never flushed and no key is dropped
(counters), no payload text reaches pgveil's log, and a real change of key state in the keystore,
followed by one NOTIFY, is still honoured.

Each test has its own protected table, keystore database and pgveil, so the counters it reads are its
own.
"""

from __future__ import annotations

import asyncio
import itertools
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, ProxyProcess, proxy_config, wait_until
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_config
from proxy.devcluster import DevCluster
from proxy.schema import apply_schema, plan_schema

pytestmark = pytest.mark.integration

_names = itertools.count()
_ids = itertools.count(1)

Sample = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Setup:
    pg: DevCluster
    table: str
    keystore_db: str

    @property
    def app_dsn(self) -> str:
        return f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{self.pg.port}/app"

    @property
    def keystore_dsn(self) -> str:
        return self.pg.dsn(dbname=self.keystore_db)

    @property
    def app_keystore_dsn(self) -> str:
        """The unprivileged application role, straight to the keystore database."""
        return f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{self.pg.port}/{self.keystore_db}"

    def tables(self) -> dict[str, Any]:
        return {
            f"public.{self.table}": {
                "columns": {"s": {"type": "text", "encrypt": True}, "n": {"type": "integer", "encrypt": True}}
            }
        }


async def _create_table(pg: DevCluster, table: str, tables: dict[str, Any]) -> None:
    app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/app")
    try:
        await app.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, s text, n int4, plain text)")
    finally:
        await app.close()
    catalog = parse_config({"tables": tables}, base_dir=Path.cwd(), environ={}).catalog()
    service = await asyncpg.connect(pg.dsn(dbname="app"))
    try:
        await apply_schema(service, await plan_schema(service, catalog))
    finally:
        await service.close()


@pytest.fixture
def setup(pg: DevCluster) -> Setup:
    n = next(_names)
    s = Setup(pg, f"enc_obs_{n}", f"ks_obs_{n}")
    pg.psql(f"CREATE DATABASE {s.keystore_db}")
    asyncio.run(_create_table(pg, s.table, s.tables()))
    return s


@pytest.fixture
def start_proxy(setup: Setup, tmp_path: Path) -> Iterator[Any]:
    started: list[ProxyProcess] = []

    def start(**overrides: Any) -> ProxyProcess:
        cfg = proxy_config(
            setup.pg,
            keystore={"dsn": setup.keystore_dsn, "master_key": {"provider": "local", "path": str(tmp_path / "mk")}},
            tables=setup.tables(),
            roles={"default": "plaintext"},
            service={"dsn": setup.pg.dsn(dbname="app")},  # the catalog is in app, not in the keystore database
        )
        cfg.update(overrides)
        p = ProxyProcess(cfg, tmp_path / f"proxy{len(started)}")
        started.append(p)
        p.start()
        _wait_serving(p, setup.table)
        return p

    yield start
    for p in started:
        p.stop()


def _wait_serving(p: ProxyProcess, table: str) -> None:
    def ready() -> bool:
        try:
            with psycopg.connect(p.dsn(connect_timeout="5"), autocommit=True) as c:
                c.execute(f"SELECT s FROM {table} WHERE id = -1").fetchall()
                return True
        except psycopg.Error:
            return False

    assert wait_until(ready, timeout=30), p.logs()


def scrape(p: ProxyProcess) -> dict[Sample, float]:
    with urllib.request.urlopen(p.admin_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def sample(name: str, **labels: str) -> Sample:
    return (name, frozenset(labels.items()))


def deltas(before: dict[Sample, float], after: dict[Sample, float], keys: list[Sample]) -> dict[Sample, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}


def settled(p: ProxyProcess, before: dict[Sample, float], expected: Mapping[Sample, float]) -> dict[Sample, float]:
    """The deltas once every expected counter has reached its value (sessions flush when they close and
    workers report about once a second); a counter that overshoots is reported as it is."""
    keys = list(expected)
    found: dict[Sample, float] = {}

    def reached() -> bool:
        found.update(deltas(before, scrape(p), keys))
        return all(found[k] >= v for k, v in expected.items())

    wait_until(reached, timeout=20, interval=0.1)
    return found


# -- metrics ------------------------------------------------------------------------------------------
REFUSED = "pgveil_statements_refused_total"
HITS = "pgveil_sql_analysis_cache_hits_total"
MISSES = "pgveil_sql_analysis_cache_misses_total"
KEY_HITS = "pgveil_key_cache_hits_total"
KEY_MISSES = "pgveil_key_cache_misses_total"


def quiet(p: ProxyProcess, names: tuple[str, ...]) -> dict[Sample, float]:
    """A scrape taken once the counters named have stopped moving (workers report about once a second,
    so what they did before now may not have arrived yet)."""
    last: dict[Sample, float] = {}

    def unchanged() -> bool:
        nonlocal last
        now = {k: v for k, v in scrape(p).items() if k[0] in names}
        same = now == last
        last = now
        return same

    wait_until(unchanged, timeout=20, interval=1.5)
    return scrape(p)


COUNTERS = (REFUSED, HITS, MISSES, KEY_HITS, KEY_MISSES)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-processes"])
def test_metrics_count_a_known_workload_exactly(setup: Setup, start_proxy: Any, workers: int) -> None:
    p: ProxyProcess = start_proxy(sessions={"workers": workers, "shutdown_timeout": 5, "track_statements": "always"})
    if workers > 1:
        assert wait_until(lambda: "worker 1 ready" in p.logs(), timeout=30), p.logs()
    t = setup.table
    construct = 3  # a protected column inside a function: 0A000
    literal_value = 2  # an integer column given 'abc' as a literal: 22P02
    bound_value = 2  # the same as a bound parameter
    copy_value = 1  # the same in COPY data
    repeats = 7  # an allowed statement, analysed once and then found in the cache
    sealed = 4  # literals sealed for a protected column: one key lookup each

    # One client per process, open at the same time: the supervisor places each on the process with the
    # fewest sessions, so every process serves one and analyses the texts once for itself.
    before = quiet(p, COUNTERS)
    conns = [psycopg.connect(p.dsn(), autocommit=True) for _ in range(workers)]
    texts: list[str] = []
    try:
        for c in conns:
            mine: list[str] = []

            def run(
                c: psycopg.Connection[Any], sql: str, params: list[Any] | None = None, mine: list[str] = mine
            ) -> None:
                mine.append(sql)
                c.execute(sql, params, prepare=False)

            def simple(c: psycopg.Connection[Any], sql: str, mine: list[str] = mine) -> None:
                mine.append(sql)
                psycopg.ClientCursor(c).execute(sql)

            for _ in range(construct):
                with pytest.raises(psycopg.errors.FeatureNotSupported):
                    run(c, f"SELECT length(s) FROM {t} WHERE id = 1")
            for _ in range(literal_value):
                with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                    simple(c, f"INSERT INTO {t} (id, n) VALUES (1, 'abc')")
            for _ in range(bound_value):
                with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                    run(c, f"INSERT INTO {t} (id, n) VALUES (%s, %s)", [1, "abc"])
            for _ in range(copy_value):
                mine.append(f"COPY {t} (id, n) FROM STDIN")
                with pytest.raises(psycopg.errors.InvalidTextRepresentation), c.cursor().copy(mine[-1]) as cp:
                    cp.write_row((1, "abc"))
            for _ in range(repeats):
                run(c, f"SELECT count(*) FROM {t} WHERE id = 1")
            assert len(set(mine)) == 5
            texts += mine
    finally:
        for c in conns:
            c.close()
    expected = {
        sample(REFUSED, reason="construct", sqlstate_class="0A"): construct * workers,
        sample(REFUSED, reason="value", sqlstate_class="22"): (literal_value + bound_value + copy_value) * workers,
        sample(REFUSED, reason="other", sqlstate_class="0A"): 0,
        sample(REFUSED, reason="other", sqlstate_class="22"): 0,
        sample(MISSES): 5 * workers,  # each process: once per distinct text
        sample(HITS): len(texts) - 5 * workers,
    }
    assert settled(p, before, expected) == expected

    # Sealing: one lookup of the column's current key per literal, every one a hit (keys are preloaded).
    before = quiet(p, COUNTERS)
    conns = [psycopg.connect(p.dsn(), autocommit=True) for _ in range(workers)]
    try:
        for c in conns:
            for _ in range(sealed):
                psycopg.ClientCursor(c).execute(f"INSERT INTO {t} (id, s) VALUES ({next(_ids)}, 'sealed')")
    finally:
        for c in conns:
            c.close()
    expected = {sample(KEY_HITS): sealed * workers, sample(KEY_MISSES): 0, sample(MISSES): sealed * workers}
    assert settled(p, before, expected) == expected


# -- key notifications --------------------------------------------------------------------------------
MARKER = "FORGED-pgveil-line-7c41e"
FLUSHES = "pgveil_key_cache_flushes_total"
INVALIDATIONS = "pgveil_key_cache_invalidations_total"
NOTIFICATIONS = "pgveil_key_notifications_total"
REFRESHES = "pgveil_key_refreshes_total"


def flood_payloads(batch: int, n: int, commands: list[str]) -> list[str]:
    """``commands`` (what payloads once meant: ``*`` to forget everything, a column id, a key id) exactly,
    once per batch, then garbage; the garbage is distinct, since PostgreSQL folds identical
    notifications of one transaction into one."""
    shapes = [
        f"{MARKER} {{i}}\n2026-01-01 00:00:00 CRITICAL keymgmt.keystore: {MARKER} all keys destroyed",
        f"\x1b[2J{MARKER}\r\n{{i}}",
        "x" * 7000 + MARKER,  # near the payload limit
        "*{i}",
    ]
    garbage = [shapes[i % len(shapes)].replace("{i}", str(i)) + f" #{batch}.{i}" for i in range(n - len(commands))]
    return [*commands, *garbage]


async def _flood(dsn: str, batches: int, per_batch: int, commands: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    sent = 0
    try:
        for b in range(batches):
            async with conn.transaction():
                for payload in flood_payloads(b, per_batch, commands):
                    await conn.execute("SELECT pg_notify('pgveil_keys', $1)", payload)
                    sent += 1
            await asyncio.sleep(0)
    finally:
        await conn.close()
    return sent


async def _insert(dsn: str, table: str, ids: list[int]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        stmt = await conn.prepare(f"INSERT INTO {table} (id, s, n) VALUES ($1, $2, $3)")
        for i in ids:
            await stmt.fetch(i, f"row {i}", i)
            await asyncio.sleep(0)
    finally:
        await conn.close()
    return len(ids)


def test_a_notification_flood_from_any_role_is_only_a_hint(setup: Setup, start_proxy: Any) -> None:
    p: ProxyProcess = start_proxy(logging={"level": "debug"})
    t = setup.table
    with psycopg.connect(setup.keystore_dsn, autocommit=True) as ks:
        key_ids = [str(k) for (k,) in ks.execute("SELECT key_id FROM pgveil.deks").fetchall()]
    assert len(key_ids) == 2  # one per protected column, both cached by pgveil
    commands = ["*", f"public.{t}.s", f"public.{t}.n", *key_ids]
    before = scrape(p)
    batches, per_batch = 20, 200
    ids = [next(_ids) for _ in range(400)]

    async def workload() -> tuple[int, int]:
        sent, inserted = await asyncio.gather(
            _flood(setup.app_keystore_dsn, batches, per_batch, commands), _insert(p.dsn(), t, ids)
        )
        return sent, inserted

    sent, inserted = asyncio.run(workload())
    assert (sent, inserted) == (batches * per_batch, len(ids))

    after = settled(p, before, {sample(NOTIFICATIONS): sent})
    assert after[sample(NOTIFICATIONS)] == sent
    counts = deltas(before, scrape(p), [sample(FLUSHES), sample(INVALIDATIONS), sample(REFRESHES, result="success")])
    assert counts[sample(FLUSHES)] == 0, counts  # the cache was never dropped wholesale
    assert counts[sample(INVALIDATIONS)] == 0, counts  # nothing changed, so no key was dropped
    # coalesced: a burst of notifications costs a refresh or two, not one each
    assert 1 <= counts[sample(REFRESHES, result="success")] <= sent // 20, counts

    # Every row is stored, sealed, and reads back through pgveil.
    with psycopg.connect(p.dsn(), autocommit=True) as c:
        rows = c.execute(f"SELECT id, s, n FROM {t} WHERE id = ANY(%s) ORDER BY id", [ids]).fetchall()
    assert rows == [(i, f"row {i}", i) for i in sorted(ids)]
    with psycopg.connect(setup.pg.dsn(dbname="app"), autocommit=True) as direct:
        stored = direct.execute(f"SELECT s FROM {t} WHERE id = ANY(%s)", [ids]).fetchall()
    assert len(stored) == len(ids)
    assert all(isinstance(s, bytes) and b"row " not in s for (s,) in stored)

    logs = p.logs()
    assert "payload of" in logs  # the notifications were logged, at debug level, as lengths
    assert MARKER not in logs
    assert "all keys destroyed" not in logs

    # A real change: the column's key is disabled in the keystore, then one notification, whatever it
    # says, makes pgveil re-read it and refuse writes.
    with psycopg.connect(setup.keystore_dsn, autocommit=True) as ks:
        ks.execute("UPDATE pgveil.deks SET state = 'DISABLED' WHERE column_id = %s", [f"public.{t}.s"])
    with psycopg.connect(setup.app_keystore_dsn, autocommit=True) as app:
        app.execute("NOTIFY pgveil_keys, 'nothing to see'")
    refused: list[psycopg.Error] = []
    written = 0  # inserts that got in before the refresh (the NOTIFY is asynchronous)

    def write_refused() -> bool:
        nonlocal written
        with psycopg.connect(p.dsn(), autocommit=True) as c:
            try:
                c.execute(f"INSERT INTO {t} (id, s) VALUES (%s, %s)", [next(_ids), "after disable"])
            except psycopg.Error as e:
                refused.append(e)
                return True
        written += 1
        return False

    assert wait_until(write_refused, timeout=20, interval=0.2), p.logs()
    sqlstate = refused[-1].sqlstate or ""
    assert sqlstate[:2] in ("55", "58"), refused[-1]
    # The write may be refused first through the dropped current-version pointer (a refresh already under
    # way when the key changed can see the change in one of its two queries only); the refresh the
    # notification asked for then drops the changed key itself.
    assert wait_until(
        lambda: deltas(before, scrape(p), [sample(INVALIDATIONS)])[sample(INVALIDATIONS)] >= 1, timeout=10
    ), p.logs()
    with psycopg.connect(setup.pg.dsn(dbname="app"), autocommit=True) as direct:
        assert direct.execute(f"SELECT count(*) FROM {t}").fetchone() == (len(ids) + written,)
