"""Per-role visibility on every path a value leaves pgveil by, with real PostgreSQL roles and real drivers.

One pgveil in front of the test cluster, with a policy over one table (three encrypted columns and one
plain governed column) and PostgreSQL roles for each grant: a billing role (plaintext), a support role
(masks), a contractor (deny), a backup role (ciphertext), a role the policy does not name (the default,
hidden), and a group role granted plaintext with a member that inherits and one that does not.

Each role reads the same rows through psql (simple protocol), psycopg (client-side binding, server-side
binding in text and binary), asyncpg (binary, prepared), COPY TO (text and CSV), RETURNING, server-side
cursors (DECLARE/FETCH through psycopg named cursors, portals with partial Execute through asyncpg),
a view, a CTE, a subquery and UNION ALL. What a restricted role receives is recorded byte for byte on
the wire between the client and pgveil, and the canary plaintext must not be in it. Refusals carry
42501 and leave the session usable; a policy reload between Parse and Bind re-decides the statement;
``pg_dump`` through pgveil as the backup role restores through pgveil as the same role.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import ProxyProcess
from encfixtures import encryption_config, run_psql
from faultproxy import FaultProxy, Link

from keymgmt.envelope import is_envelope
from proxy.config import parse_config
from proxy.devcluster import DevCluster
from proxy.schema import apply_schema, plan_schema

pytestmark = pytest.mark.integration
# The login role's view reaches the sessions through the policy runtime (role membership, reloads).
pytest.importorskip("proxy.policy_runtime", reason="the policy runtime is not merged yet")

PW = "ve-secret"
TABLE = "ve_customers"
DUMP_TABLE = "ve_dump"
ROLES = ("ve_billing", "ve_support", "ve_contractor", "ve_backup", "ve_nobody", "ve_alice", "ve_bob", "ve_app")
CANARY_SSN = "CANARY-SSN-7319"
CANARY_EMAIL = "canary.person@example.org"
ROWS = [
    (1, CANARY_EMAIL, CANARY_SSN, 4242, "555-0199"),
    (2, "bob@example.com", "987-65-4321", 7, "555-0100"),
    (3, None, None, None, None),
]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def policy(ssn: str = "masked:last4") -> dict[str, Any]:
    return {
        "default": "hidden",
        "ve_app": "plaintext",
        "ve_billing": {"public.ve_customers.*": "plaintext", "public.ve_dump.*": "plaintext"},
        "ve_support": {
            "public.ve_customers.email": "plaintext",
            "public.ve_customers.ssn": ssn,
            "public.ve_customers.score": "masked:last4",
            "public.ve_customers.phone": "masked:partial",
        },
        "ve_contractor": {"public.ve_customers.*": "deny"},
        "ve_backup": {"public.*": "ciphertext"},
        "ve_team": {"public.ve_customers.*": "plaintext"},
    }


def tables() -> dict[str, Any]:
    columns = {
        "email": {"type": "text", "encrypt": True},
        "ssn": {"type": "text", "encrypt": True},
        "score": {"type": "integer", "encrypt": True},
        "phone": {"type": "text"},
    }
    return {f"public.{TABLE}": {"columns": columns}, f"public.{DUMP_TABLE}": {"columns": columns}}


class Recorder(FaultProxy):
    """A TCP forwarder that keeps every byte it passes towards the client."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port)
        self.to_client = bytearray()
        self._lock = threading.Lock()

    def _pump(self, link: Link, direction: Any, src: Any, dst: Any) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    link.end(direction, dst)
                    return
                if direction == "to_client":
                    with self._lock:
                        self.to_client += data
                dst.sendall(data)
        except OSError:
            link.cut("both")


