"""The access audit at run time: the asyncio shell around :class:`proxy.audit.AccessAudit`.

Once a second it exports the counts to the metrics (``pgveil_audit_values_read_total{role,column,outcome}``)
and turns anomaly events into a log line and ``pgveil_audit_anomaly_active{role,column}`` /
``pgveil_audit_anomalies_total{role,column}``. Every ``audit.flush_seconds``, when a session ends (soon
after, coalesced) and at shutdown it drains the period's records: one JSON line each on the
``pgveil.audit`` logger, then one INSERT of all of them into the keystore table ``pgveil.access_audit``
(migration ``0012_access_audit``). A keystore that cannot be reached keeps the records (at most
``audit.max_pending_records``, the oldest dropped, with a warning saying how many) for the next flush and
counts ``pgveil_audit_flush_errors_total``; nothing here is ever awaited by a session.

Label values are bounded: roles and columns come from the configuration (a role label a reload removed
counts as ``default``), outcomes from a fixed set. Never a value, literal or parameter: records carry
names and counts only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.audit import OUTCOMES, AccessAudit, AnomalyEnded, AnomalyStarted, AuditRecord, SessionAudit
from proxy.config.types import AuditConfig

log = logging.getLogger(__name__)
audit_log = logging.getLogger("pgveil.audit")

TICK_SECONDS: Final = 1.0
WRITE_TIMEOUT: Final = 10.0
SESSION_END_DELAY: Final = 0.2  # sessions that end together share one flush

INSERT_SQL: Final = """
INSERT INTO pgveil.access_audit
    (instance, session_id, login_role, policy_role, column_id, outcome, values_read, period_start, period_end)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                     $8::timestamptz[], $9::timestamptz[])
