"""Policy reload without restart (issue 8, item 5), membership refresh (item 2) and metrics (item 7).

The module runs its own pgveil over the visibility database (same keys), so that its SIGHUPs disturb no
other module; each test gets it back with the issue's policy.
A session applies the new policy from its next statement; a statement prepared under the old policy
(protocol-level, asyncpg, SQL PREPARE) is decided again, never served under stale rules; an invalid
policy is refused and the running one stays; a reload under load fails no statement of a role whose view
did not change.
"""

from __future__ import annotations

import asyncio
import copy
import signal
import threading
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import visfixtures
from conftest import ProxyProcess, wait_until
from visfixtures import (
    PASSWORD,
    TABLE,
    Customer,
    VisEnv,
    insert_customers,
    issue_policy,
    make_customer,
    metric_sum,
    metrics_text,
    reload_policy,
)

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

SQL = "SELECT email, ssn, phone FROM vis_customers WHERE id = %s"


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def row(env: VisEnv) -> Customer:
    r = make_customer("reload")
    insert_customers(env, [r])
    return r


_n = iter(range(1000))


@pytest.fixture(scope="module")
def shared_proxy(env: VisEnv) -> Iterator[ProxyProcess]:
    with visfixtures.own_proxy(env, issue_policy(), "reload") as p:
        yield p


@pytest.fixture
def proxy(shared_proxy: ProxyProcess) -> Iterator[ProxyProcess]:
    """The module's pgveil, given back with the issue's policy after each test."""
    yield shared_proxy
    reload_policy(shared_proxy, issue_policy())


def policy_with(**changes: Any) -> dict[str, Any]:
    p = copy.deepcopy(issue_policy())
    p.update(changes)
    return p


def hidden_billing() -> dict[str, Any]:
    return policy_with(billing={f"{TABLE}.*": "hidden"})


def test_an_open_session_gets_the_new_policy_from_its_next_statement(
    env: VisEnv, proxy: ProxyProcess, row: Customer
) -> None:
    with (
        psycopg.connect(env.dsn("billing", proxy), autocommit=True) as billing,
        psycopg.connect(env.dsn("support", proxy), autocommit=True) as support,
    ):
        assert billing.execute(SQL, [row.id]).fetchone() == (row.email, row.ssn, row.phone)
        masked = support.execute(SQL, [row.id]).fetchone()
        assert masked is not None
        assert masked[1] != row.ssn
        reload_policy(
            proxy,
            policy_with(billing={f"{TABLE}.*": "hidden"}, support={f"{TABLE}.*": "plaintext"}),
        )
        assert billing.execute(SQL, [row.id]).fetchone() == (None, None, None), "less is revealed at once"
        assert support.execute(SQL, [row.id]).fetchone() == (row.email, row.ssn, row.phone)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_a_prepared_statement_is_decided_again_after_a_reload(
    env: VisEnv, proxy: ProxyProcess, row: Customer, binary: bool
) -> None:
    with psycopg.connect(env.dsn("billing", proxy), autocommit=True, prepare_threshold=0) as c:
        cur = c.cursor(binary=binary)
        assert cur.execute(SQL, [row.id], prepare=True).fetchone() == (row.email, row.ssn, row.phone)
        order = "SELECT id FROM vis_customers WHERE id = %s ORDER BY phone"
        assert cur.execute(order, [row.id], prepare=True).fetchall() == [(row.id,)]
        star = "SELECT * FROM vis_customers WHERE id = %s"
        assert cur.execute(star, [row.id], prepare=True).fetchone() is not None
        billing = {f"{TABLE}.*": "plaintext", f"{TABLE}.ssn": "hidden", f"{TABLE}.phone": "masked:partial"}
        reload_policy(proxy, policy_with(billing=billing))
        # The same prepared statements, executed again (psycopg reuses its server-side statement).
        got = cur.execute(SQL, [row.id], prepare=True).fetchone()
        assert got is not None
        assert got[:2] == (row.email, None)
        assert got[2] != row.phone
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute(order, [row.id], prepare=True)
        reload_policy(proxy, policy_with(billing={f"{TABLE}.*": "deny"}))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute(star, [row.id], prepare=True)
        assert c.execute("SELECT 1").fetchone() == (1,)


