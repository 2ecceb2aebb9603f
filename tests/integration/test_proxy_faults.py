"""Faults end only the session they hit: malformed and oversized messages, garbage startup packets, an
unreachable or dying server, a terminated backend, clients that vanish mid-query or mid-COPY, and a client
that stops reading a 200 MB result. A canary session on the same proxy runs queries throughout and must
never notice."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import PW_PASSWORD, ProxyProcess, proxy_config, wait_until
from faultproxy import FaultProxy, RawClient, frame, parse_error_fields, query, raw_session, startup_packet

from proxy.devcluster import DevCluster, free_port

pytestmark = pytest.mark.integration

MAX_MESSAGE_SIZE = 1 << 20


class Canary:
    """A second session that keeps querying through the same proxy while faults hit other sessions."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        self.count = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                row = self.conn.execute("SELECT %s::int + 1", [self.count]).fetchone()
                if row != (self.count + 1,):
                    raise AssertionError(f"canary got {row!r}")
                self.count += 1
            except BaseException as e:
                self.errors.append(e)
                return
            time.sleep(0.01)

    def assert_alive(self) -> None:
        """The canary never failed and still makes progress."""
        start = self.count
        assert wait_until(lambda: self.count > start + 3 or bool(self.errors), timeout=10)
        assert self.errors == []

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.conn.close()


@pytest.fixture(scope="module")
def fproxy(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The proxy the faults hit: upstream TLS prefer, and a 1 MB message limit."""
    cfg = proxy_config(
        pg,
        upstream={"host": "127.0.0.1", "port": pg.port, "tls": "prefer"},
        sessions={"shutdown_timeout": 5, "max_message_size": MAX_MESSAGE_SIZE, "track_statements": "always"},
    )
    p = ProxyProcess(cfg, tmp_path_factory.mktemp("faults-proxy"))
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def fproxy_light(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The same limits on the frame-level fast path (no protected tables, track_statements auto)."""
    cfg = proxy_config(
        pg,
        upstream={"host": "127.0.0.1", "port": pg.port, "tls": "prefer"},
        sessions={"shutdown_timeout": 5, "max_message_size": MAX_MESSAGE_SIZE, "track_statements": "auto"},
    )
    p = ProxyProcess(cfg, tmp_path_factory.mktemp("faults-proxy-light"))
    p.start()
    yield p
    p.stop()


@pytest.fixture(params=["full", "light"])
def any_mode(request: pytest.FixtureRequest) -> ProxyProcess:
    """Both relay modes: the full statement model and the frame-level fast path."""
    name = "fproxy" if request.param == "full" else "fproxy_light"
    p: ProxyProcess = request.getfixturevalue(name)
    return p


@pytest.fixture(scope="module")
def canary(fproxy: ProxyProcess) -> Iterator[Canary]:
    c = Canary(fproxy.dsn())
    yield c
    c.stop()
    assert c.errors == []


@pytest.fixture(scope="module")
def admin(pg: DevCluster) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def copy_table(pg: DevCluster) -> str:
    pg.psql(
        "DROP TABLE IF EXISTS fault_copy; CREATE TABLE fault_copy (id int, t text); GRANT ALL ON fault_copy TO PUBLIC",
        dbname="app",
    )
    return "fault_copy"


def login(p: ProxyProcess) -> Any:
    return raw_session(p.host, p.port, "pwuser", PW_PASSWORD, "app")


def backend_gone(admin: psycopg.Connection[Any], pid: int) -> bool:
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row == (0,)


def backend_active(admin: psycopg.Connection[Any], pid: int) -> bool:
    row = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row == ("active",)


def assert_serving(p: ProxyProcess) -> None:
    assert p.proc is not None
    assert p.proc.poll() is None, p.logs()
    with psycopg.connect(p.dsn(connect_timeout="10"), autocommit=True) as c:
        assert c.execute("SELECT 'serving'").fetchone() == ("serving",)


# -- malformed traffic after startup ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("unknown type byte", b"\x01\x00\x00\x00\x04"),
        ("length field of 3", b"Q\x00\x00\x00\x03"),
        ("length field of 0", b"Q\x00\x00\x00\x00"),
        ("password message after startup", frame(b"p", b"secret\0")),
        ("bind body truncated", frame(b"B", b"\0\0\x00\x05")),
        ("bind format code 7", frame(b"B", b"\0\0\x00\x01\x00\x07\x00\x00\x00\x00")),
        ("parse query unterminated", frame(b"P", b"\0SELECT 1")),
        ("query with trailing bytes", frame(b"Q", b"SELECT 1\0junk")),
        ("describe target X", frame(b"D", b"X\0")),
        ("execute without row count", frame(b"E", b"\0")),
        ("sync with a body", frame(b"S", b"\0")),
    ],
)
def test_malformed_message_gets_fatal_08p01(
    any_mode: ProxyProcess, canary: Canary, admin: psycopg.Connection[Any], name: str, payload: bytes
) -> None:
    with login(any_mode) as raw:
        pid = raw.backend_pid
        assert pid is not None
        raw.simple_query("SELECT 1")
        raw.send(payload)
        fields = raw.expect_fatal()
    assert fields["S"] == "FATAL", name
    assert fields["C"] == "08P01", name
    assert "client" in fields["M"]
    assert wait_until(lambda: backend_gone(admin, pid), timeout=10)
    canary.assert_alive()


