"""KEK rotation and destruction: re-wrapping every wrapped key under a new KEK, and retiring old KEKs.

This module is the service layer behind ``pgveil keys rotate-kek``, ``destroy-kek`` and ``list-keks``
(the CLI calls it; an admin API would call the same functions). It talks to the keystore through one
asyncpg connection and to the KEKs through :class:`~keymgmt.providers.KeyProvider` objects; it never
writes envelopes or touches the protected tables: a KEK rotation changes ``pgveil.deks.wrapped`` and
``kek_id`` only, never a DEK, so no stored value is rewritten and running proxies keep their cached keys.

Rotation, step by step (each step its own transaction, so a crash leaves a consistent keystore and a
second run resumes where the first stopped):

1. Pick the target KEK and record the job. An unfinished ``kind = 'kek'`` row of
   ``pgveil.rotation_jobs`` is resumed as it is. Otherwise the target is ``--to-config``'s provider's KEK,
   or a KEK version the configured provider has that the keystore has never seen (a rotation that
   crashed right after creating it, or one made in the HSM's own tools), or else a new version the
   provider creates. The target becomes the keystore's *primary* KEK in the same transaction as the
   job row, and ``pgveil_keys`` is notified, so every proxy wraps the keys it creates from then on
   under the target when its provider holds it.
2. Batches in key id order (keyset pagination, the position stored in the job row): lock up to
   ``batch_size`` keys not yet under the target (``FOR UPDATE SKIP LOCKED``: a concurrent shred waits at
   most one batch, and a key it holds is taken on the next sweep), unwrap each under the KEK it names,
   wrap it under the target, write both columns and the job's progress, commit. ``pgveil.deks`` first,
   then ``pgveil.blind_index_keys``.
3. Sweep again from the start while keys remain under other KEKs (skipped locks, or keys a proxy without
   the target created meanwhile); the job is done only when none remain, else it stays open and the
   next run resumes it.

Destruction refuses a KEK that is primary or that any wrapped key still names (saying how many and for
which columns). Otherwise, holding the KEK's row lock (``FOR UPDATE``, which the foreign-key lock of a
concurrent key insert waits for), it destroys the material in the provider that holds it and marks the
row DESTROYED; the row stays, so a backup's wrapped keys can be shown to name a KEK that no longer exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keymgmt.errors import KeyManagementError
from keymgmt.keystore import NOTIFY_CHANNEL
from keymgmt.providers import KekLifecycle, KeyProvider, ProviderChain, provider_of

log = logging.getLogger(__name__)

# First 8 bytes of sha256(b"pgveil.keystore.kek_rotation") as a signed bigint: one rotation at a time.
ROTATION_LOCK_ID = 0x2F4E6C1D9A83B512
DEFAULT_BATCH_SIZE = 500
MAX_SWEEPS = 5
_TABLES = ("deks", "blind_index_keys")
_NIL = uuid.UUID(int=0)


class KekRotationError(KeyManagementError):
    """A KEK rotation or destruction cannot proceed (another is running, a KEK is still needed)."""

    sqlstate = "55000"


@dataclass(frozen=True, slots=True)
class KekInfo:
    version: int
    kek_id: str
    provider_id: str
    state: str
    is_primary: bool
    created_at: datetime
    destroyed_at: datetime | None
    wrapped_keys: int  # data keys and blind-index keys still wrapped under this KEK


@dataclass(frozen=True, slots=True)
class RotationProgress:
    job_id: uuid.UUID
    to_kek_id: str
    done: int
    total: int


@dataclass(frozen=True, slots=True)
class RotationResult:
    job_id: uuid.UUID
    to_kek_id: str
    to_version: int
    resumed: bool
    rewrapped: int  # by this run
    done: int  # by the whole job, including runs before a crash
    remaining: int  # still under another KEK (the job then stays open)
    seconds: float


@dataclass(frozen=True, slots=True)
class DestroyResult:
    kek: KekInfo
    material_destroyed: bool  # False: no configured provider held it (destroy it where it lives)
    already_destroyed: bool


_LIST_KEKS = """
    SELECT k.version, k.kek_id, k.provider_id, k.state, k.is_primary, k.created_at, k.destroyed_at,
           (SELECT count(*) FROM pgveil.deks d WHERE d.kek_id = k.kek_id AND d.wrapped IS NOT NULL)
         + (SELECT count(*) FROM pgveil.blind_index_keys b WHERE b.kek_id = k.kek_id AND b.wrapped IS NOT NULL)
           AS wrapped_keys
    FROM pgveil.keks k"""
_OPEN_JOB = """
    SELECT job_id, to_kek_id, rows_done, rows_total, position FROM pgveil.rotation_jobs
    WHERE kind = 'kek' AND state IN ('pending', 'running', 'paused')"""
_REMAINING = """
    SELECT (SELECT count(*) FROM pgveil.deks WHERE wrapped IS NOT NULL AND kek_id <> $1)
         + (SELECT count(*) FROM pgveil.blind_index_keys WHERE wrapped IS NOT NULL AND kek_id <> $1)"""
_DEPENDENTS = """
    SELECT 'data keys' AS kind, column_id, count(*) AS n FROM pgveil.deks
    WHERE kek_id = $1 AND wrapped IS NOT NULL GROUP BY column_id
    UNION ALL
    SELECT 'blind-index keys', column_id, count(*) FROM pgveil.blind_index_keys
    WHERE kek_id = $1 AND wrapped IS NOT NULL GROUP BY column_id
    ORDER BY n DESC, column_id"""


# One query per table, spelled out (the table names are constants, never input).
_SELECT_BATCH = {
    table: f"""SELECT key_id, wrapped, kek_id FROM pgveil.{table}
        WHERE key_id > $1 AND wrapped IS NOT NULL AND kek_id <> $2
        ORDER BY key_id LIMIT $3 FOR UPDATE SKIP LOCKED"""  # noqa: S608
    for table in _TABLES
}
_UPDATE_BATCH = {
    table: f"""UPDATE pgveil.{table} t SET wrapped = v.w, kek_id = $3
        FROM unnest($1::uuid[], $2::bytea[]) AS v(k, w) WHERE t.key_id = v.k"""  # noqa: S608
    for table in _TABLES
}


def _kek_info(row: Any) -> KekInfo:
    return KekInfo(
        version=row["version"],
        kek_id=row["kek_id"],
        provider_id=row["provider_id"],
        state=row["state"],
        is_primary=row["is_primary"],
        created_at=row["created_at"],
        destroyed_at=row["destroyed_at"],
        wrapped_keys=row["wrapped_keys"],
    )


async def list_keks(conn: Any) -> list[KekInfo]:
    """Every KEK the keystore has met, oldest version first, with how many keys each still wraps."""
    return [_kek_info(r) for r in await conn.fetch(_LIST_KEKS + " ORDER BY k.version")]


async def _notify(conn: Any) -> None:
    await conn.execute("SELECT pg_notify($1, 'kek')", NOTIFY_CHANNEL)


async def rotate_kek(
    conn: Any,
    provider: KeyProvider,
    *,
    target: KeyProvider | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pause: float = 0.0,
    on_progress: Callable[[RotationProgress], None] | None = None,
) -> RotationResult:
    """Re-wraps every wrapped key under a new KEK (see the module docstring); resumes an unfinished run.

    ``provider`` holds the KEKs the keys are wrapped under now (the configuration's ``master_key`` and
    ``previous_master_keys``); ``target`` is another provider to move them to (``--to-config``), else
    ``provider`` makes the new KEK version. ``pause`` seconds are slept between batches (throttle).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ROTATION_LOCK_ID):
        raise KekRotationError("another pgveil keys rotate-kek is running on this keystore")
    try:
        keys = ProviderChain(target, provider) if target is not None else provider
        started = time.monotonic()
        job_id, to_kek, resumed = await _start_job(conn, provider, target, keys)
        rewrapped = 0
        for sweep in range(MAX_SWEEPS):
            row = await conn.fetchrow(
                "SELECT rows_done, rows_total, position FROM pgveil.rotation_jobs WHERE job_id = $1", job_id
            )
            position = json.loads(row["position"]) if row["position"] else {}
            done, total = row["rows_done"], row["rows_total"] or 0
            start = _TABLES.index(position.get("table", _TABLES[0]))
            for table in _TABLES[start:]:
                after = uuid.UUID(position["after"]) if position.get("table") == table else _NIL
                while True:
                    try:
                        n, after = await _rewrap_batch(conn, keys, table, to_kek, after, batch_size, job_id)
                    except KekRotationError as exc:
                        # The job stays open (the next run resumes it); what stopped it is recorded.
                        await conn.execute(
                            "UPDATE pgveil.rotation_jobs SET last_error = $2, updated_at = now() WHERE job_id = $1",
                            job_id,
                            exc.message,
                        )
                        raise
                    if n == 0:
                        break
                    rewrapped += n
                    done += n
                    total = max(total, done)
                    if on_progress is not None:
                        on_progress(RotationProgress(job_id, to_kek, done, total))
                    if pause > 0:
                        await asyncio.sleep(pause)
                position = {}
            remaining = await conn.fetchval(_REMAINING, to_kek)
            if remaining == 0:
                break
            log.info("KEK rotation sweep %d: %d keys still under other KEKs; sweeping again", sweep + 1, remaining)
            await conn.execute(
                """UPDATE pgveil.rotation_jobs SET position = NULL, rows_total = rows_done + $2, updated_at = now()
                   WHERE job_id = $1""",
                job_id,
                remaining,
            )
            await asyncio.sleep(min(0.2 * (sweep + 1), 1.0))
        if remaining == 0:
            await conn.execute(
                """UPDATE pgveil.rotation_jobs SET state = 'done', position = NULL, rows_total = rows_done,
                   last_error = NULL, finished_at = now(), updated_at = now() WHERE job_id = $1""",
                job_id,
            )
            await _notify(conn)
        version = await conn.fetchval("SELECT version FROM pgveil.keks WHERE kek_id = $1", to_kek)
        done = await conn.fetchval("SELECT rows_done FROM pgveil.rotation_jobs WHERE job_id = $1", job_id)
        return RotationResult(job_id, to_kek, version, resumed, rewrapped, done, remaining, time.monotonic() - started)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ROTATION_LOCK_ID)


