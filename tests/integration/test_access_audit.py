"""The access audit (issue 11, item 3) with the real PostgreSQL the suite starts, real roles and real
drivers: counts matched exactly against a known workload (psycopg simple and extended protocol, binary,
asyncpg prepared statements, COPY TO, a cursor's FETCH; plaintext, masked and hidden roles, a group
member), in the keystore table, the ``pgveil.audit`` JSON log lines and the metrics; no value in any
of them; ``pgveil audit report`` and its errors; an anomaly rule's flag and 53400 refusal under a burst
and their end once the window has passed; a keystore that is unreachable during flushes.

Each pgveil here has its own ``audit.instance``, so its records are told apart from those of the other
pgveil processes the suite runs over the same keystore.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import visfixtures
import yaml
from conftest import ProxyProcess, wait_until
from faultproxy import FaultProxy
from visfixtures import Customer, VisEnv, insert_customers, issue_policy, leaked, make_customer, metric_sum

from proxy.devcluster import DevCluster, free_port

pytestmark = pytest.mark.integration

T = "public.vis_customers"
EMAIL, SSN, PHONE = f"{T}.email", f"{T}.ssn", f"{T}.phone"
Key = tuple[str, str, str, str]  # (login role, policy role, column, outcome)


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> VisEnv:
    return visfixtures.shared_env(pg, tmp_path_factory, pytestconfig)


@pytest.fixture(scope="module")
def rows(env: VisEnv) -> list[Customer]:
    customers = [make_customer("audit") for _ in range(3)]
    insert_customers(env, customers)
    return customers


@contextlib.contextmanager
def audited_proxy(env: VisEnv, name: str, audit: dict[str, Any], **overrides: Any) -> Iterator[ProxyProcess]:
    with visfixtures.own_proxy(env, issue_policy(), name, audit={"instance": name, **audit}, **overrides) as p:
        yield p


def table_counts(env: VisEnv, instance: str) -> tuple[Counter[Key], int]:
    """The keystore table's counts for one instance, and its number of distinct sessions."""
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        got = c.execute(
            "SELECT login_role, policy_role, column_id, outcome, values_read, session_id "
            "FROM pgveil.access_audit WHERE instance = %s",
            [instance],
        ).fetchall()
    counts: Counter[Key] = Counter()
    for login, label, column, outcome, n, _ in got:
        counts[(login, label, column, outcome)] += n
    return counts, len({r[5] for r in got})


def log_records(p: ProxyProcess) -> list[dict[str, Any]]:
    out = []
    for line in p.logs().splitlines():
        # text format: "<time> INFO pgveil.audit [s<session>] {json}" (the session only when flushed in one)
        _, sep, rest = line.partition(" INFO pgveil.audit ")
        if sep:
            out.append(json.loads(rest[rest.index("{") :]))
    return out


def log_counts(p: ProxyProcess) -> Counter[Key]:
    counts: Counter[Key] = Counter()
    for r in log_records(p):
        counts[(r["login_role"], r["policy_role"], r["column"], r["outcome"])] += r["count"]
    return counts


def in_list(rows: list[Customer]) -> str:
    return ", ".join(str(r.id) for r in rows)


# -- exact counts ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact(env: VisEnv, rows: list[Customer]) -> Iterator[ProxyProcess]:
    with audited_proxy(env, "audit-exact", {"flush_seconds": 1}) as p:
        yield p


