"""The admin API over ``sessions.workers``: the supervisor lists the sessions of every process (asked
now, over the control channel), terminates one a worker serves, and sets the log level of every process,
including a worker started again after a crash; a worker that does not answer is reported, not waited
for. Real ``pgveil serve`` with two processes, real PostgreSQL, psycopg sessions placed on both."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PW_PASSWORD, ProxyProcess, wait_until
from test_admin_api import call, pgveil, token, write_tokens
from test_proxy_workers import children, client_port, serving_process, workers_ready

pytestmark = pytest.mark.integration


@pytest.fixture
def duo(make_proxy: Any, tmp_path: Path) -> ProxyProcess:
    """pgveil as a supervisor and one worker (process 1), its admin API enabled, logging at info."""
    p: ProxyProcess = make_proxy(
        sessions={"workers": 2, "shutdown_timeout": 5},
        admin={"tokens_file": str(write_tokens(tmp_path / "tokens.yaml")), "auth_failure_limit": 1000},
        logging={"level": "info", "format": "text"},
    )
    assert p.proc is not None
    assert wait_until(lambda: len(children(p.proc.pid)) == 1, timeout=20), p.logs()
    assert wait_until(lambda: workers_ready(p, 1), timeout=30), p.logs()
    return p


def worker_pid(p: ProxyProcess) -> int:
    """The pid of worker 1 now (the last "worker 1 started (pid N)" line)."""
    found = re.findall(r"worker 1 started \(pid (\d+)\)", p.logs())
    assert found, p.logs()
    return int(found[-1])


def process_of(p: ProxyProcess, conn: psycopg.Connection[Any]) -> int:
    """Which process serves ``conn``, found through /proc (not through pgveil): 0 or 1."""
    assert p.proc is not None
    supervisor, worker = p.proc.pid, worker_pid(p)
    pid = serving_process({supervisor, worker}, client_port(conn))
    return 0 if pid == supervisor else 1


def sessions(p: ProxyProcess) -> dict[str, Any]:
    r = call(p.admin_url + "/v1/sessions", bearer=token("reader"))
    assert r.status == 200, r.body
    body: dict[str, Any] = r.body
    return body


def by_port(p: ProxyProcess) -> dict[int, dict[str, Any]]:
    return {s["client_port"]: s for s in sessions(p)["sessions"]}


def connect(p: ProxyProcess, other_role: bool = False) -> psycopg.Connection[Any]:
    if other_role:
        return psycopg.connect(p.dsn(user="pwuser", password=PW_PASSWORD, dbname="postgres"), autocommit=True)
    return psycopg.connect(p.dsn(), autocommit=True)


def spread(p: ProxyProcess, n: int) -> list[psycopg.Connection[Any]]:
    """``n`` sessions, alternating role app on database app and role pwuser on database postgres; the
    supervisor places them evenly over its two processes."""
    conns = [connect(p, other_role=i % 2 == 1) for i in range(n)]
    for c in conns:
        assert c.execute("SELECT 1").fetchone() == (1,)
    return conns


def log_lines(p: ProxyProcess, needle: str) -> list[str]:
    return [ln for ln in p.logs().splitlines() if needle in ln]


def test_every_process_s_sessions_are_listed_with_their_role_database_and_address(duo: ProxyProcess) -> None:
    p = duo
    conns = spread(p, 6)
    try:
        where = {client_port(c): process_of(p, c) for c in conns}
        assert sorted(where.values()) == [0, 0, 0, 1, 1, 1]  # placed evenly, so both processes serve some
        body = sessions(p)
        assert (body["covers"], body["unanswered"], body["process"]) == ("all", [], 0)
        assert body["total"] == len(body["sessions"]) == 6
        assert body["other_processes"] == {"1": 3}
        listed = {s["client_port"]: s for s in body["sessions"]}
        assert set(listed) == set(where)
        for i, c in enumerate(conns):
            s = listed[client_port(c)]
            role, database = ("pwuser", "postgres") if i % 2 else ("app", "app")
            assert (s["role"], s["database"], s["client_address"], s["state"], s["tls"]) == (
                role,
                database,
                "127.0.0.1",
                "idle",
                False,
            )
            assert s["process"] == where[client_port(c)]
        ids = [s["id"] for s in body["sessions"]]
        assert len(set(ids)) == 6  # unique over both processes
        # The id is the one of the log lines, which say which worker logged them.
        for s in body["sessions"]:
            started = log_lines(p, f"[s{s['id']}] session started")
            assert len(started) == 1, started
            assert ("worker=1" in started[0]) == (s["process"] == 1), started[0]
        # The CLI shows the same list.
        r = pgveil("admin", "sessions", "--admin", p.admin_url, token_name="reader")
        assert r.returncode == 0, r.stderr
        for port, s in listed.items():
            line = next(ln for ln in r.stdout.splitlines() if f"127.0.0.1:{port}" in ln)
            assert line.split()[:3] == [str(s["id"]), s["role"], s["database"]]
            assert line.split()[-1] == str(s["process"])
        assert "6 sessions in all" in r.stdout
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: sessions(p)["total"] == 0, timeout=10), sessions(p)


def test_a_session_a_worker_serves_is_terminated_through_the_supervisor(duo: ProxyProcess) -> None:
    p = duo
    conns = spread(p, 6)
    try:
        on_worker = [c for c in conns if process_of(p, c) == 1]
        on_supervisor = [c for c in conns if process_of(p, c) == 0]
        assert len(on_worker) == len(on_supervisor) == 3
        victim, cli_victim = on_worker[0], on_worker[1]
        listed = by_port(p)
        sid = listed[client_port(victim)]["id"]
        assert listed[client_port(victim)]["process"] == 1

        r = call(f"{p.admin_url}/v1/sessions/{sid}", "DELETE", token("operator"))
        assert (r.status, r.body) == (200, {"id": sid, "terminated": True, "process": 1})
        with pytest.raises(psycopg.OperationalError) as exc:
            victim.execute("SELECT 1")
        assert "terminating connection due to administrator command" in str(exc.value)
        assert exc.value.sqlstate in (None, "57P01")  # libpq reports the FATAL it read before the close
        assert victim.closed
        for c in conns:
            if c is not victim:
                assert c.execute("SELECT 1").fetchone() == (1,)  # the others, on either process, go on
        assert wait_until(lambda: sid not in {s["id"] for s in sessions(p)["sessions"]}, timeout=10)
        again = call(f"{p.admin_url}/v1/sessions/{sid}", "DELETE", token("operator"))
        assert again.status == 404
        assert call(f"{p.admin_url}/v1/sessions/987654321", "DELETE", token("operator")).status == 404

        # The CLI, the same way.
        cli_sid = by_port(p)[client_port(cli_victim)]["id"]
        done = pgveil("admin", "terminate", str(cli_sid), "--admin", p.admin_url, token_name="operator")
        assert (done.returncode, done.stdout.strip()) == (0, f"session {cli_sid} terminated"), done.stderr
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            cli_victim.execute("SELECT 1")
        done = pgveil("admin", "terminate", str(cli_sid), "--admin", p.admin_url, token_name="operator")
        assert done.returncode == 1
        assert done.stderr.startswith("pgveil: the admin API answered 404: not found")
        assert len(log_lines(p, "terminated by an administrator")) == 2
        for c in on_supervisor + on_worker[2:]:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        for c in conns:
            c.close()


def level_metric(p: ProxyProcess) -> float:
    r = call(p.admin_url + "/metrics")
    m = re.search(r'^pgveil_log_level_changes_total\{source="api"\} (\S+)$', r.body, re.MULTILINE)
    assert m is not None, r.body
    return float(m.group(1))


def put_level(p: ProxyProcess, level: str) -> dict[str, Any]:
    r = call(p.admin_url + "/v1/logging", "PUT", token("operator"), body={"level": level})
    assert r.status == 200, r.body
    body: dict[str, Any] = r.body
    return body


def new_session_on_worker(p: ProxyProcess) -> tuple[list[psycopg.Connection[Any]], int]:
    """Sessions opened until one lands on the worker; they and that session's id."""
    conns = [connect(p)]
    while process_of(p, conns[-1]) != 1:
        assert len(conns) < 4, "the supervisor placed no session on its idle worker"
        conns.append(connect(p))
    return conns, int(by_port(p)[client_port(conns[-1])]["id"])