@pytest.fixture(scope="module")
def vis(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    for role in (*ROLES, "ve_team"):
        pg.psql(f"DROP ROLE IF EXISTS {role}", dbname="app")
    pg.psql("CREATE ROLE ve_team NOLOGIN")
    for role in ROLES:
        pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{PW}'")
    pg.psql("ALTER ROLE ve_bob NOINHERIT")
    pg.psql("GRANT ve_team TO ve_alice, ve_bob")
    pg.psql("CREATE DATABASE ve_keys")
    cols = "id int PRIMARY KEY, email text, ssn text, score int4, phone text"
    pg.psql(f"CREATE TABLE {TABLE} ({cols}); CREATE TABLE {DUMP_TABLE} ({cols})", dbname="app")
    catalog = parse_config({"tables": tables()}, base_dir=Path.cwd(), environ={}).catalog()

    async def schema() -> None:
        conn = await asyncpg.connect(pg.dsn(dbname="app"))
        try:
            await apply_schema(conn, await plan_schema(conn, catalog))
            await conn.execute(f"CREATE VIEW ve_customers_v AS SELECT id, ssn, phone FROM {TABLE}")
            for t in (TABLE, DUMP_TABLE, "ve_customers_v"):
                await conn.execute(f"GRANT ALL ON {t} TO {', '.join((*ROLES, 've_team'))}")
        finally:
            await conn.close()

    asyncio.run(schema())
    workdir = tmp_path_factory.mktemp("ve-proxy")
    # Its own keystore database (its own master key), the catalog read from the app database.
    cfg = encryption_config(
        pg,
        workdir / "master.key",
        pg.dsn(dbname="ve_keys"),
        tables=tables(),
        roles=policy(),
        service={"dsn": pg.dsn(dbname="app")},
    )
    proxy = ProxyProcess(cfg, workdir)
    proxy.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with (
                    psycopg.connect(proxy.dsn(user="ve_app", password=PW), autocommit=True) as c,
                    c.cursor() as cur,
                ):
                    cur.executemany(
                        f"INSERT INTO {TABLE} (id, email, ssn, score, phone) VALUES (%s, %s, %s, %s, %s)", ROWS
                    )
                break
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise RuntimeError(proxy.logs()) from None
                time.sleep(0.3)
        yield proxy
    finally:
        proxy.stop()


def dsn(proxy: ProxyProcess, role: str, port: int | None = None) -> str:
    d = proxy.dsn(user=role, password=PW)
    return d if port is None else d.replace(f":{proxy.port}/", f":{port}/")


SELECT = f"SELECT id, email, ssn, score, phone FROM {TABLE} ORDER BY id"
SELECT_ABOVE = f"SELECT id, email, ssn, score, phone FROM {TABLE} WHERE id > %s ORDER BY id"


def expected(role: str) -> list[tuple[Any, ...]]:
    """What ``role`` must get for SELECT, as Python values (text format: the driver's conversions)."""
    if role in ("ve_billing", "ve_app", "ve_alice"):
        return list(ROWS)
    if role in ("ve_nobody", "ve_bob"):
        return [(r[0], None, None, None, None) for r in ROWS]
    if role == "ve_support":
        return [
            (1, CANARY_EMAIL, "***********7319", 4242, "5******9"),
            (2, "bob@example.com", "*******4321", 7, "5******0"),
            (3, None, None, None, None),
        ]
    raise AssertionError(role)


READERS = ["ve_billing", "ve_support", "ve_nobody", "ve_alice", "ve_bob"]


@pytest.mark.parametrize("role", READERS)
@pytest.mark.parametrize("mode", ["client-binding", "server-text", "server-binary"])
def test_psycopg_gets_what_the_role_may_see(vis: ProxyProcess, role: str, mode: str) -> None:
    with psycopg.connect(dsn(vis, role), autocommit=True) as c:
        if mode == "client-binding":  # the simple protocol, the parameter as a literal
            cur: Any = psycopg.ClientCursor(c)
        else:  # the extended protocol
            cur = c.cursor(binary=mode == "server-binary")
        rows = cur.execute(SELECT_ABOVE, (0,)).fetchall()
    assert rows == expected(role)


@pytest.mark.parametrize("role", READERS)
def test_asyncpg_gets_what_the_role_may_see(vis: ProxyProcess, role: str) -> None:
    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(dsn(vis, role))
        try:
            return [tuple(r) for r in await conn.fetch(SELECT)]
        finally:
            await conn.close()

    assert asyncio.run(run()) == expected(role)


@pytest.mark.parametrize("role", READERS)
def test_psql_gets_what_the_role_may_see(vis: ProxyProcess, role: str) -> None:
    p = run_psql(dsn(vis, role), "-F", "|", "-c", SELECT)
    assert p.returncode == 0, p.stderr
    want = "\n".join("|".join("" if v is None else str(v) for v in row) for row in expected(role))
    assert p.stdout.strip() == want


def test_backup_role_gets_the_stored_envelopes_as_bytea(vis: ProxyProcess) -> None:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn(vis, "ve_backup"))
        try:
            rows: list[asyncpg.Record] = await conn.fetch(SELECT)
            return rows
        finally:
            await conn.close()

    rows = asyncio.run(run())
    first = rows[0]
    for col in ("email", "ssn", "score"):
        assert isinstance(first[col], bytes)
        assert is_envelope(first[col])
    assert first["phone"] == "555-0199"  # a plain column comes as stored
    with psycopg.connect(dsn(vis, "ve_backup"), autocommit=True) as c:
        text_rows = c.execute(SELECT).fetchall()
    assert text_rows[0][2] == first["ssn"]


