"""DEK rotation: a new key version primary for writes, re-encryption of existing rows, destruction.

This module owns three operations on one encrypted column (per-column keys):

* :func:`rotate_columns` inserts version N+1 of the column's DEK (ENABLED, wrapped under the provider's
  current KEK) in one keystore transaction with the job that will re-encrypt the column, and NOTIFYs
  ``pgveil_keys``: every proxy's key cache re-reads the column's current version (the highest one) and
  seals new writes under N+1 from then on (within about a second, see :mod:`keymgmt.keystore`). An
  unfinished job of the same column is cancelled (superseded): the new job re-encrypts everything that
  is not under the new version, which covers what the old one had left.
* :class:`ReEncryption` runs such a job: keyset pagination on the primary key over the rows whose
  envelope's key id (bytes 4..19, see :mod:`keymgmt.envelope`) is not the new version's, a batch at a
  time; each value is opened and sealed again under the new version with the same associated data, and
  written back with a compare-and-set (``... WHERE pk = u.pk AND col = u.old``), so a row that the
  application wrote meanwhile is left as the application wrote it (counted as skipped). Each batch, its
  progress row included, is one transaction. Passes repeat until one finds nothing left to do, so a
  write sealed under the old version by a proxy that had not heard the notification yet is caught by
  the next pass.
* :func:`destroy_version` destroys an old version (a tombstone stays) once no row references it: it
  counts the referencing rows under a SHARE lock on the table, so no write can slip in between the count
  and the destruction, and refuses while any remains or while the version is the current one.

It does not know the proxy's configuration: the table, its primary key, the encrypted column and its
declared type come in as a :class:`RotationTarget` (the CLI builds it from the configuration). It never
logs values, keys or key material; identifiers of columns and key ids are not secret.

Per-subject keys (one DEK per data subject, shared by every table of the subject's kind) rotate by kind:

* :func:`rotate_subject_kind` raises the kind's generation (``pgveil.subject_kinds``) and queues one job for
  every table and encrypted column of the kind; it creates no key. A subject's version below the kind's
  generation is no longer current for writes (:mod:`keymgmt.keystore` creates the subject's next version on
  its next write), and every proxy drops its cached pointers to such versions on the NOTIFY.
* :class:`SubjectKindReEncryption` runs that job: every target in turn, keyset pagination over every stored
  value, each value under an older generation re-sealed under the next version of its own subject's key
  (created for a batch's subjects in one keystore statement, before the batch's transaction), written back
  with compare-and-set; SHREDDED subjects are skipped; passes until nothing is left, then a sweep gives the
  next version to the subjects whose rows it never met.
* :func:`destroy_subject_versions` destroys every older version that is not its subject's current one, all or
  none, refusing while any row of any target references one (SHARE locks on all the kind's tables).

:func:`rotate_columns` refuses a column that has per-subject keys rather than leaving them under the old
version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from keymgmt.envelope import (
    DEK_LENGTH,
    DataKey,
    KeyState,
    Opener,
    OpenFailed,
    column_associated_data,
    peek_key_id,
    seal,
    subject_scope,
)
from keymgmt.errors import DecryptionFailed, KeyManagementError
from keymgmt.jobs import JobError, JobRunner, JobState, JobStatus, Throttle
from keymgmt.keystore import NOTIFY_CHANNEL, Keystore
from keymgmt.providers import KeyProvider, provider_of

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000
# Rows per second of a job that is not told otherwise: a small share of what one job does flat out on two
# cores (50,000-100,000 rows/s, bench/rotation.py), at which pgbench through pgveil kept its throughput
# within the run-to-run noise (docs/rotation.md).
DEFAULT_THROTTLE = 5000
# A pass that still finds work after this many means writes keep arriving under an old version.
MAX_PASSES = 20
_POLL_SECONDS = 0.5
# Where the key id sits in an envelope, 1-based as SQL's substring() counts.
_KEY_ID_SQL = "substring({col} from 5 for 16)"


class RotationError(KeyManagementError):
    """A rotation, re-encryption or destruction request that cannot be carried out as asked."""

    sqlstate = "55000"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# What format_type() can spell a type as: names (quoted or not, schema-qualified), modifiers, arrays.
_SQL_TYPE = re.compile(r'[A-Za-z0-9_ ,.()"\[\]]+')


@dataclass(frozen=True, slots=True)
class KeyColumn:
    """One primary-key column: its name and its type as ``format_type`` spells it."""

    name: str
    sql_type: str

    def __post_init__(self) -> None:
        # The type is spliced into SQL as a cast; the job row that carries it could have been edited.
        if not _SQL_TYPE.fullmatch(self.sql_type) or "--" in self.sql_type or self.sql_type.count('"') % 2:
            raise RotationError(f"primary key column {self.name}: unexpected type name")


@dataclass(frozen=True, slots=True)
class RotationTarget:
    """What a job re-encrypts: one encrypted column of one table, found by its primary key."""

    schema: str
    table: str
    column: str
    declared_type: str
    primary_key: tuple[KeyColumn, ...]
    column_id: str = ""

    def __post_init__(self) -> None:
        if not self.primary_key:
            raise RotationError(f"{self.qualified_column}: re-encryption needs the table's primary key")
        if not self.column_id:
            object.__setattr__(self, "column_id", f"{self.schema}.{self.table}.{self.column}")

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def qualified_column(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"

    @property
    def sql_table(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "table": self.table,
            "column": self.column,
            "declared_type": self.declared_type,
            "primary_key": [[k.name, k.sql_type] for k in self.primary_key],
            "column_id": self.column_id,
        }

    @classmethod
    def from_json(cls, data: Any) -> RotationTarget:
        if isinstance(data, str):
            data = json.loads(data)
        return cls(
            schema=data["schema"],
            table=data["table"],
            column=data["column"],
            declared_type=data["declared_type"],
            primary_key=tuple(KeyColumn(n, t) for n, t in data["primary_key"]),
            column_id=data["column_id"],
        )


# -- SQL, built from the target (pure) ---------------------------------------------------------------


def key_id_expr(target: RotationTarget, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return _KEY_ID_SQL.format(col=prefix + quote_ident(target.column))


def select_batch_sql(target: RotationTarget, *, after: bool) -> str:
    """Rows of the next batch: ``$1`` the new key id, then (``after``) one text value per key column,
    then the batch size. The primary key comes back as text, so any key type round-trips.

    Every column is qualified by the table's alias: an unqualified ``ORDER BY id`` would sort by the
    output column ``id::text`` (output names win in ORDER BY), in text order, not the key's."""
    pk = target.primary_key
    col = "t." + quote_ident(target.column)
    keys = [f"t.{quote_ident(k.name)}" for k in pk]
    cols = ", ".join(f"{k}::text" for k in keys)
    where = [f"{col} IS NOT NULL", f"{key_id_expr(target, 't')} <> $1"]
    n = 2
    if after:
        rhs = ", ".join(f"${n + i}::text::{k.sql_type}" for i, k in enumerate(pk))
        where.append(f"({', '.join(keys)}) > ({rhs})")
        n += len(pk)
    where_sql = " AND ".join(where)
    order = ", ".join(keys)
    return f"SELECT {cols}, {col} FROM {target.sql_table} AS t WHERE {where_sql} ORDER BY {order} LIMIT ${n}"  # noqa: S608


