"""Roles follow PostgreSQL: the membership graph pgveil reads over its service connection, against real
roles (CREATE ROLE ... IN ROLE, NOINHERIT, nested groups, GRANT/REVOKE), and how the policy runtime
caches, refreshes and fails closed."""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from proxy.devcluster import DevCluster
from proxy.policy.membership import MembershipGraph
from proxy.policy.model import Grant
from proxy.policy_runtime import MembershipNotLoaded, PolicyRuntime, read_membership

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
