"""The workload registry: what each benchmark does, on which targets, and against what it is compared.

A workload is a function from (context, target) to a :class:`Measurement`, plus the setup it needs
once per cluster and the hook it needs before every run. It must not start or stop the benchmarked
targets, and it measures nothing about the middleman's CPU: the runner does that around it, the same
way for all (and restarts the middleman first when the workload asks for a ``fresh_target``).

Encrypted columns: ``pgveil-encrypted`` protects the five text columns of ``bench_wide_enc`` and
``bench_ins_enc``. :func:`setup_encrypted` makes them ``bytea`` with the envelope CHECK (the schema
tooling, as an operator would) and fills ``bench_wide_enc`` *through* a short-lived pgveil-encrypted
with the rows of ``bench_wide``, so the stored values are real envelopes and the encrypted wide fetch
returns exactly what the plaintext one does. The encrypted workloads run only on that target and divide
by the plaintext workload on ``direct`` (``baseline``); ``wide-fetch`` and ``insert-single`` also run on
it, on their plaintext tables, which shows what the full statement model costs before any cryptography.

Durability: the benchmark cluster runs with PostgreSQL's default durability (``fsync``,
``synchronous_commit``, ``full_page_writes`` on), so ``insert-single`` and ``insert-encrypted`` commit
the way production does: each commit waits for its WAL flush. That wait is part of what a client sees,
so it is part of the ratio. The ``*-async`` twins run the same scripts as :data:`ASYNC_COMMIT_ROLE`, whose
sessions have ``synchronous_commit = off``: commits do not wait for the disk, the server is CPU-bound,
and the ratio shows what the middleman's own CPU costs. Before each async run, :func:`check_async_commit`
asks the server, through the target, whether the session really has it off. The select-only and fetch
workloads do not commit writes, so durability does not change them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.pgbench import BenchError, Endpoint, PgbenchRun, pgbench_init, run_pgbench
from bench.procfs import rss_kib
from bench.targets import (
    ASYNC_COMMIT_PASSWORD,
    ASYNC_COMMIT_ROLE,
    HIDDEN_ROLE,
    MASKED_ROLE,
    VISIBILITY_PASSWORD,
    PgveilEncrypted2Target,
    PgveilEncryptedEvpTarget,
    PgveilEncryptedPythonTarget,
    PgveilEncryptedTarget,
    Target,
    TargetUnavailable,
)
from proxy.devcluster import DevCluster
from proxy.schema import envelope_check

log = logging.getLogger(__name__)

# Plaintext-table workloads run on these (pgveil-encrypted: the full statement model on a plain table).
PLAIN_TABLE_TARGETS = ("direct", "pgveil", "pgveil-encrypted", "pgbouncer")
ALL_TARGETS = (
    "direct",
    "pgveil",
    "pgveil-encrypted",
    "pgveil-encrypted-py",
    "pgveil-encrypted-evp",
    "pgveil-encrypted-2w",
    "pgbouncer",
)
# pgveil-encrypted-py: the same as pgveil-encrypted on the pure-Python kernels (PGVEIL_IMPL=python);
# pgveil-encrypted-evp: on the accelerator with its opens on OpenSSL's EVP (PGVEIL_GCM=evp).
ENCRYPTED_TARGETS = ("pgveil-encrypted", "pgveil-encrypted-py", "pgveil-encrypted-2w")
# The workloads on plaintext tables that compare the middlemen among themselves.
PLAIN_TARGETS = ("direct", "pgveil", "pgbouncer")
MIDDLEMEN = tuple(t for t in ALL_TARGETS if t != "direct")
PGBENCH_SCALE = 10
WIDE_ROWS = 1000
TEXT_COLUMNS = ("c1", "c2", "c3", "c4", "c5")
# What pgveil-encrypted protects: ``schema.table`` -> column -> declared type.
PROTECTED_TABLES: Mapping[str, Mapping[str, str]] = {
    "public.bench_wide_enc": dict.fromkeys(TEXT_COLUMNS, "text"),
    "public.bench_ins_enc": dict.fromkeys(TEXT_COLUMNS, "text"),
    "public.bench_wide_subj": dict.fromkeys(TEXT_COLUMNS, "text"),
    "public.bench_ins_subj": {"c1": "text"},
}
# Per-subject keys: bench_wide_subj's 1,000 rows are 1,000 data subjects (kind bench, subject column id);
# bench_ins_subj takes inserts for new and existing subjects.
SUBJECT_TABLES: Mapping[str, tuple[str, str]] = {
    "public.bench_wide_subj": ("bench", "id"),
    "public.bench_ins_subj": ("bench", "subject"),
}
EXISTING_SUBJECT = 1
IDLE_HOLD_S = 1.0
IDLE_CONNECT_CONCURRENCY = 50
BACKEND_DRAIN_TIMEOUT_S = 60.0

# Benchmark fixtures, not secrets: they encrypt generated md5 strings in a throwaway cluster.
PGCRYPTO_KEY_HEX = "5f0c6d2b8a1e4f3c9b7a6d5e4c3b2a190817263544536271809a8b7c6d5e4f30"
PGCRYPTO_IV_HEX = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
PGP_PASSPHRASE = "pgveil-bench-passphrase"


@dataclass(frozen=True, slots=True)
class BenchContext:
    cluster: DevCluster
    direct: Endpoint
    pgbench: Path
    workdir: Path
    duration: int
    idle_connections: int


@dataclass(frozen=True, slots=True)
class Measurement:
    """One run of one workload on one target. ``tps`` is None for workloads without transactions."""

    transactions: int = 0
    failed: int = 0
    tps: float | None = None
    latencies_us: tuple[int, ...] = ()
    idle_kib_per_conn: float | None = None
    progress_tps: tuple[float, ...] = ()
    note: str = ""


RunFn = Callable[[BenchContext, Target], Measurement]
SetupFn = Callable[[BenchContext], None]
CheckFn = Callable[[BenchContext, Target], None]


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    description: str
    targets: tuple[str, ...]
    run: RunFn
    setup: tuple[SetupFn, ...] = ()
    before_run: SetupFn | None = None
    baseline: tuple[str, str] | None = None
    rows_per_tx: int | None = None
    max_rounds: int | None = None
    fresh_target: bool = False
    # Before each run, outside the measured time: raises BenchError when the run would not measure
    # what the description says (a session setting that did not reach the server).
    check: CheckFn | None = None

    @property
    def ratio_baseline(self) -> tuple[str, str]:
        """(workload, target) whose throughput this workload's ratio divides by."""
        return self.baseline or (self.name, "direct")


