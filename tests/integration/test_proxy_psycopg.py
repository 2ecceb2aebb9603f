"""psycopg 3 through the pass-through proxy: text and binary results, server- and client-side binding,
pipelines, executemany, COPY, named cursors, prepared statements, LISTEN/NOTIFY, cancellation, and the
authentication methods relayed to PostgreSQL."""

from __future__ import annotations

import datetime
import decimal
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors
import pytest
from conftest import MD5_PASSWORD, PW_PASSWORD, ProxyProcess, wait_until
from psycopg.types.json import Jsonb

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

CONNECT_TIMEOUT = "10"


def connect(proxy: ProxyProcess, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(connect_timeout=CONNECT_TIMEOUT), **kw)


@pytest.fixture
def conn(proxy: ProxyProcess) -> Iterator[psycopg.Connection[Any]]:
    with connect(proxy, autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def admin(pg: DevCluster) -> Iterator[psycopg.Connection[Any]]:
    """A direct superuser connection, for looking at the server's side of things."""
    with psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=10) as c:
        yield c


def backend_state(admin: psycopg.Connection[Any], pid: int) -> tuple[str, str] | None:
    row = admin.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return (row[0], row[1]) if row else None


VALUES: list[tuple[str, Any]] = [
    ("int2", 32767),
    ("int4", -2147483648),
    ("int8", 9223372036854775807),
    ("numeric", decimal.Decimal("-12345678901234567890.000000000001")),
    ("float8", 1.5e300),
    ("bool", True),
    ("text", "quote ' backslash \\ unicode é ☃ nul-free"),
    ("bytea", bytes(range(256)) * 4),
    ("date", datetime.date(1999, 12, 31)),
    ("timestamptz", datetime.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=datetime.UTC)),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("jsonb", {"a": [1, 2, {"b": None}], "c": "d"}),
    ("int4[]", [1, None, 3]),
    ("text[]", ["a", "b,c", 'd"e', None]),
]


def _adapt(type_name: str, value: Any) -> Any:
    return Jsonb(value) if type_name == "jsonb" else value


def test_backend_pid_through_proxy(conn: psycopg.Connection[Any], admin: psycopg.Connection[Any]) -> None:
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert pid is not None
    assert conn.info.backend_pid == pid[0]
    state = backend_state(admin, pid[0])
    assert state is not None
    row = admin.execute("SELECT usename, datname FROM pg_stat_activity WHERE pid = %s", [pid[0]]).fetchone()
    assert row == ("app", "app")


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_types_round_trip(conn: psycopg.Connection[Any], binary: bool) -> None:
    sql = "SELECT " + ", ".join(f"%s::{t}" for t, _ in VALUES)
    params = [_adapt(t, v) for t, v in VALUES]
    with conn.cursor(binary=binary) as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
        assert cur.pgresult is not None
        assert {cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)} == {int(binary)}
    assert row is not None
    for (type_name, expected), got in zip(VALUES, row, strict=True):
        if type_name == "float8":
            assert got == pytest.approx(expected)
        else:
            assert got == expected, type_name


def test_server_side_binding_with_nulls_and_many_params(conn: psycopg.Connection[Any]) -> None:
    n = 500
    sql = "SELECT " + " + ".join(["coalesce(%s::int, 0)"] * n)
    params: list[int | None] = [None if i % 10 == 0 else i for i in range(n)]
    row = conn.execute(sql, params).fetchone()
    assert row == (sum(p for p in params if p is not None),)


