"""Relay properties: pass-through is byte-identical however the network splits the stream, and no input,
however hostile, makes the relay raise: a violation becomes a FATAL 08P01 and a CloseConnection."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_captures import PSYCOPG_FEATURES, PSYCOPG_SESSION, Chunk

from proxy.errors import ProtocolViolation
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.relay import CloseConnection, Phase, Relay

STARTUP = codec.encode_startup(m.StartupMessage(m.PROTOCOL_3_0, (("user", "app"), ("database", "app"))))
BIG_VALUE = bytes(range(256)) * 4096  # 1 MiB


def fe(*msgs: m.FrontendMessage) -> bytes:
    return b"".join(codec.encode_frontend(x) for x in msgs)


def be(*msgs: m.BackendMessage) -> bytes:
    return b"".join(codec.encode_backend(x) for x in msgs)


def columns(*names: str) -> m.RowDescription:
    return m.RowDescription(tuple(m.FieldDescription(n, 16400, i + 1, 25, -1, -1, 0) for i, n in enumerate(names)))


def ready_relay() -> Relay:
    relay = Relay()
    relay.receive_client(STARTUP)
    relay.receive_server(be(m.Authentication(m.AuthCode.OK), m.BackendKeyData(1, 2), m.ReadyForQuery(b"I")))
    relay.to_client.clear()
    relay.events.clear()
    assert relay.phase is Phase.READY
    return relay


# A realistic mixed conversation: simple query with notices and a notification, LISTEN, COPY OUT, the
# extended protocol, COPY IN, a function call, a transaction.
CLIENT_STREAM = fe(
    m.Query("SELECT a, b FROM t"),
    m.Query("LISTEN ch"),
    m.Query("COPY t TO STDOUT"),
    m.Parse("s1", "SELECT a FROM t WHERE b = $1", (25,)),
    m.Bind("", "s1", (0,), (b"x",), (1,)),
    m.Describe(b"P", ""),
    m.Execute(""),
    m.Sync(),
    m.Query("COPY t FROM STDIN"),
    m.CopyData(b"1\tone\n"),
    m.CopyData(b"2\ttwo\n"),
    m.CopyDone(),
    m.FunctionCall(1598, (), (), 0),
    m.Query("BEGIN"),
    m.Parse("", "SELECT 1"),
    m.Bind("c", "", (), (), ()),
    m.Execute("c", 1),
    m.Sync(),
)
SERVER_STREAM = be(
    columns("a", "b"),
    m.DataRow((b"1", None)),
    m.NoticeResponse(((b"S", "NOTICE"), (b"M", "hello"))),
    m.DataRow((b"2", b"two")),
    m.CommandComplete("SELECT 2"),
    m.ReadyForQuery(b"I"),
    m.CommandComplete("LISTEN"),
    m.ReadyForQuery(b"I"),
    m.NotificationResponse(7, "ch", "payload"),
    m.CopyOutResponse(0, (0, 0)),
    m.CopyData(b"1\tone\n"),
    m.CopyData(b"2\ttwo\n"),
    m.CopyDone(),
    m.CommandComplete("COPY 2"),
    m.ReadyForQuery(b"I"),
    m.ParseComplete(),
    m.BindComplete(),
    columns("a"),
    m.DataRow((b"\x00\x01",)),
    m.CommandComplete("SELECT 1"),
    m.ParameterStatus("TimeZone", "UTC"),
    m.ReadyForQuery(b"I"),
    m.CopyInResponse(0, (0, 0)),
    m.CommandComplete("COPY 2"),
    m.ReadyForQuery(b"I"),
    m.FunctionCallResponse(b"\x00\x00\x00\x01"),
    m.ReadyForQuery(b"I"),
    m.CommandComplete("BEGIN"),
    m.ReadyForQuery(b"T"),
    m.ParseComplete(),
    m.BindComplete(),
    m.DataRow((b"1",)),
    m.PortalSuspended(),
    m.ReadyForQuery(b"T"),
)
BIG_CLIENT_STREAM = fe(m.Query("SELECT big FROM t"), m.Query("COPY t FROM STDIN"), m.CopyData(BIG_VALUE), m.CopyDone())
BIG_SERVER_STREAM = be(
    columns("big"),
    m.DataRow((BIG_VALUE,)),
    m.DataRow((BIG_VALUE[:1000], None, BIG_VALUE[:10])),
    m.CommandComplete("SELECT 2"),
    m.ReadyForQuery(b"I"),
    m.CopyInResponse(0, (0,)),
    m.CommandComplete("COPY 1"),
    m.ReadyForQuery(b"I"),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def run(client_chunks: list[bytes], server_chunks: list[bytes]) -> tuple[Relay, bytes, bytes]:
    relay = ready_relay()
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    for piece in client_chunks:
        relay.receive_client(piece)
        to_server.extend(relay.to_server)
        relay.to_server.clear()
    for piece in server_chunks:
        relay.receive_server(piece)
        to_client.extend(relay.to_client)
        relay.to_client.clear()
    return relay, b"".join(to_server), b"".join(to_client)


def assert_clean_end(relay: Relay, *, statements: set[str], portals: set[str], status: bytes) -> None:
    assert relay.events == []
    assert relay.phase is Phase.READY
    assert not relay.pending
    assert set(relay.statements) == statements
    assert set(relay.portals) == portals
    assert relay.transaction_status == status
    assert relay.client_at_boundary
    assert not relay.has_buffered_client_bytes


cut_points = st.lists(st.integers(0, 2**31), max_size=60)


@given(cut_points, cut_points)
def test_mixed_stream_passes_through_byte_identical_for_any_split(
    client_cuts: list[int], server_cuts: list[int]
) -> None:
    relay, to_server, to_client = run(chunked(CLIENT_STREAM, client_cuts), chunked(SERVER_STREAM, server_cuts))
    assert to_server == CLIENT_STREAM
    assert to_client == SERVER_STREAM
    assert_clean_end(relay, statements={"s1", ""}, portals={"c"}, status=b"T")
    assert relay.parameters["TimeZone"] == "UTC"
    assert relay.client_messages == 1 + 18
    assert relay.server_messages == 3 + 34


def test_mixed_stream_in_single_bytes() -> None:
    client_chunks = [CLIENT_STREAM[i : i + 1] for i in range(len(CLIENT_STREAM))]
    server_chunks = [SERVER_STREAM[i : i + 1] for i in range(len(SERVER_STREAM))]
    relay, to_server, to_client = run(client_chunks, server_chunks)
    assert to_server == CLIENT_STREAM
    assert to_client == SERVER_STREAM
    assert_clean_end(relay, statements={"s1", ""}, portals={"c"}, status=b"T")


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.integers(0, len(BIG_CLIENT_STREAM)), max_size=40), st.lists(st.integers(0, 2**31), max_size=40))
def test_megabyte_row_and_copy_data_pass_through_for_any_split(client_cuts: list[int], server_cuts: list[int]) -> None:
    relay, to_server, to_client = run(chunked(BIG_CLIENT_STREAM, client_cuts), chunked(BIG_SERVER_STREAM, server_cuts))
    assert to_server == BIG_CLIENT_STREAM
    assert to_client == BIG_SERVER_STREAM
    assert_clean_end(relay, statements=set(), portals=set(), status=b"I")


def test_megabyte_row_is_never_buffered_whole() -> None:
    relay = ready_relay()
    relay.receive_client(fe(m.Query("SELECT big FROM t")))
    head = be(columns("big"))
    row = be(m.DataRow((BIG_VALUE,)))
    relay.receive_server(head + row[:100])
    sent = b"".join(relay.to_client)
    assert sent == head + row[:100]  # the start of the row is on its way before the rest has arrived
    assert not relay.client_at_boundary


@st.composite
def resplit(draw: st.DrawFn, capture: tuple[Chunk, ...]) -> list[Chunk]:
    """The capture in its real order, each recv() further cut at random points."""
    out: list[Chunk] = []
    for direction, data in capture:
        cuts = draw(st.lists(st.integers(0, len(data)), max_size=6))
        out.extend((direction, piece) for piece in chunked(data, cuts))
    return out


def replay(chunks: list[Chunk]) -> tuple[Relay, bytes, bytes]:
    relay = Relay()
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    for direction, data in chunks:
        if direction == "C":
            relay.receive_client(data)
        else:
            relay.receive_server(data)
        to_server.extend(relay.to_server)
        relay.to_server.clear()
        to_client.extend(relay.to_client)
        relay.to_client.clear()
    return relay, b"".join(to_server), b"".join(to_client)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([PSYCOPG_SESSION, PSYCOPG_FEATURES]).flatmap(resplit))
def test_captured_conversations_survive_any_resplit(chunks: list[Chunk]) -> None:
    relay, to_server, to_client = replay(chunks)
    client_bytes = b"".join(d for t, d in chunks if t == "C")
    startup_length = int.from_bytes(client_bytes[:4], "big")
    assert to_server == client_bytes[startup_length:]  # the session sends the startup packet itself
    assert to_client == b"".join(d for t, d in chunks if t == "S")
    assert [type(e).__name__ for e in relay.events] == [
        "StartupReceived",
        "Authenticated",
        "SessionReady",
        "CloseConnection",
    ]
    assert relay.events[-1] == CloseConnection()
    assert not relay.pending


# -- hostile input ------------------------------------------------------------------------------------


def relay_in(phase: str) -> Relay:
    if phase == "startup":
        return Relay()
    if phase == "authenticating":
        relay = Relay()
        relay.receive_client(STARTUP)
        return relay
    relay = ready_relay()
    if phase == "extended":
        relay.receive_client(fe(m.Parse("s", "SELECT 1"), m.Bind("", "s", (), (), ()), m.Describe(b"P", "")))
        relay.receive_client(fe(m.Execute(""), m.Sync(), m.Query("COPY t FROM STDIN")))
    return relay


phases = st.sampled_from(["startup", "authenticating", "ready", "extended"])
operations = st.lists(st.tuples(st.sampled_from(["C", "S"]), st.binary(max_size=64)), min_size=1, max_size=12)


def check_outcome(relay: Relay) -> None:
    """Whatever happened, the relay is in a consistent state; a violation closed it with an error."""
    closes = [e for e in relay.events if isinstance(e, CloseConnection)]
    assert len(closes) <= 1
    if closes:
        assert relay.phase is Phase.CLOSED
        error = closes[0].error
        if error is not None:
            assert isinstance(error, ProtocolViolation)
            # 0A000: an unsupported protocol version at startup, as the server reports it.
            assert error.sqlstate in ("08P01", "0A000")
            assert error.peer in ("client", "server")
            if relay.client_at_boundary:
                # The client is told why, in the last bytes it receives (in protocol 2's format if it
                # asked for protocol 2).
                fatal = relay.to_client[-1]
                if fatal != b"EFATAL:  " + error.message.encode() + b"\n\x00":
                    t, n = codec.read_header(fatal, 0)
                    assert 1 + n == len(fatal)
                    decoded = codec.decode_backend(t, fatal[5:])
                    assert isinstance(decoded, m.ErrorResponse)
                    assert (decoded.severity, decoded.sqlstate) == ("FATAL", error.sqlstate)
                    assert decoded.field(b"M") == error.message


def feed(relay: Relay, ops: list[tuple[str, bytes]]) -> None:
    for direction, data in ops:
        closed = relay.phase is Phase.CLOSED
        before = len(relay.to_client), len(relay.to_server)
        if direction == "C":
            relay.receive_client(data)
        else:
            relay.receive_server(data)
        if closed:
            assert (len(relay.to_client), len(relay.to_server)) == before  # nothing moves after the end


@given(phases, operations)
def test_arbitrary_bytes_never_raise(phase: str, ops: list[tuple[str, bytes]]) -> None:
    relay = relay_in(phase)
    feed(relay, ops)
    check_outcome(relay)


@given(
    phases,
    st.sampled_from([b"Q", b"P", b"B", b"D", b"E", b"C", b"S", b"F", b"d", b"p", b"X", b"\x00"]),
    st.binary(max_size=32),
)
def test_arbitrary_frontend_bodies_never_raise(phase: str, type_byte: bytes, body: bytes) -> None:
    relay = relay_in(phase)
    relay.receive_client(codec.frame(type_byte, body))
    check_outcome(relay)


@given(
    phases,
    st.sampled_from([bytes([t]) for t in sorted(codec.BACKEND_TYPES)] + [b"\x00", b"Q"]),
    st.binary(max_size=32),
)
def test_arbitrary_backend_bodies_never_raise(phase: str, type_byte: bytes, body: bytes) -> None:
    relay = relay_in(phase)
    relay.receive_server(codec.frame(type_byte, body))
    check_outcome(relay)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_captures_never_raise(data: st.DataObject) -> None:
    capture = data.draw(st.sampled_from([PSYCOPG_SESSION, PSYCOPG_FEATURES]))
    chunks = list(capture)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(chunks) - 1))
        direction, chunk = chunks[i]
        mutated = bytearray(chunk)
        j = data.draw(st.integers(0, len(mutated) - 1))
        mutated[j] = data.draw(st.integers(0, 255))
        chunks[i] = (direction, bytes(mutated))
    relay = Relay()
    feed(relay, list(chunks))
    check_outcome(relay)
