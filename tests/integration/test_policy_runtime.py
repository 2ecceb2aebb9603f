"""Roles follow PostgreSQL: the membership graph pgveil reads over its service connection, against real
roles (CREATE ROLE ... IN ROLE, NOINHERIT, nested groups, GRANT/REVOKE), and how the policy runtime
caches, refreshes and fails closed."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import APP_PASSWORD, ProxyProcess, proxy_config, wait_until
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_config
from proxy.devcluster import DevCluster
from proxy.policy.membership import MembershipGraph
from proxy.policy.model import Grant
from proxy.policy_runtime import MembershipNotLoaded, PolicyRuntime, read_membership
from proxy.schema import apply_schema, plan_schema

pytestmark = pytest.mark.integration

_runs = itertools.count()


def prefix() -> str:
    return f"pr{os.getpid()}_{next(_runs)}_"


async def read(pg: DevCluster) -> MembershipGraph:
    conn = await asyncpg.connect(pg.dsn(dbname="app"))
    try:
        return await read_membership(conn)
    finally:
        await conn.close()


def test_graph_matches_the_servers_own_privilege_inheritance(pg: DevCluster) -> None:
    p = prefix()
    pg.psql(
        f"""
        CREATE ROLE {p}staff NOLOGIN;
        CREATE ROLE {p}support NOLOGIN IN ROLE {p}staff;
        CREATE ROLE {p}agent LOGIN IN ROLE {p}support;
        CREATE ROLE {p}noinh LOGIN NOINHERIT IN ROLE {p}support;
        CREATE ROLE {p}gate NOLOGIN NOINHERIT IN ROLE {p}staff;
        CREATE ROLE {p}via_gate LOGIN IN ROLE {p}gate;
        CREATE ROLE {p}loner LOGIN SUPERUSER;
        """
    )
    graph = asyncio.run(read(pg))
    ours = {r for r in graph.roles if r.startswith(p)}
    assert len(ours) == 7
    # The server's answer for every pair: pg_has_role(login, group, 'USAGE') is "has the privileges
    # of". Superusers are left out of the comparison: the server answers true for them whatever the
    # membership, and pgveil deliberately gives them nothing extra (asserted below).
    rows = pg.psql(
        f"SELECT a.rolname, b.rolname, pg_has_role(a.rolname, b.rolname, 'USAGE') "
        f"FROM pg_roles a, pg_roles b WHERE a.rolname LIKE '{p}%' AND b.rolname LIKE '{p}%' AND NOT a.rolsuper"
    )
    assert len(rows.splitlines()) == 6 * 7
    for line in rows.splitlines():
        login, group, usage = line.split("|")
        assert (group in graph.inherited_roles(login)) == (usage == "t"), (login, group)
    assert graph.inherited_roles(f"{p}agent") == {f"{p}agent", f"{p}support", f"{p}staff"}
    assert graph.inherited_roles(f"{p}noinh") == {f"{p}noinh"}
    assert graph.inherited_roles(f"{p}via_gate") == {f"{p}via_gate", f"{p}gate"}
    assert graph.inherited_roles(f"{p}loner") == {f"{p}loner"}  # a superuser gets nothing extra


@dataclass
class RecordingPolicy:
    """Stands in for the config's Policy: the view it makes names the roles it was asked about."""

    calls: list[tuple[str, frozenset[str], int]]

    def view(self, login_role: str, member_of: frozenset[str], epoch: int) -> Any:
        self.calls.append((login_role, member_of, epoch))
        return _View(login_role, epoch, member_of)


@dataclass(frozen=True)
class _View:
    login_role: str
    epoch: int
    member_of: frozenset[str]
    label: str = "default"

    def grant(self, column: Any) -> Grant:
        raise AssertionError("not used here")


def members(view: Any) -> frozenset[str]:
    assert isinstance(view, _View)
    return view.member_of