# -- setup ---------------------------------------------------------------------------------------
def _sql(cluster: DevCluster, *statements: str) -> str:
    """Runs each statement on its own (VACUUM cannot share a ``psql -c``), as the superuser."""
    out = ""
    for statement in statements:
        try:
            out = cluster.psql(statement)
        except subprocess.CalledProcessError as exc:
            raise BenchError(f"setup SQL failed: {str(exc.stderr).strip()}") from None
    return out


def setup_pgbench_tables(ctx: BenchContext) -> None:
    pgbench_init(ctx.pgbench, ctx.direct, PGBENCH_SCALE)


def _text_col(i: int) -> str:
    return f"substr(md5(i::text || '-c{i}'), 1, 20)"


def setup_wide(ctx: BenchContext) -> None:
    cols = ", ".join(_text_col(i) for i in range(1, 6))
    _sql(
        ctx.cluster,
        "DROP TABLE IF EXISTS bench_wide;"
        "CREATE TABLE bench_wide (id int PRIMARY KEY, c1 text, c2 text, c3 text, c4 text, c5 text);"
        f"INSERT INTO bench_wide SELECT i, {cols} FROM generate_series(1, {WIDE_ROWS}) AS i;",
        "VACUUM ANALYZE bench_wide;",
    )


def setup_insert(ctx: BenchContext) -> None:
    _sql(
        ctx.cluster,
        "DROP TABLE IF EXISTS bench_ins;"
        "CREATE TABLE bench_ins (id bigserial PRIMARY KEY, c1 text, c2 text, c3 text, c4 text, c5 text);",
    )


def truncate_insert(ctx: BenchContext) -> None:
    """Every target starts from the same empty table, so none pays for another's index growth, and
    right after a checkpoint, so every run writes the same full-page images and none inherits a
    checkpoint that the WAL of an earlier run triggered."""
    _sql(ctx.cluster, "TRUNCATE bench_ins RESTART IDENTITY;", "CHECKPOINT;")


def encrypted_target(
    ctx: BenchContext, workers: int = 1, *, python: bool = False, evp: bool = False
) -> PgveilEncryptedTarget:
    """pgveil with the protected tables; ``python``: on the pure-Python kernels (PGVEIL_IMPL=python);
    ``evp``: the accelerator's opens on OpenSSL's EVP (PGVEIL_GCM=evp)."""
    cls: type[PgveilEncryptedTarget] = PgveilEncryptedTarget
    if workers == 2:
        cls = PgveilEncrypted2Target
    elif python:
        cls = PgveilEncryptedPythonTarget
    elif evp:
        cls = PgveilEncryptedEvpTarget
    return cls(ctx.cluster, ctx.workdir, PROTECTED_TABLES, SUBJECT_TABLES)


def _connect(endpoint: Endpoint) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        host=endpoint.host,
        port=endpoint.port,
        user=endpoint.user,
        password=endpoint.password,
        dbname=endpoint.dbname,
        sslmode="disable",
        connect_timeout=10,
    )


async def _apply_schema(ctx: BenchContext, target: PgveilEncryptedTarget) -> None:
    import asyncpg

    from proxy.config import parse_config
    from proxy.schema import apply_schema, plan_schema

    config = parse_config(target.config_data(), base_dir=ctx.workdir, environ=target.keystore_environ)
    conn = await asyncpg.connect(ctx.cluster.dsn())
    try:
        await apply_schema(conn, await plan_schema(conn, config.catalog()))
    finally:
        await conn.close()