def test_contractor_is_refused_with_42501_and_the_session_goes_on(vis: ProxyProcess) -> None:
    with psycopg.connect(dsn(vis, "ve_contractor"), autocommit=True) as c:
        for sql in (SELECT, f"SELECT * FROM {TABLE}", f"SELECT count(*) FROM {TABLE} WHERE ssn IS NULL"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                c.execute(sql)
            assert "public.ve_customers" in str(info.value)
            assert c.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT id FROM {TABLE} WHERE ssn IS NULL",  # encrypted: allowed for a plaintext role only
        f"SELECT count(ssn) FROM {TABLE}",
        f"SELECT id FROM {TABLE} WHERE phone LIKE '555-01%'",  # plain: every use needs plaintext
        f"SELECT id FROM {TABLE} ORDER BY phone",
        f"SELECT id FROM {TABLE} WHERE phone = '555-0199'",
        f"SELECT count(*) FROM {TABLE} GROUP BY phone",
    ],
)
def test_support_may_not_use_a_masked_column_in_a_predicate(vis: ProxyProcess, sql: str) -> None:
    with psycopg.connect(dsn(vis, "ve_support"), autocommit=True) as c:
        for cur in (c.cursor(), c.cursor(binary=True), psycopg.ClientCursor(c)):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                cur.execute(sql)
            assert "public.ve_customers" in str(info.value)
            assert c.execute("SELECT 2").fetchone() == (2,)
    with psycopg.connect(dsn(vis, "ve_billing"), autocommit=True) as c:
        c.execute(sql).fetchall()  # plaintext: allowed


@pytest.mark.parametrize(
    ("sql", "role", "want"),
    [
        (f"WITH c AS (SELECT id, ssn FROM {TABLE}) SELECT ssn FROM c ORDER BY id", "ve_support", "***********7319"),
        (f"SELECT s FROM (SELECT id, ssn AS s FROM {TABLE}) q ORDER BY id", "ve_support", "***********7319"),
        ("SELECT ssn FROM ve_customers_v ORDER BY id", "ve_support", "***********7319"),
        (f"SELECT ssn FROM {TABLE} WHERE id = 1 UNION ALL SELECT ssn FROM {TABLE} WHERE id = 1", "ve_support", None),
        (f"WITH c AS (SELECT id, ssn FROM {TABLE}) SELECT ssn FROM c ORDER BY id", "ve_nobody", None),
        ("SELECT phone FROM ve_customers_v ORDER BY id", "ve_nobody", None),
    ],
    ids=["cte", "subquery", "view", "union-all", "cte-hidden", "view-plain-hidden"],
)
def test_pass_through_constructs_keep_the_roles_view(vis: ProxyProcess, sql: str, role: str, want: str | None) -> None:
    for binary in (False, True):
        with psycopg.connect(dsn(vis, role), autocommit=True) as c:
            rows = c.cursor(binary=binary).execute(sql).fetchall()
        assert rows[0][0] in ((want,) if want is not None else (None, "***********7319"))
        assert CANARY_SSN not in repr(rows)