def update_batch_sql(target: RotationTarget) -> str:
    """The compare-and-set write of a batch: one text array per key column, the old and new envelopes."""
    pk = target.primary_key
    col = quote_ident(target.column)
    arrays = ", ".join(
        [f"${i + 1}::text[]" for i in range(len(pk))] + [f"${len(pk) + 1}::bytea[]", f"${len(pk) + 2}::bytea[]"]
    )
    names = ", ".join([f"k{i}" for i in range(len(pk))] + ["pgveil_old", "pgveil_new"])
    match = " AND ".join(f"t.{quote_ident(k.name)} = u.k{i}::{k.sql_type}" for i, k in enumerate(pk))
    return (
        f"UPDATE {target.sql_table} AS t SET {col} = u.pgveil_new FROM unnest({arrays}) AS u({names}) "  # noqa: S608
        f"WHERE {match} AND t.{col} = u.pgveil_old"
    )


def count_not_under_sql(target: RotationTarget) -> str:
    col = quote_ident(target.column)
    return f"SELECT count(*) FROM {target.sql_table} WHERE {col} IS NOT NULL AND {key_id_expr(target)} <> $1"  # noqa: S608


def count_under_sql(target: RotationTarget) -> str:
    col = quote_ident(target.column)
    return f"SELECT count(*) FROM {target.sql_table} WHERE {col} IS NOT NULL AND {key_id_expr(target)} = $1"  # noqa: S608


# -- re-sealing a batch (pure) --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resealed:
    keys: list[list[str]]  # one list per primary-key column
    old: list[bytes]
    new: list[bytes]
    unreadable: int


def reseal_batch(
    rows: Sequence[tuple[Sequence[str], bytes]], opener: Opener, new_key: DataKey, associated: bytes
) -> Resealed:
    """Opens each stored value and seals its plaintext under ``new_key`` with the same associated data.

    A value that does not open (tampered, or under a destroyed, disabled or unknown key) is counted and
    left alone: nothing is ever written for it."""
    width = len(rows[0][0]) if rows else 0
    keys: list[list[str]] = [[] for _ in range(width)]
    old: list[bytes] = []
    new: list[bytes] = []
    unreadable = 0
    open_ = opener.open
    for pk, envelope in rows:
        try:
            plaintext = open_(envelope, 0, len(envelope), associated)
        except OpenFailed:
            unreadable += 1
            continue
        for i, v in enumerate(pk):
            keys[i].append(v)
        old.append(envelope)
        new.append(seal(new_key, plaintext, associated))
    return Resealed(keys, old, new, unreadable)


# -- catalog ----------------------------------------------------------------------------------------------


