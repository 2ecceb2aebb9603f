"""The keystore: wrapped DEKs in schema ``pgveil`` of a PostgreSQL database, and the cache in front.

This module owns the keystore's schema (versioned migrations: the files ``keymgmt/migrations/NNNN_name.sql``,
applied in name order, each recorded by name in ``pgveil.schema_migrations``), creating and loading DEK versions
(wrapped by the :class:`~keymgmt.providers.KeyProvider`, unwrapped only into memory), the key cache's
filling, and the LISTEN connection that tells the cache to re-check. It does not decide who may
see what, never logs or stores unwrapped keys, and never writes envelopes. Rotation, shredding and the
ledger write these tables in later modules; they NOTIFY channel ``pgveil_keys`` after committing.

A notification carries no authority: any role may NOTIFY any channel, so a message on ``pgveil_keys``
is only a hint that key state may have changed. Its payload is ignored (writers may put a key id or a
column id there for people reading ``pg_stat_activity``; pgveil never acts on it and logs only its
length). Each hint asks for a refresh, which re-reads from ``pgveil.deks`` the state of every cached
key version and the current version of every cached scope, and drops exactly what changed (see
:mod:`keymgmt.keycache`). Hints are coalesced (one refresh running, one queued) and refreshes start at
least ``refresh_interval`` apart, so a flood of notifications costs at most two bounded keystore
queries per interval and never empties the cache. A refresh that fails clears the cache (fail closed:
what changed cannot be known).

If the LISTEN connection is lost, the cache is cleared and its TTL drops to one second until the
listener is back, so a shred elsewhere is still honoured within about a second, at the cost of more
keystore reads; on reconnection the cache is cleared again, since notifications may have been missed.

Current key of a scope: the highest version of ``(column_id, subject_id)``. If it is ENABLED it
encrypts; if DESTROYED the scope is shredded and stays so (writes are refused); if DISABLED writes are
refused until an operator acts. A scope with no row yet gets version 1 on first use. A data subject's
highest version is current only while its ``kind_generation`` is not below its kind's generation
(``pgveil.subject_kinds``): ``pgveil keys rotate --subject-kind`` raises the generation, every cached pointer
to such a version is dropped by the refresh its NOTIFY triggers, and the subject's next write creates its
next version (:meth:`Keystore.create_subject_versions`), so a rotation costs nothing per subject up front.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import importlib.resources
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any

import asyncpg

from keymgmt.envelope import (
    DEK_LENGTH,
    SUBJECT_SCOPE_PREFIX,
    DataKey,
    KeyId,
    KeyState,
    Subject,
    subject_kind_of_scope,
)
from keymgmt.errors import KeyDestroyed, KeyDisabled, KeystoreError, UnknownKey
from keymgmt.keycache import KeyCache, KeyFacts, RefreshGate, RefreshResult, Scope
from keymgmt.providers import KeyProvider, provider_of

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "pgveil_keys"
# First 8 bytes of sha256(b"pgveil.keystore.migrations") as a signed bigint: an advisory lock id that
# an application sharing the database is unlikely to use.
MIGRATION_LOCK_ID = -7261815439346342433
# While the listener is down, nothing tells us about shreds elsewhere; a short TTL bounds staleness.
DEGRADED_TTL_SECONDS = 1.0
# Hints (notifications) start at most one refresh per interval: a shred is honoured within about this
# long after its NOTIFY, and a flood costs at most two keystore queries per interval.
REFRESH_INTERVAL_SECONDS = 0.1
_RECONNECT_MIN_DELAY = 0.2
_RECONNECT_MAX_DELAY = 5.0


# What asyncpg raises when the server, the network or the driver's connection state fails.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned migration file, ``keymgmt/migrations/NNNN_name.sql``; ``name`` is the file's stem,
    the value recorded in ``pgveil.schema_migrations``."""

    name: str
    sql: str


_MIGRATION_NAME = re.compile(r"[0-9]{4}_[a-z0-9_]+")


UNWRAP_BUCKETS: tuple[float, ...] = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
"""Upper bounds (seconds) of the unwrap latency histogram: a local key file unwraps in microseconds, an
HSM over PKCS#11 in milliseconds, a remote KMS in tens of them."""