def test_returning_is_served_by_the_roles_view(vis: ProxyProcess) -> None:
    with psycopg.connect(dsn(vis, "ve_support"), autocommit=True) as c:
        row = c.execute(f"UPDATE {TABLE} SET score = score WHERE id = 1 RETURNING id, ssn, phone").fetchone()
    assert row == (1, "***********7319", "5******9")
    with psycopg.connect(dsn(vis, "ve_nobody"), autocommit=True) as c:
        row = c.cursor(binary=True).execute(f"UPDATE {TABLE} SET id = id WHERE id = 1 RETURNING ssn, phone").fetchone()
    assert row == (None, None)


@pytest.mark.parametrize("fmt", ["text", "csv"])
@pytest.mark.parametrize("role", ["ve_billing", "ve_support", "ve_nobody", "ve_backup"])
def test_copy_to_serves_the_roles_view(vis: ProxyProcess, role: str, fmt: str) -> None:
    opts = "" if fmt == "text" else " (FORMAT csv)"
    with psycopg.connect(dsn(vis, role), autocommit=True) as c:
        with c.cursor().copy(f"COPY (SELECT id, ssn, phone FROM {TABLE} WHERE id = 1) TO STDOUT{opts}") as cp:
            by_query = b"".join(bytes(b) for b in cp)
        with c.cursor().copy(f"COPY {TABLE} (id, ssn, phone) TO STDOUT{opts}") as cp:
            by_table = b"".join(bytes(b) for b in cp)
    sep = b"\t" if fmt == "text" else b","
    null = b"\\N" if fmt == "text" else b""
    first = next(line for line in by_table.splitlines() if line.startswith(b"1" + sep))
    assert by_query.rstrip(b"\n") == first
    ssn, phone = first.split(sep)[1:]
    if role == "ve_billing":
        assert (ssn, phone) == (CANARY_SSN.encode(), b"555-0199")
    elif role == "ve_support":
        assert (ssn, phone) == (b"***********7319", b"5******9")
    elif role == "ve_nobody":
        assert (ssn, phone) == (null, null)
    else:
        assert ssn.lstrip(b"\\").startswith(b"x5056")  # bytea hex of the envelope's "PV"
        assert phone == b"555-0199"


def test_binary_copy_to_is_refused_for_a_restricted_role(vis: ProxyProcess) -> None:
    with psycopg.connect(dsn(vis, "ve_support"), autocommit=True) as c:
        with (
            pytest.raises(psycopg.Error) as info,
            c.cursor().copy(f"COPY {TABLE} (id, phone) TO STDOUT (FORMAT binary)") as cp,
        ):
            b"".join(bytes(b) for b in cp)
        assert info.value.sqlstate in ("42501", "0A000")
        assert c.execute("SELECT 3").fetchone() == (3,)


@pytest.mark.parametrize("role", ["ve_support", "ve_nobody"])
def test_cursors_serve_the_roles_view(vis: ProxyProcess, role: str) -> None:
    want = [r[2] for r in expected(role)]
    with psycopg.connect(dsn(vis, role)) as c:
        with c.cursor(name="ve_cur") as cur:  # DECLARE ... CURSOR, then FETCH
            cur.itersize = 1
            cur.execute(f"SELECT id, ssn FROM {TABLE} ORDER BY id")
            assert [r[1] for r in cur] == want
        with c.cursor(name="ve_cur_b", binary=True) as cur:
            cur.execute(f"SELECT id, ssn FROM {TABLE} ORDER BY id")
            assert [r[1] for r in cur.fetchmany(2)] + [r[1] for r in cur.fetchall()] == want

    async def portals() -> list[Any]:
        conn = await asyncpg.connect(dsn(vis, role))
        try:
            async with conn.transaction():
                cur = await conn.cursor(f"SELECT id, ssn FROM {TABLE} ORDER BY id")
                got = [r["ssn"] for r in await cur.fetch(1)]  # Execute with a row limit: a partial portal
                got += [r["ssn"] for r in await cur.fetch(5)]
                async for r in conn.cursor(f"SELECT id, ssn FROM {TABLE} ORDER BY id", prefetch=1):
                    got.append(r["ssn"])
                return got
        finally:
            await conn.close()

    assert asyncio.run(portals()) == want + want


