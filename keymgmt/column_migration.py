"""Column migrations: a live plaintext column to an encrypted ``bytea`` column (``pgveil encrypt``), and
back (``pgveil decrypt``), online, resumable, every step a transaction.

This module owns the job's phases and the SQL they run in the application's database. It does not know
the proxy's configuration or its type codecs: the table, its primary key, the column, its declared type
and the envelope CHECK come in as a :class:`MigrationTarget`, and the per-type conversion between a
value's text form and the canonical plaintext that is sealed comes in as :class:`Converters` (the CLI
builds them from ``proxy.pgtypes``). It never logs values, plaintext or keys.

Theory of operation (``encrypt``; ``decrypt`` is the mirror image)::

    setup      one transaction: a shadow column (bytea) with the envelope CHECK (NOT VALID, then validated
               in its own statement, which does not block writes), and a row trigger that sets the shadow to
               NULL on every INSERT and whenever an UPDATE changes the source column. The job row goes to
               phase backfill.
    backfill   passes over the table in primary-key order (keyset pagination), a batch per transaction:
               rows whose shadow is NULL and source is not are read (source as text), each value is turned
               into its canonical plaintext and sealed under the column's current data key with the
               column's associated data, and written with a compare-and-set:
                   UPDATE t SET shadow = u.new ... WHERE t.pk = u.pk AND t.shadow IS NULL
                                                    AND t.source::text = u.old
               A row the application changed after the batch read it does not match and is left for a
               later pass (counted as skipped); a row it changes after the batch wrote it gets its shadow
               cleared by the trigger, so the next pass encrypts the new value. A pass that leaves at most
               a batch of rows to do (or the 20th pass) leads to the swap.
    swap       one transaction, under ACCESS EXCLUSIVE on the table (taken with a lock timeout, retried,
               so the job never queues the application behind it for long): the last rows are encrypted
               (no write can race now), an exact count is taken (every non-NULL source has its envelope),
               the trigger and its function are dropped, the source column is dropped, the shadow renamed
               to the column's name (its CHECK, ``pgveil_envelope_<column>``, follows it), NOT NULL and
               the column comment carried over, and ``pgveil_catalog`` is notified with the table's name
               (delivered at commit: every pgveil instance re-reads its catalog, and statements naming the
               table wait for that). The job row is done in the same transaction when the keystore shares
               the database.

Refusals, before anything is changed and again under the swap's lock: no primary key, the column in the
primary key, partitions or inheritance, a default, an identity or generated column, column privileges,
and any object depending on the column (views, indexes, constraints, triggers with a column list,
policies, statistics, sequences, generated columns): dropping the column would drop or break them, so
the job names them and changes nothing. The column ends up as the table's last column.

Crash safety: each phase and batch is one transaction; the claim (an advisory lock, see
:mod:`keymgmt.jobs`) dies with the runner's connection. Running the command again resumes from the last
committed batch; a swap that committed while its job row (in another database) did not is recognised
from the table itself.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from keymgmt.envelope import DataKey, KeyState, OpenFailed, column_associated_data, seal
from keymgmt.errors import KeyManagementError, UnknownKey
from keymgmt.jobs import JobError, JobRunner, JobState, JobStatus, Throttle, job_status
from keymgmt.keystore import Keystore
from keymgmt.rotation import KeyColumn, primary_key_of, quote_ident

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 2000
DEFAULT_THROTTLE = 0  # rows per second; 0: as fast as the database allows
MAX_PASSES = 20
CATALOG_CHANNEL = "pgveil_catalog"  # proxy.schema's channel; keymgmt must not import the proxy
SWAP_LOCK_TIMEOUT_MS = 2000
SWAP_ATTEMPTS = 30
_POLL_SECONDS = 0.5
_MAX_IDENTIFIER = 63
# The session settings under which values are read and written as text: what the converters expect.
SESSION_SETTINGS = (
    ("DateStyle", "ISO, MDY"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
)


class MigrationError(KeyManagementError):
    """A migration that cannot start or go on as asked; the message names the column and why."""

    sqlstate = "55000"


class Direction(enum.StrEnum):
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"


class Phase(enum.StrEnum):
    SETUP = "setup"
    BACKFILL = "backfill"
    SWAPPED = "swapped"


@dataclass(frozen=True, slots=True)
class Converters:
    """Between a value's text form (as PostgreSQL writes it under :data:`SESSION_SETTINGS`) and its
    canonical plaintext. Each raises ``ValueError`` for a value it cannot convert (never with the value
    in the message)."""

    to_canonical: Callable[[str], bytes]
    from_canonical: Callable[[bytes], str]


def short_name(prefix: str, column: str) -> str:
    """``prefix + column``, shortened with a hash where PostgreSQL would truncate it."""
    name = prefix + column
    if len(name.encode()) <= _MAX_IDENTIFIER:
        return name
    digest = hashlib.sha256(column.encode()).hexdigest()[:8]
    room = _MAX_IDENTIFIER - len(prefix) - 1 - len(digest)
    return f"{prefix}{column.encode()[:room].decode(errors='ignore')}_{digest}"


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """One column to migrate. ``declared_type`` is a valid SQL type name (the plain column's type);
    ``check_name`` and ``check_sql`` are the envelope CHECK (``check_sql`` spelled over ``{col}``)."""

    direction: Direction
    schema: str
    table: str
    column: str
    declared_type: str
    primary_key: tuple[KeyColumn, ...]
    check_name: str
    check_sql: str
    column_id: str = ""

    def __post_init__(self) -> None:
        if not self.column_id:
            object.__setattr__(self, "column_id", f"{self.schema}.{self.table}.{self.column}")

    @property
    def shadow(self) -> str:
        return short_name("pgveil_mig_", self.column)

    @property
    def temp_check(self) -> str:
        """The envelope CHECK's name while it sits on the shadow column (renamed at the swap)."""
        return short_name("pgveil_envmig_", self.column)

    @property
    def trigger(self) -> str:
        return short_name("pgveil_migrate_", self.column)

    @property
    def function(self) -> str:
        digest = hashlib.sha256(self.column_id.encode()).hexdigest()[:16]
        return f"pgveil.{quote_ident('migrate_' + digest)}"

    @property
    def sql_table(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction.value,
            "schema": self.schema,
            "table": self.table,
            "column": self.column,
            "declared_type": self.declared_type,
            "primary_key": [[k.name, k.sql_type] for k in self.primary_key],
            "check_name": self.check_name,
            "check_sql": self.check_sql,
            "column_id": self.column_id,
        }

    @classmethod
    def from_json(cls, data: Any) -> MigrationTarget:
        if isinstance(data, str):
            data = json.loads(data)
        return cls(
            direction=Direction(data["direction"]),
            schema=data["schema"],
            table=data["table"],
            column=data["column"],
            declared_type=data["declared_type"],
            primary_key=tuple(KeyColumn(n, t) for n, t in data["primary_key"]),
            check_name=data["check_name"],
            check_sql=data["check_sql"],
            column_id=data["column_id"],
        )


# -- SQL, built from the target (pure) ---------------------------------------------------------------------


def trigger_function_sql(target: MigrationTarget) -> str:
    """The row trigger: an INSERT never brings a shadow value, and an UPDATE that changes the source
    column clears it (compared as text in the C collation, so a change of representation counts)."""
    src, shadow = quote_ident(target.column), quote_ident(target.shadow)
    if target.direction is Direction.ENCRYPT:
        changed = f'NEW.{src}::text IS DISTINCT FROM OLD.{src}::text COLLATE "C"'
    else:
        changed = f"NEW.{src} IS DISTINCT FROM OLD.{src}"
    return (
        f"CREATE OR REPLACE FUNCTION {target.function}() RETURNS trigger LANGUAGE plpgsql AS $pgveil$\n"
        "BEGIN\n"
        "    IF TG_OP = 'INSERT' THEN\n"
        f"        NEW.{shadow} := NULL;\n"
        f"    ELSIF {changed} THEN\n"
        f"        NEW.{shadow} := NULL;\n"
        "    END IF;\n"
        "    RETURN NEW;\n"
        "END\n"
        "$pgveil$"
    )


def setup_sql(target: MigrationTarget) -> list[str]:
    table, shadow = target.sql_table, quote_ident(target.shadow)
    steps = ["CREATE SCHEMA IF NOT EXISTS pgveil", trigger_function_sql(target)]
    if target.direction is Direction.ENCRYPT:
        check = target.check_sql.format(col=shadow)
        steps.append(
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {shadow} bytea, "
            f"ADD CONSTRAINT {quote_ident(target.temp_check)} CHECK ({check}) NOT VALID"
        )
    else:
        steps.append(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {shadow} {target.declared_type}")
    steps.append(f"DROP TRIGGER IF EXISTS {quote_ident(target.trigger)} ON {table}")
    steps.append(
        f"CREATE TRIGGER {quote_ident(target.trigger)} BEFORE INSERT OR UPDATE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {target.function}()"
    )
    return steps


def select_batch_sql(target: MigrationTarget, *, after: bool) -> str:
    """The next batch of rows to do: primary key (as text), then the source (text, or the envelope)."""
    pk = target.primary_key
    keys = [f"t.{quote_ident(k.name)}" for k in pk]
    src, shadow = f"t.{quote_ident(target.column)}", f"t.{quote_ident(target.shadow)}"
    value = f"{src}::text" if target.direction is Direction.ENCRYPT else src
    where = [f"{shadow} IS NULL", f"{src} IS NOT NULL"]
    n = 1
    if after:
        rhs = ", ".join(f"${n + i}::text::{k.sql_type}" for i, k in enumerate(pk))
        where.append(f"({', '.join(keys)}) > ({rhs})")
        n += len(pk)
    cols = ", ".join(f"{k}::text" for k in keys)
    return (
        f"SELECT {cols}, {value} FROM {target.sql_table} AS t WHERE {' AND '.join(where)} "  # noqa: S608
        f"ORDER BY {', '.join(keys)} LIMIT ${n}"
    )


def update_batch_sql(target: MigrationTarget) -> str:
    """The compare-and-set write of a batch: one text array per key column, the old values, the new."""
    pk = target.primary_key
    k = len(pk)
    if target.direction is Direction.ENCRYPT:
        old_t, new_t, new = "text[]", "bytea[]", "u.pgveil_new"
        match_old = f't.{quote_ident(target.column)}::text COLLATE "C" = u.pgveil_old'
    else:
        old_t, new_t, new = "bytea[]", "text[]", f"u.pgveil_new::{target.declared_type}"
        match_old = f"t.{quote_ident(target.column)} = u.pgveil_old"
    arrays = ", ".join([f"${i + 1}::text[]" for i in range(k)] + [f"${k + 1}::{old_t}", f"${k + 2}::{new_t}"])
    names = ", ".join([f"k{i}" for i in range(k)] + ["pgveil_old", "pgveil_new"])
    match = " AND ".join(f"t.{quote_ident(c.name)} = u.k{i}::{c.sql_type}" for i, c in enumerate(pk))
    shadow = quote_ident(target.shadow)
    return (
        f"UPDATE {target.sql_table} AS t SET {shadow} = {new} FROM unnest({arrays}) AS u({names}) "  # noqa: S608
        f"WHERE {match} AND t.{shadow} IS NULL AND {match_old}"
    )


def remaining_sql(target: MigrationTarget) -> str:
    src, shadow = quote_ident(target.column), quote_ident(target.shadow)
    return f"SELECT count(*) FROM {target.sql_table} WHERE {shadow} IS NULL AND {src} IS NOT NULL"  # noqa: S608


def counts_sql(target: MigrationTarget) -> str:
    src, shadow = quote_ident(target.column), quote_ident(target.shadow)
    return (
        f"SELECT count({src}) AS source, count({shadow}) AS shadow, "  # noqa: S608
        f"count(*) FILTER (WHERE {shadow} IS NULL AND {src} IS NOT NULL) AS missing, count(*) AS total "
        f"FROM {target.sql_table}"
    )


# -- the database's view of the column -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnState:
    table_oid: int
    attnum: int
    type_name: str  # format_type()
    is_bytea: bool
    not_null: bool
    has_envelope_check: bool
    shadow_exists: bool


_COLUMN_SQL = """
SELECT c.oid AS table_oid, a.attnum, format_type(a.atttypid, a.atttypmod) AS type_name,
       a.atttypid = 'bytea'::regtype AS is_bytea, a.attnotnull AS not_null,
       EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.conname = $4 AND k.contype = 'c')
           AS has_check,
       EXISTS (SELECT 1 FROM pg_attribute s WHERE s.attrelid = c.oid AND s.attname = $5 AND NOT s.attisdropped)
           AS shadow_exists
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $3 AND NOT a.attisdropped AND a.attnum > 0
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
"""


async def column_state(conn: Any, target: MigrationTarget) -> ColumnState | None:
    """The column as the database has it; None if the table is missing. Raises if the column is."""
    row = await conn.fetchrow(_COLUMN_SQL, target.schema, target.table, target.column, target.check_name, target.shadow)
    if row is None:
        return None
    if row["attnum"] is None:
        raise MigrationError(f"column {target.column_id} does not exist")
    return ColumnState(
        row["table_oid"],
        row["attnum"],
        row["type_name"],
        row["is_bytea"],
        row["not_null"],
        row["has_check"],
        row["shadow_exists"],
    )


# Everything that depends on the column (pg_depend, normal and automatic dependencies): dropping the
# column would drop it (indexes, constraints, sequences) or fail (views, generated columns).
_DEPENDENTS_SQL = """
SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) AS what
FROM pg_depend d
WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = $1 AND d.refobjsubid = $2
  AND d.deptype IN ('n', 'a')
  AND NOT (d.classid = 'pg_constraint'::regclass
           AND d.objid IN (SELECT oid FROM pg_constraint WHERE conrelid = $1 AND conname = ANY($3::text[])))
  AND NOT (d.classid = 'pg_class'::regclass AND d.objid = $1)
ORDER BY 1
"""

_TABLE_FACTS_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = $1 OR inhparent = $1) AS family,
       (SELECT relkind::text FROM pg_class WHERE oid = $1) AS relkind,
       a.atthasdef AS has_default, a.attidentity <> '' AS identity, a.attgenerated <> '' AS generated,
       a.attacl IS NOT NULL AS has_acl
FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum = $2
"""


async def refusals(conn: Any, target: MigrationTarget, state: ColumnState) -> list[str]:
    """Why the column cannot be migrated safely (empty: it can)."""
    reasons: list[str] = []
    facts = await conn.fetchrow(_TABLE_FACTS_SQL, state.table_oid, state.attnum)
    if facts["family"] or facts["relkind"] == "p":
        reasons.append(f"{target.qualified_table} has partitions, inheritance children or parents")
    if facts["has_default"]:
        reasons.append(f"column {target.column_id} has a DEFAULT (drop it first)")
    if facts["identity"] or facts["generated"]:
        reasons.append(f"column {target.column_id} is an identity or generated column")
    if facts["has_acl"]:
        reasons.append(f"column {target.column_id} has column-level privileges, which dropping it would lose")
    if any(k.name == target.column for k in target.primary_key):
        reasons.append(f"column {target.column_id} is part of the primary key")
    ours = [target.temp_check] + ([target.check_name] if target.direction is Direction.DECRYPT else [])
    for r in await conn.fetch(_DEPENDENTS_SQL, state.table_oid, state.attnum, ours):
        reasons.append(f"{r['what']} depends on column {target.column_id} (drop it first, re-create it after)")
    return reasons


def _state_refusal(target: MigrationTarget, state: ColumnState) -> str | None:
    """Whether the column is in the state the migration starts from (or, resumed, already left)."""
    if target.direction is Direction.ENCRYPT:
        if state.is_bytea and state.has_envelope_check:
            return f"column {target.column_id} is already encrypted (bytea with pgveil's envelope CHECK)"
    elif not (state.is_bytea and state.has_envelope_check):
        return f"column {target.column_id} is not encrypted ({state.type_name} without pgveil's envelope CHECK)"
    return None


# -- starting ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartedMigration:
    job_id: uuid.UUID
    resumed: bool


async def open_migrations(conn: Any) -> dict[str, Direction]:
    """Columns with an unfinished migration (``conn``: a keystore connection); what the proxy serves as
    still stored the old way until the swap. Empty when the keystore has no such table yet."""
    try:
        rows = await conn.fetch(
            """SELECT column_id, kind FROM pgveil.rotation_jobs
               WHERE kind IN ('encrypt', 'decrypt') AND state IN ('pending', 'running', 'paused')"""
        )
    except Exception as exc:  # an uninitialised keystore: no migrations
        if getattr(exc, "sqlstate", None) in ("42P01", "42703", "3F000", "22P02"):
            return {}
        raise
    return {r["column_id"]: Direction(r["kind"]) for r in rows}


async def start_migration(
    ks_conn: Any,
    data_conn: Any,
    target: MigrationTarget,
    *,
    throttle: int | None = DEFAULT_THROTTLE,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> StartedMigration:
    """Records the migration job (or finds the unfinished one of the same column and direction), after
    checking that the column can be migrated. Changes nothing in the application's database."""
    if batch_size < 1:
        raise ValueError("the batch size must be at least 1")
    open_job = await ks_conn.fetchrow(
        """SELECT job_id, kind FROM pgveil.rotation_jobs
           WHERE column_id = $1 AND kind IN ('encrypt', 'decrypt') AND state IN ('pending', 'running', 'paused')""",
        target.column_id,
    )
    if open_job is not None:
        if open_job["kind"] != target.direction.value:
            raise MigrationError(
                f"column {target.column_id} has an unfinished {open_job['kind']} job {open_job['job_id']}",
                hint="let it finish (run the same command again) or cancel it (pgveil jobs cancel)",
            )
        return StartedMigration(open_job["job_id"], True)
    state = await column_state(data_conn, target)
    if state is None:
        raise MigrationError(f"table {target.qualified_table} does not exist")
    problem = _state_refusal(target, state)
    if problem is not None:
        raise MigrationError(problem)
    if state.shadow_exists:
        raise MigrationError(
            f"{target.qualified_table} already has a column {target.shadow} (left by a cancelled migration?)",
            hint="pgveil encrypt --abort (or decrypt --abort) removes it and the migration trigger",
        )
    reasons = await refusals(data_conn, target, state)
    if reasons:
        raise MigrationError(f"cannot migrate {target.column_id}: " + "; ".join(reasons))
    if await ks_conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pgveil.deks WHERE column_id = $1 AND subject_id IS NOT NULL)", target.column_id
    ):
        raise MigrationError(f"{target.column_id} has per-subject keys: this command migrates column keys only")
    job_id = uuid.uuid4()
    position = {"phase": Phase.SETUP.value, "pass": 1, "after": None, "pass_work": 0}
    await ks_conn.execute(
        """INSERT INTO pgveil.rotation_jobs (job_id, kind, column_id, state, target, position,
               throttle_rows_per_second, batch_size)
           VALUES ($1, $2, $3, 'pending', $4::jsonb, $5::jsonb, $6, $7)""",
        job_id,
        target.direction.value,
        target.column_id,
        json.dumps(target.to_json()),
        json.dumps(position),
        throttle or None,
        batch_size,
    )
    # Instances configured for the target state retry their catalog every two seconds until then; this
    # makes them read it at once.
    await data_conn.execute("SELECT pg_notify($1, '')", CATALOG_CHANNEL)
    log.info("%s job %s of %s recorded", target.direction.value, job_id, target.column_id)
    return StartedMigration(job_id, False)


