"""Shared setup of the per-role visibility tests (issue 8): a database of its own with real PostgreSQL
roles, the issue's table, one pgveil enforcing the issue's policy, and the tools to look at what a client
receives.

Written from the issue and the design decisions, not from the implementation: :func:`expected_grant`
is an independent model of how a login role's grants combine (most specific pattern within a policy
role, most permissive grant across the roles it inherits, ``default`` only where none of them covers
the column), used by the tests and by the property test as the oracle.

Roles (all ``LOGIN`` with :data:`PASSWORD` unless said otherwise):

- ``billing``, ``support``, ``contractor``, ``backup``: the issue's policy roles;
- ``outsider``: not in the policy (gets ``default``);
- ``finance`` (``NOLOGIN``), a group role the policy grants plaintext; ``fin_member`` (INHERIT) is a member,
  ``fin_noinherit`` (``NOINHERIT``) too: it may ``SET ROLE finance`` but inherits nothing;
- ``vis_root``: a superuser the policy does not name;
- ``mixed``: member of ``support`` and ``contractor`` (deny only where nothing grants more);
- ``matcher``: ``match`` (served masked; equality refused until searchable columns exist);
- ``m_<function>``: one role per masking function over the typed table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, ProxyProcess, proxy_config, wait_until
from encfixtures import apply_tables, run_psql

from proxy.devcluster import DevCluster

DB = "vis"
PASSWORD = "vis-secret"
TABLE = "public.vis_customers"
TYPED = "public.vis_typed"
PLAIN = "public.vis_plain"  # only plain governed columns: visibility without encryption

# The issue's table: email and ssn encrypted, phone plain (visibility only), name not governed.
CUSTOMERS_DDL = "CREATE TABLE vis_customers (id int PRIMARY KEY, name text, email text, ssn text, phone text)"
CUSTOMER_COLUMNS: dict[str, dict[str, Any]] = {
    "email": {"type": "text", "encrypt": True},
    "ssn": {"type": "text", "encrypt": True},
    "phone": {"type": "text", "encrypt": False},
}
ENCRYPTED = {"email", "ssn"}
GOVERNED = ("email", "ssn", "phone")

# One column per declared type, encrypted and plain, for masks by type.
TYPED_DDL = (
    "CREATE TABLE vis_typed (id int PRIMARY KEY, d date, n int4, num numeric, u uuid, b bool, t text,"
    " pd date, pn int4, pt text)"
)
TYPED_COLUMNS: dict[str, dict[str, Any]] = {
    "d": {"type": "date", "encrypt": True},
    "n": {"type": "integer", "encrypt": True},
    "num": {"type": "numeric", "encrypt": True},
    "u": {"type": "uuid", "encrypt": True},
    "b": {"type": "bool", "encrypt": True},
    "t": {"type": "text", "encrypt": True},
    "pd": {"type": "date", "encrypt": False},
    "pn": {"type": "integer", "encrypt": False},
    "pt": {"type": "text", "encrypt": False},
}
MASK_FUNCTIONS = ("last4", "partial", "email", "hash", "null")
PLAIN_DDL = "CREATE TABLE vis_plain (id int PRIMARY KEY, note text, pin text)"
PLAIN_COLUMNS: dict[str, dict[str, Any]] = {"pin": {"type": "text", "encrypt": False}}

# Views over the governed columns, created behind pgveil after the schema is applied.
VIEWS = (
    "CREATE VIEW vis_view AS SELECT id, name, email, ssn, phone FROM vis_customers",
    "CREATE VIEW vis_view_renamed AS SELECT id, ssn AS tax_id, phone AS tel FROM vis_customers",
    "CREATE VIEW vis_view_expr AS SELECT id, lower(phone) AS lp, length(phone) AS lenp FROM vis_customers",
    "CREATE VIEW vis_view_of_view AS SELECT id, tel FROM vis_view_renamed",
    "CREATE VIEW vis_plain_view AS SELECT id, pin AS code FROM vis_plain",
)
VIEW_NAMES = ("vis_view", "vis_view_renamed", "vis_view_expr", "vis_view_of_view", "vis_plain_view")

FIXED_VALUES = {
    "d": "2000-01-01",
    "n": "0",
    "num": "0",
    "u": "00000000-0000-0000-0000-000000000000",
    "b": "false",
    "t": "REDACTED",
    "pd": "2000-01-01",
    "pn": "0",
    "pt": "REDACTED",
}

LOGIN_ROLES = (
    "billing",
    "support",
    "contractor",
    "backup",
    "outsider",
    "fin_member",
    "fin_noinherit",
    "mixed",
    "matcher",
    *(f"m_{f}" for f in (*MASK_FUNCTIONS, "fixed")),
)
SUPERUSER_ROLE = "vis_root"
GROUP_ROLE = "finance"
# (member, group): pg_auth_members. fin_noinherit is NOINHERIT, so its membership gives nothing.
MEMBERSHIPS = (("fin_member", "finance"), ("fin_noinherit", "finance"), ("mixed", "support"), ("mixed", "contractor"))
NOINHERIT = frozenset({"fin_noinherit"})


def issue_policy() -> dict[str, Any]:
    """The issue's example policy over vis_customers, plus the group role and the mask roles."""
    c = TABLE
    roles: dict[str, Any] = {
        "default": "hidden",
        "billing": {f"{c}.*": "plaintext", f"{PLAIN}.*": "plaintext"},
        "support": {
            f"{c}.email": "plaintext",
            f"{c}.ssn": "masked:last4",
            f"{c}.phone": "masked:partial",
            f"{PLAIN}.pin": "masked:partial",
        },
        "contractor": {f"{c}.*": "deny"},
        "backup": {f"{c}.*": "ciphertext", f"{TYPED}.*": "ciphertext"},
        "finance": {f"{c}.*": "plaintext", f"{TYPED}.*": "plaintext", f"{PLAIN}.*": "plaintext"},
    }
    for f in MASK_FUNCTIONS:
        roles[f"m_{f}"] = {f"{TYPED}.*": f"masked:{f}", f"{c}.*": f"masked:{f}"}
    roles["m_fixed"] = {f"{TYPED}.{col}": f"masked:fixed:{v}" for col, v in FIXED_VALUES.items()}
    roles["m_fixed"][f"{c}.*"] = "masked:fixed:REDACTED"
    roles["matcher"] = {f"{c}.*": "match", f"{c}.ssn": "match:last4"}  # masked until searchable columns exist
    return roles