@pytest.mark.parametrize("role", ["ve_support", "ve_nobody", "ve_bob"])
def test_the_canary_never_reaches_a_restricted_role_on_the_wire(vis: ProxyProcess, role: str) -> None:
    rec = Recorder(vis.port)
    with rec:
        d = dsn(vis, role, rec.port)
        with psycopg.connect(d, autocommit=True) as c:
            c.execute(SELECT).fetchall()
            c.cursor(binary=True).execute(SELECT_ABOVE, (0,)).fetchall()
            psycopg.ClientCursor(c).execute(SELECT_ABOVE, (0,)).fetchall()
            with c.cursor().copy(f"COPY {TABLE} TO STDOUT (FORMAT csv)") as cp:
                b"".join(bytes(b) for b in cp)
            with c.transaction(), c.cursor(name="canary_cur") as cur:
                cur.execute(f"SELECT * FROM {TABLE}")
                cur.fetchall()
            with contextlib.suppress(psycopg.Error):
                c.execute(f"SELECT id FROM {TABLE} WHERE ssn = '{CANARY_SSN}'")

        async def run() -> None:
            conn = await asyncpg.connect(d)
            try:
                await conn.fetch(SELECT)
            finally:
                await conn.close()

        asyncio.run(run())
        seen = bytes(rec.to_client)
    assert seen  # the recorder saw the sessions
    for secret in (CANARY_SSN[:10].encode(), CANARY_SSN.encode().hex().encode()):
        assert secret not in seen
    if role != "ve_support":  # support sees e-mail in plaintext; no one else does
        assert b"canary.person" not in seen


def test_a_reload_between_parse_and_bind_redecides(vis: ProxyProcess) -> None:
    """A statement prepared while ssn is masked for support is executed after SIGHUP made it hidden,
    then denied: never served under the rules it was prepared under."""
    try:
        with psycopg.connect(dsn(vis, "ve_support"), autocommit=True, prepare_threshold=0) as c:
            sql = f"SELECT ssn FROM {TABLE} WHERE id = %s"
            assert c.execute(sql, (1,)).fetchone() == ("***********7319",)
            _reload(vis, policy(ssn="hidden"), lambda: c.execute(sql, (1,)).fetchone() == (None,))
            _reload(vis, policy(ssn="deny"), lambda: _refused(c, sql))
            assert c.execute("SELECT 4").fetchone() == (4,)
    finally:
        _reload(vis, policy(), lambda: _support_ssn(vis) == "***********7319")


def _support_ssn(proxy: ProxyProcess) -> Any:
    try:
        with psycopg.connect(dsn(proxy, "ve_support"), autocommit=True) as c:
            row = c.execute(f"SELECT ssn FROM {TABLE} WHERE id = 1").fetchone()
    except psycopg.Error:  # still denied
        return None
    return None if row is None else row[0]


def _refused(c: psycopg.Connection[Any], sql: str) -> bool:
    try:
        c.execute(sql, (1,)).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def _reload(proxy: ProxyProcess, roles: dict[str, Any], done: Any) -> None:
    proxy.config["roles"] = roles
    proxy.write_config()
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("the reloaded policy was not applied:\n" + proxy.logs()[-3000:])
        time.sleep(0.2)