def test_runtime_follows_grant_and_revoke_and_fails_closed_before_the_first_read(pg: DevCluster) -> None:
    p = prefix()
    pg.psql(f"CREATE ROLE {p}billing NOLOGIN; CREATE ROLE {p}clerk LOGIN;")

    async def scenario() -> None:
        policy = RecordingPolicy([])
        rt = PolicyRuntime(policy, lambda: asyncpg.connect(pg.dsn(dbname="app")), refresh_seconds=0)
        with pytest.raises(MembershipNotLoaded) as e:
            rt.view(f"{p}clerk")
        assert e.value.sqlstate == "55000"
        assert await rt.refresh()
        v = rt.view_source(f"{p}clerk")
        first = v()
        assert members(first) == frozenset()
        assert v() is first  # cached within an epoch
        pg.psql(f"GRANT {p}billing TO {p}clerk")
        epoch = rt.epoch
        assert await rt.refresh()
        assert rt.epoch > epoch
        assert members(v()) == {f"{p}billing"}
        epoch = rt.epoch
        assert await rt.refresh()  # nothing changed: same epoch, same view
        assert rt.epoch == epoch
        pg.psql(f"REVOKE {p}billing FROM {p}clerk")
        rt.role_ddl_completed()
        for _ in range(200):
            if members(v()) == frozenset():
                break
            await asyncio.sleep(0.02)
        assert members(v()) == frozenset()

        # A login role created after the last read: refused (55000) until a read knows it, which it asks for.
        pg.psql(f"CREATE ROLE {p}newcomer LOGIN IN ROLE {p}billing")
        with pytest.raises(MembershipNotLoaded):
            rt.view(f"{p}newcomer")
        for _ in range(200):
            if rt.graph is not None and rt.graph.knows(f"{p}newcomer"):
                break
            await asyncio.sleep(0.02)
        assert members(rt.view(f"{p}newcomer")) == {f"{p}billing"}
        await rt.stop()

    asyncio.run(scenario())


def test_a_failed_read_keeps_the_last_good_membership(pg: DevCluster) -> None:
    p = prefix()
    pg.psql(f"CREATE ROLE {p}grp NOLOGIN; CREATE ROLE {p}user LOGIN IN ROLE {p}grp;")

    async def scenario() -> None:
        up = True

        async def connect() -> Any:
            if not up:
                raise OSError("service connection down")
            return await asyncpg.connect(pg.dsn(dbname="app"))

        rt = PolicyRuntime(RecordingPolicy([]), connect, refresh_seconds=0)
        assert await rt.refresh()
        before = rt.view(f"{p}user")
        up = False
        assert not await rt.refresh()
        assert rt.membership_read_failures == 1
        assert rt.view(f"{p}user") is before
        assert members(before) == {f"{p}grp"}

    asyncio.run(scenario())


def test_periodic_poll_notices_changes_made_directly(pg: DevCluster) -> None:
    p = prefix()
    pg.psql(f"CREATE ROLE {p}grp NOLOGIN; CREATE ROLE {p}user LOGIN;")

    async def scenario() -> None:
        rt = PolicyRuntime(RecordingPolicy([]), lambda: asyncpg.connect(pg.dsn(dbname="app")), refresh_seconds=0.05)
        assert await rt.refresh()
        rt.start_polling()
        assert members(rt.view(f"{p}user")) == frozenset()
        pg.psql(f"GRANT {p}grp TO {p}user")
        for _ in range(400):
            if members(rt.view(f"{p}user")):
                break
            await asyncio.sleep(0.02)
        assert members(rt.view(f"{p}user")) == {f"{p}grp"}
        await rt.stop()

    asyncio.run(scenario())


# -- through a running pgveil ---------------------------------------------------------------------------

PASSWORD = "policy-runtime-pw"
_tables = itertools.count()


@dataclass
class Env:
    pg: DevCluster
    table: str
    p: str  # the prefix of this test's role names
    keystore_db: str
    workdir: Path

    def role(self, name: str) -> str:
        return f"{self.p}{name}"

    def tables(self) -> dict[str, Any]:
        cols = {"ssn": {"type": "text", "encrypt": True}, "phone": {"type": "text"}}
        return {f"public.{self.table}": {"columns": cols}}

    def config(self, roles: dict[str, Any], **extra: Any) -> dict[str, Any]:
        cfg = proxy_config(
            self.pg,
            keystore={
                "dsn": self.pg.dsn(dbname=self.keystore_db),
                "master_key": {"provider": "local", "path": str(self.workdir / "mk")},
            },
            tables=self.tables(),
            service={"dsn": self.pg.dsn(dbname="app")},
            roles=roles,
        )
        cfg.update(extra)
        return cfg