async def abort_migration(ks_conn: Any, data_conn: Any, target: MigrationTarget) -> uuid.UUID | None:
    """Undoes an unfinished migration of the column: cancels its job (if any) and removes the trigger, its
    function, the shadow column and its CHECK in one transaction, leaving the column as it was. Refuses
    while a runner holds the job (pause or stop it first). Returns the cancelled job's id."""
    row = await ks_conn.fetchrow(
        """SELECT job_id FROM pgveil.rotation_jobs
           WHERE column_id = $1 AND kind IN ('encrypt', 'decrypt') AND state IN ('pending', 'running', 'paused')""",
        target.column_id,
    )
    job_id: uuid.UUID | None = None if row is None else row["job_id"]
    if job_id is not None:
        [status] = await job_status(ks_conn, [job_id])
        if status.active:
            raise MigrationError(
                f"the migration job {job_id} of {target.column_id} is running", hint="stop its command first"
            )
    table = target.sql_table
    async with data_conn.transaction():
        await data_conn.execute(f"SET LOCAL lock_timeout = {SWAP_LOCK_TIMEOUT_MS * 5}")
        await data_conn.execute(f"DROP TRIGGER IF EXISTS {quote_ident(target.trigger)} ON {table}")
        await data_conn.execute(f"DROP FUNCTION IF EXISTS {target.function}()")
        await data_conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {quote_ident(target.temp_check)}")
        await data_conn.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS {quote_ident(target.shadow)}")
        await data_conn.execute("SELECT pg_notify($1, $2)", CATALOG_CHANNEL, target.table)
        if job_id is not None and ks_conn is data_conn:
            await _cancel_row(ks_conn, job_id)
    if job_id is not None and ks_conn is not data_conn:
        await _cancel_row(ks_conn, job_id)
    log.info("migration of %s aborted", target.column_id)
    return job_id


