"""Startup and authentication answer as PostgreSQL 15 does (issue 7, item 9).

Each script of raw bytes (a client ending the connection before its StartupMessage, stray bytes, an
SSLRequest or GSSENCRequest followed by anything, a Terminate or EOF during SASL or password
authentication) is sent once straight to the server and once through pgveil. What comes back must be the
same: the one-byte answers, each ErrorResponse's severity, SQLSTATE and message, the other messages by
type, and whether the connection then closes. PostgreSQL logs most of these as COMMERROR and closes
without a word (postmaster.c ProcessStartupPacket; auth.c recv_password_packet and CheckSASLAuth)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ProxyProcess, proxy_config

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

_EOF = object()  # in a script: the client shuts down its side
Step = bytes | object


def _startup(user: str | None = "app", protocol: int = 3 << 16, *, terminator: bool = True) -> bytes:
    body = struct.pack("!I", protocol)
    if user is not None:
        body += b"user\x00" + user.encode() + b"\x00"
    body += b"database\x00app\x00"
    if terminator:
        body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def _message(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)
TERMINATE = _message(b"X")

# name -> the client's steps. None of them ever authenticates; each ends in one of the ways a client can
# stop early.
SCRIPTS: dict[str, list[Step]] = {
    "nothing": [_EOF],
    "partial-length": [b"\x00\x00", _EOF],
    "terminate-first": [TERMINATE],
    "terminate-first-then-eof": [TERMINATE, _EOF],
    "http-request": [b"GET / HTTP/1.1\r\nHost: pgveil\r\n\r\n"],
    "length-too-small": [struct.pack("!II", 7, 196608)],
    "length-too-large": [struct.pack("!II", 10005, 196608) + b"\x00" * 100],
    "length-largest-then-eof": [struct.pack("!II", 10004, 196608) + b"\x00" * 100, _EOF],
    "incomplete-packet": [struct.pack("!II", 100, 196608) + b"user\x00", _EOF],
    "protocol-2": [_startup(protocol=2 << 16)],
    "protocol-4": [_startup(protocol=4 << 16)],
    "protocol-0": [struct.pack("!II", 8, 0)],
    "protocol-0.5": [struct.pack("!II", 8, 5)],
    "protocol-1": [_startup(protocol=1 << 16)],
    "protocol-3.1-then-eof": [_startup(protocol=(3 << 16) | 1), _EOF],
    "no-terminator": [_startup(terminator=False)],
    "no-user": [_startup(user=None)],
    "cancel-unknown": [struct.pack("!IIII", 16, 80877102, 1, 2)],
    "sasl-then-eof": [_startup(), _EOF],
    "sasl-then-terminate": [_startup(), TERMINATE],
    "startup-and-terminate-together": [_startup() + TERMINATE],
    "sasl-then-query": [_startup(), _message(b"Q", b"SELECT 1\x00")],
    "sasl-then-garbage-response": [_startup(), _message(b"p", b"\x01\x02\x03")],
    "sasl-then-stray-type": [_startup(), b"\xff\x00\x00\x00\x04"],
    "md5-then-terminate": [_startup("md5user"), TERMINATE],
    "md5-then-eof": [_startup("md5user"), _EOF],
    "password-then-terminate": [_startup("pwuser"), TERMINATE],
    "password-then-sync": [_startup("pwuser"), _message(b"S")],
    "unknown-user-then-terminate": [_startup("nosuchuser"), TERMINATE],
}


# Scripts that negotiate encryption first. pgveil answers 'N' to both requests (it cannot relay GSS
# encryption, and this pgveil has no client TLS); the server answers 'N' to both over its Unix socket
# ("no SSL or GSSAPI encryption on Unix sockets"), so that is where these go for the reference answer.
TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
NEGOTIATING: dict[str, list[Step]] = {
    "ssl-then-eof": [SSL_REQUEST, _EOF],
    "ssl-then-terminate": [SSL_REQUEST, TERMINATE],
    "ssl-twice": [SSL_REQUEST, SSL_REQUEST],
    "ssl-then-tls-hello": [SSL_REQUEST, TLS_HELLO],
    "ssl-then-protocol-2": [SSL_REQUEST, _startup(protocol=2 << 16)],
    "ssl-then-gssenc-then-terminate": [SSL_REQUEST, GSSENC_REQUEST, TERMINATE],
    "ssl-then-gssenc-then-ssl": [SSL_REQUEST, GSSENC_REQUEST, SSL_REQUEST],
    "gssenc-then-eof": [GSSENC_REQUEST, _EOF],
    "gssenc-then-terminate": [GSSENC_REQUEST, TERMINATE],
    "gssenc-twice": [GSSENC_REQUEST, GSSENC_REQUEST],
    "gssenc-then-tls-hello": [GSSENC_REQUEST, TLS_HELLO],
    "gssenc-then-ssl-then-eof": [GSSENC_REQUEST, SSL_REQUEST, _EOF],
    "gssenc-then-ssl-then-protocol-4": [GSSENC_REQUEST, SSL_REQUEST, _startup(protocol=4 << 16)],
    "gssenc-then-cancel": [GSSENC_REQUEST, struct.pack("!IIII", 16, 80877102, 1, 2)],
    "ssl-and-bytes-together": [SSL_REQUEST + TERMINATE],
}


def _summarise(data: bytes) -> list[Any]:
    """The messages, comparable across server and proxy: ErrorResponse as (severity, SQLSTATE, message),
    an old-style error (to a client of protocol 2) as its text, others by type (Authentication with its
    request code)."""
    out: list[Any] = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 7] == b"EFATAL:":
            text, _, _rest = data[pos + 1 :].partition(b"\x00")
            out.append(("old-style error", text.decode()))
            break
        if len(data) - pos < 5:
            out.append(("truncated", data[pos:]))
            break
        t = data[pos : pos + 1]
        (n,) = struct.unpack_from("!I", data, pos + 1)
        body = data[pos + 5 : pos + 1 + n]
        pos += 1 + n
        if t == b"E":
            fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\x00") if f}
            out.append(("error", fields.get(b"V"), fields.get(b"C"), fields.get(b"M")))
        elif t == b"R":
            out.append(("auth", struct.unpack_from("!I", body, 0)[0]))
        else:
            out.append((t.decode(errors="replace"),))
    return out


def run_script(address: str | tuple[str, int], steps: list[Step], timeout: float = 5.0) -> tuple[list[Any], bool]:
    """Sends the steps (a short pause between them, so each arrives as its own read) and collects every
    byte until the peer closes or ``timeout`` passes. After an SSLRequest or GSSENCRequest sent on its
    own, the one-byte answer is read first. Returns (replies, closed)."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
    else:
        sock = socket.create_connection(address, timeout=timeout)
    replies: list[Any] = []
    received = b""
    closed = False
    try:
        for step in steps:
            if step is _EOF:
                sock.shutdown(socket.SHUT_WR)
                continue
            assert isinstance(step, bytes)
            try:
                sock.sendall(step)
            except OSError:
                break
            if step in (SSL_REQUEST, GSSENC_REQUEST) and not received:
                try:
                    answer = sock.recv(1)
                except OSError:
                    answer = b""
                if answer in (b"N", b"S", b"G"):
                    replies.append(("answer", answer.decode()))
                else:
                    received += answer
            time.sleep(0.15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        sock.close()
    return replies + _summarise(received), closed


@pytest.fixture(scope="module")
def startup_proxy(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = ProxyProcess(proxy_config(pg, sessions={"startup_timeout": 3}), Path(tmp_path_factory.mktemp("startup")))
    p.start()
    yield p
    p.stop()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_startup_script_answers_as_the_server(name: str, pg: DevCluster, startup_proxy: ProxyProcess) -> None:
    steps = SCRIPTS[name]
    direct = run_script(("127.0.0.1", pg.port), steps)
    proxied = run_script((startup_proxy.host, startup_proxy.port), steps)
    print(name, "server:", direct, "pgveil:", proxied)
    assert proxied == direct
    assert "Traceback" not in startup_proxy.logs()


@pytest.mark.parametrize("name", sorted(NEGOTIATING))
def test_negotiation_script_answers_as_the_server(name: str, pg: DevCluster, startup_proxy: ProxyProcess) -> None:
    steps = NEGOTIATING[name]
    assert pg.base_dir is not None
    direct = run_script(str(pg.base_dir / f".s.PGSQL.{pg.port}"), steps)
    proxied = run_script((startup_proxy.host, startup_proxy.port), steps)
    print(name, "server:", direct, "pgveil:", proxied)
    assert proxied == direct
    assert "Traceback" not in startup_proxy.logs()
