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

Limits: per-subject keys (one DEK per data subject) are not rotated by this module; :func:`rotate_columns`
refuses a column that has them rather than leaving them under the old version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from keymgmt.envelope import (
    DEK_LENGTH,
    DataKey,
    KeyState,
    Opener,
    OpenFailed,
    column_associated_data,
    seal,
)
from keymgmt.errors import KeyManagementError
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
                    f"{target.column_id} has per-subject keys: rotating them is not supported by this command yet"
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


@dataclass(frozen=True, slots=True)
class BatchResult:
    scanned: int
    updated: int
    skipped: int
    unreadable: int
    seconds: float


ProgressCallback = Callable[[JobStatus, BatchResult | None], Awaitable[None] | None]


class ReEncryption(JobRunner):
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

    def __init__(
        self,
        keystore: Keystore,
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

    async def _job_row(self) -> tuple[JobState, dict[str, Any], float | None, int]:
        row = await self._ks.fetchrow(
            "SELECT state, position, throttle_rows_per_second, batch_size FROM pgveil.rotation_jobs WHERE job_id = $1",
            self.job_id,
        )
        if row is None:
            raise JobError(f"job {self.job_id} disappeared")
        position = row["position"]
        position = json.loads(position) if isinstance(position, str) else dict(position)
        return (
            JobState(row["state"]),
            position,
            row["throttle_rows_per_second"],
            row["batch_size"] or DEFAULT_BATCH_SIZE,
        )

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