async def _cancel_row(conn: Any, job_id: uuid.UUID) -> None:
    await conn.execute(
        """UPDATE pgveil.rotation_jobs SET state = 'cancelled', last_error = 'aborted by an operator',
               finished_at = now(), updated_at = now() WHERE job_id = $1""",
        job_id,
    )


# -- the job -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchResult:
    scanned: int
    updated: int
    skipped: int
    unreadable: int
    seconds: float


ProgressCallback = Callable[[JobStatus, BatchResult | None], Awaitable[None] | None]


class ColumnMigration(JobRunner):
    """Runs one migration job to its end (or until paused for good, cancelled, or stopped).

    ``keystore_conn`` holds the job's claim and its row; ``data_conn`` works on the table. Pass the same
    connection for both when the keystore is in the application's database (the default): then every
    batch and the swap commit together with their progress, and the counts survive any crash exactly."""

    _label = "migration job"
    _keystore: Keystore
    _unusable_key_errors = (UnknownKey, KeyManagementError)  # a provider that is down: counted, not fatal

    def __init__(
        self,
        keystore: Keystore,
        keystore_conn: Any,
        data_conn: Any,
        job_id: uuid.UUID,
        converters: Converters,
        *,
        throttle: int | None = None,
        batch_size: int | None = None,
        on_progress: ProgressCallback | None = None,
        stop: asyncio.Event | None = None,
        poll_seconds: float = _POLL_SECONDS,
        notify_swap: bool = True,
        before_swap: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(
            keystore, keystore_conn, data_conn, job_id, on_progress=on_progress, poll_seconds=poll_seconds, stop=stop
        )
        self._conv = converters
        self._throttle_override = throttle
        self._batch_override = batch_size
        # Tests switch the swap's notification off, and wait before it, to observe the window after it.
        self._notify_swap = notify_swap
        self._before_swap = before_swap

    @property
    def _same(self) -> bool:
        return self._ks is self._data

    async def _job_row(self) -> Any:
        row = await self._ks.fetchrow(
            """SELECT kind, state, target, position, rows_total, throttle_rows_per_second, batch_size
               FROM pgveil.rotation_jobs WHERE job_id = $1""",
            self.job_id,
        )
        if row is None:
            raise JobError(f"no such job: {self.job_id}")
        return row

    async def _run_claimed(self) -> JobStatus:
        row = await self._job_row()
        if row["kind"] not in (Direction.ENCRYPT.value, Direction.DECRYPT.value):
            raise JobError(f"job {self.job_id} is a {row['kind']} job, not a column migration")
        if JobState(row["state"]).finished:
            return await self._report(None)
        target = MigrationTarget.from_json(row["target"])
        for name, value in SESSION_SETTINGS:
            await self._data.execute("SELECT set_config($1, $2, false)", name, value)
        if self._throttle_override is not None:
            await self._ks.execute(
                "UPDATE pgveil.rotation_jobs SET throttle_rows_per_second = $2 WHERE job_id = $1",
                self.job_id,
                self._throttle_override or None,
            )
        if self._batch_override is not None:
            await self._ks.execute(
                "UPDATE pgveil.rotation_jobs SET batch_size = $2 WHERE job_id = $1", self.job_id, self._batch_override
            )
        await self._ks.execute(
            """UPDATE pgveil.rotation_jobs SET state = 'running', started_at = coalesce(started_at, now()),
                   updated_at = now() WHERE job_id = $1 AND state = 'pending'""",
            self.job_id,
        )
        phase = Phase(_position(row["position"]).get("phase", Phase.SETUP.value))
        db = await column_state(self._data, target)
        if phase is Phase.BACKFILL and db is not None and not db.shadow_exists and _state_refusal(target, db):
            # The swap committed, its job row (in another database) did not: the table says it is done.
            await self._finish(target, {"phase": Phase.SWAPPED.value})
            return await self._report(None)
        associated = column_associated_data(target.column_id)
        throttle = Throttle(None)
        select_first = select_batch_sql(target, after=False)
        select_next = select_batch_sql(target, after=True)
        update = update_batch_sql(target)
        await self._report(None)
        while True:
            if self._stop.is_set():
                return await self._status()
            row = await self._job_row()
            state = JobState(row["state"])
            if state is JobState.PAUSED:
                throttle.reset()
                await self._wait(self._poll)
                continue
            if state.finished:
                return await self._report(None)
            position = _position(row["position"])
            phase = Phase(position.get("phase", Phase.SETUP.value))
            if phase is Phase.SETUP:
                await self._setup(target)
                continue
            if phase is Phase.SWAPPED:  # a swap committed but its job row was not (two databases)
                await self._finish(target, position)
                continue
            throttle.rows_per_second = row["throttle_rows_per_second"]
            batch_size = row["batch_size"] or DEFAULT_BATCH_SIZE
            started = time.perf_counter()
            result = await self._batch(target, associated, position, batch_size, select_first, select_next, update)
            if result is None:
                continue
            status = await self._report(BatchResult(*result, time.perf_counter() - started))
            if status.state.finished:
                return status
            delay = throttle.delay(result[0])
            if delay > 0:
                await self._wait(delay)

    async def _set_position(self, position: dict[str, Any], **fields: Any) -> None:
        sets = ", ".join(f"{k} = ${i + 3}" for i, k in enumerate(fields))
        await self._ks.execute(
            f"UPDATE pgveil.rotation_jobs SET position = $2::jsonb, updated_at = now(){', ' + sets if sets else ''} "  # noqa: S608
            "WHERE job_id = $1",
            self.job_id,
            json.dumps(position),
            *fields.values(),
        )

    async def _setup(self, target: MigrationTarget) -> None:
        state = await column_state(self._data, target)
        if state is None:
            raise MigrationError(f"table {target.qualified_table} does not exist")
        if not state.shadow_exists:
            problem = _state_refusal(target, state)
            if problem is not None:
                raise MigrationError(problem)
        async with self._data.transaction():
            await self._data.execute(f"SET LOCAL lock_timeout = {SWAP_LOCK_TIMEOUT_MS * 5}")
            state = await column_state(self._data, target)
            assert state is not None
            reasons = await refusals(self._data, target, state)
            if reasons:
                raise MigrationError(f"cannot migrate {target.column_id}: " + "; ".join(reasons))
            for sql in setup_sql(target):
                if "ADD CONSTRAINT" in sql and await self._data.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1 AND conname = $2)",
                    state.table_oid,
                    target.temp_check,
                ):
                    sql = sql.split(", ADD CONSTRAINT")[0]
                await self._data.execute(sql)
            position = {"phase": Phase.BACKFILL.value, "pass": 1, "after": None, "pass_work": 0}
            if self._same:
                await self._set_position(position)
            # Delivered at commit, without names (statements go on): every instance reads its catalog
            # again and learns the shadow column, which it governs as the column (proxy.catalog_loader).
            await self._data.execute("SELECT pg_notify($1, '')", CATALOG_CHANNEL)
        if target.direction is Direction.ENCRYPT:
            # Validating scans the table under SHARE UPDATE EXCLUSIVE: reads and writes go on meanwhile.
            await self._data.execute(
                f"ALTER TABLE {target.sql_table} VALIDATE CONSTRAINT {quote_ident(target.temp_check)}"
            )
        total = int(await self._data.fetchval(remaining_sql(target)))
        if not self._same:
            await self._set_position(position)
        await self._ks.execute(
            "UPDATE pgveil.rotation_jobs SET rows_total = $2, rows_remaining = $2, passes = 1 WHERE job_id = $1",
            self.job_id,
            total,
        )
        log.info("migration job %s: %s has its shadow column and trigger", self.job_id, target.column_id)

    async def _write_key(self, target: MigrationTarget) -> DataKey:
        key = await self._keystore.active_key(target.column_id)
        if key.state is not KeyState.ENABLED or key.column_id != target.column_id:
            raise MigrationError(f"the data key of {target.column_id} is not enabled")
        return key

    async def _convert(
        self, target: MigrationTarget, associated: bytes, rows: Sequence[Any]
    ) -> tuple[list[list[str]], list[Any], list[Any], int]:
        """(key columns, old values, new values, values that could not be converted) of a batch."""
        width = len(target.primary_key)
        keys: list[list[str]] = [[] for _ in range(width)]
        old: list[Any] = []
        new: list[Any] = []
        unreadable = 0
        if target.direction is Direction.ENCRYPT:
            key = await self._write_key(target)
            to_canonical = self._conv.to_canonical
            for r in rows:
                try:
                    canonical = to_canonical(r[width])
                except ValueError:
                    unreadable += 1
                    continue
                for i in range(width):
                    keys[i].append(r[i])
                old.append(r[width])
                new.append(seal(key, canonical, associated))
        else:
            envelopes = [bytes(r[width]) for r in rows]
            opener = await self._opener_for(envelopes)
            from_canonical = self._conv.from_canonical
            for r, envelope in zip(rows, envelopes, strict=True):
                try:
                    text = from_canonical(opener.open(envelope, 0, len(envelope), associated))
                except (OpenFailed, ValueError):
                    unreadable += 1
                    continue
                for i in range(width):
                    keys[i].append(r[i])
                old.append(envelope)
                new.append(text)
        return keys, old, new, unreadable

    async def _batch(
        self,
        target: MigrationTarget,
        associated: bytes,
        position: dict[str, Any],
        batch_size: int,
        select_first: str,
        select_next: str,
        update: str,
    ) -> tuple[int, int, int, int] | None:
        async with self._data.transaction():
            row = await self._ks.fetchrow(
                "SELECT state, position FROM pgveil.rotation_jobs WHERE job_id = $1"  # noqa: S608 - constants
                + (" FOR UPDATE" if self._same else ""),
                self.job_id,
            )
            if row is None or JobState(row["state"]) is not JobState.RUNNING:
                return None
            position = _position(row["position"])
            after = position.get("after")
            if after is None:
                rows = await self._data.fetch(select_first, batch_size)
            else:
                rows = await self._data.fetch(select_next, *after, batch_size)
            keys, old, new, unreadable = await self._convert(target, associated, rows)
            updated = 0
            if old:
                status = await self._data.execute(update, *keys, old, new)
                updated = int(status.rsplit(" ", 1)[1])
            skipped = len(old) - updated
            width = len(target.primary_key)
            pass_no = int(position.get("pass", 1))
            new_position = dict(position)
            new_position["pass_work"] = int(position.get("pass_work", 0)) + updated
            new_position["pass_unreadable"] = int(position.get("pass_unreadable", 0)) + unreadable
            remaining: int | None = None
            if len(rows) == batch_size:
                new_position["after"] = [rows[-1][i] for i in range(width)]
            else:
                remaining = int(await self._data.fetchval(remaining_sql(target)))
                # A pass ends: the swap when at most a batch is left (or after MAX_PASSES), else one more.
                new_position.update({"after": None, "pass": pass_no + 1, "pass_work": 0, "pass_unreadable": 0})
                new_position["swap"] = remaining <= batch_size or pass_no >= MAX_PASSES
            progress = (updated, skipped, unreadable, remaining, new_position)
            if self._same:
                await self._progress(*progress)
        if not self._same:
            await self._progress(*progress)
        if new_position.get("swap"):
            await self._swap(target, associated, new_position, batch_size)
        return len(rows), updated, skipped, unreadable

    async def _progress(
        self, updated: int, skipped: int, unreadable: int, remaining: int | None, position: dict[str, Any]
    ) -> None:
        await self._ks.execute(
            """UPDATE pgveil.rotation_jobs SET position = $2::jsonb, rows_done = rows_done + $3,
                   rows_skipped = rows_skipped + $4, rows_unreadable = rows_unreadable + $5,
                   passes = $6,
                   rows_remaining = coalesce($7::bigint, GREATEST(coalesce(rows_remaining, 0) - $3, 0)),
                   updated_at = now()
               WHERE job_id = $1""",
            self.job_id,
            json.dumps(position),
            updated,
            skipped,
            unreadable,
            int(position.get("pass", 1)),
            remaining,
        )

    async def _swap(self, target: MigrationTarget, associated: bytes, position: dict[str, Any], batch: int) -> None:
        """The last rows, the exact count, and the column exchange, in one transaction under the lock."""
        if self._before_swap is not None:
            await self._before_swap()
        for attempt in range(SWAP_ATTEMPTS):
            try:
                await self._swap_once(target, associated, position, batch)
                return
            except _Unfinished as exc:
                await self._ks.execute(
                    """UPDATE pgveil.rotation_jobs SET state = 'failed', last_error = $2, finished_at = now(),
                           updated_at = now() WHERE job_id = $1""",
                    self.job_id,
                    exc.message,
                )
                log.warning("migration job %s failed: %s", self.job_id, exc.message)
                return
            except Exception as exc:
                if getattr(exc, "sqlstate", None) != "55P03" or attempt + 1 == SWAP_ATTEMPTS:
                    raise
                log.info("migration job %s: the table is busy; retrying the swap", self.job_id)
                await self._wait(0.5 + 0.1 * attempt)
                if self._stop.is_set():
                    return
        raise MigrationError(f"could not lock {target.qualified_table} for the swap")

    async def _swap_once(
        self, target: MigrationTarget, associated: bytes, position: dict[str, Any], batch: int
    ) -> None:
        table = target.sql_table
        src, shadow = quote_ident(target.column), quote_ident(target.shadow)
        caught_up = 0
        async with self._data.transaction():
            await self._data.execute(f"SET LOCAL lock_timeout = {SWAP_LOCK_TIMEOUT_MS}")
            await self._data.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            locked = time.perf_counter()
            if self._same:
                row = await self._ks.fetchrow(
                    "SELECT state FROM pgveil.rotation_jobs WHERE job_id = $1 FOR UPDATE", self.job_id
                )
                if JobState(row["state"]) is not JobState.RUNNING:
                    return
            state = await column_state(self._data, target)
            assert state is not None
            reasons = await refusals(self._data, target, state)
            if reasons:
                raise MigrationError(f"cannot swap {target.column_id}: " + "; ".join(reasons))
            select = select_batch_sql(target, after=False)
            update = update_batch_sql(target)
            unreadable = 0
            while True:  # no write can race now: the last rows, without a keyset
                rows = await self._data.fetch(select, batch)
                keys, old, new, bad = await self._convert(target, associated, rows)
                unreadable += bad
                if old:
                    status = await self._data.execute(update, *keys, old, new)
                    caught_up += int(status.rsplit(" ", 1)[1])
                if len(rows) < batch or not old:
                    break
            counts = await self._data.fetchrow(counts_sql(target))
            if counts["missing"] or counts["source"] != counts["shadow"]:
                raise _Unfinished(
                    f"{counts['missing']} value(s) of {target.column_id} could not be "
                    + ("encrypted" if target.direction is Direction.ENCRYPT else "decrypted")
                    + " (not valid for the declared type, or tampered or under a destroyed key); nothing was swapped"
                )
            comment = await self._data.fetchval("SELECT col_description($1, $2)", state.table_oid, state.attnum)
            await self._data.execute(f"DROP TRIGGER {quote_ident(target.trigger)} ON {table}")
            await self._data.execute(f"DROP FUNCTION {target.function}()")
            await self._data.execute(f"ALTER TABLE {table} DROP COLUMN {src}")
            await self._data.execute(f"ALTER TABLE {table} RENAME COLUMN {shadow} TO {src}")
            if target.direction is Direction.ENCRYPT:
                await self._data.execute(
                    f"ALTER TABLE {table} RENAME CONSTRAINT {quote_ident(target.temp_check)} "
                    f"TO {quote_ident(target.check_name)}"
                )
            if state.not_null:
                await self._data.execute(f"ALTER TABLE {table} ALTER COLUMN {src} SET NOT NULL")
            if comment is not None:
                await self._data.execute(f"COMMENT ON COLUMN {table}.{src} IS {_literal(comment)}")
            if self._notify_swap:
                await self._data.execute("SELECT pg_notify($1, $2)", CATALOG_CHANNEL, target.table)
            final = dict(position)
            final.update(
                {
                    "phase": Phase.SWAPPED.value,
                    "values": int(counts["shadow"]),
                    "rows": int(counts["total"]),
                    "caught_up_under_lock": caught_up,
                    # how long the table was locked, up to the commit (the commit itself not included)
                    "lock_seconds": round(time.perf_counter() - locked, 4),
                }
            )
            if self._same:
                await self._finish(target, final, caught_up)
        if not self._same:
            await self._finish(target, final, caught_up)
        log.info(
            "migration job %s: %s swapped (%d values %s)",
            self.job_id,
            target.column_id,
            final["values"],
            "encrypted" if target.direction is Direction.ENCRYPT else "decrypted",
        )

    async def _finish(self, target: MigrationTarget, position: dict[str, Any], caught_up: int = 0) -> None:
        if "values" not in position:  # recognised from the table after a crash between two databases
            position = dict(position, values=int(await self._data.fetchval(
                f"SELECT count({quote_ident(target.column)}) FROM {target.sql_table}"  # noqa: S608
            )))  # fmt: skip
        await self._ks.execute(
            """UPDATE pgveil.rotation_jobs SET position = $2::jsonb, rows_done = rows_done + $3, rows_remaining = 0,
                   state = 'done', finished_at = now(), updated_at = now()
               WHERE job_id = $1""",
            self.job_id,
            json.dumps(position),
            caught_up,
        )


class _Unfinished(MigrationError):
    """The swap found values it could not convert; the job fails, the table keeps both columns."""


def _position(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def build_target(
    data_conn: Any,
    direction: Direction,
    schema: str,
    table: str,
    column: str,
    declared_type: str,
    check_name: str,
    check_sql: str,
) -> MigrationTarget:
    pk = await primary_key_of(data_conn, schema, table)
    return MigrationTarget(direction, schema, table, column, declared_type, pk, check_name, check_sql)
