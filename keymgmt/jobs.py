"""Background jobs in the keystore: their states, who runs them, their progress, and how to read it.

This module owns the rows of ``pgveil.rotation_jobs`` as a state machine and the claim that makes a job
run in at most one process at a time. What a job does (re-encrypting rows of a column or of every table of a
subject kind, see :mod:`keymgmt.rotation`) lives elsewhere; this module never reads application tables or keys.

States (``JobState``)::

    pending --claim--> running --last batch--> done
       ^                 |  ^                   (or failed: rows left that cannot be re-encrypted)
       |              pause  resume
       |                 v  |
       +--- resume --- paused          any unfinished state --cancel / superseded--> cancelled

Claim: a runner takes a session-level advisory lock on the job (``pg_try_advisory_lock``) on the
connection it works with. The lock is the proof of life: when the runner's process dies or its
connection drops, PostgreSQL releases it, so another runner (or the same command started again) can
claim the job and continue from the last committed position. No heartbeat, no stale owner to expire.
``pg_locks`` shows whether someone holds it, which is how :func:`job_status` tells "running" from
"interrupted".

Progress is written by each batch in the same transaction as the batch's own work (when the keystore
and the data are in one database), so after a crash the counts are exact: a batch is either fully
done and counted, or neither.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from keymgmt.envelope import DataKey, Opener, peek_key_id, subject_kind_of_scope
from keymgmt.errors import DecryptionFailed, KeyManagementError, UnknownKey

# Advisory lock space of job claims: (JOB_LOCK_CLASS, first four bytes of the job id as a signed int4).
# The constant is "pgvj" in ASCII; an application sharing the database is unlikely to use it.
JOB_LOCK_CLASS = 0x7067766A


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobError(KeyManagementError):
    """A job request that cannot be honoured (unknown job, wrong state)."""

    sqlstate = "55000"


def job_lock_key(job_id: uuid.UUID) -> tuple[int, int]:
    """The advisory lock (two int4 keys) that a runner of ``job_id`` holds."""
    return JOB_LOCK_CLASS, int.from_bytes(job_id.bytes[:4], "big", signed=True)


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One job as ``pgveil jobs status`` shows it; :meth:`to_json` is the ``--json`` form."""

    job_id: uuid.UUID
    kind: str
    column_id: str | None
    state: JobState
    active: bool  # a runner holds the job's claim now
    from_key_id: uuid.UUID | None
    to_key_id: uuid.UUID | None
    to_version: int | None
    rows_done: int
    rows_skipped: int
    rows_unreadable: int
    rows_total: int | None
    rows_remaining: int | None
    passes: int
    position: Any
    throttle_rows_per_second: int | None
    batch_size: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    generation: int | None = None  # a subject kind's job: the kind's generation its keys move to

    @property
    def subject_kind(self) -> str | None:
        """The subject kind a ``subject`` job re-encrypts (its column_id is the kind's keystore scope)."""
        if self.kind != "subject" or self.column_id is None:
            return None
        return subject_kind_of_scope(self.column_id)

    @property
    def interrupted(self) -> bool:
        """Marked running, but no runner holds it: its process died; ``pgveil jobs run`` continues it."""
        return self.state is JobState.RUNNING and not self.active

    @property
    def fraction(self) -> float | None:
        """Done / (done + remaining), None before the job counted its rows."""
        if self.state is JobState.DONE:
            return 1.0
        if self.rows_remaining is None:
            return None
        whole = self.rows_done + self.rows_skipped + self.rows_unreadable + self.rows_remaining
        return 1.0 if whole == 0 else min(1.0, (whole - self.rows_remaining) / whole)

    @property
    def rate_rows_per_second(self) -> float | None:
        """Average rows re-encrypted per second since the job first started (pauses included)."""
        if self.started_at is None:
            return None
        end = self.finished_at or self.updated_at
        seconds = (end - self.started_at).total_seconds()
        return None if seconds <= 0 else self.rows_done / seconds

    def to_json(self) -> dict[str, Any]:
        def ts(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        rate = self.rate_rows_per_second
        eta = None
        if rate and self.rows_remaining is not None and not self.state.finished:
            eta = round(self.rows_remaining / rate, 1)
        return {
            "job_id": str(self.job_id),
            "kind": self.kind,
            "column": self.column_id,
            "state": self.state.value,
            "active": self.active,
            "interrupted": self.interrupted,
            "from_key_id": None if self.from_key_id is None else str(self.from_key_id),
            "to_key_id": None if self.to_key_id is None else str(self.to_key_id),
            "to_version": self.to_version,
            "subject_kind": self.subject_kind,
            "generation": self.generation,
            "rows_done": self.rows_done,
            "rows_skipped": self.rows_skipped,
            "rows_unreadable": self.rows_unreadable,
            "rows_total": self.rows_total,
            "rows_remaining": self.rows_remaining,
            "fraction": self.fraction,
            "passes": self.passes,
            "position": self.position,
            "throttle_rows_per_second": self.throttle_rows_per_second,
            "batch_size": self.batch_size,
            "rate_rows_per_second": None if rate is None else round(rate, 1),
            "eta_seconds": eta,
            "last_error": self.last_error,
            "created_at": ts(self.created_at),
            "updated_at": ts(self.updated_at),
            "started_at": ts(self.started_at),
            "finished_at": ts(self.finished_at),
        }


# Claims held now, in this database: objid is the second int4 key, as an unsigned oid.
_CLAIMS = """
    SELECT objid::bigint AS objid FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::bigint::oid
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""

_STATUS = """
    SELECT j.job_id, j.kind, j.column_id, j.state, j.from_key_id, j.to_key_id, d.version AS to_version,
           j.rows_done, j.rows_skipped, j.rows_unreadable, j.rows_total, j.rows_remaining, j.passes,
           j.position, j.throttle_rows_per_second, j.batch_size, j.last_error,
           j.created_at, j.updated_at, j.started_at, j.finished_at,
           CASE WHEN j.kind = 'subject' THEN (j.target ->> 'generation')::int END AS generation
    FROM pgveil.rotation_jobs j LEFT JOIN pgveil.deks d ON d.key_id = j.to_key_id"""


def _status_of(row: Any, claims: set[int]) -> JobStatus:
    position = row["position"]
    return JobStatus(
        job_id=row["job_id"],
        kind=row["kind"],
        column_id=row["column_id"],
        state=JobState(row["state"]),
        active=(job_lock_key(row["job_id"])[1] & 0xFFFFFFFF) in claims,
        from_key_id=row["from_key_id"],
        to_key_id=row["to_key_id"],
        to_version=row["to_version"],
        rows_done=row["rows_done"],
        rows_skipped=row["rows_skipped"],
        rows_unreadable=row["rows_unreadable"],
        rows_total=row["rows_total"],
        rows_remaining=row["rows_remaining"],
        passes=row["passes"],
        position=json.loads(position) if isinstance(position, str) else position,
        throttle_rows_per_second=row["throttle_rows_per_second"],
        batch_size=row["batch_size"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        generation=row["generation"],
    )


async def job_status(conn: Any, job_ids: Sequence[uuid.UUID] = (), *, include_finished: bool = True) -> list[JobStatus]:
    """The jobs named (all when none is named), oldest first; ``conn`` is a keystore connection."""
    where: list[str] = []
    args: list[Any] = []
    if job_ids:
        args.append(list(job_ids))
        where.append(f"j.job_id = ANY(${len(args)}::uuid[])")
    if not include_finished:
        where.append("j.state NOT IN ('done', 'failed', 'cancelled')")
    sql = _STATUS + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY j.created_at, j.job_id"
    rows = await conn.fetch(sql, *args)
    claims = {r["objid"] for r in await conn.fetch(_CLAIMS, JOB_LOCK_CLASS)}
    found = [_status_of(r, claims) for r in rows]
    missing = set(job_ids) - {s.job_id for s in found}
    if missing:
        raise JobError(f"no such job: {', '.join(sorted(str(m) for m in missing))}")
    return found


async def set_paused(conn: Any, job_id: uuid.UUID, paused: bool) -> JobState:
    """Pauses a pending or running job, or resumes a paused one; returns the new state.

    A runner holding a paused job keeps its claim and waits; resuming puts the job back to ``running``
    when a runner holds it, else to ``pending`` (``pgveil jobs run`` picks it up)."""
    async with conn.transaction():
        row = await conn.fetchrow("SELECT state FROM pgveil.rotation_jobs WHERE job_id = $1 FOR UPDATE", job_id)
        if row is None:
            raise JobError(f"no such job: {job_id}")
        state = JobState(row["state"])
        if paused:
            if state not in (JobState.PENDING, JobState.RUNNING):
                raise JobError(f"job {job_id} is {state.value}: only a pending or running job can be paused")
            new = JobState.PAUSED
        else:
            if state is not JobState.PAUSED:
                raise JobError(f"job {job_id} is {state.value}, not paused")
            [status] = await job_status(conn, [job_id])
            new = JobState.RUNNING if status.active else JobState.PENDING
        await conn.execute(
            "UPDATE pgveil.rotation_jobs SET state = $2, updated_at = now() WHERE job_id = $1", job_id, new.value
        )
    return new


async def cancel(conn: Any, job_id: uuid.UUID, reason: str = "cancelled by an operator") -> None:
    """Cancels an unfinished job; its runner stops before its next batch."""
    status = await conn.execute(
        """UPDATE pgveil.rotation_jobs SET state = 'cancelled', last_error = $2, updated_at = now(),
               finished_at = now()
           WHERE job_id = $1 AND state NOT IN ('done', 'failed', 'cancelled')""",
        job_id,
        reason,
    )
    if status.endswith(" 0"):
        [job] = await job_status(conn, [job_id])
        raise JobError(f"job {job_id} is already {job.state.value}")


async def runnable_jobs(conn: Any, kind: str, job_ids: Iterable[uuid.UUID] = ()) -> list[uuid.UUID]:
    """Unfinished, unpaused jobs of ``kind`` (the ones named, or all), oldest first."""
    wanted = list(job_ids)
    rows = await conn.fetch(
        """SELECT job_id FROM pgveil.rotation_jobs
           WHERE kind = $1 AND state IN ('pending', 'running') AND (cardinality($2::uuid[]) = 0 OR job_id = ANY($2))
           ORDER BY created_at, job_id""",
        kind,
        wanted,
    )
    return [r["job_id"] for r in rows]


async def try_claim(conn: Any, job_id: uuid.UUID) -> bool:
    """Takes the job's claim on ``conn`` (held until released or the connection ends)."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1::int, $2::int)", *job_lock_key(job_id)))


async def release_claim(conn: Any, job_id: uuid.UUID) -> None:
    await conn.fetchval("SELECT pg_advisory_unlock($1::int, $2::int)", *job_lock_key(job_id))


log = logging.getLogger(__name__)


class _KeysById(Protocol):
    async def key_by_id(self, key_id: bytes) -> DataKey: ...


class JobRunner:
    """What every job runner shares (DEK re-encryption, column migration): it takes the job's claim on
    the keystore connection, runs :meth:`_run_claimed`, records a failure's reason in the job row, and
    releases the claim whatever happens; reports progress, waits interruptibly, and finds the keys a
    batch's envelopes name (once per runner; a key it cannot have opens nothing).

    ``keystore_conn`` holds the claim and the job row; ``data_conn`` works on the application table (the
    same connection when the keystore lives in the application's database)."""

    _label = "job"  # for the log line of a stopped job
    _unusable_key_errors: tuple[type[Exception], ...] = (UnknownKey,)  # a key_by_id failure that means "no key"

    def __init__(
        self,
        keystore: _KeysById,
        keystore_conn: Any,
        data_conn: Any,
        job_id: uuid.UUID,
        *,
        on_progress: Callable[[JobStatus, Any], Awaitable[None] | None] | None,
        poll_seconds: float,
        stop: asyncio.Event | None,
    ) -> None:
        self._keystore = keystore
        self._ks = keystore_conn
        self._data = data_conn
        self.job_id = job_id
        self._on_progress = on_progress
        self._poll = poll_seconds
        self._stop = stop or asyncio.Event()
        self._keys: dict[bytes, DataKey | None] = {}
        self.errors = 0

    async def run(self) -> JobStatus:
        if not await try_claim(self._ks, self.job_id):
            raise JobError(f"job {self.job_id} is being run by another runner")
        try:
            return await self._run_claimed()
        except Exception as exc:
            self.errors += 1
            reason = exc.message if isinstance(exc, KeyManagementError) else type(exc).__name__
            log.warning("%s %s stopped: %s", self._label, self.job_id, reason)
            try:
                await self._ks.execute(
                    "UPDATE pgveil.rotation_jobs SET last_error = $2, updated_at = now() WHERE job_id = $1",
                    self.job_id,
                    reason[:500],
                )
            except Exception:  # the connection itself may be what failed
                log.debug("could not record the job's error")
            raise
        finally:
            try:
                await release_claim(self._ks, self.job_id)
            except Exception:
                log.debug("could not release the job's claim (its connection is gone, which releases it)")

    async def _run_claimed(self) -> JobStatus:
        raise NotImplementedError

    async def _status(self) -> JobStatus:
        [status] = await job_status(self._ks, [self.job_id])
        return status

    async def _report(self, batch: object) -> JobStatus:
        status = await self._status()
        if self._on_progress is not None:
            result = self._on_progress(status, batch)
            if result is not None:
                await result
        return status

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _opener_for(self, envelopes: Sequence[bytes]) -> Opener:
        for e in envelopes:
            try:
                kid = bytes(peek_key_id(e))
            except DecryptionFailed:
                continue  # not an envelope: it opens with no key
            if kid not in self._keys:
                try:
                    self._keys[kid] = await self._keystore.key_by_id(kid)
                except self._unusable_key_errors:  # destroyed or unknown: its values cannot be re-encrypted
                    self._keys[kid] = None
        return Opener(self._keys.get)


class Throttle:
    """Keeps a job at or below ``rows_per_second`` (None or 0: unlimited). Pure: the clock is injected.

    After each batch :meth:`delay` says how long to sleep: the batch's rows are charged against a
    schedule that advances ``rows / rate`` seconds per batch, never starting in the past, so a job that
    was paused or slowed down does not make up for it afterwards with a burst.
    """

    def __init__(self, rows_per_second: float | None, clock: Any = time.monotonic) -> None:
        if rows_per_second is not None and rows_per_second < 0:
            raise ValueError("the throttle must not be negative")
        self.rows_per_second = rows_per_second or None
        self._clock = clock
        self._next: float | None = None

    def delay(self, rows: int) -> float:
        if self.rows_per_second is None:
            return 0.0
        now = float(self._clock())
        start = now if self._next is None else max(self._next, now)
        self._next = start + rows / self.rows_per_second
        return max(0.0, self._next - now)

    def reset(self) -> None:
        self._next = None
