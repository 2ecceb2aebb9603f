"""Test tools for misbehaving on purpose: a fault-injecting TCP proxy and a raw wire-protocol client.

:class:`FaultProxy` sits between two real peers (typically pgveil and PostgreSQL) and forwards bytes with
one thread per direction per connection. A test can cut either side (RST) or both, stall a direction
(the pump stops reading, so kernel buffers fill and the sender feels backpressure), resume it, close a
connection after a given number of further bytes (mid-stream), or refuse new connections.

:class:`RawClient` speaks just enough of the PostgreSQL protocol (StartupMessage, cleartext and md5
passwords, simple Query, COPY) to log in and then send exactly the bytes a test wants, well-formed or not,
and to read back exactly what the proxy answers.

Both are test code: they bound every wait with a timeout and never talk to anything but loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["to_server", "to_client"]
Side = Literal["client", "server", "both"]
DIRECTIONS: tuple[Direction, ...] = ("to_server", "to_client")
_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Closes ``sock`` with an RST, waking any thread blocked reading it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # wakes a recv() in another thread without sending anything
    with contextlib.suppress(OSError):
        sock.close()


@dataclass(eq=False)
class Link:
    """One accepted client connection and its connection to the target."""

    client: socket.socket
    server: socket.socket
    forwarded: dict[Direction, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    # Bytes a direction may still forward before the link is cut; None = unlimited.
    budget: dict[Direction, int | None] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, None))
    closed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: set[Direction] = field(default_factory=set)

    def cut(self, side: Side = "both") -> None:
        with self.lock:
            if side in ("client", "both"):
                _reset(self.client)
            if side in ("server", "both"):
                _reset(self.server)
            if side == "both":
                self.closed.set()

    def end(self, direction: Direction, dst: socket.socket) -> None:
        """``direction`` reached end of stream: pass the FIN on; once both have, the link is done."""
        with self.lock:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            self.ended.add(direction)
            if len(self.ended) == len(DIRECTIONS):
                for s in (self.client, self.server):
                    with contextlib.suppress(OSError):
                        s.close()
                self.closed.set()


class FaultProxy:
    """A TCP forwarder on 127.0.0.1 with switches for faults. Use as a context manager."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self.links: list[Link] = []
        self.refusing = False
        self._flowing: dict[Direction, threading.Event] = {d: threading.Event() for d in DIRECTIONS}
        for ev in self._flowing.values():
            ev.set()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._links_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        t = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.resume()
        self.cut("both")
        for t in self._threads:
            t.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- switches --------------------------------------------------------------------------------------
    def cut(self, side: Side = "both") -> int:
        """Resets every open link on ``side``; returns how many links were open."""
        live = self.live_links()
        for link in live:
            link.cut(side)
        return len(live)

    def stall(self, direction: Direction | Literal["both"] = "both") -> None:
        """Stops forwarding ``direction`` (open and future links) until :meth:`resume`."""
        for d in DIRECTIONS if direction == "both" else (direction,):
            self._flowing[d].clear()

    def resume(self, direction: Direction | Literal["both"] = "both") -> None:
        for d in DIRECTIONS if direction == "both" else (direction,):
            self._flowing[d].set()

    def close_after(self, direction: Direction, nbytes: int) -> None:
        """Cuts each open link (RST on both sides) once ``nbytes`` more bytes went ``direction``."""
        for link in self.live_links():
            link.budget[direction] = nbytes

    def live_links(self) -> list[Link]:
        with self._links_lock:
            return [link for link in self.links if not link.closed.is_set()]

    def wait_for_links(self, n: int, timeout: float = 10.0) -> list[Link]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = self.live_links()
            if len(live) >= n:
                return live
            time.sleep(0.02)
        raise TimeoutError(f"faultproxy: expected {n} open links, have {len(self.live_links())}")

    # -- pumps -----------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            client.settimeout(None)
            server.settimeout(None)
            link = Link(client, server)
            with self._links_lock:
                self.links.append(link)
            for direction, src, dst in (("to_server", client, server), ("to_client", server, client)):
                t = threading.Thread(
                    target=self._pump, args=(link, direction, src, dst), name=f"faultproxy-{direction}", daemon=True
                )
                t.start()
                self._threads.append(t)

    def _pump(self, link: Link, direction: Direction, src: socket.socket, dst: socket.socket) -> None:
        flowing = self._flowing[direction]
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    link.end(direction, dst)
                    return
                while not flowing.wait(0.1):
                    if link.closed.is_set():
                        return
                budget = link.budget[direction]
                if budget is not None and len(data) >= budget:
                    dst.sendall(data[:budget])
                    link.forwarded[direction] += budget
                    link.cut("both")
                    return
                dst.sendall(data)
                link.forwarded[direction] += len(data)
                if budget is not None:
                    link.budget[direction] = budget - len(data)
        except OSError:
            # One side failed: fail the other the same way a dumb TCP relay would.
            link.cut("both")