# -- the oracle ----------------------------------------------------------------------------------------

ORDER = ("plaintext", "match", "masked", "ciphertext", "hidden", "deny")
MASK_ORDER = ("last4", "email", "partial", "hash", "fixed", "null")


@dataclass(frozen=True)
class Expected:
    visibility: str  # one of ORDER
    mask: str | None = None  # "last4", ..., "fixed:<text>"

    @property
    def plaintext(self) -> bool:
        return self.visibility == "plaintext"


def parse_visibility(v: str) -> Expected:
    if v == "match":
        return Expected("match", "partial")
    kind, _, fn = v.partition(":")
    if kind in ("masked", "match"):
        return Expected(kind, fn)
    return Expected(kind)


def _specificity(pattern: str, column: str) -> int | None:
    """How specifically ``pattern`` covers ``schema.table.column`` (higher wins), None if it does not."""
    parts, target = pattern.split("."), column.split(".")
    if parts[-1] == "*":
        prefix = parts[:-1]
        return len(prefix) if target[: len(prefix)] == prefix else None
    return 10 if parts == target else None


def role_grant(policy: Mapping[str, Any], role: str, column: str) -> Expected | None:
    entry = policy.get(role)
    if entry is None:
        return None
    if isinstance(entry, str):
        return parse_visibility(entry)
    best: tuple[int, str] | None = None
    for pattern, v in entry.items():
        s = _specificity(pattern, column)
        if s is not None and (best is None or s > best[0]):
            best = (s, v)
    return parse_visibility(best[1]) if best else None


def role_set(login: str, memberships: tuple[tuple[str, str], ...] = MEMBERSHIPS) -> set[str]:
    """The login role and every role whose privileges it inherits (through roles with rolinherit)."""
    found, todo = {login}, [login]
    while todo:
        r = todo.pop()
        if r in NOINHERIT:
            continue
        for member, group in memberships:
            if member == r and group not in found:
                found.add(group)
                todo.append(group)
    return found