async def _start_job(
    conn: Any, provider: KeyProvider, target: KeyProvider | None, keys: KeyProvider
) -> tuple[uuid.UUID, str, bool]:
    job = await conn.fetchrow(_OPEN_JOB)
    if job is not None:
        to_kek = job["to_kek_id"]
        if not keys.holds(to_kek):
            raise KekRotationError(
                f"an unfinished KEK rotation (job {job['job_id']}) moves keys to KEK {to_kek}, "
                "which this configuration's key providers do not hold",
                hint="run pgveil keys rotate-kek with the --to-config (or config) whose provider holds it",
            )
        log.info("resuming KEK rotation %s to %s (%d keys done)", job["job_id"], to_kek, job["rows_done"])
        return job["job_id"], to_kek, True
    primary = await conn.fetchval("SELECT kek_id FROM pgveil.keks WHERE is_primary")
    if target is not None:
        to_kek = target.kek_id
    else:
        known = await conn.fetchval("SELECT 1 FROM pgveil.keks WHERE kek_id = $1", provider.kek_id)
        if known is None and primary is not None:
            to_kek = provider.kek_id  # a version the keystore has never seen: adopt it
        elif isinstance(provider, KekLifecycle):
            to_kek = provider.create_kek()
        else:
            raise KekRotationError(
                f"the {provider.provider_id} key provider cannot create a KEK version",
                hint="create one in the key store and run rotate-kek again, or use --to-config",
            )
    state = await conn.fetchval("SELECT state FROM pgveil.keks WHERE kek_id = $1", to_kek)
    if state is not None and state != "ENABLED":
        raise KekRotationError(f"KEK {to_kek} is {state}; it cannot become primary")
    job_id = uuid.uuid4()
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO pgveil.keks (kek_id, provider_id) SELECT $1::text, $2::text
               WHERE NOT EXISTS (SELECT 1 FROM pgveil.keks WHERE kek_id = $1::text)""",
            to_kek,
            provider_of(to_kek),
        )
        await conn.execute(
            "UPDATE pgveil.keks SET is_primary = false WHERE is_primary AND kek_id <> $1",
            to_kek,
        )
        await conn.execute("UPDATE pgveil.keks SET is_primary = true WHERE kek_id = $1", to_kek)
        total = await conn.fetchval(_REMAINING, to_kek)
        await conn.execute(
            """INSERT INTO pgveil.rotation_jobs (job_id, kind, from_kek_id, to_kek_id, state, rows_total)
               VALUES ($1, 'kek', $2, $3, 'running', $4)""",
            job_id,
            primary,
            to_kek,
            total,
        )
        await _notify(conn)
    log.info("KEK rotation %s: %d keys to re-wrap from %s to %s", job_id, total, primary, to_kek)
    return job_id, to_kek, False


async def _rewrap_batch(
    conn: Any, keys: KeyProvider, table: str, to_kek: str, after: uuid.UUID, batch_size: int, job_id: uuid.UUID
) -> tuple[int, uuid.UUID]:
    async with conn.transaction():
        rows = await conn.fetch(_SELECT_BATCH[table], after, to_kek, batch_size)
        if not rows:
            return 0, after
        ids = [r["key_id"] for r in rows]
        try:
            blobs = [keys.wrap(keys.unwrap(bytes(r["wrapped"]), r["kek_id"]), to_kek) for r in rows]
        except KeyManagementError as exc:
            raise KekRotationError(
                f"cannot re-wrap a key of pgveil.{table} (after key id {after}): {exc.message}", hint=exc.hint
            ) from exc
        await conn.execute(_UPDATE_BATCH[table], ids, blobs, to_kek)
        last = ids[-1]
        await conn.execute(
            """UPDATE pgveil.rotation_jobs SET position = $2::jsonb, rows_done = rows_done + $3,
               last_error = NULL, updated_at = now() WHERE job_id = $1""",
            job_id,
            json.dumps({"table": table, "after": str(last)}),
            len(rows),
        )
    return len(rows), last


async def destroy_kek(conn: Any, provider: KeyProvider, version: int) -> DestroyResult:
    """Destroys KEK ``version`` if nothing depends on it (see the module docstring)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT kek_id, state, is_primary FROM pgveil.keks WHERE version = $1 FOR UPDATE", version
        )
        if row is None:
            raise KekRotationError(
                f"this keystore has no KEK version {version}", hint="pgveil keys list-keks lists the versions"
            )
        kek_id = row["kek_id"]
        already = row["state"] == "DESTROYED"
        if row["is_primary"]:
            raise KekRotationError(
                f"KEK version {version} ({kek_id}) is the primary KEK: new data keys are wrapped under it",
                hint="rotate to another KEK first (pgveil keys rotate-kek)",
            )
        if not already:
            dependents = await conn.fetch(_DEPENDENTS, kek_id)
            if dependents:
                count = sum(r["n"] for r in dependents)
                shown = ", ".join(f"{r['column_id']} ({r['n']} {r['kind']})" for r in dependents[:10])
                more = f" and {len(dependents) - 10} more columns" if len(dependents) > 10 else ""
                raise KekRotationError(
                    f"KEK version {version} ({kek_id}) still wraps {count} keys: {shown}{more}",
                    hint="run pgveil keys rotate-kek to re-wrap them under the primary KEK, then destroy it",
                )
        material = provider.destroy_kek(kek_id) if isinstance(provider, KekLifecycle) else False
        if not already:
            await conn.execute(
                "UPDATE pgveil.keks SET state = 'DESTROYED', destroyed_at = now() WHERE kek_id = $1", kek_id
            )
        info = await conn.fetchrow(_LIST_KEKS + " WHERE k.kek_id = $1", kek_id)
        await _notify(conn)
    if not material:
        log.warning(
            "KEK %s is marked destroyed in the keystore, but no configured key provider held its material", kek_id
        )
    return DestroyResult(_kek_info(info), material, already)