"""


def default_instance() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


def record_json(record: AuditRecord, instance: str) -> str:
    """The audit log line of one record: a JSON object, keys in a fixed order."""
    return json.dumps(
        {
            "event": "values_read",
            "instance": instance,
            "session": record.session_id,
            "login_role": record.login_role,
            "policy_role": record.policy_role,
            "column": record.column,
            "outcome": record.outcome,
            "count": record.count,
            "period_start": _iso(record.period_start),
            "period_end": _iso(record.period_end),
        }
    )


class AuditMetrics:
    """The audit's metrics, on the process's registry (names fixed; see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.values_read = Counter(
            "pgveil_audit_values_read_total",
            "Values of governed columns read by clients, by policy role, column and what they came back as.",
            ["role", "column", "outcome"],
            registry=registry,
        )
        self.anomaly_active = Gauge(
            "pgveil_audit_anomaly_active",
            "1 while an audit anomaly rule's plaintext limit for the role and column is exceeded (per process).",
            ["role", "column"],
            registry=registry,
        )
        self.anomalies = Counter(
            "pgveil_audit_anomalies_total",
            "Times an audit anomaly rule's plaintext limit for the role and column was exceeded.",
            ["role", "column"],
            registry=registry,
        )
        self.flush_errors = Counter(
            "pgveil_audit_flush_errors_total",
            "Flushes of access audit records that could not be written to the keystore (kept and retried).",
            registry=registry,
        )


class AuditRuntime:
    """The process's access audit: the sessions' seam, the periodic export and flush, and shutdown."""

    def __init__(
        self,
        config: AuditConfig,
        column_ids: Iterable[str],
        registry: CollectorRegistry,
        *,
        connect: Callable[[], Awaitable[Any]] | None = None,
        role_names: Iterable[str] = (),
        prepare: Callable[[Any], Awaitable[Any]] | None = None,
    ) -> None:
        """``connect`` opens a keystore connection (None: records go to the log only); ``prepare`` runs on
        each new connection (the keystore migrations). ``role_names``: the policy's, for metric labels."""
        self.config = config
        self.instance = config.instance or default_instance()
        self.audit = AccessAudit(config.anomaly, column_ids, window_seconds=config.window_seconds)
        self.metrics = AuditMetrics(registry)
        self._connect = connect
        self._prepare = prepare
        self._conn: Any = None
        self.role_names = frozenset(role_names)
        self.pending: deque[AuditRecord] = deque()
        self.dropped = 0
        self.flushes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_lock = asyncio.Lock()
        self._soon: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        for rule_role, column in sorted(self._watched()):
            self.metrics.anomaly_active.labels(rule_role, column).set(0)
            self.metrics.anomalies.labels(rule_role, column)

    def _watched(self) -> set[tuple[str, str]]:
        return {
            (rule.role, column)
            for column in self.audit.watched_columns
            for rule in self.audit.rules
            if rule.pattern.covers(column)
        }

    def session(self, session_id: int, login_role: str) -> SessionAudit:
        return self.audit.session(session_id, login_role)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._ticking()), loop.create_task(self._flushing_periodically())]
        if self._connect is None:
            log.warning("access audit: no keystore configured; audit records go to the pgveil.audit log only")

    async def _ticking(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.tick()

    async def _flushing_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_seconds)
            await self.flush()

    def session_ended(self) -> None:
        """A session ended: its records are flushed soon (one flush for sessions that end together)."""
        if self._soon is not None or not self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._soon = loop.call_later(SESSION_END_DELAY, self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def stop(self) -> None:
        """The last flush (bounded by the write timeout), then the tasks end."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        await self.flush()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    # -- once a second ------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Exports the counts to the metrics and handles anomaly events (raised, lowered)."""
        audit = self.audit
        audit.tick()
        if audit.unexported:
            counts, audit.unexported = audit.unexported, {}
            for (label, column, outcome), n in counts.items():
                if outcome in OUTCOMES:
                    role = label if label in self.role_names else "default"
                    self.metrics.values_read.labels(role, column, outcome).inc(n)
        if audit.events:
            events, audit.events = audit.events, []
            for ev in events:
                if isinstance(ev, AnomalyStarted):
                    self.metrics.anomaly_active.labels(ev.role, ev.column).set(1)
                    self.metrics.anomalies.labels(ev.role, ev.column).inc()
                    log.warning(
                        "access audit anomaly: role %s read %d plaintext values of column %s within %g s, over "
                        "its limit of %d per minute%s",
                        ev.role,
                        ev.read,
                        ev.column,
                        ev.window_seconds,
                        ev.limit,
                        "; its further plaintext reads of it are refused until the window passes" if ev.refuse else "",
                        extra={"audit_event": "anomaly", "role": ev.role, "column": ev.column},
                    )
                elif isinstance(ev, AnomalyEnded):
                    self.metrics.anomaly_active.labels(ev.role, ev.column).set(0)
                    log.info(
                        "access audit anomaly ended: role %s, column %s",
                        ev.role,
                        ev.column,
                        extra={"audit_event": "anomaly_ended", "role": ev.role, "column": ev.column},
                    )

    # -- flushing -----------------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Drains the period: its records to the audit log, then (with what is pending) to the keystore."""
        async with self._flush_lock:
            self.tick()
            records = self.audit.drain()
            for r in records:
                audit_log.info("%s", record_json(r, self.instance))
            if self._connect is None:
                return
            self.pending.extend(records)
            overflow = len(self.pending) - self.config.max_pending_records
            if overflow > 0:
                for _ in range(overflow):
                    self.pending.popleft()
                self.dropped += overflow
                log.warning(
                    "access audit: %d records not written to the keystore were dropped (audit.max_pending_records "
                    "is %d); they are in the pgveil.audit log",
                    overflow,
                    self.config.max_pending_records,
                )
            if not self.pending:
                return
            batch = list(self.pending)
            try:
                await asyncio.wait_for(self._write(batch), WRITE_TIMEOUT)
            except Exception as e:  # unreachable, timed out, table missing: kept for the next flush
                self.metrics.flush_errors.inc()
                log.warning(
                    "access audit: cannot write %d records to the keystore (%s); kept for the next flush",
                    len(batch),
                    type(e).__name__,
                )
                conn, self._conn = self._conn, None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
                return
            for _ in range(len(batch)):
                self.pending.popleft()
            self.flushes += 1

    async def _write(self, batch: list[AuditRecord]) -> None:
        if self._conn is None:
            assert self._connect is not None
            conn = await self._connect()
            try:
                if self._prepare is not None:
                    await self._prepare(conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.terminate()
                raise
            self._conn = conn
        ts = datetime.datetime.fromtimestamp
        await self._conn.execute(
            INSERT_SQL,
            [self.instance] * len(batch),
            [r.session_id for r in batch],
            [r.login_role for r in batch],
            [r.policy_role for r in batch],
            [r.column for r in batch],
            [r.outcome for r in batch],
            [r.count for r in batch],
            [ts(r.period_start, datetime.UTC) for r in batch],
            [ts(r.period_end, datetime.UTC) for r in batch],
        )