def _rank(e: Expected) -> tuple[int, int]:
    mask_rank = MASK_ORDER.index(e.mask.split(":")[0]) if e.mask else 0
    return ORDER.index(e.visibility), mask_rank


def expected_grant(policy: Mapping[str, Any], login: str, column: str) -> Expected:
    """What ``login`` gets for ``schema.table.column`` under ``policy``: the oracle of the tests."""
    grants = [g for r in sorted(role_set(login)) if r != "default" and (g := role_grant(policy, r, column))]
    if grants:
        return min(grants, key=_rank)
    default = policy.get("default", "hidden")
    assert isinstance(default, str)
    return parse_visibility(default)


# -- the environment -----------------------------------------------------------------------------------


@dataclass
class VisEnv:
    pg: DevCluster
    proxy: ProxyProcess
    master_key: Path
    workdir: Path

    @property
    def direct_dsn(self) -> str:
        """The superuser straight to the database, behind pgveil's back."""
        return self.pg.dsn(dbname=DB)

    def dsn(self, role: str, proxy: ProxyProcess | None = None, **params: str) -> str:
        return (proxy or self.proxy).dsn(user=role, password=PASSWORD, dbname=DB, **params)

    def config(self, roles: dict[str, Any] | None, **overrides: Any) -> dict[str, Any]:
        return vis_config(self.pg, self.master_key, roles, **overrides)

    def start_proxy(self, roles: dict[str, Any] | None, name: str, **overrides: Any) -> ProxyProcess:
        """A further pgveil over the same database and keys (stop it yourself, or use ``own_proxy``)."""
        p = ProxyProcess(self.config(roles, **overrides), self.workdir / name)
        p.start()
        wait_serving(p)
        return p


def tables_config() -> dict[str, Any]:
    return {TABLE: {"columns": CUSTOMER_COLUMNS}, TYPED: {"columns": TYPED_COLUMNS}, PLAIN: {"columns": PLAIN_COLUMNS}}


def vis_config(pg: DevCluster, master_key: Path, roles: dict[str, Any] | None, **overrides: Any) -> dict[str, Any]:
    cfg = proxy_config(
        pg,
        keystore={"dsn": pg.dsn(dbname=DB), "master_key": {"provider": "local", "path": str(master_key)}},
        tables=tables_config(),
    )
    if roles is not None:
        cfg["roles"] = roles
    cfg.update(overrides)
    return cfg


async def _create(pg: DevCluster) -> None:
    pg.psql(f"CREATE DATABASE {DB} OWNER app")
    role_sql = [f"CREATE ROLE {r} LOGIN PASSWORD '{PASSWORD}'" for r in LOGIN_ROLES if r not in NOINHERIT]
    role_sql += [f"CREATE ROLE {r} LOGIN NOINHERIT PASSWORD '{PASSWORD}'" for r in NOINHERIT]
    role_sql += [
        f"CREATE ROLE {GROUP_ROLE} NOLOGIN",
        f"CREATE ROLE {SUPERUSER_ROLE} SUPERUSER LOGIN PASSWORD '{PASSWORD}'",
    ]
    role_sql += [f"GRANT {group} TO {member}" for member, group in MEMBERSHIPS]
    pg.psql(";\n".join(role_sql))
    app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/{DB}")
    try:
        await app.execute(CUSTOMERS_DDL)
        await app.execute(TYPED_DDL)
        await app.execute(PLAIN_DDL)
        everyone = ", ".join([*LOGIN_ROLES, GROUP_ROLE])
        await app.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON vis_customers, vis_typed, vis_plain TO {everyone}")
        await app.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {everyone}")
    finally:
        await app.close()
    await apply_tables(pg, DB, tables_config())
    app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/{DB}")
    try:
        for v in VIEWS:
            await app.execute(v)
        # A server error that lists the failing row (23514 DETAIL) must not carry a governed value out.
        await app.execute("ALTER TABLE vis_plain ADD CONSTRAINT vis_plain_note CHECK (note IS DISTINCT FROM 'boom')")
        await app.execute("ALTER TABLE vis_customers ADD CONSTRAINT vis_name CHECK (name IS DISTINCT FROM 'boom')")
        await app.execute(f"GRANT SELECT ON {', '.join(VIEW_NAMES)} TO {everyone}")
    finally:
        await app.close()