def _fill_wide_encrypted(ctx: BenchContext, target: PgveilEncryptedTarget, table: str = "bench_wide_enc") -> None:
    columns = ", ".join(("id", *TEXT_COLUMNS))
    with _connect(ctx.direct) as direct:
        rows = direct.execute(f"SELECT {columns} FROM bench_wide ORDER BY id").fetchall()
    placeholders = ", ".join(["%s"] * (1 + len(TEXT_COLUMNS)))
    try:
        with _connect(target.endpoint) as conn:
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} ({columns}) VALUES ({placeholders})", rows)
            conn.commit()
            back = conn.execute(f"SELECT {columns} FROM {table} ORDER BY id").fetchall()
    except psycopg.Error as exc:
        raise BenchError(f"filling {table} through {target.name} failed: {type(exc).__name__}: {exc}") from None
    # Proves that the benchmark decrypts what it should: every value survives the round trip.
    if back != rows:
        raise BenchError(f"{table} read through {target.name} differs from bench_wide")


def setup_encrypted(ctx: BenchContext) -> None:
    """The protected tables, ready for pgveil-encrypted, with ``bench_wide_enc`` filled through it.

    If pgveil cannot do that, the tables are dropped again and the run goes on: pgveil-encrypted then
    never becomes ready (its tables are missing), so it is skipped with that reason, and the other
    targets are still measured.
    """
    texts = ", ".join(f"{c} text" for c in TEXT_COLUMNS)
    _sql(
        ctx.cluster,
        "DROP TABLE IF EXISTS bench_wide_enc, bench_ins_enc, bench_wide_subj, bench_ins_subj;"
        f"CREATE TABLE bench_wide_enc (id int PRIMARY KEY, {texts});"
        f"CREATE TABLE bench_ins_enc (id bigserial PRIMARY KEY, {texts});"
        f"CREATE TABLE bench_wide_subj (id int PRIMARY KEY, {texts});"
        "CREATE TABLE bench_ins_subj (n bigserial PRIMARY KEY, subject bigint NOT NULL, c1 text);",
    )
    target = encrypted_target(ctx)
    try:
        asyncio.run(_apply_schema(ctx, target))
        try:
            target.start()
        except TargetUnavailable as exc:
            raise BenchError(f"cannot start {target.name} to fill bench_wide_enc: {exc}") from None
        try:
            _fill_wide_encrypted(ctx, target)
            _fill_wide_encrypted(ctx, target, "bench_wide_subj")
        finally:
            target.stop()
    except Exception as exc:
        log.warning("setup of the encrypted tables failed, %s will be skipped: %s", target.name, exc)
        _sql(ctx.cluster, "DROP TABLE IF EXISTS bench_wide_enc, bench_ins_enc, bench_wide_subj, bench_ins_subj;")
        return
    _sql(ctx.cluster, "VACUUM ANALYZE bench_wide_enc;", "VACUUM ANALYZE bench_wide_subj;")


def truncate_insert_encrypted(ctx: BenchContext) -> None:
    _sql(ctx.cluster, "TRUNCATE bench_ins_enc RESTART IDENTITY;", "CHECKPOINT;")


def setup_async_role(ctx: BenchContext) -> None:
    """The login role of the ``*-async`` workloads: ``synchronous_commit = off`` is its role default,
    which the server applies when any middleman opens a session as it (see
    :data:`bench.targets.ASYNC_COMMIT_ROLE`). Runs after the tables exist, and grants what inserting
    needs, on whichever of them the encrypted setup left."""
    _sql(
        ctx.cluster,
        f"CREATE ROLE {ASYNC_COMMIT_ROLE} LOGIN PASSWORD '{ASYNC_COMMIT_PASSWORD}';"
        f"ALTER ROLE {ASYNC_COMMIT_ROLE} SET synchronous_commit = off;"
        f"GRANT INSERT ON ALL TABLES IN SCHEMA public TO {ASYNC_COMMIT_ROLE};"
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {ASYNC_COMMIT_ROLE};",
    )


def setup_envelope_domain(ctx: BenchContext) -> None:
    """``bench_ins_dom``: bench_ins_enc's columns as a domain over bytea carrying the same envelope check
    (proxy.schema.envelope_check) instead of one CHECK constraint per column, for the server-side
    comparison of insert-envelopes-domain-async. Runs after setup_async_role (grants its own)."""
    check = envelope_check("VALUE").replace('"VALUE"', "VALUE")
    columns = ", ".join(f"c{i} bench_envelope" for i in range(1, 6))
    _sql(
        ctx.cluster,
        "DROP TABLE IF EXISTS bench_ins_dom; DROP DOMAIN IF EXISTS bench_envelope;"
        f"CREATE DOMAIN bench_envelope AS bytea CHECK ({check});"
        f"CREATE TABLE bench_ins_dom (id bigserial PRIMARY KEY, {columns});"
        f"GRANT INSERT ON bench_ins_dom TO {ASYNC_COMMIT_ROLE};"
        f"GRANT USAGE ON SEQUENCE bench_ins_dom_id_seq TO {ASYNC_COMMIT_ROLE};",
    )


