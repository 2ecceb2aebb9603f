"""Roles follow PostgreSQL, but only the login role counts (issue 8, item 2): a member of a granted group
role inherits its grant, a NOINHERIT member does not, a superuser gets nothing the policy does not name,
and ``SET ROLE``, ``SET SESSION AUTHORIZATION``, ``RESET ROLE``, ``set_config('role', ...)``, ``SET LOCAL
ROLE`` and a ``role`` startup option never reveal more than the login role's own view.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import visfixtures
from visfixtures import SUPERUSER_ROLE, Customer, Tap, VisEnv, insert_customers, leaked, make_customer

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def row(env: VisEnv) -> Customer:
    r = make_customer("roles")
    insert_customers(env, [r])
    return r


def test_group_membership_grants_and_noinherit_does_not(env: VisEnv, row: Customer) -> None:
    sql = "SELECT email, ssn, phone FROM vis_customers WHERE id = %s"
    with psycopg.connect(env.dsn("fin_member"), autocommit=True) as c:
        assert c.execute(sql, [row.id]).fetchone() == (row.email, row.ssn, row.phone)
    with psycopg.connect(env.dsn("fin_noinherit"), autocommit=True) as c:
        assert c.execute(sql, [row.id]).fetchone() == (None, None, None)
    with psycopg.connect(env.dsn(SUPERUSER_ROLE), autocommit=True) as c:
        assert c.execute(sql, [row.id]).fetchone() == (None, None, None)
        assert c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (True,)


# (login role, statements that switch the session's role, which the server accepts)
SWITCHES: list[tuple[str, tuple[str, ...]]] = [
    ("fin_noinherit", ("SET ROLE finance",)),
    ("fin_noinherit", ("SET ROLE finance", "RESET ROLE")),
    ("fin_noinherit", ("SELECT set_config('role', 'finance', false)",)),
    ("fin_noinherit", ("SET SESSION ROLE finance",)),
    (SUPERUSER_ROLE, ("SET ROLE billing",)),
    (SUPERUSER_ROLE, ("SET SESSION AUTHORIZATION billing",)),
    (SUPERUSER_ROLE, ("SET SESSION AUTHORIZATION billing", "SET SESSION AUTHORIZATION DEFAULT")),
    (SUPERUSER_ROLE, ("SET SESSION AUTHORIZATION fin_member",)),
    (SUPERUSER_ROLE, ("SET ROLE finance",)),
    (SUPERUSER_ROLE, ("RESET SESSION AUTHORIZATION", "SET ROLE billing")),
    ("outsider", ("SET ROLE NONE",)),
]


@pytest.mark.parametrize("simple", [False, True], ids=["extended", "simple"])
@pytest.mark.parametrize(("login", "switch"), SWITCHES, ids=[f"{lg}:{'; '.join(s)}" for lg, s in SWITCHES])
def test_switching_role_never_reveals_more(
    env: VisEnv, row: Customer, login: str, switch: tuple[str, ...], simple: bool
) -> None:
    with Tap((env.proxy.host, env.proxy.port)) as tap:
        with psycopg.connect(tap.dsn(login), autocommit=True) as c:
            cur: Any = psycopg.ClientCursor(c) if simple else c.cursor()
            for s in switch:
                cur.execute(s)
            who = cur.execute("SELECT current_user, session_user").fetchone()
            got = cur.execute(f"SELECT email, ssn, phone FROM vis_customers WHERE id = {row.id}").fetchone()
            star = cur.execute(f"SELECT * FROM vis_customers WHERE id = {row.id}").fetchone()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                cur.execute("SELECT id FROM vis_customers ORDER BY phone")
            with c.cursor().copy(f"COPY (SELECT ssn, email FROM vis_customers WHERE id = {row.id}) TO STDOUT") as cp:
                copied = b"".join(bytes(b) for b in cp)  # (COPY of the plain phone: test_visibility_spec_paths)
        raw = tap.data()
    assert got == (None, None, None), f"{login} as {who}: {got}"
    assert star == (row.id, row.name, None, None, None), f"{login} as {who}: {star}"
    assert copied == b"\\N\t\\N\n", copied
    for secret in (row.email, row.ssn, row.phone):
        assert not leaked(raw, secret)


def test_the_switch_really_happened(env: VisEnv) -> None:
    """The control: the server did switch (so the test above is not vacuous)."""
    with psycopg.connect(env.dsn("fin_noinherit"), autocommit=True) as c:
        c.execute("SET ROLE finance")
        assert c.execute("SELECT current_user").fetchone() == ("finance",)
    with psycopg.connect(env.dsn(SUPERUSER_ROLE), autocommit=True) as c:
        c.execute("SET SESSION AUTHORIZATION billing")
        assert c.execute("SELECT session_user, current_user").fetchone() == ("billing", "billing")


@pytest.mark.parametrize("login", ["fin_noinherit", SUPERUSER_ROLE])
def test_role_in_the_startup_options(env: VisEnv, row: Customer, login: str) -> None:
    """``options=-c role=finance``: the server starts the session as finance; pgveil counts the login."""
    with psycopg.connect(env.dsn(login, options="-c%20role%3Dfinance"), autocommit=True) as c:
        assert c.execute("SELECT current_user").fetchone() == ("finance",)
        got = c.execute("SELECT email, ssn, phone FROM vis_customers WHERE id = %s", [row.id]).fetchone()
    assert got == (None, None, None)


def test_set_local_role_in_a_transaction(env: VisEnv, row: Customer) -> None:
    with psycopg.connect(env.dsn("fin_noinherit")) as c:
        c.execute("SET LOCAL ROLE finance")
        got = c.execute("SELECT email, ssn, phone FROM vis_customers WHERE id = %s", [row.id]).fetchone()
        c.rollback()
    assert got == (None, None, None)


def test_a_plaintext_role_keeps_its_view_after_switching_down(env: VisEnv, row: Customer) -> None:
    """Only the login role counts, in both directions: vis_root (hidden) stays hidden as billing, and
    fin_member (plaintext through finance) keeps plaintext after SET ROLE to itself / RESET ROLE."""
    with psycopg.connect(env.dsn("fin_member"), autocommit=True) as c:
        c.execute("SET ROLE fin_member")
        c.execute("RESET ROLE")
        got = c.execute("SELECT email, ssn, phone FROM vis_customers WHERE id = %s", [row.id]).fetchone()
    assert got == (row.email, row.ssn, row.phone)


def test_mixed_membership_takes_the_most_permissive_grant(env: VisEnv, row: Customer) -> None:
    """mixed is in support (email plaintext, ssn last4, phone partial) and contractor (deny all): deny only
    where nothing grants more, so mixed sees what support sees and SELECT * is not refused."""
    with psycopg.connect(env.dsn("mixed"), autocommit=True) as c:
        got = c.execute("SELECT * FROM vis_customers WHERE id = %s", [row.id]).fetchone()
        with psycopg.connect(env.dsn("support"), autocommit=True) as s:
            want = s.execute("SELECT * FROM vis_customers WHERE id = %s", [row.id]).fetchone()
    assert got == want
    assert got is not None
    assert got[2] == row.email
    assert got[3] != row.ssn