def run_workload(env: VisEnv, p: ProxyProcess, rows: list[Customer]) -> Counter[Key]:
    """Reads through ``p`` as several roles; what the audit must have counted."""
    ids = [r.id for r in rows]
    n = len(rows)
    expected: Counter[Key] = Counter()
    # psycopg, simple protocol (client-side binding), support: email plaintext, ssn and phone masked
    with psycopg.connect(env.dsn("support", p), autocommit=True) as c:
        got = psycopg.ClientCursor(c).execute("SELECT email, ssn, phone FROM vis_customers WHERE id = ANY(%s)", [ids])
        assert sorted(r[0] for r in got.fetchall()) == sorted(r.email for r in rows)
    expected.update({("support", "support", EMAIL, "plaintext"): n, ("support", "support", SSN, "masked"): n,
                     ("support", "support", PHONE, "masked"): n})  # fmt: skip
    # psycopg, extended protocol in binary, billing: plaintext
    with psycopg.connect(env.dsn("billing", p), autocommit=True) as c:
        binary = c.cursor(binary=True).execute("SELECT id, email, ssn FROM vis_customers WHERE id = ANY(%s)", [ids])
        assert len(binary.fetchall()) == n
    expected.update({("billing", "billing", EMAIL, "plaintext"): n, ("billing", "billing", SSN, "plaintext"): n})

    # asyncpg, one prepared statement executed twice, support
    async def prepared() -> None:
        conn = await asyncpg.connect(env.dsn("support", p))
        try:
            stmt = await conn.prepare("SELECT email FROM vis_customers WHERE id = ANY($1::int[])")
            for _ in range(2):
                assert len(await stmt.fetch(ids)) == n
        finally:
            await conn.close()

    asyncio.run(prepared())
    expected[("support", "support", EMAIL, "plaintext")] += 2 * n
    # COPY (query) TO STDOUT, support: masked fields
    with psycopg.connect(env.dsn("support", p), autocommit=True) as c:
        with c.cursor().copy(
            f"COPY (SELECT ssn, phone FROM vis_customers WHERE id IN ({in_list(rows)})) TO STDOUT"
        ) as cp:
            data = b"".join(bytes(b) for b in cp)
        assert data.count(b"\n") == n
    expected[("support", "support", SSN, "masked")] += n
    expected[("support", "support", PHONE, "masked")] += n
    # a cursor: DECLARE, then FETCH (psycopg's named cursor), billing, the plain column phone
    with psycopg.connect(env.dsn("billing", p)) as c:
        cur = c.cursor(name="audit_cursor")
        cur.itersize = 2
        cur.execute("SELECT phone FROM vis_customers WHERE id = ANY(%s)", [ids])
        assert sorted(r[0] for r in cur) == sorted(r.phone for r in rows)
    expected[("billing", "billing", PHONE, "plaintext")] += n
    # a role the policy does not name: the default (hidden)
    with psycopg.connect(env.dsn("outsider", p), autocommit=True) as c:
        assert c.execute("SELECT email FROM vis_customers WHERE id = ANY(%s)", [ids]).fetchall() == [(None,)] * n
    expected[("outsider", "default", EMAIL, "hidden")] += n
    # a member of a group the policy names: counted under the group
    with psycopg.connect(env.dsn("fin_member", p), autocommit=True) as c:
        assert len(c.execute("SELECT email FROM vis_customers WHERE id = ANY(%s)", [ids]).fetchall()) == n
    expected[("fin_member", "finance", EMAIL, "plaintext")] += n
    return expected


@pytest.fixture(scope="module")
def workload(env: VisEnv, exact: ProxyProcess, rows: list[Customer]) -> Counter[Key]:
    expected = run_workload(env, exact, rows)
    sessions = 7
    assert wait_until(lambda: table_counts(env, "audit-exact") == (expected, sessions), timeout=30, interval=0.3), (
        table_counts(env, "audit-exact"),
        expected,
    )
    return expected


def test_the_keystore_table_holds_exactly_the_values_read(env: VisEnv, workload: Counter[Key]) -> None:
    counts, sessions = table_counts(env, "audit-exact")
    assert counts == workload
    assert sessions == 7
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        bad = c.execute(
            "SELECT count(*) FROM pgveil.access_audit WHERE instance = 'audit-exact' "
            "AND NOT (period_start <= period_end AND period_end <= now() AND values_read > 0)"
        ).fetchone()
    assert bad == (0,)


def test_the_audit_log_has_one_json_line_per_record_with_the_same_counts(
    exact: ProxyProcess, workload: Counter[Key]
) -> None:
    assert wait_until(lambda: log_counts(exact) == workload, timeout=10)
    records = log_records(exact)
    assert {r["instance"] for r in records} == {"audit-exact"}
    assert {r["event"] for r in records} == {"values_read"}
    for r in records:
        assert set(r) == {"event", "instance", "session", "login_role", "policy_role", "column", "outcome", "count",
                          "period_start", "period_end"}  # fmt: skip
        assert isinstance(r["session"], int)
        assert r["period_start"] <= r["period_end"]
    assert len({r["session"] for r in records}) == 7