async def primary_key_of(conn: Any, schema: str, table: str) -> tuple[KeyColumn, ...]:
    """The table's primary-key columns in index order; RotationError when it has none."""
    rows = await conn.fetch(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
           WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary
           ORDER BY k.ord""",
        schema,
        table,
    )
    if not rows:
        raise RotationError(
            f"{schema}.{table} has no primary key: re-encryption pages through a table by its primary key",
            hint="add a primary key to the table",
        )
    return tuple(KeyColumn(r["attname"], r["type"]) for r in rows)


# -- rotation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartedRotation:
    target: RotationTarget
    job_id: uuid.UUID
    from_key_id: uuid.UUID | None
    from_version: int
    to_key_id: uuid.UUID
    to_version: int
    superseded: tuple[uuid.UUID, ...]


async def rotate_columns(
    conn: Any,
    provider: KeyProvider,
    targets: Sequence[RotationTarget],
    *,
    throttle: int | None = DEFAULT_THROTTLE,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[StartedRotation]:
    """Makes a new DEK version primary for each target's column and queues its re-encryption job.

    One keystore transaction for all targets (all rotate or none); ``conn`` is a keystore connection.
    """
    if batch_size < 1:
        raise ValueError("the batch size must be at least 1")
    started: list[StartedRotation] = []
    async with conn.transaction():
        # New versions are wrapped as the keystore wraps every new key: under its primary KEK when this
        # provider holds it (a KEK rotation may have made an older one of its KEKs primary again, or a
        # provider given a newer KEK not yet rotated to), else under the provider's newest.
        primary = await conn.fetchval("SELECT kek_id FROM pgveil.keks WHERE is_primary")
        wrap_kek = primary if primary is not None and provider.holds(primary) else provider.kek_id
        await conn.execute(
            "INSERT INTO pgveil.keks (kek_id, provider_id) VALUES ($1, $2) ON CONFLICT (kek_id) DO NOTHING",
            wrap_kek,
            provider_of(wrap_kek),
        )
        for target in targets:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "pgveil.dek:" + target.column_id
            )
            if await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pgveil.deks WHERE column_id = $1 AND subject_id IS NOT NULL)",
                target.column_id,
            ):
                raise RotationError(
                    f"{target.column_id} has per-subject keys: they rotate by subject kind (rotate_subject_kind)"
                )
            current = await conn.fetchrow(
                """SELECT key_id, version, state FROM pgveil.deks WHERE column_id = $1 AND subject_id IS NULL
                   ORDER BY version DESC LIMIT 1""",
                target.column_id,
            )
            if current is not None and current["state"] == KeyState.DESTROYED.value:
                raise RotationError(f"the data key of {target.column_id} was destroyed (shredded): nothing to rotate")
            version = 1 if current is None else current["version"] + 1
            new_key_id = uuid.uuid4()
            await conn.execute(
                """INSERT INTO pgveil.deks (key_id, scope_kind, column_id, subject_id, version, state, wrapped, kek_id)
                   VALUES ($1, 'column', $2, NULL, $3, 'ENABLED', $4, $5)""",
                new_key_id,
                target.column_id,
                version,
                provider.wrap(os.urandom(DEK_LENGTH), wrap_kek),
                wrap_kek,
            )
            job_id = uuid.uuid4()
            superseded = await conn.fetch(
                """UPDATE pgveil.rotation_jobs SET state = 'cancelled', finished_at = now(), updated_at = now(),
                       last_error = 'superseded by job ' || $2::text
                   WHERE kind = 'dek' AND column_id = $1 AND state NOT IN ('done', 'failed', 'cancelled')
                   RETURNING job_id""",
                target.column_id,
                str(job_id),
            )
            await conn.execute(
                """INSERT INTO pgveil.rotation_jobs (job_id, kind, column_id, from_key_id, to_key_id, state, target,
                       throttle_rows_per_second, batch_size)
                   VALUES ($1, 'dek', $2, $3, $4, 'pending', $5::jsonb, $6, $7)""",
                job_id,
                target.column_id,
                None if current is None else current["key_id"],
                new_key_id,
                json.dumps(target.to_json()),
                throttle or None,
                batch_size,
            )
            started.append(
                StartedRotation(
                    target,
                    job_id,
                    None if current is None else current["key_id"],
                    0 if current is None else current["version"],
                    new_key_id,
                    version,
                    tuple(r["job_id"] for r in superseded),
                )
            )
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, "rotate")
    for s in started:
        log.info(
            "rotated %s: version %d (key %s) is primary for writes; re-encryption job %s",
            s.target.column_id,
            s.to_version,
            s.to_key_id,
            s.job_id,
        )
    return started


# -- destruction --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VersionInfo:
    key_id: uuid.UUID
    version: int
    state: KeyState
    current: bool


async def column_versions(conn: Any, column_id: str) -> list[VersionInfo]:
    rows = await conn.fetch(
        """SELECT key_id, version, state, version = max(version) OVER () AS current FROM pgveil.deks
           WHERE column_id = $1 AND subject_id IS NULL ORDER BY version""",
        column_id,
    )
    return [VersionInfo(r["key_id"], r["version"], KeyState(r["state"]), bool(r["current"])) for r in rows]


async def rows_under(conn: Any, target: RotationTarget, key_id: uuid.UUID) -> int:
    """How many rows of the target hold a value under ``key_id``; ``conn`` is a data connection."""
    return int(await conn.fetchval(count_under_sql(target), key_id.bytes))


async def destroy_version(keystore_conn: Any, data_conn: Any, target: RotationTarget, version: int) -> uuid.UUID:
    """Destroys version ``version`` of the target column's DEK, if no row references it.

    While it counts, the table is locked in SHARE mode (writes wait, reads go on), and the keystore row is
    changed before the lock is released, so no value can be written under the version between the count
    and its destruction. Refuses the current version (it encrypts new writes) and any version a row
    still references. Returns the destroyed key id."""
    versions = {v.version: v for v in await column_versions(keystore_conn, target.column_id)}
    info = versions.get(version)
    if info is None:
        raise RotationError(f"{target.column_id} has no data key version {version}")
    if info.state is KeyState.DESTROYED:
        raise RotationError(f"version {version} of {target.column_id} is already destroyed")
    if info.current:
        raise RotationError(
            f"version {version} is the current data key of {target.column_id} (it encrypts new writes)",
            hint="rotate first (pgveil keys rotate), let the re-encryption job finish, then destroy",
        )
    same = keystore_conn is data_conn
    async with data_conn.transaction():
        await data_conn.execute(f"LOCK TABLE {target.sql_table} IN SHARE MODE")
        remaining = await rows_under(data_conn, target, info.key_id)
        if remaining:
            raise RotationError(
                f"refusing to destroy version {version} of {target.column_id}: {remaining} row(s) still reference it",
                hint="run the column's re-encryption job to completion (pgveil jobs status / pgveil jobs run)",
            )
        if same:
            await _destroy_row(keystore_conn, info.key_id)
        else:
            async with keystore_conn.transaction():
                await _destroy_row(keystore_conn, info.key_id)
    log.info("destroyed data key %s (version %d of %s)", info.key_id, version, target.column_id)
    return info.key_id


async def _destroy_row(conn: Any, key_id: uuid.UUID) -> None:
    status = await conn.execute(
        """UPDATE pgveil.deks SET state = 'DESTROYED', wrapped = NULL, destroyed_at = now()
           WHERE key_id = $1 AND state <> 'DESTROYED'""",
        key_id,
    )
    if status.endswith(" 0"):
        raise RotationError(f"data key {key_id} was destroyed meanwhile")
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, "destroy")


# -- the re-encryption job ---------------------------------------------------------------------------------


async def _rotation_job_row(ks: Any, job_id: uuid.UUID) -> tuple[JobState, dict[str, Any], float | None, int]:
    """A rotation job's state, position, throttle and batch size as its row holds them now."""
    row = await ks.fetchrow(
        "SELECT state, position, throttle_rows_per_second, batch_size FROM pgveil.rotation_jobs WHERE job_id = $1",
        job_id,
    )
    if row is None:
        raise JobError(f"job {job_id} disappeared")
    position = row["position"]
    position = json.loads(position) if isinstance(position, str) else dict(position)
    return (
        JobState(row["state"]),
        position,
        row["throttle_rows_per_second"],
        row["batch_size"] or DEFAULT_BATCH_SIZE,
    )


@dataclass(frozen=True, slots=True)
class BatchResult:
    scanned: int
    updated: int
    skipped: int
    unreadable: int
    seconds: float


ProgressCallback = Callable[[JobStatus, BatchResult | None], Awaitable[None] | None]


class _RotationJob(JobRunner):
    """What both re-encryption jobs share: the command line's throttle and batch size, written into the job
    row when a run starts, and the job row read at each batch."""

    def __init__(
        self,
        keystore: Any,
        keystore_conn: Any,
        data_conn: Any,
        job_id: uuid.UUID,
        *,
        throttle: int | None = None,
        batch_size: int | None = None,
        on_progress: ProgressCallback | None = None,
        poll_seconds: float = _POLL_SECONDS,
        stop: asyncio.Event | None = None,
    ) -> None:
        super().__init__(
            keystore, keystore_conn, data_conn, job_id, on_progress=on_progress, poll_seconds=poll_seconds, stop=stop
        )
        self._throttle_override = throttle
        self._batch_override = batch_size

    async def _apply_overrides(self) -> None:
        if self._throttle_override is not None:  # 0: unlimited
            await self._ks.execute(
                "UPDATE pgveil.rotation_jobs SET throttle_rows_per_second = $2 WHERE job_id = $1",
                self.job_id,
                self._throttle_override or None,
            )
        if self._batch_override is not None:
            await self._ks.execute(
                "UPDATE pgveil.rotation_jobs SET batch_size = $2 WHERE job_id = $1", self.job_id, self._batch_override
            )

    async def _job_row(self) -> tuple[JobState, dict[str, Any], float | None, int]:
        return await _rotation_job_row(self._ks, self.job_id)


class ReEncryption(_RotationJob):
    """Runs one DEK re-encryption job to its end (or until paused for good, cancelled, or stopped).

    ``keystore`` supplies the keys (its cache unwraps each old version once); ``keystore_conn`` holds the
    job's claim and its progress row; ``data_conn`` reads and writes the application table. Pass the same
    connection for both when the keystore lives in the application's database (the default): then each
    batch and its progress are one transaction and the counts survive any crash exactly. With two
    databases the batch commits first and its progress right after; a crash between the two loses one
    batch from the counts (never a row: the next run finds what is left by its key id).
    """

    _label = "re-encryption job"
    _keystore: Keystore

    async def _run_claimed(self) -> JobStatus:
        row = await self._ks.fetchrow(
            """SELECT kind, state, target, to_key_id, rows_total, throttle_rows_per_second, batch_size
               FROM pgveil.rotation_jobs WHERE job_id = $1""",
            self.job_id,
        )
        if row is None:
            raise JobError(f"no such job: {self.job_id}")
        if row["kind"] != "dek":
            raise JobError(f"job {self.job_id} is a {row['kind']} job, not a re-encryption")
        if JobState(row["state"]).finished:
            return await self._report(None)
        target = RotationTarget.from_json(row["target"])
        associated = column_associated_data(target.column_id)
        new_key = await self._keystore.key_by_id(row["to_key_id"].bytes)
        if new_key.state is not KeyState.ENABLED or new_key.column_id != target.column_id:
            raise RotationError(f"the new data key of job {self.job_id} is not an enabled key of {target.column_id}")
        new_kid = new_key.key_id
        await self._apply_overrides()
        if row["rows_total"] is None:
            total = await self._data.fetchval(count_not_under_sql(target), new_kid)
            await self._ks.execute(
                """UPDATE pgveil.rotation_jobs SET rows_total = $2, rows_remaining = $2, passes = 1,
                       position = '{"pass": 1, "after": null, "pass_work": 0, "pass_unreadable": 0}'::jsonb
                   WHERE job_id = $1""",
                self.job_id,
                total,
            )
        await self._ks.execute(
            """UPDATE pgveil.rotation_jobs SET state = 'running', started_at = coalesce(started_at, now()),
                   updated_at = now() WHERE job_id = $1 AND state = 'pending'""",
            self.job_id,
        )
        select_first = select_batch_sql(target, after=False)
        select_next = select_batch_sql(target, after=True)
        update = update_batch_sql(target)
        throttle = Throttle(None)
        await self._report(None)
        while True:
            if self._stop.is_set():
                return await self._status()
            state, position, rate, batch_size = await self._job_row()
            if state is JobState.PAUSED:
                throttle.reset()
                await self._wait(self._poll)
                continue
            if state.finished:
                return await self._report(None)
            throttle.rows_per_second = rate
            started = time.perf_counter()
            result, position = await self._batch(
                target, associated, new_key, position, batch_size, select_first, select_next, update
            )
            if result is None:  # the job row changed under us (paused or cancelled): read it again
                continue
            batch = BatchResult(result[0], result[1], result[2], result[3], time.perf_counter() - started)
            status = await self._report(batch)
            if status.state.finished:
                return status
            delay = throttle.delay(batch.scanned)
            if delay > 0:
                await self._wait(delay)

    async def _batch(
        self,
        target: RotationTarget,
        associated: bytes,
        new_key: DataKey,
        position: dict[str, Any],
        batch_size: int,
        select_first: str,
        select_next: str,
        update: str,
    ) -> tuple[tuple[int, int, int, int] | None, dict[str, Any]]:
        same = self._ks is self._data
        async with self._data.transaction():
            # The job row, locked: a pause or cancel committed before this batch stops it; one committed
            # during it waits for the batch to end.
            row = (
                await self._ks.fetchrow(
                    "SELECT state, position FROM pgveil.rotation_jobs WHERE job_id = $1 FOR UPDATE", self.job_id
                )
                if same
                else await self._ks.fetchrow(
                    "SELECT state, position FROM pgveil.rotation_jobs WHERE job_id = $1", self.job_id
                )
            )
            if row is None or JobState(row["state"]) is not JobState.RUNNING:
                return None, position
            raw = row["position"]
            position = json.loads(raw) if isinstance(raw, str) else dict(raw)
            after = position.get("after")
            if after is None:
                rows = await self._data.fetch(select_first, new_key.key_id, batch_size)
            else:
                rows = await self._data.fetch(select_next, new_key.key_id, *after, batch_size)
            width = len(target.primary_key)
            pairs = [(tuple(r[i] for i in range(width)), bytes(r[width])) for r in rows]
            opener = await self._opener_for([p[1] for p in pairs])
            resealed = reseal_batch(pairs, opener, new_key, associated)
            updated = 0
            if resealed.old:
                status = await self._data.execute(update, *resealed.keys, resealed.old, resealed.new)
                updated = int(status.rsplit(" ", 1)[1])
            skipped = len(resealed.old) - updated
            done_pass = len(rows) < batch_size
            pass_no = int(position.get("pass", 1))
            pass_work = int(position.get("pass_work", 0)) + updated + skipped
            pass_unreadable = int(position.get("pass_unreadable", 0)) + resealed.unreadable
            finished: JobState | None = None
            error: str | None = None
            if not done_pass:
                new_position = {
                    "pass": pass_no,
                    "after": list(pairs[-1][0]),
                    "pass_work": pass_work,
                    "pass_unreadable": pass_unreadable,
                }
            elif pass_work == 0:
                # A whole pass found nothing it could re-encrypt: what is left (if anything) cannot be.
                new_position = {"pass": pass_no, "after": None, "pass_work": 0, "pass_unreadable": pass_unreadable}
                if pass_unreadable:
                    finished = JobState.FAILED
                    error = (
                        f"{pass_unreadable} row(s) of {target.column_id} could not be decrypted "
                        "(tampered, or under a destroyed or disabled key) and keep their old version"
                    )
                else:
                    finished = JobState.DONE
            elif pass_no >= MAX_PASSES:
                new_position = {"pass": pass_no, "after": None, "pass_work": pass_work, "pass_unreadable": 0}
                finished = JobState.FAILED
                error = (
                    f"after {pass_no} passes, values of {target.column_id} are still being written under an "
                    "old key version (is a pgveil instance not hearing keystore notifications?)"
                )
            else:
                new_position = {"pass": pass_no + 1, "after": None, "pass_work": 0, "pass_unreadable": 0}
            progress_args = (
                self.job_id,
                json.dumps(new_position),
                updated,
                skipped,
                pass_unreadable,
                new_position["pass"],
                None if finished is None else finished.value,
                error,
            )
            if same:
                await self._ks.execute(_PROGRESS, *progress_args)
        if not same:
            await self._ks.execute(_PROGRESS, *progress_args)
        if finished is JobState.DONE:
            remaining = await self._data.fetchval(count_not_under_sql(target), new_key.key_id)
            await self._ks.execute(
                "UPDATE pgveil.rotation_jobs SET rows_remaining = $2 WHERE job_id = $1", self.job_id, remaining
            )
            log.info("re-encryption job %s of %s done", self.job_id, target.column_id)
        return (len(rows), updated, skipped, resealed.unreadable), new_position


_PROGRESS = """
    UPDATE pgveil.rotation_jobs SET
        position = $2::jsonb,
        rows_done = rows_done + $3,
        rows_skipped = rows_skipped + $4,
        rows_unreadable = $5,
        passes = $6,
        rows_remaining = GREATEST(rows_total - rows_done - $3 - rows_skipped - $4 - $5, 0),
        state = coalesce($7::text, state),
        last_error = coalesce($8::text, last_error),
        finished_at = CASE WHEN $7::text IS NULL THEN finished_at ELSE now() END,
        updated_at = now()
    WHERE job_id = $1"""


# -- rotation by subject kind --------------------------------------------------------------------------------
#
# A kind's keys are one DEK per data subject, shared by every table of the kind, so they rotate together:
# :func:`rotate_subject_kind` raises the kind's generation (``pgveil.subject_kinds``, migration 0014) and
# queues one job for every table and encrypted column of the kind. No key is created up front: a subject's
# highest version whose ``kind_generation`` is below the kind's generation is stale, so the next write of
# that subject creates its next version (keymgmt.keystore), and the job creates the next versions of the
# subjects it meets, a batch at a time, then sweeps the subjects none of whose rows it met.


@dataclass(frozen=True, slots=True)
class StartedKindRotation:
    kind: str
    generation: int
    job_id: uuid.UUID
    targets: tuple[RotationTarget, ...]
    superseded: tuple[uuid.UUID, ...]

    @property
    def scope(self) -> str:
        return subject_scope(self.kind)


def _kind_lock(kind: str) -> str:
    return "pgveil.subject-kind:" + kind


async def rotate_subject_kind(
    conn: Any,
    kind: str,
    targets: Sequence[RotationTarget],
    *,
    throttle: int | None = DEFAULT_THROTTLE,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> StartedKindRotation:
    """Retires every current key of the data subjects of ``kind`` for writes and queues the job that
    re-encrypts ``targets`` (every encrypted column of every table of the kind) under their subjects' next
    versions. One keystore transaction; NOTIFYs ``pgveil_keys`` so every proxy drops its cached pointers to
    the retired versions within about a second. An unfinished job of the kind is superseded (cancelled)."""
    if batch_size < 1:
        raise ValueError("the batch size must be at least 1")
    if not targets:
        raise RotationError(f"subject kind {kind}: no encrypted column to re-encrypt")
    scope = subject_scope(kind)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", _kind_lock(kind))
        generation = await conn.fetchval(
            """INSERT INTO pgveil.subject_kinds (kind, generation) VALUES ($1, 1)
               ON CONFLICT (kind) DO UPDATE SET generation = pgveil.subject_kinds.generation + 1, rotated_at = now()
               RETURNING generation""",
            kind,
        )
        job_id = uuid.uuid4()
        superseded = await conn.fetch(
            """UPDATE pgveil.rotation_jobs SET state = 'cancelled', finished_at = now(), updated_at = now(),
                   last_error = 'superseded by job ' || $2::text
               WHERE kind = 'subject' AND column_id = $1 AND state NOT IN ('done', 'failed', 'cancelled')
               RETURNING job_id""",
            scope,
            str(job_id),
        )
        target = {"kind": kind, "generation": generation, "targets": [t.to_json() for t in targets]}
        await conn.execute(
            """INSERT INTO pgveil.rotation_jobs (job_id, kind, column_id, state, target, throttle_rows_per_second,
                   batch_size)
               VALUES ($1, 'subject', $2, 'pending', $3::jsonb, $4, $5)""",
            job_id,
            scope,
            json.dumps(target),
            throttle or None,
            batch_size,
        )
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, "rotate")
    started = StartedKindRotation(kind, generation, job_id, tuple(targets), tuple(r["job_id"] for r in superseded))
    log.info(
        "rotated subject kind %s: generation %d, every subject's next write uses its next key version; "
        "re-encryption job %s",
        kind,
        generation,
        job_id,
    )
    return started


@dataclass(frozen=True, slots=True)
class SubjectKeyInfo:
    """What the job needs to know about one key version of the kind (never its material)."""

    subject_id: bytes
    version: int
    kind_generation: int
    state: KeyState


@dataclass(frozen=True, slots=True)
class SubjectBatchPlan:
    """A batch sorted by what it needs (pure, :func:`plan_subject_batch`)."""

    stale: list[tuple[Sequence[str], bytes, bytes]]  # (primary key, envelope, subject id)
    current: int  # already under a key of the kind's generation (written since the rotation)
    unreadable: int  # not an envelope, or under a key that is not a live key of this kind

    @property
    def subjects(self) -> list[bytes]:
        return list(dict.fromkeys(s for _, _, s in self.stale))


def plan_subject_batch(
    rows: Sequence[tuple[Sequence[str], bytes]], info: Callable[[bytes], SubjectKeyInfo | None], generation: int
) -> SubjectBatchPlan:
    """Sorts a batch's rows by the key version their envelope names: a version of the kind's current
    generation needs nothing; an older one is re-sealed under its own subject's next version; anything else
    (no envelope, a key unknown, destroyed or of another scope) cannot be re-encrypted."""
    stale: list[tuple[Sequence[str], bytes, bytes]] = []
    current = unreadable = 0
    for pk, envelope in rows:
        try:
            kid = bytes(peek_key_id(envelope))
        except DecryptionFailed:
            unreadable += 1
            continue
        k = info(kid)
        if k is None or k.state is KeyState.DESTROYED:
            unreadable += 1
        elif k.kind_generation >= generation:
            current += 1
        else:
            stale.append((pk, envelope, k.subject_id))
    return SubjectBatchPlan(stale, current, unreadable)


def reseal_subject_batch(
    rows: Sequence[tuple[Sequence[str], bytes, bytes]],
    opener: Opener,
    new_keys: Callable[[bytes], DataKey | None],
    associated: bytes,
) -> Resealed:
    """Opens each value (its old key appends its subject's part of the associated data) and seals its
    plaintext under ``new_keys(subject id)``, the same subject's new version, with the same associated data.
    A row whose subject has no new key, or whose value does not open, is counted and left alone."""
    width = len(rows[0][0]) if rows else 0
    keys: list[list[str]] = [[] for _ in range(width)]
    old: list[bytes] = []
    new: list[bytes] = []
    unreadable = 0
    for pk, envelope, subject_id in rows:
        key = new_keys(subject_id)
        if key is None or key.subject != subject_id:
            unreadable += 1
            continue
        try:
            plaintext = opener.open(envelope, 0, len(envelope), associated)
        except OpenFailed:
            unreadable += 1
            continue
        for i, v in enumerate(pk):
            keys[i].append(v)
        old.append(envelope)
        new.append(seal(key, plaintext, associated))
    return Resealed(keys, old, new, unreadable)


def select_all_batch_sql(target: RotationTarget, *, after: bool) -> str:
    """The next batch of a subject kind's job: every stored value in primary-key order (which key a value
    is under is told from the keystore, which may be another database: it cannot be a join). ``$1`` the
    batch size, then (``after``) one text value per key column."""
    pk = target.primary_key
    col = "t." + quote_ident(target.column)
    keys = [f"t.{quote_ident(k.name)}" for k in pk]
    cols = ", ".join(f"{k}::text" for k in keys)
    where = [f"{col} IS NOT NULL"]
    if after:
        rhs = ", ".join(f"${2 + i}::text::{k.sql_type}" for i, k in enumerate(pk))
        where.append(f"({', '.join(keys)}) > ({rhs})")
    return (
        f"SELECT {cols}, {col} FROM {target.sql_table} AS t WHERE {' AND '.join(where)} "  # noqa: S608
        f"ORDER BY {', '.join(keys)} LIMIT $1"
    )


def count_values_sql(target: RotationTarget) -> str:
    return f"SELECT count(*) FROM {target.sql_table} WHERE {quote_ident(target.column)} IS NOT NULL"  # noqa: S608


def count_under_any_sql(target: RotationTarget) -> str:
    col = quote_ident(target.column)
    return (
        f"SELECT count(*) FROM {target.sql_table} WHERE {col} IS NOT NULL "  # noqa: S608
        f"AND {key_id_expr(target)} = ANY($1::bytea[])"
    )


_KIND_KEYS = """
    SELECT key_id, subject_id, version, kind_generation, state FROM pgveil.deks
    WHERE column_id = $1 AND key_id = ANY($2::uuid[])"""
# Each named subject's highest version, if it is an ENABLED version of generation $3 or later.
_NEW_VERSIONS = """
    SELECT cur.subject_id, cur.key_id
    FROM unnest($2::bytea[]) AS s(subject_id)
    CROSS JOIN LATERAL (SELECT d.subject_id, d.key_id, d.state, d.kind_generation FROM pgveil.deks d
                        WHERE d.column_id = $1 AND d.subject_id = s.subject_id
                        ORDER BY d.version DESC LIMIT 1) cur
    WHERE cur.state = 'ENABLED' AND cur.kind_generation >= $3"""
_SHREDDED = """
    SELECT subject_id FROM pgveil.subjects WHERE kind = $1 AND subject_id = ANY($2::bytea[]) AND state = 'SHREDDED'"""
# Subjects (after $4, in id order) whose highest version is ENABLED, below generation $2 and not shredded:
# the ones the sweep gives their next version although no row of theirs was met.
_STALE_SUBJECTS = """
    SELECT d.subject_id FROM pgveil.deks d
    WHERE d.column_id = $1 AND ($4::bytea IS NULL OR d.subject_id > $4) AND d.state = 'ENABLED'
      AND d.kind_generation < $2
      AND NOT EXISTS (SELECT 1 FROM pgveil.deks h WHERE h.column_id = d.column_id AND h.subject_id = d.subject_id
                      AND h.version > d.version)
      AND NOT EXISTS (SELECT 1 FROM pgveil.subjects s WHERE s.kind = $5 AND s.subject_id = d.subject_id
                      AND s.state = 'SHREDDED')
    ORDER BY d.subject_id LIMIT $3"""

_KIND_PROGRESS = """
    UPDATE pgveil.rotation_jobs SET
        position = $2::jsonb,
        rows_done = rows_done + $3,
        rows_skipped = rows_skipped + $4,
        rows_unreadable = $5,
        passes = $6,
        rows_remaining = CASE WHEN $6 = 1 THEN GREATEST(rows_total - $9, 0) ELSE 0 END,
        state = coalesce($7::text, state),
        last_error = coalesce($8::text, last_error),
        finished_at = CASE WHEN $7::text IS NULL THEN finished_at ELSE now() END,
        updated_at = now()
    WHERE job_id = $1"""


# A batch that PostgreSQL rolled back for a deadlock or a serialization failure is tried again, a few times.
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_MAX_RETRIES = 5
_JOB_ROW = "SELECT state, position FROM pgveil.rotation_jobs WHERE job_id = $1"
# Key versions a kind's job remembers (facts, and unwrapped old keys) before it forgets them and asks again.
_MAX_REMEMBERED = 50_000
_JOB_ROW_LOCKED = _JOB_ROW + " FOR UPDATE"


class _KindKeys(Protocol):
    async def key_by_id(self, key_id: bytes) -> DataKey: ...
    async def keys_by_ids(self, key_ids: Iterable[bytes]) -> int: ...
    async def create_subject_versions(self, kind: str, subject_ids: Iterable[bytes], pool: Any = None) -> int: ...


def advance_position(
    position: dict[str, Any],
    target: RotationTarget,
    n_targets: int,
    pairs: Sequence[tuple[Sequence[str], bytes]],
    batch_size: int,
    updated: int,
    skipped: int,
    unreadable: int,
    current: int,
    shredded: int,
) -> tuple[dict[str, Any], JobState | None, str | None]:
    """The position after a batch of a subject kind's job (pure): the next keyset page, the next target, the
    next pass, the sweep (a pass found nothing to re-encrypt) or the end (FAILED with a reason when what is
    left cannot be re-encrypted, or writes under old versions keep coming after :data:`MAX_PASSES`)."""
    pos = dict(position)
    pos["pass_work"] = int(pos.get("pass_work", 0)) + updated + skipped
    pos["pass_unreadable"] = int(pos.get("pass_unreadable", 0)) + unreadable
    pos["pass_seen"] = int(pos.get("pass_seen", 0)) + len(pairs)
    pos["current"] = int(pos.get("current", 0)) + current
    pos["shredded"] = int(pos.get("shredded", 0)) + shredded
    if len(pairs) >= batch_size:
        pos["after"] = list(pairs[-1][0])
        return pos, None, None
    if int(pos["target"]) + 1 < n_targets:
        pos["target"], pos["after"] = int(pos["target"]) + 1, None
        return pos, None, None
    # The pass is over.
    pass_no = int(pos.get("pass", 1))
    if pos["pass_work"] == 0:
        if pos["pass_unreadable"]:
            return (
                pos | {"after": None},
                JobState.FAILED,
                (
                    f"{pos['pass_unreadable']} value(s) of subject kind tables could not be re-encrypted "
                    "(tampered, or under a destroyed, disabled or unknown key) and keep their old version"
                ),
            )
        return pos | {"after": None, "phase": "keys", "swept_after": None}, None, None
    if pass_no >= MAX_PASSES:
        return (
            pos | {"after": None},
            JobState.FAILED,
            (
                f"after {pass_no} passes, values of {target.qualified_table} and its kind are still being written "
                "under old key versions (is a pgveil instance not hearing keystore notifications?)"
            ),
        )
    reset = {"pass": pass_no + 1, "target": 0, "after": None, "pass_work": 0, "pass_unreadable": 0}
    return pos | reset | {"pass_seen": 0, "current": 0, "shredded": 0}, None, None


class SubjectKindReEncryption(_RotationJob):
    """Runs a subject kind's job (:func:`rotate_subject_kind`): every target (table, encrypted column) in
    turn, keyset pagination on its primary key, each value whose key version is older than the job's
    generation re-sealed under the next version of its own subject's key (the subject named by the old
    key's keystore row, which the envelope's associated data binds) and written back with compare-and-set.
    A SHREDDED subject's rows are skipped and it is never given a key. Passes over all targets repeat until
    one finds nothing to re-encrypt; then the subjects none of whose rows were met get their next version
    too (the sweep), so that every old version can be destroyed.

    Each batch reads its rows first, creates the new versions its subjects need (their own keystore
    statement, committed), then, in one transaction with the job row locked, re-seals, writes and records
    its progress: a concurrent write of the application is never waited on while keys are created."""

    _label = "subject kind re-encryption job"
    _keystore: _KindKeys

    def __init__(self, keystore: _KindKeys, keystore_conn: Any, data_conn: Any, job_id: uuid.UUID, **kw: Any) -> None:
        super().__init__(keystore, keystore_conn, data_conn, job_id, **kw)
        self._info: dict[bytes, SubjectKeyInfo | None] = {}

    async def _run_claimed(self) -> JobStatus:
        row = await self._ks.fetchrow(
            "SELECT kind, state, target, rows_total FROM pgveil.rotation_jobs WHERE job_id = $1", self.job_id
        )
        if row is None:
            raise JobError(f"no such job: {self.job_id}")
        if row["kind"] != "subject":
            raise JobError(f"job {self.job_id} is a {row['kind']} job, not a subject kind's re-encryption")
        if JobState(row["state"]).finished:
            return await self._report(None)
        spec = row["target"]
        spec = json.loads(spec) if isinstance(spec, str) else dict(spec)
        kind, generation = str(spec["kind"]), int(spec["generation"])
        targets = [RotationTarget.from_json(t) for t in spec["targets"]]
        await self._apply_overrides()
        if row["rows_total"] is None:
            total = 0
            for t in targets:
                total += int(await self._data.fetchval(count_values_sql(t)))
            first: dict[str, Any] = {"phase": "rows", "pass": 1, "target": 0, "after": None}
            first |= {"pass_work": 0, "pass_unreadable": 0, "pass_seen": 0, "current": 0, "shredded": 0}
            await self._ks.execute(
                """UPDATE pgveil.rotation_jobs SET rows_total = $2, rows_remaining = $2, passes = 1,
                       position = $3::jsonb WHERE job_id = $1""",
                self.job_id,
                total,
                json.dumps(first),
            )
        await self._ks.execute(
            """UPDATE pgveil.rotation_jobs SET state = 'running', started_at = coalesce(started_at, now()),
                   updated_at = now() WHERE job_id = $1 AND state = 'pending'""",
            self.job_id,
        )
        throttle = Throttle(None)
        retries = 0
        await self._report(None)
        while True:
            if self._stop.is_set():
                return await self._status()
            state, position, rate, batch_size = await self._job_row()
            if state is JobState.PAUSED:
                throttle.reset()
                await self._wait(self._poll)
                continue
            if state.finished:
                return await self._report(None)
            throttle.rows_per_second = rate
            started = time.perf_counter()
            if position.get("phase") == "keys":
                outcome = await self._sweep(kind, generation, position, batch_size)
                if outcome is None:
                    continue
                charged, batch = outcome, BatchResult(0, 0, 0, 0, time.perf_counter() - started)
            else:
                try:
                    result = await self._batch(kind, generation, targets, position, batch_size)
                except _RETRYABLE as exc:
                    # The batch's compare-and-set met an application transaction's row locks in another
                    # order (PostgreSQL chose the job's transaction): it rolled back whole, so try it again.
                    retries += 1
                    if retries > _MAX_RETRIES:
                        raise
                    log.warning("job %s: batch rolled back (%s), retrying", self.job_id, type(exc).__name__)
                    await self._wait(0.05 * retries)
                    continue
                retries = 0
                if result is None:  # the job row changed under us (paused, cancelled): read it again
                    continue
                scanned, updated, skipped, unreadable, charged = result
                batch = BatchResult(scanned, updated, skipped, unreadable, time.perf_counter() - started)
            status = await self._report(batch)
            if status.state.finished:
                return status
            delay = throttle.delay(charged)
            if delay > 0:
                await self._wait(delay)

    async def _key_info(self, scope: str, envelopes: Sequence[bytes]) -> None:
        if len(self._info) > _MAX_REMEMBERED:  # a kind of millions of subjects: bounded memory
            self._info.clear()
        wanted: list[uuid.UUID] = []
        for e in envelopes:
            try:
                kid = bytes(peek_key_id(e))
            except DecryptionFailed:
                continue
            if kid not in self._info:
                self._info[kid] = None
                wanted.append(uuid.UUID(bytes=kid))
        if not wanted:
            return
        for r in await self._ks.fetch(_KIND_KEYS, scope, wanted):
            self._info[r["key_id"].bytes] = SubjectKeyInfo(
                bytes(r["subject_id"]), r["version"], r["kind_generation"], KeyState(r["state"])
            )

    async def _locked_position(self, position: dict[str, Any], *, lock: bool) -> bool:
        """Inside the batch's transaction: whether the job is still running at the position the batch
        was read at (a pause, a cancel or another runner's progress since makes the batch void)."""
        row = await self._ks.fetchrow(_JOB_ROW_LOCKED if lock else _JOB_ROW, self.job_id)
        if row is None or JobState(row["state"]) is not JobState.RUNNING:
            return False
        raw = row["position"]
        now = json.loads(raw) if isinstance(raw, str) else dict(raw)
        return bool(now == position)

    async def _batch(
        self,
        kind: str,
        generation: int,
        targets: Sequence[RotationTarget],
        position: dict[str, Any],
        batch_size: int,
    ) -> tuple[int, int, int, int, int] | None:
        if position.get("phase") != "rows" or position.get("target", 0) >= len(targets):
            raise JobError(f"job {self.job_id} has an unexpected position")
        scope = subject_scope(kind)
        index = int(position["target"])
        target = targets[index]
        after = position.get("after")
        if after is None:
            rows = await self._data.fetch(select_all_batch_sql(target, after=False), batch_size)
        else:
            rows = await self._data.fetch(select_all_batch_sql(target, after=True), batch_size, *after)
        width = len(target.primary_key)
        pairs = [(tuple(r[i] for i in range(width)), bytes(r[width])) for r in rows]
        await self._key_info(scope, [p[1] for p in pairs])
        plan = plan_subject_batch(pairs, self._info.get, generation)
        subjects = plan.subjects
        shredded: set[bytes] = set()
        new_ids: dict[bytes, bytes] = {}
        if subjects:
            shredded = {bytes(r["subject_id"]) for r in await self._ks.fetch(_SHREDDED, kind, subjects)}
            live = [s for s in subjects if s not in shredded]
            found = {
                bytes(r["subject_id"]): r["key_id"].bytes
                for r in await self._ks.fetch(_NEW_VERSIONS, scope, live, generation)
            }
            missing = [s for s in live if s not in found]
            if missing:
                await self._keystore.create_subject_versions(kind, missing)
                again = await self._ks.fetch(_NEW_VERSIONS, scope, missing, generation)
                found |= {bytes(r["subject_id"]): r["key_id"].bytes for r in again}
            new_ids = found
        await self._keystore.keys_by_ids(list(new_ids.values()))
        new_keys: dict[bytes, DataKey | None] = {}
        for subject_id, kid in new_ids.items():
            try:
                new_keys[subject_id] = await self._keystore.key_by_id(kid)
            except KeyManagementError:
                new_keys[subject_id] = None
        work = [r for r in plan.stale if r[2] not in shredded]
        shredded_rows = len(plan.stale) - len(work)
        # The old keys of the batch in one keystore query (a batch may name a thousand subjects' keys), then
        # the opener finds them in the cache.
        if len(self._keys) > _MAX_REMEMBERED:
            self._keys.clear()
        await self._keystore.keys_by_ids([r[1][4:20] for r in work if r[1][4:20] not in self._keys])
        opener = await self._opener_for([r[1] for r in work])
        resealed = reseal_subject_batch(work, opener, new_keys.get, column_associated_data(target.column_id))
        same = self._ks is self._data
        update = update_batch_sql(target)
        async with self._data.transaction():
            if not await self._locked_position(position, lock=same):
                return None
            updated = 0
            if resealed.old:
                status = await self._data.execute(update, *resealed.keys, resealed.old, resealed.new)
                updated = int(status.rsplit(" ", 1)[1])
            skipped = len(resealed.old) - updated
            unreadable = plan.unreadable + resealed.unreadable
            new_position, finished, error = advance_position(
                position, target, len(targets), pairs, batch_size, updated, skipped, unreadable,
                plan.current, shredded_rows,
            )  # fmt: skip
            args = (
                self.job_id,
                json.dumps(new_position),
                updated,
                skipped,
                new_position["pass_unreadable"],
                new_position["pass"],
                None if finished is None else finished.value,
                error,
                new_position["pass_seen"],
            )
            if same:
                await self._ks.execute(_KIND_PROGRESS, *args)
        if not same:
            await self._ks.execute(_KIND_PROGRESS, *args)
        if finished is not None:
            log.info("re-encryption job %s of subject kind %s %s", self.job_id, kind, finished.value)
        charged = len(resealed.old) + (len(pairs) - len(resealed.old)) // 10
        return len(pairs), updated, skipped, unreadable, charged

    async def _sweep(self, kind: str, generation: int, position: dict[str, Any], batch_size: int) -> int | None:
        """One batch of the sweep: the next subjects (in id order) whose current version is still of an
        older generation get their next version. Returns how many subjects it looked at, None if the job
        row changed meanwhile."""
        scope = subject_scope(kind)
        raw_after = position.get("swept_after")
        after = None if raw_after is None else bytes.fromhex(raw_after)
        subjects = [
            bytes(r["subject_id"])
            for r in await self._ks.fetch(_STALE_SUBJECTS, scope, generation, batch_size, after, kind)
        ]
        created = await self._keystore.create_subject_versions(kind, subjects) if subjects else 0
        done = len(subjects) < batch_size
        new_position = dict(position)
        new_position["swept_after"] = subjects[-1].hex() if subjects else raw_after
        new_position["keys_created"] = int(position.get("keys_created", 0)) + created
        async with self._ks.transaction():
            if not await self._locked_position(position, lock=True):
                return None
            await self._ks.execute(
                _KIND_PROGRESS,
                self.job_id,
                json.dumps(new_position),
                0,
                0,
                int(position.get("pass_unreadable", 0)),
                int(position.get("pass", 1)),
                JobState.DONE.value if done else None,
                None,
                int(position.get("pass_seen", 0)),
            )
            if done:
                await self._ks.execute(
                    "UPDATE pgveil.rotation_jobs SET rows_remaining = 0 WHERE job_id = $1", self.job_id
                )
        if done:
            log.info("re-encryption job %s of subject kind %s done", self.job_id, kind)
        return len(subjects)


# -- destroying a kind's old versions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KindDestruction:
    kind: str
    generation: int
    destroyed: int
    kept_stale: int  # subjects whose current version is still of an older generation (shredded, or not swept)


async def kind_generation(conn: Any, kind: str) -> int:
    """The kind's generation (0: never rotated); ``conn`` is a keystore connection."""
    value = await conn.fetchval("SELECT generation FROM pgveil.subject_kinds WHERE kind = $1", kind)
    return 0 if value is None else int(value)


_OLD_KIND_VERSIONS = """
    SELECT d.key_id FROM pgveil.deks d
    WHERE d.column_id = $1 AND d.state <> 'DESTROYED' AND d.kind_generation < $2
      AND EXISTS (SELECT 1 FROM pgveil.deks h WHERE h.column_id = d.column_id AND h.subject_id = d.subject_id
                  AND h.version > d.version)"""
_STALE_CURRENT_COUNT = """
    SELECT count(*) FROM pgveil.deks d
    WHERE d.column_id = $1 AND d.state <> 'DESTROYED' AND d.kind_generation < $2
      AND NOT EXISTS (SELECT 1 FROM pgveil.deks h WHERE h.column_id = d.column_id AND h.subject_id = d.subject_id
                      AND h.version > d.version)"""


async def destroy_subject_versions(
    keystore_conn: Any, data_conn: Any, kind: str, targets: Sequence[RotationTarget]
) -> KindDestruction:
    """Destroys every version of the kind's subject keys older than the kind's generation that is not its
    subject's current version, if no row of any target references one of them (tombstones stay).

    As :func:`destroy_version`: every target table is locked in SHARE mode (writes wait, reads go on) while
    the old versions are listed and the rows referencing them counted, and the keystore rows change before
    the locks are released, so no value can be written under an old version in between. All or nothing:
    it refuses while any row references any of them, naming the tables and counts."""
    generation = await kind_generation(keystore_conn, kind)
    if generation == 0:
        raise RotationError(
            f"subject kind {kind} was never rotated: it has no old key versions",
            hint=f"pgveil keys rotate --subject-kind {kind}",
        )
    scope = subject_scope(kind)
    same = keystore_conn is data_conn
    async with data_conn.transaction():
        for name in sorted({t.sql_table for t in targets}):
            await data_conn.execute(f"LOCK TABLE {name} IN SHARE MODE")
        old = [r["key_id"] for r in await keystore_conn.fetch(_OLD_KIND_VERSIONS, scope, generation)]
        kept = int(await keystore_conn.fetchval(_STALE_CURRENT_COUNT, scope, generation))
        old_bytes = [k.bytes for k in old]
        held: list[str] = []
        for t in targets:
            n = int(await data_conn.fetchval(count_under_any_sql(t), old_bytes)) if old_bytes else 0
            if n:
                held.append(f"{n} in {t.qualified_column}")
        if held:
            raise RotationError(
                f"refusing to destroy the old key versions of subject kind {kind}: rows still reference them "
                f"({', '.join(held)})",
                hint="run the kind's re-encryption job to completion (pgveil jobs status / pgveil jobs run)",
            )
        destroyed = 0
        if old:
            if same:
                destroyed = await _destroy_rows(keystore_conn, old)
            else:
                async with keystore_conn.transaction():
                    destroyed = await _destroy_rows(keystore_conn, old)
    log.info("destroyed %d old key versions of subject kind %s (generation %d)", destroyed, kind, generation)
    return KindDestruction(kind, generation, destroyed, kept)


async def _destroy_rows(conn: Any, key_ids: Sequence[uuid.UUID]) -> int:
    status = await conn.execute(
        """UPDATE pgveil.deks SET state = 'DESTROYED', wrapped = NULL, destroyed_at = now()
           WHERE key_id = ANY($1::uuid[]) AND state <> 'DESTROYED'""",
        list(key_ids),
    )
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, "destroy")
    return int(status.rsplit(" ", 1)[1])