@pytest.fixture
def env(pg: DevCluster, tmp_path: Path) -> Env:
    n = next(_tables)
    e = Env(pg, f"prt_{os.getpid()}_{n}", prefix(), f"prt_ks_{os.getpid()}_{n}", tmp_path)
    pg.psql(f"CREATE DATABASE {e.keystore_db}")

    async def create() -> None:
        app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/app")
        try:
            await app.execute(f"CREATE TABLE {e.table} (id int PRIMARY KEY, name text, ssn text, phone text)")
        finally:
            await app.close()
        catalog = parse_config({"tables": e.tables()}, base_dir=Path.cwd(), environ={}).catalog()
        service = await asyncpg.connect(pg.dsn(dbname="app"))
        try:
            await apply_schema(service, await plan_schema(service, catalog))
        finally:
            await service.close()

    asyncio.run(create())
    pg.psql(f"GRANT ALL ON {e.table} TO PUBLIC", dbname="app")
    return e


@pytest.fixture
def start(env: Env) -> Iterator[Any]:
    started: list[ProxyProcess] = []

    def go(roles: dict[str, Any], **extra: Any) -> ProxyProcess:
        p = ProxyProcess(env.config(roles, **extra), env.workdir / f"proxy{len(started)}")
        started.append(p)
        p.start()

        def ready() -> bool:
            try:
                with psycopg.connect(p.dsn(connect_timeout="5"), autocommit=True) as c:
                    c.execute(f"SELECT name FROM {env.table} WHERE id = -1").fetchall()
                    return True
            except psycopg.Error:
                return False

        assert wait_until(ready, timeout=30), p.logs()
        return p

    yield go
    for p in started:
        p.stop()


def login(env: Env, *names: str, superuser: bool = False) -> None:
    for name in names:
        env.pg.psql(f"CREATE ROLE {env.role(name)} LOGIN PASSWORD '{PASSWORD}'{' SUPERUSER' if superuser else ''}")


def connect(p: ProxyProcess, env: Env, name: str, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(p.dsn(user=env.role(name), password=PASSWORD), autocommit=True, **kw)


def seed(p: ProxyProcess, env: Env) -> None:
    with psycopg.connect(p.dsn(), autocommit=True) as c:  # app: default (hidden) still writes
        c.execute(f"INSERT INTO {env.table} VALUES (1, 'Ada', '123-45-6789', '+44 20 7946 0018')")


def test_set_role_and_session_authorization_never_change_what_pgveil_reveals(env: Env, start: Any) -> None:
    boss, billing = env.role("boss"), env.role("billing")
    env.pg.psql(f"CREATE ROLE {boss} NOLOGIN")
    login(env, "billing")
    env.pg.psql(f"CREATE ROLE {env.role('low')} LOGIN NOINHERIT PASSWORD '{PASSWORD}' IN ROLE {boss}")
    login(env, "super", superuser=True)
    p = start({"default": "hidden", boss: "plaintext", billing: "plaintext"})
    seed(p, env)
    q = f"SELECT ssn, phone FROM {env.table} WHERE id = 1"
    with connect(p, env, "billing") as c:  # the control: the policy does reveal it to billing
        assert c.execute(q).fetchone() == ("123-45-6789", "+44 20 7946 0018")
    with connect(p, env, "low") as c:
        assert c.execute(q).fetchone() == (None, None)
        c.execute(f"SET ROLE {boss}")
        assert c.execute("SELECT current_user").fetchone() == (boss,)  # the server did switch
        assert c.execute(q).fetchone() == (None, None)
        assert c.execute(q, binary=True).fetchone() == (None, None)
        c.execute("RESET ROLE")
        assert c.execute(q).fetchone() == (None, None)
    with connect(p, env, "super") as c:  # a superuser the policy does not name gets the default
        assert c.execute(q).fetchone() == (None, None)
        c.execute(f"SET SESSION AUTHORIZATION {billing}")
        assert c.execute("SELECT session_user").fetchone() == (billing,)
        assert c.execute(q).fetchone() == (None, None)
        c.execute("RESET SESSION AUTHORIZATION")
        c.execute(f"SET ROLE {boss}")
        assert c.execute("SELECT current_user").fetchone() == (boss,)
        assert c.execute(q).fetchone() == (None, None)

    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(p.dsn(user=env.role("low"), password=PASSWORD))
        try:
            await conn.execute(f"SET ROLE {boss}")
            row = await conn.fetchrow(q)
            assert row is not None
            assert tuple(row) == (None, None)
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())

    # Values served, by a role label the policy names (billing) or "default" (every other login).
    def served(role: str, outcome: str) -> float:
        return scrape(p).get(("pgveil_values_served_total", (("outcome", outcome), ("role", role))), 0.0)

    assert wait_until(lambda: served(billing, "plaintext") == 2 and served("default", "hidden") == 16), [
        (k, v) for k, v in scrape(p).items() if k[0].startswith("pgveil_values")
    ]
    assert not [k for k in scrape(p) if k[0] == "pgveil_values_served_total" and ("role", env.role("low")) in k[1]]