def test_client_side_binding(proxy: ProxyProcess) -> None:
    tricky = ["O'Reilly", "back\\slash", "semi; colon -- comment", "$$dollar$$", "é☃", ""]
    with connect(proxy, autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
        cur = c.cursor()
        assert isinstance(cur, psycopg.ClientCursor)
        for s in tricky:
            cur.execute("SELECT %s, length(%s)", [s, s])
            assert cur.fetchone() == (s, len(s))
        cur.execute(
            "SELECT %s::bytea, %s::date, %s::numeric", [b"\x00\xff", datetime.date(2020, 1, 2), decimal.Decimal("NaN")]
        )
        row = cur.fetchone()
        assert row is not None
        assert row[0] == b"\x00\xff"
        assert row[1] == datetime.date(2020, 1, 2)
        assert row[2].is_nan()


def test_pipeline_many_statements_with_one_failing(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TEMP TABLE pipe (i int PRIMARY KEY)")
    with conn.pipeline() as p:
        cursors = [conn.execute("SELECT %s::int * 2", [i]) for i in range(200)]
        p.sync()
        assert [c.fetchone() for c in cursors] == [(i * 2,) for i in range(200)]

    def failing_pipeline() -> None:
        with conn.pipeline() as p:
            for i in range(50):
                conn.execute("INSERT INTO pipe VALUES (%s)", [i])
            p.sync()
            conn.execute("INSERT INTO pipe VALUES (%s)", [7])  # duplicate: fails
            conn.execute("INSERT INTO pipe VALUES (%s)", [1000])  # skipped by the server until Sync
            p.sync()

    with pytest.raises(psycopg.errors.UniqueViolation):
        failing_pipeline()
    # The statements before the failure are in; the one after it was skipped; the session still works.
    row = conn.execute("SELECT count(*), max(i) FROM pipe").fetchone()
    assert row == (50, 49)

    with conn.pipeline():
        a = conn.execute("SELECT 'after'")
        b = conn.execute("SELECT count(*) FROM pipe")
    assert a.fetchone() == ("after",)
    assert b.fetchone() == (50,)


def test_pipeline_in_transaction_with_error_rolls_back(proxy: ProxyProcess) -> None:
    with connect(proxy) as c:
        c.execute("CREATE TEMP TABLE pipe_tx (i int)")
        c.commit()

        def failing_pipeline() -> None:
            with c.pipeline():
                c.execute("INSERT INTO pipe_tx VALUES (1)")
                c.execute("SELECT 1/0")
                c.execute("INSERT INTO pipe_tx VALUES (2)")

        with pytest.raises(psycopg.errors.DivisionByZero):
            failing_pipeline()
        c.rollback()
        assert c.execute("SELECT count(*) FROM pipe_tx").fetchone() == (0,)


def test_executemany(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TEMP TABLE em (id int, name text, at timestamptz)")
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    rows = [(i, f"n{i}", now + datetime.timedelta(seconds=i)) for i in range(2000)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO em VALUES (%s, %s, %s)", rows)
        assert conn.execute("SELECT count(*), sum(id) FROM em").fetchone() == (2000, sum(range(2000)))
        cur.executemany(
            "UPDATE em SET name = %s WHERE id = %s RETURNING id", [(f"u{i}", i) for i in range(10)], returning=True
        )
        got = []
        while True:
            r = cur.fetchone()
            got.append(r)
            if not cur.nextset():
                break
        assert got == [(i,) for i in range(10)]


def test_copy_in_and_out(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TEMP TABLE cp (id int, name text, data bytea)")
    rows = [(i, f"row {i}\twith tab", bytes([i % 256]) * (i % 50)) for i in range(10000)]
    with conn.cursor() as cur:
        with cur.copy("COPY cp (id, name, data) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        assert conn.execute("SELECT count(*), sum(id) FROM cp").fetchone() == (10000, sum(range(10000)))

        with cur.copy("COPY (SELECT id, name, data FROM cp ORDER BY id) TO STDOUT") as copy:
            copy.set_types(["int4", "text", "bytea"])
            out = list(copy.rows())
        assert out == rows

        # Binary COPY both ways.
        conn.execute("CREATE TEMP TABLE cp2 (LIKE cp)")
        with cur.copy("COPY cp2 FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "bytea"])
            for r in rows[:1000]:
                copy.write_row(r)
        with cur.copy("COPY (SELECT * FROM cp2 ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "bytea"])
            assert list(copy.rows()) == rows[:1000]


def test_copy_failure_keeps_session(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TEMP TABLE cpf (id int PRIMARY KEY)")

    def copy_duplicates() -> None:
        with conn.cursor() as cur, cur.copy("COPY cpf FROM STDIN") as copy:
            for i in [1, 2, 3, 2]:
                copy.write_row((i,))

    def copy_then_give_up() -> None:
        with conn.cursor() as cur, cur.copy("COPY cpf FROM STDIN") as copy:
            copy.write_row((10,))
            raise psycopg.errors.QueryCanceled("client gave up")  # psycopg sends CopyFail

    with pytest.raises(psycopg.errors.UniqueViolation):
        copy_duplicates()
    with pytest.raises(psycopg.errors.QueryCanceled):
        copy_then_give_up()
    assert conn.execute("SELECT count(*) FROM cpf").fetchone() == (0,)


def test_named_cursor_itersize(proxy: ProxyProcess) -> None:
    with connect(proxy) as c:
        with c.cursor(name="big") as cur:
            cur.itersize = 97
            cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
            total = 0
            count = 0
            for g, h in cur:
                total += g
                count += 1
                assert len(h) == 32
            assert (count, total) == (5000, 5000 * 5001 // 2)
        with c.cursor(name="scroll", scrollable=True) as cur:
            cur.execute("SELECT generate_series(1, 100)")
            assert cur.fetchmany(10)[-1] == (10,)
            cur.scroll(50, mode="absolute")
            assert cur.fetchone() == (51,)
            cur.scroll(-11)
            assert cur.fetchone() == (41,)
        c.commit()
        with c.cursor(name="held", withhold=True) as cur:
            cur.execute("SELECT generate_series(1, 10)")
            c.commit()  # a WITH HOLD cursor outlives its transaction
            assert len(cur.fetchall()) == 10


def test_prepared_statements(proxy: ProxyProcess) -> None:
    with connect(proxy, autocommit=True) as c:
        for i in range(5):
            assert c.execute("SELECT %s::int + 1", [i], prepare=True).fetchone() == (i + 1,)
        names = c.execute("SELECT name, statement FROM pg_prepared_statements").fetchall()
        assert any("$1::int + 1" in stmt for _, stmt in names)

    with connect(proxy, autocommit=True, prepare_threshold=0) as c:
        c.prepared_max = 5
        for round_ in range(3):
            for k in range(12):  # more distinct statements than prepared_max: psycopg deallocates
                assert c.execute(f"SELECT %s::int * {k}", [round_]).fetchone() == (round_ * k,)
        row = c.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
        assert row is not None
        assert 1 <= row[0] <= 6
        with c.cursor(binary=True) as cur:
            cur.execute("SELECT %s::text || 'x'", ["a"])
            assert cur.fetchone() == ("ax",)


def test_listen_notify(proxy: ProxyProcess) -> None:
    with connect(proxy, autocommit=True) as listener, connect(proxy, autocommit=True) as notifier:
        listener.execute("LISTEN pgveil_test")
        row = notifier.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        notifier_pid = row[0]
        assert notifier_pid == notifier.info.backend_pid
        notifier.execute("NOTIFY pgveil_test, 'first'")
        notifier.execute("SELECT pg_notify('pgveil_test', %s)", ["second ☃"])
        got = list(listener.notifies(timeout=10, stop_after=2))
        assert [(n.channel, n.payload) for n in got] == [("pgveil_test", "first"), ("pgveil_test", "second ☃")]
        assert {n.pid for n in got} == {notifier_pid}
        assert listener.execute("SELECT 'still usable'").fetchone() == ("still usable",)


def _run_in_thread(fn: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, errors


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_long_query(proxy: ProxyProcess, admin: psycopg.Connection[Any], method: str) -> None:
    with connect(proxy, autocommit=True) as c:
        pid = c.info.backend_pid
        t, errors = _run_in_thread(lambda: c.execute("SELECT pg_sleep(30)"))
        assert wait_until(lambda: (backend_state(admin, pid) or ("", ""))[0] == "active", timeout=10)
        if method == "cancel":
            c.cancel()
        else:
            c.cancel_safe(timeout=5)
        t.join(15)
        assert not t.is_alive(), "the cancel did not reach the server"
        assert len(errors) == 1
        assert isinstance(errors[0], psycopg.errors.QueryCanceled)
        assert errors[0].sqlstate == "57014"
        assert c.execute("SELECT 'usable after cancel'").fetchone() == ("usable after cancel",)
        assert c.info.backend_pid == pid


def test_cancel_with_wrong_key_is_ignored(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    """A CancelRequest with a wrong secret must not cancel anything (the server checks it, not us)."""
    with connect(proxy, autocommit=True) as c:
        pid = c.info.backend_pid
        t, errors = _run_in_thread(lambda: c.execute("SELECT pg_sleep(1.5)"))
        assert wait_until(lambda: (backend_state(admin, pid) or ("", ""))[0] == "active", timeout=10)
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
            s.sendall(struct.pack("!IIII", 16, 80877102, pid, 0xDEADBEEF))
            s.settimeout(5)
            assert s.recv(100) == b""  # nothing is answered to a CancelRequest
        t.join(15)
        assert not t.is_alive()
        assert errors == []


def test_auth_methods_are_relayed(proxy: ProxyProcess, admin: psycopg.Connection[Any]) -> None:
    for user, password in (("app", None), ("md5user", MD5_PASSWORD), ("pwuser", PW_PASSWORD)):
        dsn = (
            proxy.dsn(connect_timeout=CONNECT_TIMEOUT)
            if password is None
            else proxy.dsn(user=user, password=password, connect_timeout=CONNECT_TIMEOUT)
        )
        with psycopg.connect(dsn, autocommit=True) as c:
            assert c.execute("SELECT current_user").fetchone() == (user,)
            row = admin.execute(
                "SELECT a.usename FROM pg_stat_activity a WHERE a.pid = %s", [c.info.backend_pid]
            ).fetchone()
            assert row == (user,)


@pytest.mark.parametrize("user", ["app", "md5user", "pwuser"])
def test_wrong_password_gets_server_error(proxy: ProxyProcess, user: str) -> None:
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(proxy.dsn(user=user, password="wrong", connect_timeout=CONNECT_TIMEOUT))
    assert f'password authentication failed for user "{user}"' in str(exc.value)