def wait_serving(p: ProxyProcess, timeout: float = 30) -> None:
    """Until ``p`` answers a statement on a governed table (catalog and keys loaded) as some role."""
    last: list[str] = []

    def ready() -> bool:
        try:
            with psycopg.connect(p.dsn(user="billing", password=PASSWORD, dbname=DB, connect_timeout="5")) as c:
                c.execute("SELECT id FROM vis_customers WHERE id = -1").fetchall()
                return True
        except psycopg.Error as e:
            last[:] = [f"{type(e).__name__}: {e}"]
            return False

    if not wait_until(ready, timeout=timeout, interval=0.2):
        raise RuntimeError(f"pgveil never served vis_customers: {last}\n{p.logs()}")


_SHARED: dict[str, VisEnv] = {}


def shared_env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, config: pytest.Config) -> VisEnv:
    """The run's one visibility environment (issue policy), created on first use, stopped at the end."""
    env = _SHARED.get("env")
    if env is not None:
        return env
    asyncio.run(_create(pg))
    workdir = tmp_path_factory.mktemp("vis")
    master_key = workdir / "master.key"
    proxy = ProxyProcess(vis_config(pg, master_key, issue_policy()), workdir / "main")
    proxy.start()

    def stop() -> None:
        proxy.stop()

    config.add_cleanup(stop)
    wait_serving(proxy)
    env = VisEnv(pg, proxy, master_key, workdir)
    _SHARED["env"] = env
    return env


@contextlib.contextmanager
def own_proxy(env: VisEnv, roles: dict[str, Any] | None, name: str, **overrides: Any) -> Iterator[ProxyProcess]:
    p = env.start_proxy(roles, name, **overrides)
    try:
        yield p
    finally:
        p.stop()


# -- rows ----------------------------------------------------------------------------------------------

_ids = iter(range(1, 10**9))


def next_id() -> int:
    return next(_ids)


@dataclass(frozen=True)
class Customer:
    id: int
    name: str
    email: str
    ssn: str
    phone: str

    def value(self, column: str) -> str:
        v: str = getattr(self, column)
        return v


def make_customer(tag: str) -> Customer:
    """A row whose governed values are canaries: distinctive, with a long random core no mask keeps."""
    i = next_id()

    def core() -> str:  # independent per column: what one column shows says nothing of another's canary
        return f"{secrets.randbelow(10**18):018d}"

    return Customer(
        id=i,
        name=f"name-{tag}-{i}",
        email=f"cnry{core()}e@vis-example.test",
        ssn=f"SSN{core()}9876",
        phone=f"+41{core()}5432",
    )


def insert_customers(env: VisEnv, rows: list[Customer], proxy: ProxyProcess | None = None) -> None:
    """Writes through pgveil as billing (plaintext on every column), so email and ssn are sealed. A
    statement refused with 55000 while pgveil reads its catalog again (after a test's DDL) is retried."""
    with psycopg.connect(env.dsn("billing", proxy), autocommit=True) as c:
        for r in rows:
            retry(
                c,
                "INSERT INTO vis_customers (id, name, email, ssn, phone) VALUES (%s, %s, %s, %s, %s)",
                [r.id, r.name, r.email, r.ssn, r.phone],
            )