@pytest.mark.skipif(not (PG_BIN / "pg_dump").exists(), reason="pg_dump 15 is not installed")
def test_pg_dump_as_backup_role_restores_through_pgveil_as_the_same_role(vis: ProxyProcess, tmp_path: Path) -> None:
    rows: list[tuple[Any, ...]] = [
        (10 + i, f"user{i}@example.com", f"SSN-{i:04d}", i * 3, f"555-{i:04d}") for i in range(20)
    ]
    rows.append((99, None, "only-ssn", None, None))
    with psycopg.connect(dsn(vis, "ve_billing"), autocommit=True) as c:
        c.execute(f"TRUNCATE {DUMP_TABLE}")
        with c.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {DUMP_TABLE} (id, email, ssn, score, phone) VALUES (%s, %s, %s, %s, %s)", rows
            )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    dump = tmp_path / "dump.sql"
    p = subprocess.run(
        [str(PG_BIN / "pg_dump"), "--data-only", "-t", f"public.{DUMP_TABLE}", "-f", str(dump), dsn(vis, "ve_backup")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    text = dump.read_text()
    assert "SSN-0001" not in text  # envelopes only
    assert "user1@example.com" not in text
    assert "555-0001" in text  # the plain column, as stored
    with psycopg.connect(dsn(vis, "ve_billing"), autocommit=True) as c:
        c.execute(f"TRUNCATE {DUMP_TABLE}")
    psql = shutil.which("psql") or str(PG_BIN / "psql")
    p = subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn(vis, "ve_backup"), "-f", str(dump)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    with psycopg.connect(dsn(vis, "ve_billing"), autocommit=True) as c:
        restored = c.execute(f"SELECT id, email, ssn, score, phone FROM {DUMP_TABLE} ORDER BY id").fetchall()
    assert restored == rows


def test_a_ciphertext_role_cannot_store_a_non_envelope(vis: ProxyProcess) -> None:
    with psycopg.connect(dsn(vis, "ve_backup"), autocommit=True) as c:
        for sql, args in (
            (f"INSERT INTO {DUMP_TABLE} (id, ssn) VALUES (500, '\\x5056')", None),
            (f"INSERT INTO {DUMP_TABLE} (id, ssn) VALUES (501, %s)", (b"plaintext ssn",)),
        ):
            with pytest.raises(psycopg.Error) as info:
                c.execute(sql, args)
            assert info.value.sqlstate == "22023"
        moved = c.execute(f"SELECT email FROM {TABLE} WHERE id = 1").fetchone()
        assert moved is not None
        with pytest.raises(psycopg.Error):  # another column's envelope
            c.execute(f"INSERT INTO {DUMP_TABLE} (id, ssn) VALUES (502, %s)", (moved[0],))
    with psycopg.connect(dsn(vis, "ve_billing"), autocommit=True) as c:
        assert c.execute(f"SELECT count(*) FROM {DUMP_TABLE} WHERE id BETWEEN 500 AND 502").fetchone() == (0,)


def test_set_role_never_widens_what_pgveil_serves(vis: ProxyProcess) -> None:
    """ve_bob (NOINHERIT) may SET ROLE to ve_team, which the policy grants plaintext; pgveil serves the
    login role's view whatever the session's current role."""
    with psycopg.connect(dsn(vis, "ve_bob"), autocommit=True) as c:
        c.execute("SET ROLE ve_team")
        assert c.execute("SELECT current_user").fetchone() == ("ve_team",)
        assert c.execute(SELECT).fetchall() == expected("ve_bob")
        c.execute("SET SESSION AUTHORIZATION DEFAULT")
        c.execute("RESET ROLE")
        assert c.cursor(binary=True).execute(SELECT).fetchall() == expected("ve_bob")


@pytest.mark.parametrize("role", ["ve_nobody", "ve_support"])
def test_a_role_may_write_what_it_may_not_read(vis: ProxyProcess, role: str) -> None:
    base = 600 if role == "ve_nobody" else 700
    with psycopg.connect(dsn(vis, role), autocommit=True) as c:
        c.execute(
            f"INSERT INTO {DUMP_TABLE} (id, email, ssn, score, phone) VALUES (%s, %s, %s, %s, %s)",
            (base, "w@example.com", "WRITE-ONLY-1", 5, "555-7777"),
        )
        psycopg.ClientCursor(c).execute(
            f"INSERT INTO {DUMP_TABLE} (id, ssn) VALUES (%s, %s)", (base + 1, "WRITE-ONLY-2")
        )
        with c.cursor().copy(f"COPY {DUMP_TABLE} (id, ssn) FROM STDIN") as cp:
            cp.write_row((base + 2, "WRITE-ONLY-3"))
    with psycopg.connect(dsn(vis, "ve_billing"), autocommit=True) as c:
        got = c.execute(
            f"SELECT id, ssn FROM {DUMP_TABLE} WHERE id BETWEEN %s AND %s ORDER BY id", (base, base + 2)
        ).fetchall()
    assert got == [(base, "WRITE-ONLY-1"), (base + 1, "WRITE-ONLY-2"), (base + 2, "WRITE-ONLY-3")]