def test_a_grant_made_through_pgveil_applies_once_committed(env: Env, start: Any) -> None:
    grp = env.role("grp")
    env.pg.psql(f"CREATE ROLE {grp} NOLOGIN")
    login(env, "user", "admin")
    env.pg.psql(f"ALTER ROLE {env.role('admin')} CREATEROLE")
    env.pg.psql(f"GRANT {grp} TO {env.role('admin')} WITH ADMIN OPTION")
    # The poll would take an hour: only the noticed GRANT can make the change visible in time.
    p = start({"default": "hidden", grp: "plaintext"}, policy={"membership_refresh_seconds": 3600})
    seed(p, env)
    q = f"SELECT ssn FROM {env.table} WHERE id = 1"
    with connect(p, env, "user") as user, connect(p, env, "admin") as admin:
        assert user.execute(q).fetchone() == (None,)
        admin.execute("BEGIN")
        admin.execute(f"GRANT {grp} TO {env.role('user')}")
        assert user.execute(q).fetchone() == (None,)  # not committed: PostgreSQL does not grant it yet either
        admin.execute("COMMIT")
        assert wait_until(lambda: user.execute(q).fetchone() == ("123-45-6789",), timeout=15), p.logs()
        admin.execute(f"REVOKE {grp} FROM {env.role('user')}")
        assert wait_until(lambda: user.execute(q).fetchone() == (None,), timeout=15), p.logs()

    # Another pgveil instance on the same database hears of role DDL made through the first one.
    other = start({"default": "hidden", grp: "plaintext"}, policy={"membership_refresh_seconds": 3600})
    with connect(other, env, "user") as user, connect(p, env, "admin") as admin:
        assert user.execute(q).fetchone() == (None,)
        admin.execute(f"GRANT {grp} TO {env.role('user')}")
        assert wait_until(lambda: user.execute(q).fetchone() == ("123-45-6789",), timeout=15), other.logs()