def test_the_metrics_count_per_policy_role_column_and_outcome(exact: ProxyProcess, workload: Counter[Key]) -> None:
    by_label: Counter[tuple[str, str, str]] = Counter()
    for (_, label, column, outcome), n in workload.items():
        by_label[(label, column, outcome)] += n
    for (label, column, outcome), n in by_label.items():
        assert metric_sum(exact, "pgveil_audit_values_read_total", role=label, column=column, outcome=outcome) == n
    assert metric_sum(exact, "pgveil_audit_values_read_total") == sum(workload.values())
    assert metric_sum(exact, "pgveil_audit_flush_errors_total") == 0


def test_no_value_reaches_the_audit_log_or_the_table(
    env: VisEnv, exact: ProxyProcess, rows: list[Customer], workload: Counter[Key]
) -> None:
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        table = "\n".join(str(r) for r in c.execute("SELECT * FROM pgveil.access_audit").fetchall())
    logs = exact.logs()
    for r in rows:
        for value in (r.email, r.ssn, r.phone):
            assert not leaked(table.encode(), value)
            assert not leaked(logs.encode(), value)


# -- pgveil audit report -----------------------------------------------------------------------------------


def report(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "report", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_report_summarises_per_role_and_column(exact: ProxyProcess, workload: Counter[Key]) -> None:
    expected: dict[tuple[str, str], Counter[str]] = {}
    logins: dict[tuple[str, str], set[str]] = {}
    for (login, label, column, outcome), n in workload.items():
        expected.setdefault((label, column), Counter())[outcome] += n
        logins.setdefault((label, column), set()).add(login)
    for since in ("1h", "30m"):
        done = report(exact.config_path, "--since", since, "--instance", "audit-exact", "--json")
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        got = {(e["role"], e["column"]): e for e in doc["entries"]}
        assert set(got) == set(expected)
        for key, outcomes in expected.items():
            for outcome in ("plaintext", "masked", "hidden", "ciphertext"):
                assert got[key][outcome] == outcomes[outcome], (key, outcome)
            assert set(got[key]["login_roles"]) == logins[key]
    text = report(exact.config_path, "--since", "1h", "--instance", "audit-exact")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[1].split()[:6] == ["role", "column", "plaintext", "masked", "hidden", "ciphertext"]
    support_email = next(line.split() for line in lines if line.split()[:2] == ["support", EMAIL])
    assert support_email[2:6] == [
        str(expected[("support", EMAIL)][o]) for o in ("plaintext", "masked", "hidden", "ciphertext")
    ]
    empty = report(exact.config_path, "--since", "1h", "--instance", "no-such-instance")
    assert empty.returncode == 0
    assert "no values of governed columns read" in empty.stdout


def _config_with_keystore(exact: ProxyProcess, tmp_path: Path, dsn: str) -> Path:
    cfg = yaml.safe_load(exact.config_path.read_text())
    cfg["keystore"]["dsn"] = dsn
    path = tmp_path / "pgveil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_report_says_in_one_line_when_the_keystore_is_unreachable(exact: ProxyProcess, tmp_path: Path) -> None:
    done = report(_config_with_keystore(exact, tmp_path, f"postgresql://u:p@127.0.0.1:{free_port()}/x"))
    assert done.returncode == 1
    assert done.stderr.strip().startswith("pgveil: cannot connect to the keystore")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_the_report_says_in_one_line_when_the_table_is_missing(
    pg: DevCluster, exact: ProxyProcess, tmp_path: Path
) -> None:
    pg.psql("DROP DATABASE IF EXISTS audit_empty")
    pg.psql("CREATE DATABASE audit_empty")
    done = report(_config_with_keystore(exact, tmp_path, pg.dsn(dbname="audit_empty")))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "pgveil: the keystore has no access audit table (pgveil.access_audit): run pgveil keystore init"
    )


def test_the_report_refuses_a_bad_duration(exact: ProxyProcess) -> None:
    done = report(exact.config_path, "--since", "0h")
    assert done.returncode == 2
    assert "--since must be a duration like 30m, 1h or 7d" in done.stderr


# -- anomaly rules -----------------------------------------------------------------------------------------

WINDOW = 4
LIMIT = 120  # per minute: 8 plaintext values per 4-second window


@pytest.fixture(scope="module")
def anomaly(env: VisEnv, rows: list[Customer]) -> Iterator[ProxyProcess]:
    rule = {"role": "support", "column": EMAIL, "plaintext_per_minute": LIMIT, "refuse": True}
    with audited_proxy(env, "audit-anomaly", {"flush_seconds": 1, "window_seconds": WINDOW, "anomaly": [rule]}) as p:
        yield p