@dataclass(frozen=True, slots=True)
class GenerationSummary:
    generation: int
    enabled: int  # versions not destroyed (ENABLED or DISABLED)
    current: int  # of which the subject's highest version
    destroyed: int
    rows: int  # values of the kind's tables under a version of this generation


@dataclass(frozen=True, slots=True)
class KindVersions:
    kind: str
    generation: int
    subjects: int
    generations: tuple[GenerationSummary, ...]
    other_rows: int  # values under no key version of the kind (unreadable)

    def to_json(self) -> dict[str, Any]:
        return {
            "subject_kind": self.kind,
            "generation": self.generation,
            "subjects": self.subjects,
            "generations": [
                {
                    "generation": g.generation,
                    "enabled": g.enabled,
                    "current": g.current,
                    "destroyed": g.destroyed,
                    "rows": g.rows,
                }
                for g in self.generations
            ],
            "other_rows": self.other_rows,
        }


async def kind_versions(
    keystore_conn: Any, data_conn: Any, kind: str, targets: Sequence[RotationTarget]
) -> KindVersions:
    """A subject kind's key versions by generation, and how many stored values each generation holds."""
    scope = subject_scope(kind)
    generation = await kind_generation(keystore_conn, kind)
    keys = await keystore_conn.fetch(
        """SELECT key_id, kind_generation, state, version = max(version) OVER (PARTITION BY subject_id) AS current
           FROM pgveil.deks WHERE column_id = $1""",
        scope,
    )
    gen_of = {r["key_id"].bytes: r["kind_generation"] for r in keys}
    per: dict[int, list[int]] = {}
    for r in keys:
        g = per.setdefault(r["kind_generation"], [0, 0, 0, 0])
        if r["state"] == KeyState.DESTROYED.value:
            g[2] += 1
        else:
            g[0] += 1
            g[1] += bool(r["current"])
    other = 0
    for t in targets:
        sql = (
            f"SELECT {key_id_expr(t)} AS k, count(*) AS n FROM {t.sql_table} "  # noqa: S608
            f"WHERE {quote_ident(t.column)} IS NOT NULL GROUP BY 1"
        )
        for r in await data_conn.fetch(sql):
            g_no = gen_of.get(bytes(r["k"]))
            if g_no is None:
                other += r["n"]
            else:
                per.setdefault(g_no, [0, 0, 0, 0])[3] += r["n"]
    subjects = int(
        await keystore_conn.fetchval("SELECT count(DISTINCT subject_id) FROM pgveil.deks WHERE column_id = $1", scope)
    )
    gens = tuple(GenerationSummary(g, *per[g]) for g in sorted(per))
    return KindVersions(kind, generation, subjects, gens, other)
