"""``sessions.workers``: several processes share the listen address; metrics add up; signals reach all."""

from __future__ import annotations

import os
import re
import signal
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


def metric(p: ProxyProcess, name: str) -> float:
    with urllib.request.urlopen(p.admin_url + "/metrics", timeout=5) as r:
        body = r.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def workers_proxy(make_proxy: Any) -> ProxyProcess:
    p: ProxyProcess = make_proxy(sessions={"workers": 3, "shutdown_timeout": 5})
    assert p.proc is not None
    pid = p.proc.pid
    assert wait_until(lambda: len(children(pid)) == 2, timeout=20), p.logs()
    return p


def test_sessions_are_served_by_every_process_and_metrics_add_up(workers_proxy: ProxyProcess) -> None:
    p = workers_proxy
    assert p.proc is not None
    before = metric(p, "pgveil_sessions_total")
    conns = [psycopg.connect(p.dsn(), autocommit=True) for _ in range(30)]
    try:
        for c in conns:
            assert c.execute("SELECT pg_backend_pid()").fetchone() == (c.info.backend_pid,)
        # the sessions' client-side ports are spread over the processes by the kernel (SO_REUSEPORT)
        assert wait_until(lambda: metric(p, "pgveil_sessions_active") == 30, timeout=10)
        assert wait_until(lambda: metric(p, "pgveil_sessions_total") - before == 30, timeout=10)
    finally:
        for c in conns:
            c.close()


def test_a_worker_that_dies_is_started_again(workers_proxy: ProxyProcess) -> None:
    p = workers_proxy
    assert p.proc is not None
    victim = min(children(p.proc.pid))
    os.kill(victim, signal.SIGKILL)
    pid = p.proc.pid
    assert wait_until(lambda: victim not in children(pid) and len(children(pid)) == 2, timeout=20)
    assert "exited" in p.logs()
    with psycopg.connect(p.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


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
