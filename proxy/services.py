"""The operations the admin API and the ``pgveil`` CLI share: sessions, policy reload and explain, keys.

One function per operation, returning plain data (dataclasses that :func:`as_json` turns into JSON
values), so that ``GET /v1/sessions`` and ``pgveil admin sessions`` cannot disagree. The HTTP layer
(:mod:`proxy.admin.api`) adds authentication, scopes and status codes; the CLI (:mod:`proxy.cli_admin`)
either calls these functions itself (working directly on the keystore) or asks a running instance's API,
which calls them there.

What a running instance offers is reached through :class:`Instance`, a small seam the listener
(:class:`proxy.server.ProxyServer`) implements; nothing here imports the listener. Operations that key
management adds later (rotations, jobs, subjects) belong here beside :func:`list_keys`, as functions of a
keystore connection, so the CLI can run them without an instance and the API inside one.

Never returned: key bytes (wrapped or not), subject ids, statement text, parameters, passwords. A
session is described by its role, database, client address, start time and state only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy import logsetup
from proxy.config import Config
from proxy.protocol import relay

# -- sessions ------------------------------------------------------------------------------------------


class SessionState(enum.StrEnum):
    STARTUP = "startup"  # before authentication has completed
    IDLE = "idle"
    IDLE_IN_TRANSACTION = "idle in transaction"
    IDLE_IN_FAILED_TRANSACTION = "idle in transaction (aborted)"
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One client session of this process (``id`` is the ``s<N>`` of its log lines)."""

    id: int
    role: str | None  # the login role (what the policy applies to); None before the StartupMessage
    database: str | None
    client_address: str | None
    client_port: int | None
    started_at: str  # ISO 8601, UTC
    state: SessionState
    tls: bool
    process: int = 0  # 0: the supervisor (or the only process); N: worker N of ``sessions.workers``


@dataclass(frozen=True, slots=True)
class SessionList:
    """The sessions of every process. ``covers``: ``process`` (pgveil runs as one process), ``all`` (the
    supervisor and every worker listed theirs), ``partial`` (the workers in ``unanswered`` did not answer in
    time: their sessions are counted in ``other_processes``, process number → sessions, but not listed)."""

    sessions: tuple[SessionInfo, ...]
    process: int = 0
    other_processes: Mapping[int, int] = field(default_factory=dict)
    covers: str = "process"
    unanswered: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return len(self.sessions) + sum(self.other_processes.get(p, 0) for p in self.unanswered)


@dataclass(frozen=True, slots=True)
class WorkerSessions:
    """What one worker process answered: its sessions, or None when it did not answer in time (``count``
    is then what the supervisor counted)."""

    process: int
    sessions: tuple[SessionInfo, ...] | None
    count: int


@dataclass(frozen=True, slots=True)
class WorkerTermination:
    """Which worker process ended the session (None: none has it), and the workers that did not answer."""

    process: int | None
    unanswered: tuple[int, ...] = ()


class WorkerControl(Protocol):
    """The worker processes of a supervisor (``sessions.workers`` > 1), asked over their control channels,
    each with a timeout: a worker that does not answer in time is reported, never waited for."""

    async def sessions(self) -> Sequence[WorkerSessions]: ...

    async def terminate(self, session_id: int) -> WorkerTermination: ...

    async def log_levels(self, level: str | None = None, source: str = "api") -> Mapping[int, str | None]:
        """Every worker's log level (None: it did not answer), after setting it to ``level`` if given."""
        ...


class ServedSession(Protocol):
    """The part of :class:`proxy.session.Session` described and terminated here."""

    sid: int
    started: float  # time.monotonic() when the client connected
    closed: bool
    client_tls: bool
    relay: relay.Relay

    @property
    def client(self) -> Any: ...  # the client's transport

    def terminate_by_administrator(self) -> None: ...


def describe_session(s: ServedSession, *, now: float | None = None, wall: float | None = None) -> SessionInfo:
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    r = s.relay
    startup = r.startup
    role = r.login_role or (startup.get("user") if startup is not None else None)
    database = startup.get("database") or role if startup is not None else None
    peer = s.client.get_extra_info("peername")
    address: str | None = None
    port: int | None = None
    if isinstance(peer, tuple) and len(peer) >= 2:
        address, port = str(peer[0]), int(peer[1])
    elif isinstance(peer, str) and peer:
        address = peer  # a Unix socket path
    if r.phase is not relay.Phase.READY:
        state = SessionState.STARTUP
    elif r.busy:
        state = SessionState.ACTIVE
    elif r.transaction_status == b"T":
        state = SessionState.IDLE_IN_TRANSACTION
    elif r.transaction_status == b"E":
        state = SessionState.IDLE_IN_FAILED_TRANSACTION
    else:
        state = SessionState.IDLE
    started = datetime.datetime.fromtimestamp(wall - (now - s.started), datetime.UTC)
    return SessionInfo(
        id=s.sid,
        role=role,
        database=database,
        client_address=address,
        client_port=port,
        started_at=started.isoformat(timespec="seconds"),
        state=state,
        tls=s.client_tls,
    )