def gauge(p: ProxyProcess) -> float:
    return metric_sum(p, "pgveil_audit_anomaly_active", role="support", column=EMAIL)


def test_a_burst_raises_the_anomaly_refuses_with_53400_until_the_window_passes(
    env: VisEnv, anomaly: ProxyProcess, rows: list[Customer]
) -> None:
    ids = [r.id for r in rows]
    select = "SELECT email FROM vis_customers WHERE id = ANY(%s)"
    assert gauge(anomaly) == 0
    assert metric_sum(anomaly, "pgveil_audit_anomalies_total", role="support", column=EMAIL) == 0

    async def open_prepared() -> tuple[asyncpg.Connection, Any]:
        conn = await asyncpg.connect(env.dsn("support", anomaly))
        return conn, await conn.prepare("SELECT email FROM vis_customers WHERE id = ANY($1::int[])")

    loop = asyncio.new_event_loop()
    try:
        aconn, stmt = loop.run_until_complete(open_prepared())  # prepared before the burst
        with psycopg.connect(env.dsn("support", anomaly), autocommit=True) as c:
            for _ in range(3):  # 3, 6, then 9 plaintext values: over 8 in the window
                assert len(c.execute(select, [ids]).fetchall()) == 3
            with pytest.raises(psycopg.Error) as refused:
                c.execute(select, [ids])
            assert refused.value.sqlstate == "53400"
            message = str(refused.value)
            assert EMAIL in message
            assert "role support" in message
            assert str(LIMIT) in message
            for r in rows:
                assert not leaked(message.encode(), r.email)
            with pytest.raises(psycopg.Error) as simple:
                psycopg.ClientCursor(c).execute(select, [ids])
            assert simple.value.sqlstate == "53400"
            # the session stays usable: other statements, and the role's masked columns
            assert c.execute("SELECT 1").fetchone() == (1,)
            assert len(c.execute("SELECT ssn FROM vis_customers WHERE id = ANY(%s)", [ids]).fetchall()) == 3
            # a statement prepared before the anomaly is refused at its Bind
            with pytest.raises(asyncpg.PostgresError) as bound:
                loop.run_until_complete(stmt.fetch(ids))
            assert bound.value.sqlstate == "53400"
            # a member of support is refused too; another role is not
            with psycopg.connect(env.dsn("mixed", anomaly), autocommit=True) as m:
                with pytest.raises(psycopg.Error) as member:
                    m.execute(select, [ids])
                assert member.value.sqlstate == "53400"
            with psycopg.connect(env.dsn("billing", anomaly), autocommit=True) as b:
                assert len(b.execute(select, [ids]).fetchall()) == 3
            assert wait_until(lambda: gauge(anomaly) == 1, timeout=10)
            assert metric_sum(anomaly, "pgveil_audit_anomalies_total", role="support", column=EMAIL) == 1
            lines = [line for line in anomaly.logs().splitlines() if "access audit anomaly: role support" in line]
            assert len(lines) == 1
            assert EMAIL in lines[0]

            # the window passes (the refused statements read nothing): plaintext reads are served again
            def served_again() -> bool:
                try:
                    return len(c.execute(select, [ids]).fetchall()) == 3
                except psycopg.errors.ConfigurationLimitExceeded:  # 53400: still refused
                    return False

            assert wait_until(served_again, timeout=WINDOW * 5, interval=0.5)
            assert len(loop.run_until_complete(stmt.fetch(ids))) == 3
            assert wait_until(lambda: gauge(anomaly) == 0, timeout=10)
            assert metric_sum(anomaly, "pgveil_audit_anomalies_total", role="support", column=EMAIL) == 1
            assert any("access audit anomaly ended: role support" in line for line in anomaly.logs().splitlines())
        loop.run_until_complete(aconn.close())
    finally:
        loop.close()
    # what the refused statements never read is not counted: 3 + 3 + 3, then 3 + 3 after the window
    assert wait_until(
        lambda: table_counts(env, "audit-anomaly")[0][("support", "support", EMAIL, "plaintext")] == 15, timeout=20
    ), table_counts(env, "audit-anomaly")
    assert metric_sum(anomaly, "pgveil_statements_refused_total", reason="audit_anomaly") >= 4


# -- a keystore that is unreachable during flushes ---------------------------------------------------------


