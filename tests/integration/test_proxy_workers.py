"""``sessions.workers``: the supervisor places each client on the least-loaded process; metrics add up;
signals reach all; the connection limit holds over all processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ProxyProcess, wait_until

pytestmark = pytest.mark.integration


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(x) for x in text)
    return found


def metrics_text(p: ProxyProcess) -> str:
    with urllib.request.urlopen(p.admin_url + "/metrics", timeout=5) as r:
        return str(r.read().decode())


def metric(p: ProxyProcess, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", metrics_text(p), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def per_process(p: ProxyProcess) -> dict[str, float]:
    body = metrics_text(p)
    found = re.findall(r'^pgveil_process_sessions\{process="(\d+)"\} ([0-9.e+]+)$', body, re.MULTILINE)
    return {proc: float(v) for proc, v in found}


def workers_ready(p: ProxyProcess, n: int, times: int = 1) -> bool:
    """Each of workers 1..n said it is ready (and takes clients) at least ``times`` times."""
    logs = p.logs()
    return all(logs.count(f"worker {i} ready") >= times for i in range(1, n + 1))


def client_port(conn: psycopg.Connection[Any]) -> int:
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return int(sock.getsockname()[1])


def serving_process(pids: set[int], port: int) -> int:
    """Which of ``pids`` holds the accepted socket whose peer is the client port ``port`` (through
    /proc: the process's socket inodes against /proc/net/tcp)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[9] in inodes:
                return inodes[fields[9]]
    raise AssertionError(f"no pgveil process holds the connection from port {port}")


@pytest.fixture
def workers_proxy(make_proxy: Any) -> ProxyProcess:
    p: ProxyProcess = make_proxy(sessions={"workers": 3, "shutdown_timeout": 5})
    assert p.proc is not None
    pid = p.proc.pid
    assert wait_until(lambda: len(children(pid)) == 2, timeout=20), p.logs()
    assert wait_until(lambda: workers_ready(p, 2), timeout=30), p.logs()
    return p


def test_clients_are_spread_evenly_and_metrics_add_up(workers_proxy: ProxyProcess) -> None:
    p = workers_proxy
    assert p.proc is not None
    pids = {p.proc.pid, *children(p.proc.pid)}
    before = metric(p, "pgveil_sessions_total")
    conns = [psycopg.connect(p.dsn(), autocommit=True) for _ in range(30)]
    try:
        for c in conns:
            assert c.execute("SELECT pg_backend_pid()").fetchone() == (c.info.backend_pid,)
        # Placed at accept time on the least-loaded process: 10 each, whatever the kernel would have done.
        held = [serving_process(pids, client_port(c)) for c in conns]
        assert sorted(held.count(pid) for pid in pids) == [10, 10, 10]
        assert wait_until(lambda: per_process(p) == {"0": 10.0, "1": 10.0, "2": 10.0}, timeout=10), per_process(p)
        assert wait_until(lambda: metric(p, "pgveil_sessions_active") == 30, timeout=10)
        assert wait_until(lambda: metric(p, "pgveil_sessions_total") - before == 30, timeout=10)
        # Closing reports back: the next clients go where sessions were freed.
        freed = [c for c, pid in zip(conns, held, strict=True) if pid == p.proc.pid][:4]
        for c in freed:
            c.close()
        assert wait_until(lambda: per_process(p).get("0") == 6.0, timeout=10), per_process(p)
        more = [psycopg.connect(p.dsn(), autocommit=True) for _ in range(4)]
        conns += more
        assert [serving_process(pids, client_port(c)) for c in more] == [p.proc.pid] * 4
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: per_process(p) == {"0": 0.0, "1": 0.0, "2": 0.0}, timeout=10), per_process(p)


def test_a_burst_of_clients_is_spread_too(workers_proxy: ProxyProcess) -> None:
    """Clients that connect at the same moment (pgbench's) land on different processes."""
    p = workers_proxy
    assert p.proc is not None
    pids = {p.proc.pid, *children(p.proc.pid)}
    socks = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(6)]
    try:
        ports = [s.getsockname()[1] for s in socks]
        assert wait_until(lambda: per_process(p) == {"0": 2.0, "1": 2.0, "2": 2.0}, timeout=10), per_process(p)
        held = [serving_process(pids, port) for port in ports]
        assert sorted(held.count(pid) for pid in pids) == [2, 2, 2]
    finally:
        for s in socks:
            s.close()


def test_the_connection_limit_holds_over_all_processes(make_proxy: Any) -> None:
    p: ProxyProcess = make_proxy(sessions={"workers": 2, "max_client_connections": 3})
    assert p.proc is not None
    assert wait_until(lambda: workers_ready(p, 1), timeout=30), p.logs()
    conns = [psycopg.connect(p.dsn(), autocommit=True) for _ in range(3)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(p.dsn(), autocommit=True)
        for c in conns:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: per_process(p) == {"0": 0.0, "1": 0.0}, timeout=10), per_process(p)
    with psycopg.connect(p.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_a_worker_that_dies_is_started_again(workers_proxy: ProxyProcess) -> None:
    p = workers_proxy
    assert p.proc is not None
    pid = p.proc.pid
    pids = {pid, *children(pid)}
    conns = [psycopg.connect(p.dsn(), autocommit=True) for _ in range(3)]
    try:
        held = [serving_process(pids, client_port(c)) for c in conns]
        assert sorted(held) == sorted(pids)
        victim = min(children(pid))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: victim not in children(pid) and len(children(pid)) == 2, timeout=20)
        assert "exited" in p.logs()
        for c, holder in zip(conns, held, strict=True):
            if holder == victim:
                with pytest.raises(psycopg.OperationalError):
                    c.execute("SELECT 1")
            else:
                assert c.execute("SELECT 1").fetchone() == (1,)
        # The new worker starts with no sessions, so it takes the next client.
        assert wait_until(lambda: workers_ready(p, 2, times=1) and p.logs().count(" ready") >= 3, timeout=30)
        newcomer = (children(pid) - pids).pop()
        with psycopg.connect(p.dsn(), autocommit=True) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
            assert serving_process({pid, *children(pid)}, client_port(c)) == newcomer
    finally:
        for c in conns:
            c.close()


def test_sigterm_stops_every_process(workers_proxy: ProxyProcess) -> None:
    p = workers_proxy
    assert p.proc is not None
    kids = children(p.proc.pid)
    assert len(kids) == 2
    rc = p.stop(timeout=30)
    assert rc == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{k}").exists() for k in kids):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{k}/status").exists() and "zombie" not in Path(f"/proc/{k}/status").read_text()
                   for k in kids)  # fmt: skip


def test_a_cancel_request_placed_on_another_process_reaches_the_backend(make_proxy: Any) -> None:
    p: ProxyProcess = make_proxy(sessions={"workers": 2})
    assert p.proc is not None
    assert wait_until(lambda: workers_ready(p, 1), timeout=30), p.logs()
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        # One session open, so the CancelRequest's own connection goes to the other, idle process.
        assert wait_until(lambda: sorted(per_process(p).values()) == [0.0, 1.0], timeout=10), per_process(p)
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
        assert time.monotonic() - started < 20
        assert wait_until(lambda: metric(p, "pgveil_cancel_requests_total") == 1, timeout=10)
        assert conn.execute("SELECT 1").fetchone() == (1,)