def truncate_insert_domain(ctx: BenchContext) -> None:
    _sql(ctx.cluster, "TRUNCATE bench_ins_dom RESTART IDENTITY;", "CHECKPOINT;")


def setup_visibility_roles(ctx: BenchContext) -> None:
    """The login roles of the ``wide-fetch-masked`` / ``-hidden`` workloads (the encrypted targets'
    policy names them); they may read the wide tables."""
    _sql(
        ctx.cluster,
        *(
            f"CREATE ROLE {role} LOGIN PASSWORD '{VISIBILITY_PASSWORD}';"
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};"
            for role in (MASKED_ROLE, HIDDEN_ROLE)
        ),
    )


def check_visibility(role: str, expected: str) -> CheckFn:
    """Before each run: one row of the encrypted wide table read through the target as ``role`` must
    come back as the policy says (``expected``: "masked" or "hidden"), or the row would measure another
    path."""

    def check(ctx: BenchContext, target: Target) -> None:
        endpoint = dataclasses.replace(target.endpoint, user=role, password=VISIBILITY_PASSWORD)
        try:
            with _connect(endpoint) as conn:
                row = conn.execute("SELECT c1 FROM bench_wide_enc ORDER BY id LIMIT 1").fetchone()
        except psycopg.Error as exc:
            raise BenchError(f"cannot read bench_wide_enc as {role} through {target.name}: {exc}") from None
        value = None if row is None else row[0]
        ok = value is None if expected == "hidden" else isinstance(value, str) and "*" in value
        if not ok:
            raise BenchError(f"{role} through {target.name} does not see bench_wide_enc {expected}")

    return check


