"""Random frontend message sequences, valid and invalid, through pgveil and straight to the server
(issue 7, item 7).

Each example is one session: login, BEGIN (nothing it writes survives), a random run of Query, Parse,
Bind, Describe, Execute, Close, Sync, Flush, COPY messages, FunctionCall, Terminate and malformed frames
over protected and plain tables, then Sync and a probe query. The same bytes go once to the server and once
through pgveil. Whatever pgveil refuses, it must never close the connection without an ErrorResponse
where the server would have answered, never let an exception out of the relay (its log has no
traceback), and never stall other sessions: a bystander's query through pgveil is answered after every
example.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from typing import Any

import encfixtures
import psycopg
import pytest
from conftest import MD5_PASSWORD
from encfixtures import EncEnv
from faultproxy import RawClient, frame, query
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

USER = "md5user"

SQL = [
    "SELECT 1",
    "SELECT $1::int",
    "SELECT s, n FROM enc_refuse WHERE id = $1",
    "SELECT s FROM enc_refuse WHERE s = $1",
    "INSERT INTO enc_refuse (id, grp, s, n) VALUES ($1, -1, $2, $3)",
    "INSERT INTO enc_refuse (id, grp, s) VALUES (-7, -1, 'fuzz-literal')",
    "UPDATE enc_refuse SET s = $1 WHERE id = $2",
    "INSERT INTO enc_refuse (id, s) VALUES ($1, $65536)",
    "INSERT INTO enc_refuse (id, s) VALUES ($1, $2147483647)",
    "SELECT $65536::text",
    "COPY enc_refuse (id, s) FROM STDIN",
    "COPY enc_refuse (id, s) TO STDOUT",
    "COPY enc_plain (id, v) FROM STDIN",
    "SET client_encoding = 'LATIN1'",
    "SET client_encoding = 'UTF8'",
    "SELECT s FROM enc_refuse; SELECT 1",
    "SELEC broken enc_refuse",
    "PREPARE q AS SELECT s FROM enc_refuse WHERE id = $1",
    "EXECUTE q(1)",
    "/* enc_refuse */ SELECT 1 WHERE 1 IN (1" + ", 2" * 4000 + ")",
    "SELECT id FROM enc_plain WHERE v = $1",
]
NAMES = ["", "s1", "s2"]
FRONTEND_TYPES = b"BCcDdEFfHPpQSX"


def _cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


values = st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"1", b"42", b"fuzz", b"\x00\x00\x00\x01"]))
formats = st.lists(st.integers(0, 2), max_size=3)


@st.composite
def bind_message(draw: st.DrawFn) -> bytes:
    params = draw(st.lists(values, max_size=4))
    fmts = draw(formats)
    body = _cstr(draw(st.sampled_from(NAMES))) + _cstr(draw(st.sampled_from(NAMES)))
    body += struct.pack("!H", len(fmts)) + b"".join(struct.pack("!H", f) for f in fmts)
    body += struct.pack("!H", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    results = draw(formats)
    body += struct.pack("!H", len(results)) + b"".join(struct.pack("!H", f) for f in results)
    return frame(b"B", body)


@st.composite
def parse_message(draw: st.DrawFn) -> bytes:
    types = draw(st.lists(st.sampled_from([0, 23, 25, 17, 2**32 - 1]), max_size=3))
    body = _cstr(draw(st.sampled_from(NAMES))) + _cstr(draw(st.sampled_from(SQL)))
    body += struct.pack("!H", len(types)) + b"".join(struct.pack("!I", t) for t in types)
    return frame(b"P", body)


def _target(kind: bytes) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda k, n: frame(kind, k + _cstr(n)), st.sampled_from([b"S", b"P", b"X"]), st.sampled_from(NAMES)
    )


message = st.one_of(
    st.builds(lambda s: query(s), st.sampled_from(SQL)),
    parse_message(),
    bind_message(),
    _target(b"D"),
    _target(b"C"),
    st.builds(
        lambda n, r: frame(b"E", _cstr(n) + struct.pack("!i", r)), st.sampled_from(NAMES), st.sampled_from([0, 1, -1])
    ),
    st.just(frame(b"S", b"")),
    st.just(frame(b"H", b"")),
    st.builds(
        lambda d: frame(b"d", d),
        st.sampled_from([b"-5\tfuzz-copy\n", b"1\t\\N\n", b"garbage", b"\\.\n", b"\xff\xfe\n"]),
    ),
    st.just(frame(b"c", b"")),
    st.just(frame(b"f", b"fuzz\x00")),
    st.builds(lambda b: frame(b"F", b), st.binary(max_size=16)),
    st.builds(lambda t, b: frame(bytes([t]), b), st.sampled_from(list(FRONTEND_TYPES)), st.binary(max_size=16)),
    st.sampled_from([b"\x00\x00\x00\x00\x04", b"Q\x00\x00\x00\x02", frame(b"X", b""), frame(b"p", b"x\x00")]),
)


def run_session(host: str, port: int, script: bytes, probe: str) -> tuple[str, list[bytes]]:
    """Logs in, sends BEGIN, the script, Sync and the probe; returns the outcome and the message types:
    "alive" (the probe answered), "open" (nothing more within the timeout), "closed-error" (closed after
    an ErrorResponse), "closed-silent" (closed without one)."""
    client = RawClient(host, port, timeout=2)
    types: list[bytes] = []
    try:
        client.login(USER, MD5_PASSWORD, "app")
        client.simple_query("BEGIN")
        client.send(script + frame(b"S", b"") + query(f"SELECT '{probe}'"))
        seen_probe = False
        while True:
            try:
                msg = client.read_message()
            except TimeoutError:
                return "open", types
            except ConnectionResetError:
                msg = None
            if msg is None:
                return ("closed-error" if b"E" in types else "closed-silent"), types
            t, body = msg
            types.append(t)
            if t == b"D" and probe.encode() in body:
                seen_probe = True
            if t == b"Z" and seen_probe:
                return "alive", types
    finally:
        client.close()


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> EncEnv:
    env = encfixtures.shared_env(pg, tmp_path_factory, pytestconfig)
    with psycopg.connect(env.direct_dsn, autocommit=True) as c:
        c.execute(f"GRANT ALL ON enc_refuse, enc_plain TO {USER}")
    return env


@pytest.fixture(scope="module")
def bystander(env: EncEnv) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(env.dsn(), autocommit=True) as c:
        yield c


def _parse(sql: str, name: str = "") -> bytes:
    return frame(b"P", _cstr(name) + _cstr(sql) + b"\x00\x00")


# The examples, always run first: each dropped the client without a word.
LATIN1_COPY = [
    query("SET client_encoding = 'LATIN1'"),
    query("COPY enc_refuse (id, s) FROM STDIN"),
    frame(b"d", b"-5\tfuzz-copy\n"),
    frame(b"c", b""),
]
PARSE_65536 = [_parse("INSERT INTO enc_refuse (id, s) VALUES ($1, $65536)"), frame(b"S", b"")]
PARSE_2147483647 = [_parse("INSERT INTO enc_refuse (id, s) VALUES ($1, $2147483647)", "s1"), frame(b"S", b"")]


@example(messages=LATIN1_COPY)
@example(messages=PARSE_65536)
@example(messages=PARSE_2147483647)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(messages=st.lists(message, min_size=1, max_size=8))
def test_random_sessions_never_drop_the_client_silently(
    messages: list[bytes], env: EncEnv, pg: DevCluster, bystander: psycopg.Connection[Any]
) -> None:
    script = b"".join(messages)
    probe = f"probe-{uuid.uuid4().hex}"
    direct, direct_types = run_session("127.0.0.1", pg.port, script, probe)
    proxied, proxied_types = run_session(env.proxy.host, env.proxy.port, script, probe)
    detail = f"server: {direct} {direct_types}; pgveil: {proxied} {proxied_types}"
    if direct != "closed-silent":
        assert proxied != "closed-silent", detail
    assert bystander.execute("SELECT 1").fetchone() == (1,)
    assert "Traceback" not in env.proxy.logs(), detail
    assert "internal error" not in env.proxy.logs(), detail