def test_records_are_kept_while_the_keystore_is_unreachable_and_written_once_it_is_back(
    env: VisEnv, rows: list[Customer]
) -> None:
    ids = [r.id for r in rows]
    key = ("billing", "billing", PHONE, "plaintext")
    with FaultProxy("127.0.0.1", env.pg.port) as keystore:
        superuser_dsn = env.direct_dsn
        ks = dict(env.config(issue_policy())["keystore"])
        ks["dsn"] = superuser_dsn.replace(f":{env.pg.port}/", f":{keystore.port}/")
        overrides = {"keystore": ks, "service": {"dsn": superuser_dsn}}
        with audited_proxy(env, "audit-outage", {"flush_seconds": 1}, **overrides) as p:

            def read() -> None:
                with psycopg.connect(env.dsn("billing", p), autocommit=True) as c:
                    assert len(c.execute("SELECT phone FROM vis_customers WHERE id = ANY(%s)", [ids]).fetchall()) == 3

            read()
            assert wait_until(lambda: table_counts(env, "audit-outage")[0][key] == 3, timeout=20)
            keystore.refusing = True
            keystore.cut()
            read()  # sessions are not held up by the audit
            read()
            assert wait_until(lambda: metric_sum(p, "pgveil_audit_flush_errors_total") >= 1, timeout=20)
            assert table_counts(env, "audit-outage")[0][key] == 3
            assert log_counts(p)[key] == 9  # the log has every record at once
            keystore.refusing = False
            assert wait_until(lambda: table_counts(env, "audit-outage")[0][key] == 9, timeout=30), table_counts(
                env, "audit-outage"
            )
            read()
            assert wait_until(lambda: table_counts(env, "audit-outage")[0][key] == 12, timeout=30)


# -- flushes at session end and at shutdown ----------------------------------------------------------------


def test_a_session_end_and_the_shutdown_flush_without_waiting_for_the_interval(
    env: VisEnv, rows: list[Customer]
) -> None:
    ids = [r.id for r in rows]
    select = "SELECT email FROM vis_customers WHERE id = ANY(%s)"
    key = ("support", "support", EMAIL, "plaintext")
    with audited_proxy(env, "audit-ends", {"flush_seconds": 3600}) as p:
        with psycopg.connect(env.dsn("support", p), autocommit=True) as c:
            assert len(c.execute(select, [ids]).fetchall()) == 3
        assert wait_until(lambda: table_counts(env, "audit-ends")[0][key] == 3, timeout=20)
        open_session = psycopg.connect(env.dsn("support", p), autocommit=True)
        try:
            assert len(open_session.execute(select, [ids]).fetchall()) == 3
            assert table_counts(env, "audit-ends")[0][key] == 3  # the interval is an hour
            assert p.stop() == 0
        finally:
            open_session.close()
    assert table_counts(env, "audit-ends") == (Counter({key: 6}), 2)
    assert log_counts(p) == Counter({key: 6})


def test_each_worker_process_records_its_own_sessions_under_its_own_instance_name(
    env: VisEnv, rows: list[Customer]
) -> None:
    ids = [r.id for r in rows]
    sessions = {"workers": 2, "shutdown_timeout": 5, "track_statements": "always"}
    with audited_proxy(env, "audit-workers", {"flush_seconds": 1}, sessions=sessions) as p:
        assert wait_until(lambda: "worker 1 ready" in p.logs(), timeout=30), p.logs()  # the supervisor's log
        first = psycopg.connect(env.dsn("support", p), autocommit=True)
        second = psycopg.connect(env.dsn("support", p), autocommit=True)
        try:
            for c in (first, second):
                assert len(c.execute("SELECT email FROM vis_customers WHERE id = ANY(%s)", [ids]).fetchall()) == 3
        finally:
            first.close()
            second.close()

        def recorded() -> list[tuple[Any, ...]]:
            with psycopg.connect(env.direct_dsn, autocommit=True) as c:
                return c.execute(
                    "SELECT instance, session_id, sum(values_read)::int FROM pgveil.access_audit "
                    "WHERE instance LIKE 'audit-workers%%' GROUP BY 1, 2 ORDER BY 1"
                ).fetchall()

        assert wait_until(lambda: sum(r[2] for r in recorded()) == 6, timeout=20), recorded()
        got = recorded()
        assert [r[2] for r in got] == [3, 3]
        assert {r[0] for r in got} == {
            "audit-workers",
            *(i for i, _, _ in got if re.fullmatch(r"audit-workers/\d+", i)),
        }
        assert len({r[0] for r in got}) == 2  # one session in each process