def async_endpoint(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` logged in as the async-commit role."""
    return dataclasses.replace(endpoint, user=ASYNC_COMMIT_ROLE, password=ASYNC_COMMIT_PASSWORD)


def check_async_commit(ctx: BenchContext, target: Target) -> None:
    """The server, asked through ``target`` as the async-commit role, must say ``synchronous_commit`` is
    off: otherwise the row would be labelled CPU-bound and measure the disk."""
    try:
        with _connect(async_endpoint(target.endpoint)) as conn:
            row = conn.execute("SHOW synchronous_commit").fetchone()
    except psycopg.Error as exc:
        raise BenchError(f"cannot ask the server through {target.name}: {type(exc).__name__}: {exc}") from None
    value = str(row[0]) if row else "(no answer)"
    if value != "off":
        raise BenchError(f"synchronous_commit is {value!r}, not 'off', for {ASYNC_COMMIT_ROLE} through {target.name}")


def _iv_args() -> str:
    return f"decode('{PGCRYPTO_KEY_HEX}', 'hex'), decode('{PGCRYPTO_IV_HEX}', 'hex'), 'aes-cbc'"


def setup_pgcrypto_iv(ctx: BenchContext) -> None:
    enc = ", ".join(f"encrypt_iv(convert_to(c{i}, 'UTF8'), {_iv_args()})" for i in range(1, 6))
    _sql(
        ctx.cluster,
        "CREATE EXTENSION IF NOT EXISTS pgcrypto;"
        "DROP TABLE IF EXISTS bench_wide_pgcrypto_iv;"
        "CREATE TABLE bench_wide_pgcrypto_iv (id int PRIMARY KEY,"
        " c1 bytea, c2 bytea, c3 bytea, c4 bytea, c5 bytea);"
        f"INSERT INTO bench_wide_pgcrypto_iv SELECT id, {enc} FROM bench_wide;",
        "VACUUM ANALYZE bench_wide_pgcrypto_iv;",
    )


def setup_pgcrypto_pgp(ctx: BenchContext) -> None:
    enc = ", ".join(f"pgp_sym_encrypt(c{i}, '{PGP_PASSPHRASE}')" for i in range(1, 6))
    _sql(
        ctx.cluster,
        "CREATE EXTENSION IF NOT EXISTS pgcrypto;"
        "DROP TABLE IF EXISTS bench_wide_pgcrypto_pgp;"
        "CREATE TABLE bench_wide_pgcrypto_pgp (id int PRIMARY KEY,"
        " c1 bytea, c2 bytea, c3 bytea, c4 bytea, c5 bytea);"
        f"INSERT INTO bench_wide_pgcrypto_pgp SELECT id, {enc} FROM bench_wide;",
        "VACUUM ANALYZE bench_wide_pgcrypto_pgp;",
    )


# -- pgbench workloads ---------------------------------------------------------------------------
def _from_pgbench(run: PgbenchRun) -> Measurement:
    notes: list[str] = []
    if run.exit_code != 0:
        notes.append(f"pgbench exit {run.exit_code}")
    if run.summary.aborted_clients:
        notes.append(f"{run.summary.aborted_clients} clients aborted")
    return Measurement(
        transactions=run.summary.transactions,
        failed=max(run.summary.failed, run.failed_in_log),
        tps=run.summary.tps,
        latencies_us=run.latencies_us,
        progress_tps=run.progress_tps,
        note=", ".join(notes),
    )


def builtin_select(mode: str) -> RunFn:
    def run(ctx: BenchContext, target: Target) -> Measurement:
        args = ["-S", "-M", mode, "-c", "8", "-j", "2"]
        return _from_pgbench(run_pgbench(ctx.pgbench, target.endpoint, args, ctx.duration, ctx.workdir))

    return run


def custom_script(
    script_name: str,
    sql: str,
    *,
    clients: int = 2,
    mode: str = "prepared",
    defines: Sequence[str] = (),
    async_commit: bool = False,
    login: str | None = None,
) -> RunFn:
    """pgbench running ``sql`` as its script; ``async_commit`` logs in as the async-commit role,
    ``login`` as that visibility role (see :data:`bench.targets.MASKED_ROLE`)."""

    def run(ctx: BenchContext, target: Target) -> Measurement:
        script = ctx.workdir / "scripts" / f"{script_name}.sql"
        script.parent.mkdir(exist_ok=True)
        script.write_text(sql + "\n")
        args = ["-f", str(script), "-M", mode, "-c", str(clients), "-j", str(min(clients, 2))]
        for define in defines:
            args += ["-D", define]
        endpoint = async_endpoint(target.endpoint) if async_commit else target.endpoint
        if login is not None:
            endpoint = dataclasses.replace(endpoint, user=login, password=VISIBILITY_PASSWORD)
        return _from_pgbench(run_pgbench(ctx.pgbench, endpoint, args, ctx.duration, ctx.workdir))

    return run


WIDE_SQL = "SELECT id, c1, c2, c3, c4, c5 FROM bench_wide;"
WIDE_ENCRYPTED_SQL = "SELECT id, c1, c2, c3, c4, c5 FROM bench_wide_enc;"
INSERT_SQL = "INSERT INTO bench_ins (c1, c2, c3, c4, c5) VALUES (:txt, :txt, :txt, :txt, :txt);"
INSERT_ENCRYPTED_SQL = "INSERT INTO bench_ins_enc (c1, c2, c3, c4, c5) VALUES (:txt, :txt, :txt, :txt, :txt);"
INSERT_TEXT = "txt=abcdefghijklmnopqrst"
# The server's share of insert-encrypted: what pgveil sends for a 20-byte value (a 68-byte envelope: v1
# prefix, then 64 bytes standing for key id, nonce, ciphertext and tag; the CHECK looks at the prefix and
# the length only), as bytea hex text, straight to the server.
INSERT_ENVELOPES_SQL = "INSERT INTO bench_ins_enc (c1, c2, c3, c4, c5) VALUES (:env, :env, :env, :env, :env);"
INSERT_ENVELOPES_DOMAIN_SQL = INSERT_ENVELOPES_SQL.replace("bench_ins_enc", "bench_ins_dom")
INSERT_ENVELOPE = "env=\\x50560101" + "a5" * 64
PGCRYPTO_IV_SQL = (
    "SELECT id, "
    + ", ".join(f"convert_from(decrypt_iv(c{i}, {_iv_args()}), 'UTF8') AS c{i}" for i in range(1, 6))
    + " FROM bench_wide_pgcrypto_iv;"
)
PGCRYPTO_PGP_SQL = (
    "SELECT id, "
    + ", ".join(f"pgp_sym_decrypt(c{i}, '{PGP_PASSPHRASE}') AS c{i}" for i in range(1, 6))
    + " FROM bench_wide_pgcrypto_pgp;"
)


# -- first writes of new data subjects ----------------------------------------------------------------
_SUBJECT_COUNTER = [10_000_000]


def insert_subject(*, new: bool) -> RunFn:
    """One client inserting single rows into bench_ins_subj for ``ctx.duration`` seconds, each for a new
    data subject (``new``: pgveil creates, wraps and stores its key first) or for the one existing subject
    (its key is cached): the first-write cost of a subject is the latency difference."""

    def run(ctx: BenchContext, target: Target) -> Measurement:
        latencies: list[int] = []
        failed = 0
        with _connect(target.endpoint) as conn:
            conn.autocommit = True
            conn.execute("INSERT INTO bench_ins_subj (subject, c1) VALUES (%s, %s)", (EXISTING_SUBJECT, "warm"))
            started = time.perf_counter()
            while time.perf_counter() - started < ctx.duration:
                if new:
                    _SUBJECT_COUNTER[0] += 1
                    subject = _SUBJECT_COUNTER[0]
                else:
                    subject = EXISTING_SUBJECT
                t0 = time.perf_counter_ns()
                try:
                    conn.execute("INSERT INTO bench_ins_subj (subject, c1) VALUES (%s, %s)", (subject, "abcdefghij"))
                except psycopg.Error:
                    failed += 1
                    continue
                latencies.append((time.perf_counter_ns() - t0) // 1000)
            elapsed = time.perf_counter() - started
        return Measurement(
            transactions=len(latencies), failed=failed, tps=len(latencies) / elapsed, latencies_us=tuple(latencies)
        )

    return run


# -- idle memory ---------------------------------------------------------------------------------
def _client_backends(cluster: DevCluster) -> int:
    out = _sql(cluster, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
    return int(out.strip())


async def _hold_idle(endpoint: Endpoint, count: int, measure: Callable[[], int]) -> tuple[int, int, str]:
    """Opens ``count`` connections, holds them idle, and calls ``measure`` while they are open.

    Returns (connections opened, measured value, first error or "").
    """
    import asyncpg

    gate = asyncio.Semaphore(IDLE_CONNECT_CONCURRENCY)
    conns: list[Any] = []

    async def connect() -> None:
        async with gate:
            conn = await asyncpg.connect(
                host=endpoint.host,
                port=endpoint.port,
                user=endpoint.user,
                password=endpoint.password,
                database=endpoint.dbname,
                ssl=False,
                timeout=30,
            )
            conns.append(conn)
            # An application's pooled connection has run queries; a session-mode pooler only binds a
            # server connection at the first one, so without it the pooler would be measured half-empty.
            await conn.fetchval("SELECT 1", timeout=30)

    try:
        results = await asyncio.gather(*(connect() for _ in range(count)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        first_error = f"{type(errors[0]).__name__}: {errors[0]}" if errors else ""
        await asyncio.sleep(IDLE_HOLD_S)
        value = measure()
        return len(conns), value, first_error
    finally:
        await asyncio.gather(*(c.close(timeout=5) for c in conns), return_exceptions=True)


def _wait_for_drain(cluster: DevCluster, limit: int) -> None:
    """Waits until a pooling middleman has closed the server connections idle-memory made it open."""
    deadline = time.monotonic() + BACKEND_DRAIN_TIMEOUT_S
    while _client_backends(cluster) > limit:
        if time.monotonic() > deadline:
            log.warning("server connections did not drain to %d within %.0f s", limit, BACKEND_DRAIN_TIMEOUT_S)
            return
        time.sleep(0.5)


def run_idle_memory(ctx: BenchContext, target: Target) -> Measurement:
    if not target.middleman_pids():
        return Measurement()
    backends_before = _client_backends(ctx.cluster)
    before = rss_kib(target.middleman_pids())
    try:
        opened, during, error = asyncio.run(
            _hold_idle(target.endpoint, ctx.idle_connections, lambda: rss_kib(target.middleman_pids()))
        )
    finally:
        _wait_for_drain(ctx.cluster, backends_before + 10)
    if opened == 0:
        raise BenchError(f"no idle connection could be opened through {target.name}: {error}")
    note = f"RSS {before} -> {during} KiB with {opened} connections"
    if opened < ctx.idle_connections:
        note += f"; only {opened} of {ctx.idle_connections} connected ({error})"
    return Measurement(idle_kib_per_conn=(during - before) / opened, note=note)


# -- the registry --------------------------------------------------------------------------------
WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "pgbench-S-simple",
        "pgbench -S (select-only), simple query protocol, 8 clients",
        PLAIN_TARGETS,
        builtin_select("simple"),
        setup=(setup_pgbench_tables,),
    ),
    Workload(
        "pgbench-S-extended",
        "pgbench -S, extended protocol with unnamed statements, 8 clients",
        PLAIN_TARGETS,
        builtin_select("extended"),
        setup=(setup_pgbench_tables,),
    ),
    Workload(
        "pgbench-S-prepared",
        "pgbench -S, named prepared statements, 8 clients",
        PLAIN_TARGETS,
        builtin_select("prepared"),
        setup=(setup_pgbench_tables,),
    ),
    Workload(
        "wide-fetch",
        f"all {WIDE_ROWS} rows of bench_wide (5 text columns of 20 chars) per transaction, 2 clients"
        " (on pgveil-encrypted: an unprotected table under the full statement model)",
        PLAIN_TABLE_TARGETS,
        custom_script("wide-fetch", WIDE_SQL),
        setup=(setup_wide, setup_encrypted),
        rows_per_tx=WIDE_ROWS,
    ),
    Workload(
        "wide-fetch-encrypted",
        f"wide-fetch of bench_wide_enc: the same {WIDE_ROWS} rows, 5 columns encrypted, decrypted by pgveil",
        (*ENCRYPTED_TARGETS, "pgveil-encrypted-evp"),
        custom_script("wide-fetch-encrypted", WIDE_ENCRYPTED_SQL),
        setup=(setup_wide, setup_encrypted),
        baseline=("wide-fetch", "direct"),
        rows_per_tx=WIDE_ROWS,
    ),
    Workload(
        "wide-fetch-subjects",
        f"wide-fetch-encrypted of bench_wide_subj: {WIDE_ROWS} rows of {WIDE_ROWS} distinct data subjects, each"
        " with its own key (per-subject keys), the subject column in the result (each value's key checked"
        " against it); its ratio is over the same fetch with one key per column",
        ("pgveil-encrypted", "pgveil-encrypted-py"),
        custom_script("wide-fetch-subjects", "SELECT id, c1, c2, c3, c4, c5 FROM bench_wide_subj;"),
        setup=(setup_wide, setup_encrypted),
        baseline=("wide-fetch-encrypted", "pgveil-encrypted"),
        rows_per_tx=WIDE_ROWS,
    ),
    Workload(
        "wide-fetch-subjects-noid",
        "wide-fetch-subjects without the subject column in the result (keys found by the envelope's key"
        " id alone); its ratio is over the same fetch with one key per column",
        ("pgveil-encrypted", "pgveil-encrypted-py"),
        custom_script("wide-fetch-subjects-noid", "SELECT c1, c2, c3, c4, c5 FROM bench_wide_subj;"),
        setup=(setup_wide, setup_encrypted),
        baseline=("wide-fetch-encrypted", "pgveil-encrypted"),
        rows_per_tx=WIDE_ROWS,
    ),
    Workload(
        "insert-subject-existing",
        "single-row INSERT (autocommit, one client) into bench_ins_subj for a data subject whose key exists",
        ("pgveil-encrypted",),
        insert_subject(new=False),
        setup=(setup_wide, setup_encrypted),
        baseline=("insert-subject-existing", "pgveil-encrypted"),
    ),
    Workload(
        "insert-subject-new",
        "insert-subject-existing, each row for a new data subject: pgveil creates its key first (random DEK,"
        " wrapped by the KEK, INSERT ... ON CONFLICT DO NOTHING into the keystore); ratio over existing",
        ("pgveil-encrypted",),
        insert_subject(new=True),
        setup=(setup_wide, setup_encrypted),
        baseline=("insert-subject-existing", "pgveil-encrypted"),
    ),
    Workload(
        "wide-fetch-masked",
        "wide-fetch-encrypted as a role whose policy masks the 5 columns (masked:partial): decrypted, then"
        " masked by pgveil; its ratio is over the plaintext role's wide-fetch-encrypted on the same target",
        ("pgveil-encrypted", "pgveil-encrypted-py"),
        custom_script("wide-fetch-masked", WIDE_ENCRYPTED_SQL, login=MASKED_ROLE),
        setup=(setup_wide, setup_encrypted, setup_visibility_roles),
        baseline=("wide-fetch-encrypted", "pgveil-encrypted"),
        rows_per_tx=WIDE_ROWS,
        check=check_visibility(MASKED_ROLE, "masked"),
    ),
    Workload(
        "wide-fetch-hidden",
        "wide-fetch-encrypted as a role whose policy hides the 5 columns (NULL, nothing decrypted); its"
        " ratio is over wide-fetch of the unprotected table through the same target",
        ("pgveil-encrypted", "pgveil-encrypted-py"),
        custom_script("wide-fetch-hidden", WIDE_ENCRYPTED_SQL, login=HIDDEN_ROLE),
        setup=(setup_wide, setup_encrypted, setup_visibility_roles),
        baseline=("wide-fetch", "pgveil-encrypted"),
        rows_per_tx=WIDE_ROWS,
        check=check_visibility(HIDDEN_ROLE, "hidden"),
    ),
    Workload(
        "wide-fetch-restricted",
        "wide-fetch of the unprotected table as the masking role: its 5 text columns are unattributed, so"
        " pgveil screens each value for envelopes (a role that may not see some encrypted column); its"
        " ratio is over the plaintext role's wide-fetch on the same target",
        ("pgveil-encrypted", "pgveil-encrypted-py"),
        custom_script("wide-fetch-restricted", WIDE_SQL, login=MASKED_ROLE),
        setup=(setup_wide, setup_encrypted, setup_visibility_roles),
        baseline=("wide-fetch", "pgveil-encrypted"),
        rows_per_tx=WIDE_ROWS,
    ),
    Workload(
        "insert-single",
        "single-row INSERT of 5 text parameters into bench_ins, one per transaction, 2 clients, durable"
        " commits (each waits for its WAL flush, as in production); on pgveil-encrypted: an unprotected"
        " table under the full statement model",
        PLAIN_TABLE_TARGETS,
        custom_script("insert-single", INSERT_SQL, defines=(INSERT_TEXT,)),
        setup=(setup_insert, setup_wide, setup_encrypted),
        before_run=truncate_insert,
    ),
    Workload(
        "insert-encrypted",
        "the issue's workload: insert-single into bench_ins_enc, the 5 parameters encrypted by pgveil,"
        " durable commits; its ratio is encrypted through pgveil over plaintext on a direct connection",
        ENCRYPTED_TARGETS,
        custom_script("insert-encrypted", INSERT_ENCRYPTED_SQL, defines=(INSERT_TEXT,)),
        setup=(setup_insert, setup_wide, setup_encrypted),
        before_run=truncate_insert_encrypted,
        baseline=("insert-single", "direct"),
    ),
    Workload(
        "insert-single-async",
        "CPU-bound view, not production durability: insert-single with synchronous_commit=off for its"
        f" sessions (login role {ASYNC_COMMIT_ROLE}), so commits do not wait for the disk",
        PLAIN_TABLE_TARGETS,
        custom_script("insert-single-async", INSERT_SQL, defines=(INSERT_TEXT,), async_commit=True),
        setup=(setup_insert, setup_wide, setup_encrypted, setup_async_role),
        before_run=truncate_insert,
        check=check_async_commit,
    ),
    Workload(
        "insert-encrypted-async",
        "CPU-bound view, not production durability: insert-encrypted with synchronous_commit=off for its"
        f" sessions (login role {ASYNC_COMMIT_ROLE})",
        ENCRYPTED_TARGETS,
        custom_script("insert-encrypted-async", INSERT_ENCRYPTED_SQL, defines=(INSERT_TEXT,), async_commit=True),
        setup=(setup_insert, setup_wide, setup_encrypted, setup_async_role),
        before_run=truncate_insert_encrypted,
        baseline=("insert-single-async", "direct"),
        check=check_async_commit,
    ),
    Workload(
        "insert-envelopes-async",
        "the server's share of insert-encrypted-async: five 68-byte envelopes (bytea hex text) into"
        " bench_ins_enc, with its envelope CHECK constraints, straight to the server; its ratio is over"
        " insert-single-async on direct",
        ("direct",),
        custom_script("insert-envelopes-async", INSERT_ENVELOPES_SQL, defines=(INSERT_ENVELOPE,), async_commit=True),
        setup=(setup_insert, setup_wide, setup_encrypted, setup_async_role),
        before_run=truncate_insert_encrypted,
        baseline=("insert-single-async", "direct"),
        check=check_async_commit,
    ),
    Workload(
        "insert-envelopes-domain-async",
        "insert-envelopes-async into bench_ins_dom, whose columns are a domain over bytea with the same"
        " envelope check in place of the CHECK constraints; its ratio is over insert-single-async on direct",
        ("direct",),
        custom_script(
            "insert-envelopes-domain-async", INSERT_ENVELOPES_DOMAIN_SQL, defines=(INSERT_ENVELOPE,), async_commit=True
        ),
        setup=(setup_insert, setup_wide, setup_encrypted, setup_async_role, setup_envelope_domain),
        before_run=truncate_insert_domain,
        baseline=("insert-single-async", "direct"),
        check=check_async_commit,
    ),
    Workload(
        "idle-memory",
        "middleman RSS per idle client connection (--idle-connections asyncpg connections, default 500,"
        " one SELECT 1 each, held 1 s)",
        PLAIN_TARGETS,
        run_idle_memory,
        # Allocators keep what earlier workloads used, which would hide the growth being measured.
        fresh_target=True,
    ),
    Workload(
        "wide-fetch-pgcrypto-decrypt_iv",
        "wide-fetch decrypting 5 bytea columns with pgcrypto decrypt_iv (AES-CBC) in the server",
        ("direct",),
        custom_script("wide-fetch-pgcrypto-decrypt_iv", PGCRYPTO_IV_SQL),
        setup=(setup_wide, setup_pgcrypto_iv),
        baseline=("wide-fetch", "direct"),
        rows_per_tx=WIDE_ROWS,
    ),
    Workload(
        "wide-fetch-pgcrypto-pgp_sym",
        "wide-fetch decrypting 5 bytea columns with pgcrypto pgp_sym_decrypt in the server",
        ("direct",),
        custom_script("wide-fetch-pgcrypto-pgp_sym", PGCRYPTO_PGP_SQL),
        setup=(setup_wide, setup_pgcrypto_pgp),
        baseline=("wide-fetch", "direct"),
        rows_per_tx=WIDE_ROWS,
        # Seconds per transaction: one round gives a handful of transactions, more add little.
        max_rounds=1,
    ),
)


def select_workloads(names: Sequence[str] | None) -> list[Workload]:
    """The registry in its order, restricted to ``names`` and the workloads their ratios divide by (a
    ratio only means something within one run); unknown names are an error."""
    if not names:
        return list(WORKLOADS)
    known = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(known)}")
    wanted = set(names)
    for name in names:
        base = known[name].ratio_baseline[0]
        if base not in wanted:
            log.info("also running %s: %s's ratio divides by it", base, name)
            wanted.add(base)
    return [w for w in WORKLOADS if w.name in wanted]