def assert_debug_line_of_worker(p: ProxyProcess, sid: int) -> None:
    lines = log_lines(p, f"[s{sid}] client connected")
    assert len(lines) == 1, lines
    assert " DEBUG " in lines[0], lines
    assert "worker=1" in lines[0], lines


def test_the_log_level_reaches_every_worker_and_a_restarted_one(duo: ProxyProcess) -> None:
    p = duo
    assert call(p.admin_url + "/v1/logging", bearer=token("reader")).body == {"level": "info", "workers": {"1": "info"}}
    before = level_metric(p)

    # At info, a session's connection line (debug) is not written, on either process.
    conns, sid = new_session_on_worker(p)
    for c in conns:
        c.close()
    assert not log_lines(p, f"[s{sid}] client connected")

    assert put_level(p, "debug") == {"level": "debug", "previous": "info", "changed": True, "workers": {"1": "debug"}}
    assert call(p.admin_url + "/v1/logging", bearer=token("reader")).body == {
        "level": "debug",
        "workers": {"1": "debug"},
    }
    changed = log_lines(p, "log level changed from info to debug (api)")
    assert len(changed) == 2, changed  # the supervisor's line and the worker's
    assert sum("worker=1" in ln for ln in changed) == 1
    assert level_metric(p) == before + 1  # one change, counted once for all processes
    conns, sid = new_session_on_worker(p)
    try:
        assert_debug_line_of_worker(p, sid)
    finally:
        for c in conns:
            c.close()

    # A worker that dies is started again at the level of the moment, not at the file's.
    victim = worker_pid(p)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: workers_ready(p, 1, times=2) and worker_pid(p) != victim, timeout=30), p.logs()
    assert call(p.admin_url + "/v1/logging", bearer=token("reader")).body == {
        "level": "debug",
        "workers": {"1": "debug"},
    }
    conns, sid = new_session_on_worker(p)
    try:
        assert process_of(p, conns[-1]) == 1
        assert_debug_line_of_worker(p, sid)
    finally:
        for c in conns:
            c.close()
    assert level_metric(p) == before + 1  # starting at the level is no change

    assert put_level(p, "warning")["workers"] == {"1": "warning"}
    assert level_metric(p) == before + 2
    conns, sid = new_session_on_worker(p)
    for c in conns:
        c.close()
    assert not log_lines(p, f"[s{sid}] session started")  # an info line, below the level now