# ---------------------------------------------------------------------------------------------------
# A raw protocol client
# ---------------------------------------------------------------------------------------------------

PROTOCOL_3 = 196608


def frame(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + struct.pack("!I", len(body) + 4) + body


def startup_packet(**params: str) -> bytes:
    body = struct.pack("!I", PROTOCOL_3)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\0")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by their one-letter code (S, V, C, M, D, ...)."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


@dataclass
class ServerError(Exception):
    fields: dict[str, str]

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    def __str__(self) -> str:
        return f"{self.fields.get('S', '?')} {self.sqlstate}: {self.fields.get('M', '')}"


class RawClient:
    """A blocking socket that speaks the protocol by hand. Every read has ``timeout`` seconds."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._buf = b""
        self.backend_pid: int | None = None
        self.parameters: dict[str, str] = {}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(_CHUNK)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def read_message(self) -> tuple[bytes, bytes] | None:
        """The next (type, body), or None at end of stream."""
        while len(self._buf) < 5:
            if not self._fill():
                return None
        (n,) = struct.unpack_from("!I", self._buf, 1)
        while len(self._buf) < 1 + n:
            if not self._fill():
                return None
        t, body, self._buf = self._buf[:1], self._buf[5 : 1 + n], self._buf[1 + n :]
        return t, body

    def read_until_closed(self) -> list[tuple[bytes, bytes]]:
        """Every message up to end of stream (a reset counts as the end)."""
        out: list[tuple[bytes, bytes]] = []
        with contextlib.suppress(ConnectionResetError):
            while (msg := self.read_message()) is not None:
                out.append(msg)
        return out

    def login(self, user: str, password: str, database: str) -> None:
        """Startup and password authentication (cleartext or md5) up to the first ReadyForQuery."""
        self.send(startup_packet(user=user, database=database, application_name="pgveil-raw-test"))
        while True:
            msg = self.read_message()
            if msg is None:
                raise ConnectionError("connection closed during startup")
            t, body = msg
            if t == b"R":
                (code,) = struct.unpack_from("!I", body)
                if code == 3:
                    self.send(frame(b"p", password.encode() + b"\0"))
                elif code == 5:
                    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
                    outer = hashlib.md5(inner + body[4:8]).hexdigest()
                    self.send(frame(b"p", b"md5" + outer.encode() + b"\0"))
                elif code != 0:
                    raise NotImplementedError(f"authentication method {code}")
            elif t == b"K":
                self.backend_pid = struct.unpack_from("!I", body)[0]
            elif t == b"S":
                name, value, _ = body.split(b"\0", 2)
                self.parameters[name.decode()] = value.decode()
            elif t == b"E":
                raise ServerError(parse_error_fields(body))
            elif t == b"Z":
                return

    def simple_query(self, sql: str) -> list[tuple[bytes, bytes]]:
        """Sends a Query and returns the messages up to ReadyForQuery; raises ServerError on an error."""
        self.send(query(sql))
        return self.read_until_ready()

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        error: ServerError | None = None
        while True:
            msg = self.read_message()
            if msg is None:
                raise ConnectionError("connection closed before ReadyForQuery")
            out.append(msg)
            if msg[0] == b"E":
                error = error or ServerError(parse_error_fields(msg[1]))
            if msg[0] == b"Z":
                if error is not None:
                    raise error
                return out

    def expect_fatal(self) -> dict[str, str]:
        """Reads to end of stream and returns the fields of the ErrorResponse received; fails if none."""
        messages = self.read_until_closed()
        errors = [parse_error_fields(body) for t, body in messages if t == b"E"]
        if not errors:
            raise AssertionError(f"no ErrorResponse before the connection closed; got {[t for t, _ in messages]}")
        return errors[-1]


@contextlib.contextmanager
def raw_session(host: str, port: int, user: str, password: str, database: str) -> Iterator[RawClient]:
    client = RawClient(host, port)
    try:
        client.login(user, password, database)
        yield client
    finally:
        client.close()