async def _asyncpg_prepared(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    conn = await asyncpg.connect(env.dsn("billing", proxy))
    try:
        stmt = await conn.prepare("SELECT email, ssn, phone FROM vis_customers WHERE id = $1")
        assert tuple(await stmt.fetchrow(row.id)) == (row.email, row.ssn, row.phone)
        await asyncio.to_thread(reload_policy, proxy, hidden_billing())
        assert tuple(await stmt.fetchrow(row.id)) == (None, None, None)
        # asyncpg's statement cache: the same text through conn.fetch reuses a server-side statement too.
        assert tuple(await conn.fetchrow("SELECT email, ssn, phone FROM vis_customers WHERE id = $1", row.id)) == (
            None,
            None,
            None,
        )
    finally:
        await conn.close()


def test_an_asyncpg_prepared_statement_after_a_reload(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    asyncio.run(_asyncpg_prepared(env, proxy, row))


@pytest.mark.parametrize("simple", [False, True], ids=["extended", "simple"])
def test_sql_prepare_execute_after_a_reload(env: VisEnv, proxy: ProxyProcess, row: Customer, simple: bool) -> None:
    with psycopg.connect(env.dsn("billing", proxy), autocommit=True) as conn:
        c: Any = psycopg.ClientCursor(conn) if simple else conn.cursor()
        c.execute(f"PREPARE vis_r AS SELECT email, ssn, phone FROM vis_customers WHERE id = {row.id}")
        c.execute(f"PREPARE vis_o AS SELECT id FROM vis_customers WHERE id = {row.id} ORDER BY phone")
        assert c.execute("EXECUTE vis_r").fetchone() == (row.email, row.ssn, row.phone)
        reload_policy(proxy, hidden_billing())
        assert c.execute("EXECUTE vis_r").fetchone() == (None, None, None)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("EXECUTE vis_o")  # ORDER BY phone, decided under plaintext: now an oracle
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_an_open_cursor_is_not_served_under_stale_rules(env: VisEnv, proxy: ProxyProcess) -> None:
    rows = [make_customer("reload-cursor") for _ in range(3)]
    insert_customers(env, rows)
    with psycopg.connect(env.dsn("billing", proxy)) as c:
        cur = c.cursor(name="vis_stale")
        cur.itersize = 1
        cur.execute("SELECT id, ssn FROM vis_customers WHERE id = ANY(%s) ORDER BY id", [[r.id for r in rows]])
        assert cur.fetchone() == (rows[0].id, rows[0].ssn)
        reload_policy(proxy, hidden_billing())
        try:
            rest = cur.fetchall()
        except psycopg.errors.InsufficientPrivilege:
            return  # refused: also not stale
        assert rest == [(r.id, None) for r in rows[1:]], "FETCH after the reload served the old view"


def test_an_invalid_policy_is_refused_and_the_running_one_stays(
    env: VisEnv, proxy: ProxyProcess, row: Customer
) -> None:
    before = metric_sum(proxy, "pgveil_policy_reloads_total")
    ok_before = metric_sum(proxy, "pgveil_policy_reloads_total", result="success")
    bad = policy_with(support={f"{TABLE}.ssn": "masked:rot13", f"{TABLE}.email": "plaintext"})
    proxy.config["roles"] = bad
    proxy.write_config()
    proxy.signal(signal.SIGHUP)
    assert wait_until(lambda: metric_sum(proxy, "pgveil_policy_reloads_total") > before, timeout=20), proxy.logs()
    assert metric_sum(proxy, "pgveil_policy_reloads_total") == before + 1
    assert metric_sum(proxy, "pgveil_policy_reloads_total", result="success") == ok_before
    assert "roles.support" in proxy.logs(), proxy.logs()[-2000:]
    with psycopg.connect(env.dsn("support", proxy), autocommit=True) as c:
        got = c.execute(SQL, [row.id]).fetchone()
    assert got is not None
    assert got[0] == row.email
    assert got[1] != row.ssn
    assert got[1] is not None, "still the running policy's last4 mask"
    with psycopg.connect(env.dsn("billing", proxy), autocommit=True) as c:
        assert c.execute(SQL, [row.id]).fetchone() == (row.email, row.ssn, row.phone)


@pytest.mark.parametrize(
    "roles",
    [
        {"support": {"public.vis_customers.ssn": "visible"}},
        {"support": {"public.*.ssn": "plaintext"}},
        {"support": {"public.vis_customers.ssn": "masked:fixed"}},
        {"support": "sometimes"},
        {"default": "masked"},
    ],
    ids=[
        "unknown-visibility",
        "star-in-the-middle",
        "fixed-without-text",
        "bad-role-string",
        "masked-without-function",
    ],
)
def test_invalid_policies_name_the_dotted_path(
    env: VisEnv, proxy: ProxyProcess, row: Customer, roles: dict[str, Any]
) -> None:
    before = metric_sum(proxy, "pgveil_policy_reloads_total")
    proxy.config["roles"] = policy_with(**roles)
    proxy.write_config()
    proxy.signal(signal.SIGHUP)
    assert wait_until(lambda: metric_sum(proxy, "pgveil_policy_reloads_total") > before, timeout=20), proxy.logs()
    assert f"roles.{next(iter(roles))}" in proxy.logs()
    with psycopg.connect(env.dsn("billing", proxy), autocommit=True) as c:
        assert c.execute(SQL, [row.id]).fetchone() == (row.email, row.ssn, row.phone)


def test_reload_under_load_fails_no_statement_of_an_unchanged_role(
    env: VisEnv, proxy: ProxyProcess, row: Customer
) -> None:
    stop = threading.Event()
    failures: list[str] = []
    wrong: list[Any] = []
    count = [0]

    def load() -> None:
        with psycopg.connect(env.dsn("billing", proxy), autocommit=True, prepare_threshold=0) as c:
            while not stop.is_set():
                try:
                    got = c.execute(SQL, [row.id], prepare=count[0] % 2 == 0).fetchone()
                    if got != (row.email, row.ssn, row.phone):
                        wrong.append(got)
                    count[0] += 1
                except psycopg.Error as e:
                    failures.append(f"{e.sqlstate}: {e}")

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for k in range(4):
            ssn = "masked:hash" if k % 2 == 0 else "masked:last4"
            reload_policy(proxy, policy_with(support={f"{TABLE}.ssn": ssn, f"{TABLE}.email": "hidden"}))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert count[0] > 0
    assert failures == []
    assert wrong == []


def test_membership_changes_apply_after_a_reload(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    """GRANT finance TO a role: after a reload it sees plaintext; REVOKE: after a reload no longer."""
    name = f"late_{next(_n)}"
    env.pg.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'")
    with psycopg.connect(env.direct_dsn, autocommit=True) as d:
        d.execute(f"GRANT SELECT ON vis_customers TO {name}")

    def view() -> tuple[Any, ...] | str | None:
        with psycopg.connect(env.dsn(name, proxy), autocommit=True) as c:
            try:
                return c.execute(SQL, [row.id]).fetchone()
            except psycopg.errors.ObjectNotInPrerequisiteState as e:
                return f"55000 {e}"  # a role newer than pgveil's last read of the membership: fail closed

    reload_policy(proxy, issue_policy())
    assert wait_until(lambda: view() == (None, None, None), timeout=15), view()
    env.pg.psql(f"GRANT finance TO {name}")
    reload_policy(proxy, issue_policy())  # the reload reads the membership again (it may finish just after)
    plain = (row.email, row.ssn, row.phone)
    assert wait_until(lambda: view() == plain, timeout=15), view()
    env.pg.psql(f"REVOKE finance FROM {name}")
    reload_policy(proxy, issue_policy())
    assert wait_until(lambda: view() == (None, None, None), timeout=15), "a revoked membership still grants"


def test_values_served_metrics_use_bounded_labels(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    name = "pgveil_values_served_total"
    for role in ("billing", "support", "outsider", "backup", "fin_noinherit"):
        with psycopg.connect(env.dsn(role, proxy), autocommit=True) as c:
            c.execute(SQL, [row.id]).fetchall()
    assert metric_sum(proxy, name, role="billing", outcome="plaintext") >= 3
    assert metric_sum(proxy, name, role="support", outcome="plaintext") >= 1
    assert metric_sum(proxy, name, role="support", outcome="masked") >= 2
    assert metric_sum(proxy, name, role="default", outcome="hidden") >= 6
    assert metric_sum(proxy, name, role="backup", outcome="ciphertext") >= 2
    text = metrics_text(proxy)
    for unlisted in ("outsider", "fin_noinherit"):
        assert f'role="{unlisted}"' not in text, "a login name the policy does not list became a label"
    before = metric_sum(proxy, "pgveil_statements_refused_total", reason="policy_denied")
    with psycopg.connect(env.dsn("support", proxy), autocommit=True) as c, pytest.raises(psycopg.Error):
        c.execute("SELECT id FROM vis_customers ORDER BY phone")
    assert metric_sum(proxy, "pgveil_statements_refused_total", reason="policy_denied") == before + 1


def test_without_roles_every_role_gets_hidden_and_a_warning(env: VisEnv, row: Customer) -> None:
    """Absent ``roles:`` means ``default: hidden`` (restrictive), and pgveil says so at startup."""
    with visfixtures.own_proxy(env, None, f"noroles{next(_n)}") as p:
        for role in ("billing", "support", "fin_member"):
            with psycopg.connect(env.dsn(role, p), autocommit=True) as c:
                assert c.execute(SQL, [row.id]).fetchone() == (None, None, None), role
        logs = p.logs().lower()
        assert "warn" in logs, logs[-2000:]
        assert "hidden" in logs or "roles" in logs, logs[-2000:]


def test_hidden_and_deny_never_decrypt(env: VisEnv, proxy: ProxyProcess, row: Customer) -> None:
    """``hidden`` and ``deny`` never decrypt at all; a mask decrypts inside pgveil (the counter moves)."""
    name = "pgveil_values_decrypted_total"

    def decrypted_by(role: str, sql: str) -> float:
        before = metric_sum(proxy, name)
        with psycopg.connect(env.dsn(role, proxy), autocommit=True) as c:
            try:
                c.execute(sql, [row.id]).fetchall()
            except psycopg.errors.InsufficientPrivilege:
                pass
        return metric_sum(proxy, name) - before

    assert decrypted_by("outsider", SQL) == 0
    assert decrypted_by("fin_noinherit", "SELECT * FROM vis_customers WHERE id = %s") == 0
    assert decrypted_by("contractor", SQL) == 0
    assert decrypted_by("backup", SQL) == 0  # the stored envelope, as stored
    assert decrypted_by("support", SQL) >= 2  # email in plaintext, ssn masked: both opened