class ProviderCalls:
    """Counts and times the key provider's wrap and unwrap calls (read by the metrics): per operation the
    calls, the failures, and for unwrap a latency histogram over :data:`UNWRAP_BUCKETS`."""

    def __init__(self) -> None:
        self.calls = {"wrap": 0, "unwrap": 0}
        self.errors = {"wrap": 0, "unwrap": 0}
        self.unwrap_buckets = [0] * len(UNWRAP_BUCKETS)  # per bucket, not cumulative
        self.unwrap_seconds = 0.0

    @contextlib.contextmanager
    def timed(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.errors[operation] += 1
            raise
        finally:
            self.calls[operation] += 1
            if operation == "unwrap":
                elapsed = time.perf_counter() - started
                self.unwrap_seconds += elapsed
                i = bisect.bisect_left(UNWRAP_BUCKETS, elapsed)
                if i < len(self.unwrap_buckets):
                    self.unwrap_buckets[i] += 1


def load_migrations(directory: Traversable | None = None) -> tuple[Migration, ...]:
    """Reads the migration files in name order (the four-digit prefix orders them).

    A file whose name does not follow ``NNNN_name.sql`` is an error rather than skipped, so a typo cannot
    silently leave a migration out; two files with one prefix are allowed (two branches may each add
    one) and apply in name order.
    """
    folder = directory if directory is not None else importlib.resources.files("keymgmt") / "migrations"
    migrations: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        stem = entry.name[: -len(".sql")]
        if not _MIGRATION_NAME.fullmatch(stem):
            raise KeystoreError(f"keystore migration file {entry.name} is not named NNNN_name.sql")
        migrations.append(Migration(stem, entry.read_text(encoding="utf-8")))
    migrations.sort(key=lambda m: m.name)
    return tuple(migrations)


MIGRATIONS: tuple[Migration, ...] = load_migrations()


async def init_keystore(conn: Any) -> list[str]:
    """Creates or upgrades the keystore schema on ``conn`` (an asyncpg connection).

    Idempotent; returns the names of the migrations applied by this call (empty when up to date).
    The migrations are the files of ``keymgmt/migrations`` (:func:`load_migrations`), applied in name
    order; a keystore records each by its file's stem, so one that was migrated before the SQL moved
    into files (same names) is not migrated again. Everything runs in one transaction under an advisory
    lock, so concurrent starters serialise and a failed migration leaves nothing half-applied.
    """
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
            await conn.execute("CREATE SCHEMA IF NOT EXISTS pgveil")
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS pgveil.schema_migrations (
                        name       text PRIMARY KEY,
                        applied_at timestamptz NOT NULL DEFAULT now()
                    )"""
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM pgveil.schema_migrations")}
            known = {m.name for m in MIGRATIONS}
            if done - known:
                log.warning(
                    "keystore has migrations this version does not know (%s): a newer pgveil upgraded it",
                    ", ".join(sorted(done - known)),
                )
            applied: list[str] = []
            for migration in MIGRATIONS:
                if migration.name in done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute("INSERT INTO pgveil.schema_migrations (name) VALUES ($1)", migration.name)
                applied.append(migration.name)
    except _DRIVER_ERRORS as exc:
        raise KeystoreError(f"keystore migration failed ({_describe(exc)})") from exc
    if applied:
        log.info("keystore schema migrated: %s", ", ".join(applied))
    return applied


def _describe(exc: BaseException) -> str:
    # asyncpg's message and detail can quote row values (a subject id in a key violation); report the
    # class and SQLSTATE only.
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}, SQLSTATE {sqlstate}" if sqlstate else type(exc).__name__


@contextlib.contextmanager
def _keystore_errors() -> Iterator[None]:
    try:
        yield
    except asyncpg.UndefinedTableError as exc:
        raise KeystoreError("the keystore schema is missing", hint="initialise the keystore (init_keystore)") from exc
    except _DRIVER_ERRORS as exc:
        raise KeystoreError(f"keystore query failed ({_describe(exc)})") from exc


_CURRENT_COLUMN_KEY = """
    SELECT key_id, column_id, subject_id, version, state, wrapped, kek_id FROM pgveil.deks
    WHERE column_id = $1 AND subject_id IS NULL ORDER BY version DESC LIMIT 1"""
# A subject's highest version, and whether a rotation of its kind has made it stale (its kind_generation
# is below the kind's generation, see migration 0014): a stale version still opens what it sealed but no
# longer seals; the next write creates the subject's next version (:data:`_INSERT_NEXT_SUBJECT_VERSIONS`).
_CURRENT_SUBJECT_KEY = """
    SELECT d.key_id, d.column_id, d.subject_id, d.version, d.state, d.wrapped, d.kek_id,
           d.kind_generation < coalesce((SELECT k.generation FROM pgveil.subject_kinds k WHERE k.kind = $3), 0)
               AS stale
    FROM pgveil.deks d WHERE d.column_id = $1 AND d.subject_id = $2 ORDER BY d.version DESC LIMIT 1"""
_KEYS_BY_IDS = """
    SELECT key_id, column_id, subject_id, version, state, wrapped, kek_id FROM pgveil.deks
    WHERE key_id = ANY($1::uuid[])"""
_KEY_BY_ID = """
    SELECT key_id, column_id, subject_id, version, state, wrapped, kek_id FROM pgveil.deks
    WHERE key_id = $1"""
# Only under a KEK that is still ENABLED: the row lock (FOR KEY SHARE, as the foreign key takes) waits
# for a concurrent ``destroy-kek`` (FOR UPDATE), whose count of dependent keys then includes this one,
# or sees its DESTROYED state and inserts nothing.
_INSERT_FIRST_VERSION = """
    INSERT INTO pgveil.deks (key_id, scope_kind, column_id, subject_id, version, state, wrapped, kek_id)
    SELECT $1::uuid, $2::text, $3::text, $4::bytea, 1, 'ENABLED', $5::bytea, $6::text
    WHERE EXISTS (SELECT 1 FROM pgveil.keks WHERE kek_id = $6::text AND state = 'ENABLED' FOR KEY SHARE)
    ON CONFLICT DO NOTHING"""
# A data subject's first key version: the same guard, plus the subject's row in pgveil.subjects (a data-
# modifying CTE runs whether or not it is read). Returns 1 when this call created the key, 0 when another
# instance did first (the unique index deks_subject_version) or the KEK is no longer ENABLED.
_INSERT_FIRST_SUBJECT_VERSION = """
    WITH k AS (
        INSERT INTO pgveil.deks (key_id, scope_kind, column_id, subject_id, subject_kind, version, state, wrapped,
                                 kek_id, kind_generation)
        SELECT $1::uuid, 'subject', $2::text, $3::bytea, $6::text, 1, 'ENABLED', $4::bytea, $5::text,
               coalesce((SELECT g.generation FROM pgveil.subject_kinds g WHERE g.kind = $6::text), 0)
        WHERE EXISTS (SELECT 1 FROM pgveil.keks WHERE kek_id = $5::text AND state = 'ENABLED' FOR KEY SHARE)
          AND NOT EXISTS (SELECT 1 FROM pgveil.subjects WHERE kind = $6::text AND subject_id = $3::bytea
                          AND state = 'SHREDDED')
        ON CONFLICT DO NOTHING
        RETURNING key_id
    ), s AS (
        INSERT INTO pgveil.subjects (kind, subject_id) SELECT $6::text, $3::bytea FROM k ON CONFLICT DO NOTHING
    )
    SELECT count(*) FROM k"""
_SUBJECT_SHREDDED = "SELECT state = 'SHREDDED' FROM pgveil.subjects WHERE kind = $1 AND subject_id = $2"
# The next version of each named subject whose highest version is ENABLED but stale (below its kind's
# generation), stamped with the kind's generation: never for a SHREDDED subject, only under an ENABLED KEK
# (as the first version). Two creators of one subject's next version race on the unique index
# deks_subject_version: one inserts, the other's row is skipped (DO NOTHING) and it reads the winner's.
# $1 key ids, $2 subject ids, $3 wrapped keys (one each, same order), $4 the scope, $5 the kind, $6 the KEK.
_INSERT_NEXT_SUBJECT_VERSIONS = """
    INSERT INTO pgveil.deks (key_id, scope_kind, column_id, subject_id, subject_kind, version, state, wrapped,
                             kek_id, kind_generation)
    SELECT n.key_id, 'subject', $4::text, n.subject_id, $5::text, cur.version + 1, 'ENABLED', n.wrapped,
           $6::text, g.generation
    FROM unnest($1::uuid[], $2::bytea[], $3::bytea[]) AS n(key_id, subject_id, wrapped)
    CROSS JOIN (SELECT coalesce(max(k.generation), 0) AS generation FROM pgveil.subject_kinds k
                WHERE k.kind = $5::text) g
    CROSS JOIN LATERAL (SELECT d.version, d.state, d.kind_generation FROM pgveil.deks d
                        WHERE d.column_id = $4::text AND d.subject_id = n.subject_id
                        ORDER BY d.version DESC LIMIT 1) cur
    WHERE cur.state = 'ENABLED' AND cur.kind_generation < g.generation
      AND NOT EXISTS (SELECT 1 FROM pgveil.subjects s WHERE s.kind = $5::text AND s.subject_id = n.subject_id
                      AND s.state = 'SHREDDED')
      AND EXISTS (SELECT 1 FROM pgveil.keks WHERE kek_id = $6::text AND state = 'ENABLED' FOR KEY SHARE)
    ON CONFLICT DO NOTHING"""
# The first KEK a keystore meets becomes primary. No conflict target: a concurrent registration of
# another KEK as primary (the one-primary index) also ends in DO NOTHING, and the caller registers again.
# The NOT EXISTS keeps a known KEK from drawing a version number it would not use.
_REGISTER_KEK = """
    INSERT INTO pgveil.keks (kek_id, provider_id, is_primary)
    SELECT $1::text, $2::text, NOT EXISTS (SELECT 1 FROM pgveil.keks WHERE is_primary)
    WHERE NOT EXISTS (SELECT 1 FROM pgveil.keks WHERE kek_id = $1::text)
    ON CONFLICT DO NOTHING"""
_KEK_STATE = "SELECT state, is_primary FROM pgveil.keks WHERE kek_id = $1"
_PRIMARY_KEK = "SELECT kek_id FROM pgveil.keks WHERE is_primary"
_PRELOAD = """
    SELECT key_id, column_id, subject_id, version, state, wrapped, kek_id,
           version = max(version) OVER (PARTITION BY column_id, subject_id) AS is_current
    FROM pgveil.deks WHERE column_id = ANY($1::text[])
    ORDER BY created_at DESC, version DESC LIMIT $2"""

_STATE_OF_KEYS = """
    SELECT key_id, column_id, subject_id, version, state FROM pgveil.deks WHERE key_id = ANY($1::uuid[])"""
# The highest version of each (column, subject) scope; the two branches match the two partial unique
# indexes, so each scope costs one index probe.
_CURRENT_OF_SCOPES = """
    SELECT s.i, cur.key_id, cur.state, cur.stale
    FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS s(column_id, subject_id, i)
    CROSS JOIN LATERAL (
        (SELECT d.key_id, d.state, d.version, false AS stale FROM pgveil.deks d
         WHERE s.subject_id IS NULL AND d.column_id = s.column_id AND d.subject_id IS NULL
         ORDER BY d.version DESC LIMIT 1)
        UNION ALL
        (SELECT d.key_id, d.state, d.version,
                d.kind_generation < coalesce((SELECT k.generation FROM pgveil.subject_kinds k
                                              WHERE 'pgveil.subject.' || k.kind = s.column_id), 0) AS stale
         FROM pgveil.deks d
         WHERE d.column_id = s.column_id AND d.subject_id = s.subject_id
         ORDER BY d.version DESC LIMIT 1)
    ) cur"""

RefreshCallback = Callable[[RefreshResult], None]


class Keystore:
    """DEK versions in the keystore database, with a bounded TTL cache of unwrapped keys in front.

    ``source`` is an asyncpg pool (borrowed: :meth:`close` leaves it open, and :meth:`listen` holds one
    of its connections) or a DSN (a small pool is created on first use and closed by :meth:`close`).
    The ``cached_*`` methods are synchronous and never touch the database: the hot path uses them and
    falls back to the ``async`` methods on a miss.
    """

    def __init__(
        self,
        source: Any,
        provider: KeyProvider,
        *,
        max_keys: int = 10_000,
        ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        pool_max_size: int = 4,
        refresh_interval: float = REFRESH_INTERVAL_SECONDS,
    ) -> None:
        self._provider = provider
        self._cache = KeyCache(max_keys, ttl_seconds, clock)
        self._gate = RefreshGate(refresh_interval, clock)
        self._refresher: asyncio.Task[None] | None = None
        self.notifications = 0
        self.refreshes = 0
        self.refresh_failures = 0
        self.provider_calls = ProviderCalls()
        self._ttl_seconds = ttl_seconds
        if isinstance(source, str):
            self._dsn: str | None = source
            self._pool: Any = None
        else:
            self._dsn = None
            self._pool = source
        self._pool_max_size = pool_max_size
        self._pool_lock = asyncio.Lock()
        self._wrap_kek: str | None = None  # the KEK new data keys are wrapped under; None = look it up
        self._warned_kek: str | None = None
        self._inflight: dict[tuple[object, ...], asyncio.Task[DataKey]] = {}
        self._listen_conn: Any = None
        self._listen_on_lost: Callable[[Any], None] | None = None
        self._listen_epoch = 0
        self._listen_callback: RefreshCallback | None = None
        self._listen_wanted = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"Keystore(provider={self._provider!r}, cache={self._cache!r}, listening={self.listening})"

    async def __aenter__(self) -> Keystore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up and the cache may keep keys for the full TTL."""
        return self._listen_conn is not None

    @property
    def cache(self) -> KeyCache:
        return self._cache

    # -- hot path: synchronous cache lookups ------------------------------------------------------
    def cached_key(self, key_id: bytes) -> DataKey | None:
        return self._cache.get(key_id)

    def cached_active_key(self, column_id: str, subject: bytes | None = None) -> DataKey | None:
        return self._cache.get_current(column_id, subject)

    # -- loading ----------------------------------------------------------------------------------
    async def active_key(self, column_id: str, subject: bytes | None = None) -> DataKey:
        """The scope's current ENABLED key version, creating version 1 if the scope has none.

        Raises :class:`KeyDestroyed` for a shredded scope and :class:`KeyDisabled` when the current
        version is disabled: in both cases nothing may be encrypted for it.
        """
        key = self._cache.get_current(column_id, subject)
        if key is not None:
            return key
        if not column_id:
            raise ValueError("column id must not be empty")
        subject = None if subject is None else bytes(subject)
        return await self._single_flight(("scope", column_id, subject), lambda: self._load_current(column_id, subject))

    def cached_subject_key(self, subject: Subject) -> DataKey | None:
        return self._cache.get_current(subject.scope, subject.subject_id)

    async def subject_key(self, subject: Subject) -> DataKey:
        """The data subject's current ENABLED key (one per subject, shared by every column of every table
        of its kind), created on first use: race-free between instances (see :data:`_INSERT_FIRST_SUBJECT_VERSION`).
        Raises :class:`KeyDestroyed` for a shredded subject."""
        return await self.active_key(subject.scope, subject.subject_id)

    async def key_by_id(self, key_id: bytes) -> DataKey:
        """The key version with this id, ENABLED or DISABLED.

        Raises :class:`UnknownKey` if no such version exists and :class:`KeyDestroyed` if it was destroyed.
        """
        key = self._cache.get(key_id)
        if key is not None:
            return key
        if len(key_id) != 16:
            raise UnknownKey()
        kid = KeyId(bytes(key_id))
        return await self._single_flight(("id", kid), lambda: self._load_by_id(kid))

    async def keys_by_ids(self, key_ids: Iterable[bytes]) -> int:
        """Loads the key versions with these ids (those not cached) in one keystore query, as
        :meth:`key_by_id` would one by one; unknown and destroyed ids are skipped (a later
        :meth:`key_by_id` reports them). Returns how many were cached."""
        wanted = [
            uuid.UUID(bytes=bytes(k)) for k in dict.fromkeys(key_ids) if len(k) == 16 and self._cache.get(k) is None
        ]
        if not wanted:
            return 0
        pool = await self._get_pool()
        generation = self._cache.generation
        with _keystore_errors():
            rows = await pool.fetch(_KEYS_BY_IDS, wanted[: self._cache.max_keys])
        loaded = 0
        for row in rows:
            if row["state"] == KeyState.DESTROYED.value:
                continue
            if self._cache.put(self._key_from_row(row), current=False, generation=generation):
                loaded += 1
        return loaded

    async def preload(self, column_ids: Iterable[str]) -> int:
        """Loads every live key version of these columns (all subjects) into the cache.

        At most ``max_keys`` versions, newest first; returns how many were cached.
        """
        wanted = sorted(set(column_ids))
        if not wanted:
            return 0
        pool = await self._get_pool()
        generation = self._cache.generation
        with _keystore_errors():
            rows = await pool.fetch(_PRELOAD, wanted, self._cache.max_keys)
        loaded = 0
        for row in reversed(rows):  # oldest first, so the newest end up most recently used
            if row["state"] == KeyState.DESTROYED.value:
                continue
            key = self._key_from_row(row)
            if self._cache.put(key, current=bool(row["is_current"]), generation=generation):
                loaded += 1
        return loaded

    async def refresh(self) -> RefreshResult:
        """Re-reads the state of every cached key version and scope pointer now, and drops what changed.

        For code in this process that changed key state itself; notifications go through the
        coalescing, rate-limited path instead (:meth:`request_refresh`)."""
        snapshot = self._cache.begin_refresh()
        if not snapshot.key_ids and not snapshot.current:
            return RefreshResult(0, 0, 0)
        pool = await self._get_pool()
        scopes = snapshot.scopes
        # Both reads in one snapshot, so a change committed between them cannot show in one and not the other.
        with _keystore_errors():
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                rows = await conn.fetch(_STATE_OF_KEYS, [uuid.UUID(bytes=k) for k in snapshot.key_ids])
                current_rows = await conn.fetch(_CURRENT_OF_SCOPES, [c for c, _ in scopes], [s for _, s in scopes])
        facts = {
            r["key_id"].bytes: KeyFacts(
                KeyState(r["state"]),
                r["column_id"],
                None if r["subject_id"] is None else bytes(r["subject_id"]),
                r["version"],
            )
            for r in rows
        }
        current: dict[Scope, bytes | None] = {}
        for r in current_rows:
            scope = scopes[r["i"] - 1]
            # A subject version a rotation of its kind made stale is no longer current: the next write
            # misses and creates the subject's next version.
            enabled = r["state"] == KeyState.ENABLED.value and not r["stale"]
            current[scope] = r["key_id"].bytes if enabled else None
        result = self._cache.apply_refresh(snapshot, facts, current)
        self.refreshes += 1
        if result.keys_dropped or result.pointers_dropped:
            log.info(
                "key refresh: %d of %d cached key versions changed, %d current-version pointers dropped",
                result.keys_dropped,
                result.keys_checked,
                result.pointers_dropped,
            )
        return result

    def request_refresh(self) -> None:
        """A hint that key state may have changed: schedules a refresh (coalesced and rate-limited)."""
        self._gate.hint()
        if self._closed:
            return
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._run_refreshes())

    async def _run_refreshes(self) -> None:
        gate = self._gate
        while not self._closed:
            wait = gate.wait()
            if wait is None:
                return
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            gate.start()
            try:
                result = await self.refresh()
            except Exception as exc:
                # What changed cannot be known: nothing cached may be trusted any more.
                self.refresh_failures += 1
                self._cache.clear()
                reason = str(exc) if isinstance(exc, KeystoreError) else _describe(exc)
                log.warning("key refresh failed (%s): key cache cleared", reason)
                continue
            finally:
                gate.finish()
            if self._listen_callback is not None:
                try:
                    self._listen_callback(result)
                except Exception:
                    log.exception("key refresh callback failed")

    async def _single_flight(self, token: tuple[object, ...], load: Callable[[], Awaitable[DataKey]]) -> DataKey:
        # Concurrent misses for the same key share one keystore read; a caller's cancellation does not
        # cancel the shared read (shield), the others still need it.
        task = self._inflight.get(token)
        if task is None:

            async def run() -> DataKey:
                return await load()

            task = asyncio.get_running_loop().create_task(run())
            self._inflight[token] = task

            def done(t: asyncio.Task[DataKey]) -> None:
                if self._inflight.get(token) is t:
                    del self._inflight[token]
                if not t.cancelled():
                    t.exception()  # retrieved here so an unawaited failure is not reported at exit

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _load_current(self, column_id: str, subject: bytes | None) -> DataKey:
        pool = await self._get_pool()
        generation = self._cache.generation
        row = await self._fetch_current(pool, column_id, subject)
        if row is None:
            await self._create_first_version(pool, column_id, subject)
            row = await self._fetch_current(pool, column_id, subject)
            if row is None:
                raise KeystoreError(f"a data key for {column_id} was created but cannot be read back")
        kind = subject_kind_of_scope(column_id)
        if subject is not None and kind is not None and row["state"] == KeyState.ENABLED.value and row["stale"]:
            # A rotation of the kind retired this version for writes: the subject's next version now.
            await self.create_subject_versions(kind, [subject], pool)
            row = await self._fetch_current(pool, column_id, subject)
            if row is None or row["stale"]:
                with _keystore_errors():
                    shredded = await pool.fetchval(_SUBJECT_SHREDDED, kind, subject)
                if shredded:
                    raise KeyDestroyed(f"the data subject's keys of kind {kind} were destroyed (shredded)")
                raise KeystoreError(f"cannot create the next data key version of a data subject of kind {kind}")
        state = KeyState(row["state"])
        if state is KeyState.DESTROYED:
            raise KeyDestroyed(f"the data key of {column_id} for this scope was destroyed")
        if state is KeyState.DISABLED:
            raise KeyDisabled(
                f"the current data key version of {column_id} is disabled",
                hint="enable it or rotate to a new version",
            )
        key = self._key_from_row(row)
        self._cache.put(key, current=True, generation=generation)
        return key

    async def _load_by_id(self, key_id: KeyId) -> DataKey:
        pool = await self._get_pool()
        generation = self._cache.generation
        with _keystore_errors():
            row = await pool.fetchrow(_KEY_BY_ID, uuid.UUID(bytes=key_id))
        if row is None:
            raise UnknownKey()
        if row["state"] == KeyState.DESTROYED.value:
            raise KeyDestroyed()
        key = self._key_from_row(row)
        # Whether it is its scope's current version is unknown here; active_key establishes that.
        self._cache.put(key, current=False, generation=generation)
        return key

    async def _fetch_current(self, pool: Any, column_id: str, subject: bytes | None) -> Any:
        with _keystore_errors():
            if subject is None:
                return await pool.fetchrow(_CURRENT_COLUMN_KEY, column_id)
            kind = subject_kind_of_scope(column_id) or ""
            return await pool.fetchrow(_CURRENT_SUBJECT_KEY, column_id, subject, kind)

    async def create_subject_versions(self, kind: str, subject_ids: Iterable[bytes], pool: Any = None) -> int:
        """Creates the next key version of each named subject of ``kind`` whose current version a rotation
        of the kind made stale (see migration 0014), in one keystore statement; subjects that are current
        already, SHREDDED, or whose highest version is not ENABLED get nothing. Race-free with other
        instances and the re-encryption job doing the same (the unique index decides, the loser's row is
        skipped). Returns how many versions this call created. The write path calls it for one subject, the
        job for the subjects of a batch."""
        wanted = [bytes(s) for s in dict.fromkeys(bytes(s) for s in subject_ids)]
        if not wanted:
            return 0
        pool = pool if pool is not None else await self._get_pool()
        scope = SUBJECT_SCOPE_PREFIX + kind
        for _attempt in range(2):
            key_ids = [uuid.uuid4() for _ in wanted]
            wrapped: list[bytes] = []
            kek_ids: set[str] = set()
            for _ in wanted:
                w, kek_id = await self.wrap_for_new_key(os.urandom(DEK_LENGTH), pool)
                wrapped.append(w)
                kek_ids.add(kek_id)
            if len(kek_ids) != 1:  # the primary KEK changed while wrapping: wrap again
                self._wrap_kek = None
                continue
            with _keystore_errors():
                status = await pool.execute(
                    _INSERT_NEXT_SUBJECT_VERSIONS, key_ids, wanted, wrapped, scope, kind, kek_id
                )
            created = int(status.rsplit(" ", 1)[1])
            if created:
                log.info("created %d data key version(s) of data subjects of kind %s", created, kind)
            if created == len(wanted):
                return created
            with _keystore_errors():  # some were current already, shredded, or the KEK is no longer ENABLED
                kek_ok = await pool.fetchval("SELECT state = 'ENABLED' FROM pgveil.keks WHERE kek_id = $1", kek_id)
            if kek_ok:
                return created
            self._wrap_kek = None  # the KEK was destroyed meanwhile: ask which one is primary now
        return 0

    async def _create_first_version(self, pool: Any, column_id: str, subject: bytes | None) -> None:
        # Two instances may both get here; the unique index lets exactly one insert win and the
        # loser's DO NOTHING plus re-select returns the winner's key.
        material = os.urandom(DEK_LENGTH)
        key_uuid = uuid.uuid4()
        kind = subject_kind_of_scope(column_id)
        for _attempt in range(2):
            wrapped, kek_id = await self.wrap_for_new_key(material, pool)
            with _keystore_errors():
                if kind is not None and subject is not None:
                    created = await pool.fetchval(
                        _INSERT_FIRST_SUBJECT_VERSION, key_uuid, column_id, subject, wrapped, kek_id, kind
                    )
                    status = f"INSERT 0 {created}"
                else:
                    status = await pool.execute(
                        _INSERT_FIRST_VERSION,
                        key_uuid,
                        "column" if subject is None else "subject",
                        column_id,
                        subject,
                        wrapped,
                        kek_id,
                    )
            if status.endswith(" 1"):
                # Never the subject id: it is personal data.
                log.info("created data key %s (version 1) for %s", key_uuid, column_id)
                return
            if await self._fetch_current(pool, column_id, subject) is not None:
                return  # another instance created it first
            if kind is not None and subject is not None:
                with _keystore_errors():
                    shredded = await pool.fetchval(_SUBJECT_SHREDDED, kind, subject)
                if shredded:
                    raise KeyDestroyed(f"the data subject's keys of kind {kind} were destroyed (shredded)")
            # Nobody else won: the KEK is no longer ENABLED (destroy-kek). Ask which one is primary now.
            self._wrap_kek = None
        raise KeystoreError(
            f"cannot create a data key for {column_id}: KEK {kek_id} is not enabled in the keystore, and this "
            "proxy's key provider does not hold the primary KEK",
            hint="configure the key provider that holds the primary KEK (pgveil keys list-keks)",
        )

    async def wrap_for_new_key(self, material: bytes, pool: Any = None) -> tuple[bytes, str]:
        """Wraps a new DEK (or blind-index key) under the keystore's primary KEK when this process's
        provider holds it, else under the provider's newest (a proxy not yet given a rotation's new
        provider; ``pgveil keys rotate-kek`` moves such keys later). Returns (wrapped, kek_id); the KEK
        is registered in ``pgveil.keks``. For every code that inserts wrapped keys (rotation too)."""
        pool = pool if pool is not None else await self._get_pool()
        kek_id = self._wrap_kek
        if kek_id is None:
            with _keystore_errors():
                primary = await pool.fetchval(_PRIMARY_KEK)
            if primary is not None and self._provider.holds(primary):
                kek_id = primary
            else:
                kek_id = self._provider.kek_id
                if primary is not None and self._warned_kek != primary:
                    self._warned_kek = primary
                    log.warning(
                        "the keystore's primary KEK %s is not held by this proxy's key provider; new data keys "
                        "are wrapped under %s until it is (pgveil keys rotate-kek moves them later)",
                        primary,
                        kek_id,
                    )
            await self._register_kek(pool, kek_id)
            self._wrap_kek = kek_id
        with self.provider_calls.timed("wrap"):
            wrapped = self._provider.wrap(material, kek_id)
        return wrapped, kek_id

    async def _register_kek(self, pool: Any, kek_id: str) -> None:
        with _keystore_errors():
            for _ in range(3):
                await pool.execute(_REGISTER_KEK, kek_id, provider_of(kek_id))
                if await pool.fetchrow(_KEK_STATE, kek_id) is not None:
                    return
        raise KeystoreError(f"cannot register KEK {kek_id} in the keystore")

    def _key_from_row(self, row: Any) -> DataKey:
        wrapped, kek_id = row["wrapped"], row["kek_id"]
        if wrapped is None or kek_id is None:
            raise KeystoreError(f"data key {row['key_id']} has no wrapped material but is not destroyed")
        with self.provider_calls.timed("unwrap"):
            material = self._provider.unwrap(bytes(wrapped), kek_id)
        return DataKey.from_material(
            row["key_id"].bytes,
            material,
            state=KeyState(row["state"]),
            column_id=row["column_id"],
            subject=None if row["subject_id"] is None else bytes(row["subject_id"]),
            version=row["version"],
        )

    async def _get_pool(self) -> Any:
        if self._closed:
            raise KeystoreError("the keystore is closed")
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                with _keystore_errors():
                    self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=self._pool_max_size)
        return self._pool

    async def initialize(self) -> list[str]:
        """Runs :func:`init_keystore` on a connection of this keystore's pool."""
        pool = await self._get_pool()
        with _keystore_errors():
            async with pool.acquire() as conn:
                return await init_keystore(conn)

    # -- notifications ----------------------------------------------------------------------------
    async def listen(self, callback: RefreshCallback | None = None) -> None:
        """LISTENs on ``pgveil_keys``; returns once listening. Notifications schedule refreshes (see the
        module docstring); after each refresh ``callback(result)`` runs (for the caller's own derived
        caches). Reconnects by itself.

        If the first attempt fails the error is raised, but the keystore keeps trying in the background
        and caches keys for at most a second meanwhile, exactly as after losing the connection.
        """
        self._listen_callback = callback
        self._listen_wanted = True
        if self._listen_conn is not None:
            return
        try:
            await self._connect_listener()
        except Exception:
            self._enter_degraded_mode()
            raise

    async def _connect_listener(self) -> None:
        pool = await self._get_pool()
        with _keystore_errors():
            conn = await pool.acquire()
        self._listen_epoch += 1
        # The termination callback carries the epoch it was registered in, so a late call about an
        # old connection cannot tear down a newer one.
        on_lost = functools.partial(self._on_listener_lost, self._listen_epoch)
        try:
            with _keystore_errors():
                conn.add_termination_listener(on_lost)
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notification)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.remove_termination_listener(on_lost)
                await pool.release(conn)
            raise
        self._listen_conn, self._listen_on_lost = conn, on_lost
        # Anything cached before now may have missed a notification.
        self._cache.clear()
        self._cache.ttl_seconds = self._ttl_seconds
        log.info("listening for key notifications on channel %s", NOTIFY_CHANNEL)

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        # Anyone may NOTIFY: the payload is neither trusted nor logged (a newline in it would forge a line).
        self.notifications += 1
        self._wrap_kek = None  # a KEK rotation NOTIFYs too: look up the primary KEK again on next use
        log.debug("key notification (payload of %d characters): refresh requested", len(payload))
        self.request_refresh()

    def _on_listener_lost(self, epoch: int, conn: Any) -> None:
        if epoch != self._listen_epoch or self._listen_conn is None:
            return
        self._listen_conn = self._listen_on_lost = None
        log.warning("lost the key notification connection")
        self._enter_degraded_mode()

    def _enter_degraded_mode(self) -> None:
        self._cache.clear()
        self._wrap_kek = None
        self._cache.ttl_seconds = min(self._ttl_seconds, DEGRADED_TTL_SECONDS)
        if not self._listen_wanted or self._closed:
            return
        log.warning("not listening for key notifications: caching keys for at most %.1f s", self._cache.ttl_seconds)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        # The pool already took the dead connection back (asyncpg releases a pooled connection that
        # closes); only a new LISTEN connection is needed.
        delay = _RECONNECT_MIN_DELAY
        while self._listen_wanted and not self._closed and self._listen_conn is None:
            try:
                await self._connect_listener()
            except Exception as exc:
                # Whatever the failure, a dead reconnect loop would leave this instance deaf for good.
                reason = str(exc) if isinstance(exc, KeystoreError) else _describe(exc)
                log.warning("key notification reconnect failed (%s); retrying in %.1f s", reason, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_DELAY)

    async def close(self) -> None:
        """Stops listening, drops every cached key, and closes the pool if this keystore created it."""
        self._closed = True
        self._listen_wanted = False
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconnect_task
        for task in list(self._inflight.values()):
            task.cancel()
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresher
        conn, on_lost = self._listen_conn, self._listen_on_lost
        self._listen_conn = self._listen_on_lost = None
        if conn is not None and self._pool is not None:
            with contextlib.suppress(Exception):
                if on_lost is not None:
                    conn.remove_termination_listener(on_lost)
                await conn.remove_listener(NOTIFY_CHANNEL, self._on_notification)
            with contextlib.suppress(Exception):
                await self._pool.release(conn)
        self._cache.clear()
        if self._dsn is not None and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