def retry(c: psycopg.Connection[Any], sql: str, params: Any, timeout: float = 15) -> None:
    """Executes ``sql``, again while pgveil answers 55000 (its catalog is being read again after DDL)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.execute(sql, params)
            return
        except psycopg.errors.ObjectNotInPrerequisiteState:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stored(env: VisEnv, ids: list[int], columns: str = "email, ssn, phone") -> list[tuple[Any, ...]]:
    """The rows as PostgreSQL stores them (superuser, direct)."""
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        return c.execute(f"SELECT id, {columns} FROM vis_customers WHERE id = ANY(%s) ORDER BY id", [ids]).fetchall()


# -- what the client receives --------------------------------------------------------------------------


def canary_forms(value: str, window: int = 10) -> list[bytes]:
    """Byte strings none of which may reach a client that may not see ``value``: every ``window``-long
    piece of it, as UTF-8 and as lower/upper hex (a bytea or a hex dump). No mask keeps that much of a
    canary: last4 keeps 4 characters, partial 2, email the domain (the canaries' cores are in the local part)."""
    raw = value.split("@")[0].encode()
    pieces = {raw[k : k + window] for k in range(len(raw) - window + 1)} or {raw}
    out: set[bytes] = set()
    for p in pieces:
        out |= {p, p.hex().encode(), p.hex().upper().encode()}
    return sorted(out)


def leaked(received: bytes, value: str) -> bool:
    return any(f in received for f in canary_forms(value))


@dataclass
class Tap:
    """A TCP relay in front of pgveil that records every byte sent to the client, so a test can search
    everything a driver received (RowDescription, DataRow, CopyData, notices, errors), not just what the
    driver chose to show."""

    target: tuple[str, int]
    received: bytearray = field(default_factory=bytearray)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _socks: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def dsn(self, role: str, **params: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"postgresql://{role}:{PASSWORD}@127.0.0.1:{self.port}/{DB}?sslmode=disable{extra}"

    def data(self) -> bytes:
        with self._lock:
            return bytes(self.received)

    def close(self) -> None:
        self._stop.set()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv()
        for s in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=10)
            client.settimeout(None)
            server.settimeout(None)
            self._socks += [client, server]
            for src, dst, record in ((client, server, False), (server, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, record), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.received += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


# -- metrics and reload --------------------------------------------------------------------------------


def metrics_text(p: ProxyProcess) -> str:
    with urllib.request.urlopen(p.admin_url + "/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


def metric_sum(p: ProxyProcess, name: str, **labels: str) -> float:
    """The sum of ``name`` over the label sets that carry every given label."""
    total = 0.0
    for line in metrics_text(p).splitlines():
        if not (line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def reload_policy(p: ProxyProcess, roles: dict[str, Any], timeout: float = 20) -> None:
    """Writes ``roles`` into ``p``'s config, sends SIGHUP and waits until pgveil counts a successful
    policy reload (``pgveil_policy_reloads_total{result="success"}``)."""
    name = "pgveil_policy_reloads_total"
    before = metric_sum(p, name, result="success"), metric_sum(p, name, result="failure")
    p.config["roles"] = roles
    p.write_config()
    p.signal(signal.SIGHUP)

    def counted() -> bool:
        return (metric_sum(p, name, result="success"), metric_sum(p, name, result="failure")) != before

    assert wait_until(counted, timeout=timeout), f"no policy reload counted\n{p.logs()[-3000:]}"
    assert metric_sum(p, name, result="failure") == before[1], f"policy {roles} rejected:\n{p.logs()[-3000:]}"


# -- reading as a role ------------------------------------------------------------------------------------


def fetch(env: VisEnv, driver: str, role: str, sql: str) -> tuple[list[Any] | None, list[tuple[Any, ...]]]:
    """The result of ``sql`` for ``role``: type OIDs (None for psql) and rows; raises the driver's error."""
    if driver.startswith("psycopg"):
        with psycopg.connect(env.dsn(role), autocommit=True) as c:
            cur = c.cursor(binary=driver.endswith("binary"))
            cur.execute(sql)
            assert cur.description is not None
            return [d.type_code for d in cur.description], cur.fetchall()
    if driver == "asyncpg":
        return asyncio.run(_asyncpg_fetch(env, role, sql))
    p = run_psql(env.dsn(role), "-F", "\t", "-P", "null=<NULL>", "-c", sql)
    if p.returncode != 0:
        raise PsqlError(p.stderr)
    out: list[tuple[Any, ...]] = []
    for line in p.stdout.splitlines():
        out.append(tuple(None if f == "<NULL>" else _psql_field(f) for f in line.split("\t")))
    return None, out


class PsqlError(Exception):
    pass


def _psql_field(f: str) -> Any:
    return bytes.fromhex(f[2:]) if f.startswith("\\x") else f


async def _asyncpg_fetch(env: VisEnv, role: str, sql: str) -> tuple[list[Any], list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(env.dsn(role))
    try:
        stmt = await conn.prepare(sql)
        oids = [a.type.oid for a in stmt.get_attributes()]
        return oids, [tuple(r) for r in await stmt.fetch()]
    finally:
        await conn.close()


@dataclass
class Received:
    """What one statement gave a client: rows (or the error's SQLSTATE and message), and every byte
    pgveil sent on that connection (startup included)."""

    rows: list[tuple[Any, ...]] | None
    sqlstate: str | None
    message: str
    raw: bytes


class Session:
    """One psycopg connection as ``role`` through a :class:`Tap`: each :meth:`run` returns the rows (or the
    error) and the bytes pgveil sent for that statement, then checks the session is still usable."""

    def __init__(self, env: VisEnv, role: str, proxy: ProxyProcess | None = None, autocommit: bool = True) -> None:
        p = proxy or env.proxy
        self.role = role
        self.tap = Tap((p.host, p.port))
        try:
            self.conn = psycopg.connect(self.tap.dsn(role), autocommit=autocommit)
        except BaseException:
            self.tap.close()
            raise

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.tap.close()

    def run(
        self, sql: str, params: Any = None, *, binary: bool = False, simple: bool = False, setup: tuple[str, ...] = ()
    ) -> Received:
        start = len(self.tap.data())
        c = self.conn
        try:
            for s in setup:
                c.execute(s)
            if sql.lstrip().upper().startswith("COPY") and "TO STDOUT" in sql.upper():
                with c.cursor().copy(sql, params) as cp:
                    rows: list[tuple[Any, ...]] = [(b"".join(bytes(b) for b in cp),)]  # COPY: one row, the data
            else:
                cur: Any = psycopg.ClientCursor(c) if simple else c.cursor(binary=binary)
                cur.execute(sql, params)
                rows = cur.fetchall() if cur.description is not None else []
            out = Received(rows, None, "", b"")
        except psycopg.Error as e:
            out = Received(None, e.sqlstate, str(e), b"")
            if not c.autocommit:
                c.rollback()
        assert c.execute("SELECT 1").fetchone() == (1,), "the session is usable afterwards"
        if not c.autocommit:
            c.rollback()
        out.raw = self.tap.data()[start:]
        return out


def run_as(
    env: VisEnv,
    role: str,
    sql: str,
    *,
    binary: bool = False,
    setup: tuple[str, ...] = (),
    proxy: ProxyProcess | None = None,
) -> Received:
    """``sql`` (after ``setup``) as ``role`` on a session of its own (see :class:`Session`)."""
    with Session(env, role, proxy) as s:
        return s.run(sql, binary=binary, setup=setup)


def check_value(exp: Expected, column: str, original: str, got: Any, envelope: bytes | None, where: str) -> None:
    """``got`` is what a role with grant ``exp`` received for ``original`` (stored as ``envelope``)."""
    detail = f"{where}: {exp} on {column} gave {got!r}"
    if isinstance(got, str) and got.startswith("\\x") and envelope is not None:
        got = bytes.fromhex(got[2:])  # bytea in text format
    if exp.visibility == "plaintext":
        assert got == original, detail
        return
    if exp.visibility == "hidden":
        assert got is None, detail
        return
    if exp.visibility == "ciphertext":
        if column in ENCRYPTED:
            assert got == envelope, detail
        else:
            assert got == original, detail  # a plain column as stored
        return
    assert exp.visibility in ("masked", "match"), detail
    assert exp.mask is not None
    fn = exp.mask.split(":")[0]
    if fn == "null":
        assert got is None, detail
        return
    if fn == "fixed":
        assert got == exp.mask.split(":", 1)[1], detail
        return
    if got is None:
        assert fn == "email", detail  # e-mail masking of a non-address: NULL allowed
        assert column != "email", detail
        return
    assert isinstance(got, str), detail
    assert got != original, detail
    assert not leaked(got.encode(), original), detail
    if fn == "last4":
        assert got.endswith(original[-4:]), detail
    elif fn == "partial":
        assert got.startswith(original[0]), detail
        assert got.endswith(original[-1]), detail
    elif fn == "email" and column == "email":
        assert got.endswith("@" + original.split("@")[1]), detail
    elif fn == "hash":
        bare = {h(original.encode()).hexdigest() for h in (hashlib.sha256, hashlib.md5, hashlib.sha1)}
        assert got.lower().removeprefix("\\x") not in bare, detail