def test_reload_under_load_disturbs_no_role_whose_view_did_not_change(env: Env, start: Any) -> None:
    """SIGHUP policy reloads while clients of unchanged roles query without pause: every statement of
    theirs succeeds with the same answer; the role whose rules change sees the new ones; an invalid
    policy is refused (the dotted path is logged) and the running one stays."""
    steady, blind, moving = env.role("steady"), env.role("blind"), env.role("moving")
    login(env, "steady", "blind", "moving")
    v1 = {"default": "hidden", steady: "plaintext", moving: "plaintext"}
    v2 = {"default": "hidden", steady: "plaintext", moving: {f"public.{env.table}.ssn": "masked:last4"}}
    p = start(v1)
    seed(p, env)
    q = f"SELECT ssn, phone FROM {env.table} WHERE id = %s"
    expected = {steady: ("123-45-6789", "+44 20 7946 0018"), blind: (None, None)}
    stop = False
    failures: list[Exception] = []
    counts = dict.fromkeys(expected, 0)

    async def client(name: str) -> None:
        conn = await asyncpg.connect(p.dsn(user=name, password=PASSWORD))
        try:
            prepared = await conn.prepare(f"SELECT ssn, phone FROM {env.table} WHERE id = $1")
            while not stop:
                for row in (await prepared.fetchrow(1), await conn.fetchrow(q.replace("%s", "1"))):
                    assert row is not None
                    assert tuple(row) == expected[name]
                counts[name] += 1
        except Exception as e:  # reported below
            failures.append(e)
        finally:
            await conn.close()

    async def scenario() -> None:
        nonlocal stop
        tasks = [asyncio.create_task(client(n)) for n in expected for _ in range(2)]
        for i in range(6):
            await asyncio.to_thread(reload_with, p, env.config(v2 if i % 2 == 0 else v1), "visibility policy reloaded")
            await asyncio.sleep(0.2)
        stop = True
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert not failures, failures
    assert all(n > 0 for n in counts.values()), counts
    # The last reload installed v1 again: moving sees plaintext; with v2 it sees the mask.
    with connect(p, env, "moving") as c:
        assert c.execute(q, (1,)).fetchone() == ("123-45-6789", "+44 20 7946 0018")


def reload_with(p: ProxyProcess, cfg: dict[str, Any], marker: str) -> None:
    """Writes ``cfg`` (keeping the proxy's ports), sends SIGHUP and waits for ``marker`` in the log."""
    keep = {"listen": p.config["listen"], "admin": p.config["admin"]}
    p.config.clear()
    p.config.update({**cfg, **keep})
    p.write_config()
    seen = p.logs().count(marker)
    p.signal(signal.SIGHUP)
    assert wait_until(lambda: p.logs().count(marker) > seen, timeout=15), p.logs()