def test_oversized_message_gets_fatal_08p01(any_mode: ProxyProcess, canary: Canary) -> None:
    sql = "SELECT '" + "x" * (2 * MAX_MESSAGE_SIZE) + "'"
    with login(any_mode) as raw:
        raw.simple_query("SELECT 1")
        # The limit is checked on the header: the proxy may close while the body is still being sent,
        # so the sender runs beside the reader.
        sender = threading.Thread(target=lambda: _send_quietly(raw, query(sql)), daemon=True)
        sender.start()
        fields = raw.expect_fatal()
        sender.join(10)
    assert fields["S"] == "FATAL"
    assert fields["C"] == "08P01"
    assert "exceeds" in fields["M"]
    canary.assert_alive()


def test_message_just_under_the_limit_passes(fproxy: ProxyProcess, canary: Canary) -> None:
    with psycopg.connect(fproxy.dsn(connect_timeout="10"), autocommit=True) as c:
        value = "y" * (MAX_MESSAGE_SIZE - 4096)
        assert c.execute("SELECT length(%s)", [value]).fetchone() == (len(value),)
    canary.assert_alive()


def _send_quietly(raw: RawClient, data: bytes) -> None:
    try:
        raw.send(data)
    except OSError:
        pass


@pytest.mark.parametrize(
    ("name", "packet"),
    [
        ("random bytes", os.urandom(64)),
        ("length of 5", b"\x00\x00\x00\x05x"),
        ("length of 0", b"\x00\x00\x00\x00"),
        ("huge length", b"\x7f\xff\xff\xff" + b"\0" * 100),
        ("protocol 2", struct.pack("!II", 8, 2 << 16)),
        ("unterminated parameters", struct.pack("!II", 16, 196608) + b"user\0app"),
        ("http request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ],
)
def test_garbage_startup_closes_cleanly(fproxy: ProxyProcess, canary: Canary, name: str, packet: bytes) -> None:
    with RawClient(fproxy.host, fproxy.port, timeout=10) as raw:
        raw.send(packet)
        messages = raw.read_until_closed()  # the proxy closes the connection (a timeout would raise)
    for t, _ in messages:
        assert t == b"E", name
    assert_serving(fproxy)
    canary.assert_alive()


def test_truncated_startup_then_disconnect(fproxy: ProxyProcess, canary: Canary) -> None:
    packet = startup_packet(user="app", database="app")
    for cut in (1, 3, 7, len(packet) - 1):
        with RawClient(fproxy.host, fproxy.port) as raw:
            raw.send(packet[:cut])
    assert_serving(fproxy)
    canary.assert_alive()


# -- the server side fails --------------------------------------------------------------------------------


def test_unreachable_server_gives_08006_naming_the_address(make_proxy: Any) -> None:
    dead = free_port()
    p = make_proxy(upstream={"host": "127.0.0.1", "port": dead, "tls": "prefer", "connect_timeout": 5})
    with RawClient(p.host, p.port) as raw:
        raw.send(startup_packet(user="app", database="app"))
        fields = raw.expect_fatal()
    assert fields["S"] == "FATAL"
    assert fields["C"] == "08006"
    assert f"127.0.0.1:{dead}" in fields["M"]
    with pytest.raises(psycopg.OperationalError, match=f"127.0.0.1:{dead}"):
        psycopg.connect(p.dsn(connect_timeout="10"))
    assert p.proc is not None
    assert p.proc.poll() is None


@pytest.fixture
def cut_proxy(pg: DevCluster, make_proxy: Any) -> Iterator[tuple[ProxyProcess, FaultProxy]]:
    """pgveil whose upstream is a fault proxy in front of PostgreSQL."""
    with FaultProxy("127.0.0.1", pg.port) as fp:
        p = make_proxy(upstream={"host": "127.0.0.1", "port": fp.port, "tls": "prefer"})
        yield p, fp


def _in_thread(fn: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


@pytest.mark.parametrize("side", ["server", "both"])
def test_server_dies_mid_query(
    cut_proxy: tuple[ProxyProcess, FaultProxy], admin: psycopg.Connection[Any], side: Any
) -> None:
    p, fp = cut_proxy
    bystander = psycopg.connect(p.dsn(connect_timeout="10"), autocommit=True)
    before = set(fp.live_links())
    c = psycopg.connect(p.dsn(connect_timeout="10"), autocommit=True)
    victims = [link for link in fp.live_links() if link not in before]
    pid = c.info.backend_pid
    t, errors = _in_thread(lambda: c.execute("SELECT pg_sleep(30)"))
    try:
        assert wait_until(lambda: backend_active(admin, pid), timeout=10)
        # Cut only the link of the sleeping session: the bystander has its own link through the fault proxy.
        assert len(victims) == 1
        victims[0].cut(side)
        t.join(15)
        assert not t.is_alive(), "the client hung after its server connection died"
        assert len(errors) == 1
        assert isinstance(errors[0], psycopg.OperationalError)
        assert errors[0].sqlstate in (None, "08006")
        assert c.closed or c.broken
        assert bystander.execute("SELECT 'bystander fine'").fetchone() == ("bystander fine",)
        assert_serving(p)
    finally:
        c.close()
        bystander.close()
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_server_closes_mid_result(cut_proxy: tuple[ProxyProcess, FaultProxy]) -> None:
    p, fp = cut_proxy
    with psycopg.connect(p.dsn(connect_timeout="10"), autocommit=True) as c:
        (link,) = fp.wait_for_links(1)
        fp.close_after("to_client", 3_000_000)
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT repeat('r', 1000) FROM generate_series(1, 100000)").fetchall()
        assert link.closed.is_set()
    assert_serving(p)


def test_stalled_server_during_startup_times_out(pg: DevCluster, make_proxy: Any) -> None:
    with FaultProxy("127.0.0.1", pg.port) as fp:
        p = make_proxy(
            upstream={"host": "127.0.0.1", "port": fp.port, "tls": "disable"},
            sessions={"startup_timeout": 1, "shutdown_timeout": 5},
        )
        fp.stall("to_client")
        with RawClient(p.host, p.port) as raw:
            raw.send(startup_packet(user="app", database="app"))
            fields = raw.expect_fatal()
        assert fields["C"] == "08006"
        assert "timed out" in fields["M"]
        fp.resume()
        assert_serving(p)


def test_terminated_backend_gives_the_servers_fatal(
    fproxy: ProxyProcess, canary: Canary, admin: psycopg.Connection[Any]
) -> None:
    with login(fproxy) as raw:
        assert raw.backend_pid is not None
        raw.simple_query("SELECT 1")
        admin.execute("SELECT pg_terminate_backend(%s)", [raw.backend_pid])
        messages = raw.read_until_closed()
    errors = [m for m in messages if m[0] == b"E"]
    assert len(errors) == 1, messages  # the server's FATAL, and nothing invented by the proxy after it
    fields = parse_error_fields(errors[0][1])
    assert fields["S"] == "FATAL"
    assert fields["C"] == "57P01"
    assert "administrator command" in fields["M"]
    canary.assert_alive()


def test_terminated_backend_during_query_psycopg(
    fproxy: ProxyProcess, canary: Canary, admin: psycopg.Connection[Any]
) -> None:
    c = psycopg.connect(fproxy.dsn(connect_timeout="10"), autocommit=True)
    pid = c.info.backend_pid
    t, errors = _in_thread(lambda: c.execute("SELECT pg_sleep(30)"))
    try:
        assert wait_until(lambda: backend_active(admin, pid), timeout=10)
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        t.join(15)
        assert not t.is_alive()
        assert len(errors) == 1
        assert "terminating connection due to administrator command" in str(errors[0])
    finally:
        c.close()
    canary.assert_alive()


# -- the client side fails --------------------------------------------------------------------------------


def test_client_vanishes_mid_query(fproxy: ProxyProcess, canary: Canary, admin: psycopg.Connection[Any]) -> None:
    with login(fproxy) as raw:
        pid = raw.backend_pid
        assert pid is not None
        raw.send(query("SELECT pg_sleep(60)"))
        assert wait_until(lambda: backend_active(admin, pid), timeout=10)
    assert wait_until(lambda: backend_gone(admin, pid), timeout=10), "the server backend outlived its client"
    canary.assert_alive()


def test_client_vanishes_mid_copy(
    fproxy: ProxyProcess, canary: Canary, admin: psycopg.Connection[Any], copy_table: str
) -> None:
    with login(fproxy) as raw:
        pid = raw.backend_pid
        assert pid is not None
        raw.send(query(f"COPY {copy_table} FROM STDIN"))
        msg = raw.read_message()
        assert msg is not None
        assert msg[0] == b"G"  # CopyInResponse
        for i in range(1000):
            raw.send(frame(b"d", f"{i}\trow {i}\n".encode()))
        raw.send(b"d\x00\x00\x10\x00" + b"partial")  # and a CopyData cut short
    assert wait_until(lambda: backend_gone(admin, pid), timeout=10), "the COPY outlived its client"
    with psycopg.connect(fproxy.dsn(connect_timeout="10")) as c:
        assert c.execute(f"SELECT count(*) FROM {copy_table}").fetchone() == (0,)
    canary.assert_alive()


def test_client_vanishes_mid_transaction_releases_locks(
    fproxy: ProxyProcess, canary: Canary, admin: psycopg.Connection[Any], copy_table: str
) -> None:
    with login(fproxy) as raw:
        pid = raw.backend_pid
        raw.simple_query(f"BEGIN; LOCK TABLE {copy_table} IN ACCESS EXCLUSIVE MODE")
    assert pid is not None
    assert wait_until(lambda: backend_gone(admin, pid), timeout=10)
    with psycopg.connect(fproxy.dsn(connect_timeout="10", options="-c%20lock_timeout%3D5000")) as c:
        assert c.execute(f"SELECT count(*) FROM {copy_table}").fetchone() is not None
    canary.assert_alive()


# -- backpressure -----------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_slow_reader_keeps_proxy_memory_bounded(fproxy: ProxyProcess, canary: Canary) -> None:
    assert fproxy.proc is not None
    pid = fproxy.proc.pid
    rows, width = 200_000, 1000  # 200 MB of DataRows
    with login(fproxy) as raw:
        raw.simple_query("SELECT 1")
        base = rss_bytes(pid)
        raw.send(query(f"SELECT repeat('x', {width}) FROM generate_series(1, {rows})"))
        peak = base
        for _ in range(30):  # read nothing for 3 s while the server keeps producing
            time.sleep(0.1)
            peak = max(peak, rss_bytes(pid))
        count = 0
        while True:
            msg = raw.read_message()
            assert msg is not None
            if msg[0] == b"D":
                count += 1
                if count % 20000 == 0:
                    peak = max(peak, rss_bytes(pid))
            elif msg[0] == b"Z":
                break
            elif msg[0] == b"E":
                raise AssertionError(msg)
    assert count == rows
    growth = peak - base
    assert growth < 50 * 1024 * 1024, f"proxy RSS grew by {growth / 1e6:.1f} MB while the client did not read"
    canary.assert_alive()


def test_slow_writer_copy_in_is_relayed(fproxy: ProxyProcess, canary: Canary, copy_table: str) -> None:
    """Many small CopyData messages in one stream, with pauses: the proxy relays them without waiting for
    a whole message batch."""
    with psycopg.connect(fproxy.dsn(connect_timeout="10")) as c:
        with c.cursor() as cur, cur.copy(f"COPY {copy_table} FROM STDIN") as copy:
            for i in range(50_000):
                copy.write_row((i, "z" * 50))
                if i % 10_000 == 0:
                    time.sleep(0.2)
        assert c.execute(f"SELECT count(*) FROM {copy_table}").fetchone() == (50_000,)
        c.rollback()
    canary.assert_alive()


def test_canary_survived_everything(canary: Canary, fproxy: ProxyProcess) -> None:
    canary.assert_alive()
    assert canary.count > 50
    assert fproxy.proc is not None
    assert fproxy.proc.poll() is None