def test_a_worker_that_does_not_answer_is_reported_and_does_not_hold_the_api(duo: ProxyProcess) -> None:
    p = duo
    conns = spread(p, 4)
    stopped = worker_pid(p)
    try:
        on_worker = [c for c in conns if process_of(p, c) == 1]
        assert len(on_worker) == 2
        sid = by_port(p)[client_port(on_worker[0])]["id"]
        os.kill(stopped, signal.SIGSTOP)
        body = sessions(p)
        assert (body["covers"], body["unanswered"]) == ("partial", [1])
        assert body["other_processes"] == {"1": 2}
        assert body["total"] == 4
        assert {s["process"] for s in body["sessions"]} == {0}
        assert len(body["sessions"]) == 2
        r = call(f"{p.admin_url}/v1/sessions/{sid}", "DELETE", token("operator"))
        assert r.status == 503
        assert "worker process 1 did not answer" in r.body["detail"]
        r = call(p.admin_url + "/v1/logging", bearer=token("reader"))
        assert r.body == {"level": "info", "workers": {"1": None}}
        assert log_lines(p, "worker 1 did not answer a sessions request")
        shown = pgveil("admin", "sessions", "--admin", p.admin_url, token_name="reader")
        assert shown.returncode == 0, shown.stderr
        assert "worker processes that did not answer in time serve more, not listed (process 1: 2)" in shown.stdout
        assert "4 sessions in all" in shown.stdout
    finally:
        os.kill(stopped, signal.SIGCONT)
    try:
        assert wait_until(lambda: sessions(p)["covers"] == "all", timeout=10)
        assert sessions(p)["total"] == 4
        # The delete it did not answer in time was not carried out later either: it had expired.
        assert on_worker[0].execute("SELECT 1").fetchone() == (1,)
    finally:
        for c in conns:
            c.close()