def test_a_prepared_statement_is_decided_again_after_a_reload(env: Env, start: Any) -> None:
    moving = env.role("moving")
    login(env, "moving")
    p = start({"default": "hidden", moving: "plaintext"})
    seed(p, env)
    by_phone = f"SELECT id FROM {env.table} WHERE phone = $1"
    ssn_of = f"SELECT ssn FROM {env.table} WHERE id = $1"

    async def prepare() -> tuple[asyncpg.Connection, Any, Any]:
        conn = await asyncpg.connect(p.dsn(user=moving, password=PASSWORD))
        return conn, await conn.prepare(by_phone), await conn.prepare(ssn_of)

    loop = asyncio.new_event_loop()
    try:
        conn, phone_stmt, ssn_stmt = loop.run_until_complete(prepare())
        with connect(p, env, "moving") as c:
            assert c.execute(by_phone.replace("$1", "%s"), ("+44 20 7946 0018",), prepare=True).fetchall() == [(1,)]
            assert c.execute(ssn_of.replace("$1", "%s"), (1,), prepare=True).fetchall() == [("123-45-6789",)]
            assert loop.run_until_complete(phone_stmt.fetchval("+44 20 7946 0018")) == 1
            assert loop.run_until_complete(ssn_stmt.fetchval(1)) == "123-45-6789"

            restricted = {
                "default": "hidden",
                moving: {f"public.{env.table}.phone": "masked:partial", f"public.{env.table}.ssn": "hidden"},
            }
            reload_with(p, env.config(restricted), "visibility policy reloaded")
            # The same prepared statements, executed again: decided under the new policy.
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="phone"):
                c.execute(by_phone.replace("$1", "%s"), ("+44 20 7946 0018",), prepare=True)
            assert c.execute(ssn_of.replace("$1", "%s"), (1,), prepare=True).fetchall() == [(None,)]
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="phone"):
                loop.run_until_complete(phone_stmt.fetchval("+44 20 7946 0018"))
            assert loop.run_until_complete(ssn_stmt.fetchval(1)) is None

            # An invalid policy is refused with the dotted path logged; the running policy stays.
            bad = {"default": "hidden", moving: {f"public.{env.table}.ssn": "masked:last5"}}
            reload_with(p, env.config(bad), "reload rejected")
            assert f"roles.{moving}" in p.logs()
            assert c.execute(ssn_of.replace("$1", "%s"), (1,), prepare=True).fetchall() == [(None,)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(by_phone.replace("$1", "%s"), ("+44 20 7946 0018",))
        loop.run_until_complete(conn.close())
    finally:
        loop.close()
    metrics = scrape(p)
    assert metrics.get(("pgveil_policy_reloads_total", (("result", "success"),)), 0) >= 1
    assert metrics.get(("pgveil_policy_reloads_total", (("result", "failure"),)), 0) >= 1


def scrape(p: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(p.admin_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_without_a_membership_read_governed_statements_are_refused_55000(env: Env, start: Any) -> None:
    """The service connection can read the catalog but not pg_auth_members: pgveil does not guess (a
    role resolved as member of nothing could get a permissive default); statements on governed columns
    get 55000 and the session goes on; once the membership can be read, they are served."""
    svc = env.role("svc")
    env.pg.psql(f"CREATE ROLE {svc} LOGIN PASSWORD '{PASSWORD}'")
    env.pg.psql("REVOKE SELECT ON pg_catalog.pg_auth_members FROM PUBLIC", dbname="app")
    try:
        dsn = f"postgresql://{svc}:{PASSWORD}@127.0.0.1:{env.pg.port}/app"
        cfg = env.config({"default": "plaintext"}, service={"dsn": dsn})
        p = ProxyProcess(cfg, env.workdir / "no-membership")
        p.start()
        try:
            with psycopg.connect(p.dsn(), autocommit=True) as c:
                with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="role membership not loaded"):
                    c.execute(f"SELECT ssn FROM {env.table}")
                with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                    c.execute(f"SELECT phone FROM {env.table}")  # a plain governed column waits too
                assert c.execute("SELECT 1").fetchall() == [(1,)]  # no governed table: passes
                env.pg.psql("GRANT SELECT ON pg_catalog.pg_auth_members TO PUBLIC", dbname="app")

                def served() -> bool:
                    try:
                        c.execute(f"SELECT ssn, phone FROM {env.table}").fetchall()
                        return True
                    except psycopg.errors.ObjectNotInPrerequisiteState:
                        return False

                assert wait_until(served, timeout=20), p.logs()
            assert "cannot read role membership" in p.logs()
        finally:
            p.stop()
    finally:
        env.pg.psql("GRANT SELECT ON pg_catalog.pg_auth_members TO PUBLIC", dbname="app")


def test_plain_governed_columns_alone_are_enforced_without_a_keystore(env: Env, pg: DevCluster) -> None:
    """Only plain governed columns and no hash mask: no keystore is configured or needed, yet the policy
    applies (a config that encrypts nothing must not turn pgveil into a pass-through for them)."""
    login(env, "reader", "payroll")
    cfg = proxy_config(
        pg,
        tables={f"public.{env.table}": {"columns": {"phone": {"type": "text"}}}},
        service={"dsn": pg.dsn(dbname="app")},
        roles={"default": "hidden", env.role("payroll"): "plaintext"},
    )
    pg.psql(f"INSERT INTO {env.table} (id, name, phone) VALUES (7, 'Grace', '+1 202 555 0143')", dbname="app")
    p = ProxyProcess(cfg, env.workdir / "plain-only")
    p.start()
    try:
        q = f"SELECT name, phone FROM {env.table} WHERE id = 7"

        def answer(name: str) -> Any:
            with connect(p, env, name) as c:
                return c.execute(q).fetchone()

        assert wait_until(lambda: answer("payroll") == ("Grace", "+1 202 555 0143"), timeout=20), p.logs()
        assert answer("reader") == ("Grace", None)
        with connect(p, env, "reader") as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"SELECT name FROM {env.table} WHERE phone LIKE '+1%'")
    finally:
        p.stop()