def local_sessions(sessions: Iterable[ServedSession], process: int = 0) -> tuple[SessionInfo, ...]:
    """The open sessions of this process, by id."""
    infos = (dataclasses.replace(describe_session(s), process=process) for s in sessions if not s.closed)
    return tuple(sorted(infos, key=lambda i: i.id))


def terminate_local_session(sessions: Iterable[ServedSession], session_id: int) -> bool:
    """Ends session ``session_id`` of this process: FATAL 57P01 to its client, its server connection
    closed (and its backend's running statement cancelled). False if this process has no such session."""
    for s in sessions:
        if s.sid == session_id and not s.closed:
            s.terminate_by_administrator()
            return True
    return False


async def list_sessions(instance: Instance) -> SessionList:
    """The sessions of this process and, with worker processes, theirs (asked now, not a snapshot)."""
    listed = list(local_sessions(instance.live_sessions()))
    workers = instance.workers()
    if workers is None:
        return SessionList(tuple(listed))
    others: dict[int, int] = {}
    unanswered: list[int] = []
    for answer in sorted(await workers.sessions(), key=lambda a: a.process):
        if answer.sessions is None:
            unanswered.append(answer.process)
            others[answer.process] = answer.count
        else:
            listed.extend(answer.sessions)
            others[answer.process] = len(answer.sessions)
    return SessionList(
        tuple(sorted(listed, key=lambda i: i.id)),
        other_processes=others,
        covers="partial" if unanswered else "all",
        unanswered=tuple(unanswered),
    )


@dataclass(frozen=True, slots=True)
class Termination:
    """``terminated`` by process ``process``; or not, and then ``unanswered`` names the workers that did
    not answer (the session may be theirs)."""

    terminated: bool
    process: int | None = None
    unanswered: tuple[int, ...] = ()


async def terminate_session(instance: Instance, session_id: int) -> Termination:
    """Ends session ``session_id`` wherever it is served (session ids are unique over all processes)."""
    if terminate_local_session(instance.live_sessions(), session_id):
        return Termination(True, 0)
    workers = instance.workers()
    if workers is None:
        return Termination(False)
    answer = await workers.terminate(session_id)
    if answer.process is not None:
        return Termination(True, answer.process)
    return Termination(False, unanswered=answer.unanswered)


@dataclass(frozen=True, slots=True)
class LogLevels:
    """The log level of this process (before and after a change) and, with worker processes, of each
    (None: it did not answer in time; it gets the level all the same, and a worker started later starts at
    the level of this process)."""

    level: str
    previous: str
    workers: Mapping[int, str | None] | None = None

    @property
    def changed(self) -> bool:
        return self.previous != self.level


async def log_levels(instance: Instance, level: str | None = None, *, source: str = "api") -> LogLevels:
    """The log levels of every process, after setting them to ``level`` if given (counted once, here)."""
    previous = logsetup.current_level()
    if level is not None:
        logsetup.set_level(level, source=source)
    workers = instance.workers()
    answers = dict(sorted((await workers.log_levels(level, source)).items())) if workers is not None else None
    return LogLevels(logsetup.current_level(), previous, answers)


# -- policy --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What a reload did: ``applied`` or not, and the lines pgveil logged about it (errors, warnings)."""

    applied: bool
    messages: tuple[str, ...] = ()


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured_log_lines(logger: logging.Logger) -> Iterator[list[str]]:
    """The warnings and errors ``logger`` emits inside the block (a reload runs synchronously, so they are
    its own). They still reach pgveil's log as well: this only copies them for the caller."""
    lines: list[str] = []
    handler = _Collect(lines)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


# -- keys ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """One version of a column's key, as the keystore records it (never its bytes)."""

    version: int
    key_id: str
    state: str
    kek_id: str | None
    created_at: str | None
    destroyed_at: str | None
    current: bool  # the highest version: the one new writes use while it is ENABLED


@dataclass(frozen=True, slots=True)
class SubjectKeys:
    """Per-subject keys of a column, counted by state (subject ids are personal data: never listed)."""

    subjects: int
    versions: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class ColumnKeys:
    column: str
    configured: bool  # listed under ``tables:`` as encrypted in the running configuration
    versions: tuple[KeyVersion, ...]
    subject_keys: SubjectKeys | None = None


@dataclass(frozen=True, slots=True)
class KeyListing:
    columns: tuple[ColumnKeys, ...]


_COLUMN_KEYS_SQL = """
SELECT column_id, version, key_id::text AS key_id, state, kek_id, created_at, destroyed_at
FROM pgveil.deks WHERE subject_id IS NULL ORDER BY column_id, version
"""
_SUBJECT_KEYS_SQL = """
SELECT column_id, state, count(*) AS versions
FROM pgveil.deks WHERE subject_id IS NOT NULL GROUP BY column_id, state ORDER BY column_id, state
"""
_SUBJECTS_SQL = """
SELECT column_id, count(DISTINCT subject_id) AS n FROM pgveil.deks WHERE subject_id IS NOT NULL GROUP BY column_id
"""


class KeystoreConnection(Protocol):
    """The part of ``asyncpg.Connection`` used here."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


def _iso(v: Any) -> str | None:
    return v.isoformat() if isinstance(v, datetime.datetime) else None


async def list_keys(conn: KeystoreConnection, configured: Iterable[str] = ()) -> KeyListing:
    """Every column's key versions from ``pgveil.deks``, and the configured encrypted columns that have
    none yet (their first version is made on first use)."""
    by_column: dict[str, list[KeyVersion]] = {}
    rows = await conn.fetch(_COLUMN_KEYS_SQL)
    for r in rows:
        by_column.setdefault(r["column_id"], []).append(
            KeyVersion(
                version=int(r["version"]),
                key_id=str(r["key_id"]),
                state=str(r["state"]),
                kek_id=r["kek_id"],
                created_at=_iso(r["created_at"]),
                destroyed_at=_iso(r["destroyed_at"]),
                current=False,
            )
        )
    states: dict[str, dict[str, int]] = {}
    for r in await conn.fetch(_SUBJECT_KEYS_SQL):
        states.setdefault(r["column_id"], {})[str(r["state"])] = int(r["versions"])
    subjects: dict[str, tuple[int, dict[str, int]]] = {}
    if states:
        for r in await conn.fetch(_SUBJECTS_SQL):
            subjects[r["column_id"]] = (int(r["n"]), states.get(r["column_id"], {}))
    wanted = set(configured)
    out: list[ColumnKeys] = []
    for column in sorted(set(by_column) | set(subjects) | wanted):
        versions = by_column.get(column, [])
        if versions:
            versions[-1] = dataclasses.replace(versions[-1], current=True)
        sub = subjects.get(column)
        out.append(
            ColumnKeys(
                column=column,
                configured=column in wanted,
                versions=tuple(versions),
                subject_keys=SubjectKeys(sub[0], dict(sub[1])) if sub is not None else None,
            )
        )
    return KeyListing(tuple(out))


def key_columns(config: Config) -> tuple[str, ...]:
    """The encrypted columns of ``config`` (``schema.table.column``), whose keys :func:`list_keys` lists."""
    tables = config.catalog().tables.values()
    return tuple(sorted(c.column_id for t in tables if t.root is None for c in t.columns.values() if c.encrypted))


# -- the running instance -----------------------------------------------------------------------------


class ExplainUnavailable(Exception):
    """The instance cannot explain yet (catalog or role membership not loaded); the text says which."""


class Explainer(Protocol):
    """What a role would get for a statement under the running policy (``pgveil policy explain``)."""

    async def __call__(self, role: str, sql: str) -> Mapping[str, Any]: ...


class Instance(Protocol):
    """What a running pgveil offers the admin API (implemented by :class:`proxy.server.ProxyServer`)."""

    def live_sessions(self) -> Iterable[ServedSession]: ...

    def workers(self) -> WorkerControl | None:
        """The worker processes (``sessions.workers`` > 1), or None when this process serves every session."""
        ...

    def reload_reporting(self) -> ReloadOutcome: ...

    def configured_key_columns(self) -> tuple[str, ...]: ...

    def keystore_connection(self) -> Callable[[], Awaitable[Any]] | None:
        """A factory of fresh keystore connections (the caller closes them), or None without a keystore."""
        ...

    def explainer(self) -> Explainer | None: ...


# -- JSON ----------------------------------------------------------------------------------------------


def as_json(value: Any) -> Any:
    """Dataclasses, enums, mappings and sequences as JSON values (properties are not included)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value
