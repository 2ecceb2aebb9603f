"""Relay: a whole conversation driven with bytes only: startup, authentication, the extended protocol's
bookkeeping, COPY, pipelining, and the violations that end a session.

Server replies follow the PostgreSQL docs ("Message Flow": "Start-up", "Simple Query", "Extended Query",
"Pipelining", "COPY Operations", "Function Call"); ``protocol_captures`` supplies real conversations.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from protocol_captures import PSYCOPG_FEATURES, PSYCOPG_SESSION, Chunk

from proxy.errors import ProtocolViolation
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.relay import (
    Authenticated,
    CancelReceived,
    CloseConnection,
    Event,
    Expect,
    Phase,
    Relay,
    SessionReady,
    StartupReceived,
    TLSRequested,
)

USER = "app"
STARTUP = m.StartupMessage(m.PROTOCOL_3_0, (("user", USER), ("database", "app"), ("options", "-c geqo=off")))
INT4 = 23
TEXT = 25


def fe(*msgs: m.FrontendMessage) -> bytes:
    return b"".join(codec.encode_frontend(x) for x in msgs)


def be(*msgs: m.BackendMessage) -> bytes:
    return b"".join(codec.encode_backend(x) for x in msgs)


def row_description(*names: str, table_oid: int = 0, type_oid: int = TEXT) -> m.RowDescription:
    return m.RowDescription(
        tuple(
            m.FieldDescription(n, table_oid, i + 1 if table_oid else 0, type_oid, -1, -1, 0)
            for i, n in enumerate(names)
        )
    )


def raw(rd: m.RowDescription) -> bytes:
    """The RowDescription body, as the relay keeps it (decoded only when a hook needs it)."""
    return codec.encode_row_description_body(rd)


def client(relay: Relay, data: bytes) -> bytes:
    """Feeds client bytes; returns (and clears) what the relay would send to the server."""
    relay.receive_client(data)
    out = b"".join(relay.to_server)
    relay.to_server.clear()
    return out


def server(relay: Relay, data: bytes) -> bytes:
    """Feeds server bytes; returns (and clears) what the relay would send to the client."""
    relay.receive_server(data)
    out = b"".join(relay.to_client)
    relay.to_client.clear()
    return out


def take_events(relay: Relay) -> list[Event]:
    events = list(relay.events)
    relay.events.clear()
    return events


def ready_relay(max_message_size: int = codec.MAX_MESSAGE_SIZE) -> Relay:
    """A relay past startup and authentication, with its outputs drained."""
    relay = Relay(max_message_size=max_message_size)
    client(relay, codec.encode_startup(STARTUP))
    server(
        relay,
        be(
            m.Authentication(m.AuthCode.OK),
            m.ParameterStatus("server_version", "15.20"),
            m.BackendKeyData(4242, 99),
            m.ReadyForQuery(b"I"),
        ),
    )
    take_events(relay)
    assert relay.phase is Phase.READY
    return relay


def closed_by(relay: Relay, peer: str) -> ProtocolViolation:
    """Asserts the relay ended the session because ``peer`` broke the protocol; returns the violation."""
    closes = [e for e in relay.events if isinstance(e, CloseConnection)]
    assert len(closes) == 1
    assert relay.phase is Phase.CLOSED
    error = closes[0].error
    assert isinstance(error, ProtocolViolation)
    assert error.peer == peer
    assert error.sqlstate == "08P01"
    return error


def fatal_sent(data: bytes) -> m.ErrorResponse:
    """``data`` ends with the proxy's FATAL 08P01; returns it decoded."""
    frames = split(data)
    last = codec.decode_backend(*frames[-1])
    assert isinstance(last, m.ErrorResponse)
    assert (last.severity, last.sqlstate) == ("FATAL", "08P01")
    return last


def split(data: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        t, n = codec.read_header(data, pos)
        out.append((t, data[pos + 5 : pos + 1 + n]))
        pos += 1 + n
    return out


def replay(relay: Relay, capture: Iterable[Chunk]) -> tuple[bytes, bytes]:
    """Feeds a captured conversation (startup packet included); returns (to_server, to_client) joined."""
    to_server = b""
    to_client = b""
    for direction, data in capture:
        if direction == "C":
            to_server += client(relay, data)
        else:
            to_client += server(relay, data)
    return to_server, to_client


# -- startup ------------------------------------------------------------------------------------------


def test_startup_message_is_handed_to_the_session_verbatim() -> None:
    relay = Relay()
    packet = codec.encode_startup(STARTUP)
    assert client(relay, packet) == b""  # the session sends the raw packet upstream itself
    assert relay.events == [StartupReceived(STARTUP, packet)]
    event = relay.events[0]
    assert isinstance(event, StartupReceived)
    assert event.raw == packet
    assert relay.phase is Phase.AUTHENTICATING
    assert relay.startup == STARTUP


def test_startup_message_split_into_single_bytes() -> None:
    relay = Relay()
    packet = codec.encode_startup(STARTUP)
    for i in range(len(packet)):
        relay.receive_client(packet[i : i + 1])
        assert bool(relay.events) is (i == len(packet) - 1)
    assert relay.events == [StartupReceived(STARTUP, packet)]


def test_ssl_request_asks_the_session_for_tls_then_startup_follows() -> None:
    relay = Relay()
    assert client(relay, codec.encode_startup(m.SSLRequest())) == b""
    assert take_events(relay) == [TLSRequested()]
    assert relay.phase is Phase.STARTUP
    assert not relay.has_buffered_client_bytes
    client(relay, codec.encode_startup(STARTUP))
    assert take_events(relay) == [StartupReceived(STARTUP, codec.encode_startup(STARTUP))]


def test_bytes_pipelined_after_ssl_request_are_held_back_for_the_session_to_refuse() -> None:
    # CVE-2021-23214: plaintext sent before the TLS handshake must not be read as if it came over TLS.
    relay = Relay()
    client(relay, codec.encode_startup(m.SSLRequest()) + codec.encode_startup(STARTUP))
    assert take_events(relay) == [TLSRequested()]
    assert relay.has_buffered_client_bytes
    assert relay.startup is None


def test_gssenc_request_is_declined_and_startup_continues() -> None:
    relay = Relay()
    client(relay, codec.encode_startup(m.GSSENCRequest()))
    assert b"".join(relay.to_client) == b"N"
    relay.to_client.clear()
    client(relay, codec.encode_startup(STARTUP))
    assert relay.events == [StartupReceived(STARTUP, codec.encode_startup(STARTUP))]


def test_bytes_pipelined_after_gssenc_request_are_refused_as_the_server_does() -> None:
    relay = Relay()
    client(relay, codec.encode_startup(m.GSSENCRequest()) + codec.encode_startup(STARTUP))
    assert b"".join(relay.to_client).startswith(b"N")
    assert b"received unencrypted data after GSSAPI encryption request" in b"".join(relay.to_client)
    assert relay.startup is None
    assert relay.phase is Phase.CLOSED


def test_cancel_request_is_handed_to_the_session_and_ends_the_connection() -> None:
    relay = Relay()
    packet = codec.encode_startup(m.CancelRequest(4242, -7))
    client(relay, packet)
    assert relay.events == [CancelReceived(packet, 4242)]
    assert relay.phase is Phase.CLOSED
    assert relay.to_client == []


@pytest.mark.parametrize(
    "packet",
    [
        b"\x00\x00\x00\x09\x00\x03\x00\x00u",  # unterminated parameter name
    ],
    ids=["unterminated"],
)
def test_invalid_startup_packets_get_a_fatal_error(packet: bytes) -> None:
    relay = Relay()
    relay.receive_client(packet)
    closed_by(relay, "client")
    fatal_sent(b"".join(relay.to_client))
    assert relay.to_server == []


def test_protocol_4_gets_the_servers_fatal() -> None:
    relay = Relay()
    relay.receive_client(b"\x00\x00\x00\x09\x00\x04\x00\x00\x00")
    (frame,) = split(b"".join(relay.to_client))
    error = codec.decode_backend(*frame)
    assert isinstance(error, m.ErrorResponse)
    assert (error.severity, error.sqlstate) == ("FATAL", "0A000")
    assert error.field(b"M") == "unsupported frontend protocol 4.0: server supports 3.0 to 3.0"


def test_protocol_2_gets_the_servers_old_style_fatal() -> None:
    relay = Relay()
    relay.receive_client(b"\x00\x00\x00\x0d\x00\x02\x00\x00user\x00\x00")
    assert b"".join(relay.to_client) == b"EFATAL:  unsupported frontend protocol 2.0: server supports 3.0 to 3.0\n\x00"
    assert relay.phase is Phase.CLOSED


@pytest.mark.parametrize(
    "packet",
    [
        b"\x00\x00\x00\x04",  # too short to hold a code
        b"\x00\x00\x27\x15",  # longer than PostgreSQL's 10000-byte limit after the length word
        fe(m.Terminate()),  # a driver's connect() and at once end()
        b"GET / HTTP/1.1\r\n",
        b"\x00\x00\x00\x14\x04\xd2\x16\x2e" + b"\x00" * 12,  # CancelRequest of 20 bytes
    ],
    ids=["short", "long", "terminate", "http", "cancel-length"],
)
def test_packets_that_cannot_start_a_session_close_it_without_a_word(packet: bytes) -> None:
    # postmaster.c logs these as COMMERROR and closes; so does pgveil.
    relay = Relay()
    relay.receive_client(packet)
    assert relay.phase is Phase.CLOSED
    assert relay.events == [CloseConnection()]
    assert relay.to_client == []
    assert relay.to_server == []


# -- authentication -----------------------------------------------------------------------------------


def test_channel_binding_mechanisms_are_not_offered_to_the_client() -> None:
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    take_events(relay)
    sasl = m.Authentication(m.AuthCode.SASL, b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00")
    notice = m.NoticeResponse(((b"M", "hello"),))
    out = server(relay, be(notice, sasl, notice))
    assert out == be(notice, m.Authentication(m.AuthCode.SASL, b"SCRAM-SHA-256\x00\x00"), notice)


def test_sasl_without_channel_binding_passes_unchanged() -> None:
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    data = be(m.Authentication(m.AuthCode.SASL, b"SCRAM-SHA-256\x00\x00"))
    assert server(relay, data) == data


def test_authentication_exchange_is_relayed_untouched() -> None:
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    take_events(relay)
    md5 = be(m.Authentication(m.AuthCode.MD5_PASSWORD, b"salt"))
    assert server(relay, md5) == md5
    password = codec.frame(b"p", b"md5" + b"0" * 32 + b"\x00")
    assert client(relay, password) == password
    rest = be(
        m.Authentication(m.AuthCode.OK),
        m.ParameterStatus("client_encoding", "UTF8"),
        m.ParameterStatus("TimeZone", "UTC"),
        m.BackendKeyData(4242, 99),
        m.ReadyForQuery(b"I"),
    )
    assert server(relay, rest) == rest
    assert take_events(relay) == [Authenticated(USER), SessionReady()]
    assert relay.login_role == USER
    assert relay.parameters == {"client_encoding": "UTF8", "TimeZone": "UTC"}
    assert relay.backend_key == m.BackendKeyData(4242, 99)
    assert relay.phase is Phase.READY
    assert relay.transaction_status == b"I"


def test_failed_authentication_is_relayed_and_marks_the_server_fatal() -> None:
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    take_events(relay)
    error = be(m.ErrorResponse(((b"S", "FATAL"), (b"V", "FATAL"), (b"C", "28P01"), (b"M", "password failed"))))
    assert server(relay, be(m.Authentication(m.AuthCode.CLEARTEXT_PASSWORD)) + error).endswith(error)
    assert relay.server_fatal
    assert relay.events == []
    assert relay.login_role is None


def test_query_before_authentication_completes_is_a_client_violation() -> None:
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    take_events(relay)
    assert client(relay, fe(m.Query("SELECT 1"))) == b""
    closed_by(relay, "client")


def test_row_description_during_authentication_is_a_server_violation() -> None:
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    take_events(relay)
    server(relay, be(row_description("a")))
    closed_by(relay, "server")


def test_terminate_during_authentication_is_the_servers_to_answer() -> None:
    # The server answers FATAL 08P01 "expected password response" if it awaits one, else closes.
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    take_events(relay)
    assert client(relay, fe(m.Terminate()) + fe(m.Query("SELECT 1"))) == fe(m.Terminate())
    assert relay.client_terminated
    assert relay.events == []
    assert client(relay, fe(m.Query("SELECT 2"))) == b""


def test_other_message_while_the_server_awaits_a_password_passes_only_its_type_byte() -> None:
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    take_events(relay)
    server(relay, be(m.Authentication(m.AuthCode.CLEARTEXT_PASSWORD)))
    assert client(relay, fe(m.Query("SELECT 1"))) == b"Q"
    assert relay.client_terminated


def test_captured_psycopg_session_end_to_end() -> None:
    relay = Relay()
    to_server, to_client = replay(relay, PSYCOPG_SESSION)
    client_bytes = b"".join(d for t, d in PSYCOPG_SESSION if t == "C")
    server_bytes = b"".join(d for t, d in PSYCOPG_SESSION if t == "S")
    startup = PSYCOPG_SESSION[0][1]
    assert to_server == client_bytes[len(startup) :]
    assert to_client == server_bytes
    assert relay.events == [
        StartupReceived(codec.decode_startup(startup[4:]), startup),  # type: ignore[arg-type]
        Authenticated("postgres"),
        SessionReady(),
        CloseConnection(),
    ]
    assert relay.parameters["server_version"].startswith("15.")
    assert relay.backend_key is not None
    assert relay.backend_key.process_id == 0x2602
    # COMMIT came as a simple Query, which destroys the unnamed statement ("Extended Query": "a simple
    # Query message also destroys the unnamed statement") and ended the transaction with its portals.
    assert "" not in relay.statements
    assert relay.portals == {}
    assert not relay.pending
    assert relay.client_bytes == len(client_bytes)
    assert relay.server_bytes == len(server_bytes)


def test_captured_features_session_end_to_end() -> None:
    relay = Relay()
    to_server, to_client = replay(relay, PSYCOPG_FEATURES)
    startup = PSYCOPG_FEATURES[0][1]
    assert to_server == b"".join(d for t, d in PSYCOPG_FEATURES if t == "C")[len(startup) :]
    assert to_client == b"".join(d for t, d in PSYCOPG_FEATURES if t == "S")
    assert [type(e) for e in relay.events] == [StartupReceived, Authenticated, SessionReady, CloseConnection]
    assert relay.events[-1] == CloseConnection()
    stmt = relay.statements["_pg3_0"]
    assert stmt.query == "SELECT id, v FROM t WHERE id = $1"
    assert stmt.param_types == (21,)
    assert not relay.pending


# -- simple query -------------------------------------------------------------------------------------


def test_simple_query_with_several_statements() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("SELECT 3; SELECT 4")))
    assert [p.expect for p in relay.pending] == [Expect.QUERY]
    rd = row_description("?column?")
    server(relay, be(rd, m.DataRow((b"3",))))
    assert relay.current_result == raw(rd)
    server(relay, be(m.CommandComplete("SELECT 1")))
    assert relay.current_result is None
    assert [p.expect for p in relay.pending] == [Expect.QUERY]
    server(relay, be(rd, m.DataRow((b"4",)), m.CommandComplete("SELECT 1")))
    assert [p.expect for p in relay.pending] == [Expect.QUERY]
    server(relay, be(m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert relay.events == []


def test_simple_query_error_then_ready() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("SELECT 1; SELECT 1/0; SELECT 2")))
    server(relay, be(row_description("a"), m.DataRow((b"1",)), m.CommandComplete("SELECT 1")))
    server(relay, be(m.ErrorResponse(((b"S", "ERROR"), (b"C", "22012")))))
    assert [p.expect for p in relay.pending] == [Expect.QUERY]
    server(relay, be(m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert not relay.server_fatal


def test_empty_query() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("")))
    server(relay, be(m.EmptyQueryResponse(), m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert relay.events == []


def test_transaction_status_follows_ready_for_query() -> None:
    relay = ready_relay()
    for query, status in (("BEGIN", b"T"), ("SELECT 1/0", b"E"), ("ROLLBACK", b"I")):
        client(relay, fe(m.Query(query)))
        server(relay, be(m.CommandComplete(query), m.ReadyForQuery(status)))
        assert relay.transaction_status == status
    assert relay.events == []


def test_asynchronous_messages_need_no_request() -> None:
    relay = ready_relay()
    data = be(
        m.NoticeResponse(((b"S", "WARNING"), (b"M", "w"))),
        m.NotificationResponse(1, "ch", "payload"),
        m.ParameterStatus("TimeZone", "Europe/Paris"),
    )
    assert server(relay, data) == data
    assert relay.parameters["TimeZone"] == "Europe/Paris"
    assert relay.events == []


# -- extended query -----------------------------------------------------------------------------------


def test_parse_complete_creates_the_statement() -> None:
    relay = ready_relay()
    client(relay, fe(m.Parse("s1", "SELECT $1", (INT4,)), m.Sync()))
    assert "s1" not in relay.statements  # only once the server has accepted it
    server(relay, be(m.ParseComplete()))
    stmt = relay.statements["s1"]
    assert (stmt.name, stmt.query, stmt.param_types) == ("s1", "SELECT $1", (INT4,))
    server(relay, be(m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert "s1" in relay.statements  # statements outlive transactions


def test_describe_statement_records_parameters_and_columns() -> None:
    relay = ready_relay()
    client(relay, fe(m.Parse("s1", "SELECT a, b FROM t WHERE a = $1"), m.Describe(b"S", "s1"), m.Sync()))
    pd = m.ParameterDescription((INT4,))
    rd = row_description("a", "b", table_oid=16400)
    server(relay, be(m.ParseComplete(), pd))
    assert [p.expect for p in relay.pending] == [Expect.DESCRIBE_STATEMENT, Expect.SYNC]
    server(relay, be(rd, m.ReadyForQuery(b"I")))
    stmt = relay.statements["s1"]
    assert stmt.parameter_description == pd
    assert stmt.row_description == raw(rd)
    assert not relay.pending


def test_describe_statement_without_result_gets_no_data() -> None:
    relay = ready_relay()
    client(relay, fe(m.Parse("ins", "INSERT INTO t VALUES ($1)"), m.Describe(b"S", "ins"), m.Sync()))
    server(relay, be(m.ParseComplete(), m.ParameterDescription((TEXT,)), m.NoData(), m.ReadyForQuery(b"I")))
    assert relay.statements["ins"].row_description is None
    assert relay.statements["ins"].parameter_description == m.ParameterDescription((TEXT,))
    assert not relay.pending


def test_bind_creates_a_portal_and_execute_completes() -> None:
    relay = ready_relay()
    rd = row_description("a", table_oid=16400)
    client(relay, fe(m.Parse("s1", "SELECT a FROM t"), m.Describe(b"S", "s1"), m.Sync()))
    server(relay, be(m.ParseComplete(), m.ParameterDescription(()), rd, m.ReadyForQuery(b"I")))
    client(relay, fe(m.Query("BEGIN")))
    server(relay, be(m.CommandComplete("BEGIN"), m.ReadyForQuery(b"T")))
    client(relay, fe(m.Bind("c1", "s1", (), (), (1,)), m.Execute("c1", 0), m.Sync()))
    assert [p.expect for p in relay.pending] == [Expect.BIND, Expect.EXECUTE, Expect.SYNC]
    server(relay, be(m.BindComplete()))
    portal = relay.portals["c1"]
    assert portal.statement is relay.statements["s1"]
    assert portal.result_formats == (1,)
    assert portal.row_description == raw(rd)  # inherited from the described statement
    server(relay, be(m.DataRow((b"x",)), m.CommandComplete("SELECT 1")))
    assert [p.expect for p in relay.pending] == [Expect.SYNC]
    server(relay, be(m.ReadyForQuery(b"T")))
    assert not relay.pending
    assert "c1" in relay.portals  # 'T': the transaction, and so the portal, is still open
    client(relay, fe(m.Query("COMMIT")))
    server(relay, be(m.CommandComplete("COMMIT"), m.ReadyForQuery(b"I")))
    assert relay.portals == {}  # 'I': the transaction ended and took its portals with it


def test_describe_portal_records_the_result_description() -> None:
    relay = ready_relay()
    client(
        relay, fe(m.Parse("", "SELECT 1"), m.Bind("", "", (), (), ()), m.Describe(b"P", ""), m.Execute(""), m.Sync())
    )
    rd = row_description("one", type_oid=INT4)
    server(relay, be(m.ParseComplete(), m.BindComplete(), rd))
    assert relay.portals[""].row_description == raw(rd)
    server(relay, be(m.DataRow((b"1",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert relay.portals == {}


def test_close_removes_statement_and_portal() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("BEGIN")))
    server(relay, be(m.CommandComplete("BEGIN"), m.ReadyForQuery(b"T")))
    client(relay, fe(m.Parse("s1", "SELECT 1"), m.Bind("p1", "s1", (), (), ()), m.Sync()))
    server(relay, be(m.ParseComplete(), m.BindComplete(), m.ReadyForQuery(b"T")))
    assert set(relay.statements) == {"s1"}
    assert set(relay.portals) == {"p1"}
    client(relay, fe(m.Close(b"P", "p1"), m.Close(b"S", "s1"), m.Sync()))
    server(relay, be(m.CloseComplete()))
    assert relay.portals == {}
    assert "s1" in relay.statements
    server(relay, be(m.CloseComplete(), m.ReadyForQuery(b"T")))
    assert relay.statements == {}
    assert not relay.pending


def test_close_of_an_unknown_name_is_not_an_error() -> None:
    # The server answers CloseComplete even when nothing had that name ("Extended Query", Close).
    relay = ready_relay()
    client(relay, fe(m.Close(b"S", "nope"), m.Sync()))
    server(relay, be(m.CloseComplete(), m.ReadyForQuery(b"I")))
    assert relay.events == []
    assert not relay.pending


def test_portal_suspended_with_max_rows() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("BEGIN")))
    server(relay, be(m.CommandComplete("BEGIN"), m.ReadyForQuery(b"T")))
    client(relay, fe(m.Parse("", "SELECT g FROM generate_series(1, 3) g"), m.Bind("cur", "", (), (), ())))
    client(relay, fe(m.Execute("cur", 2), m.Sync()))
    server(relay, be(m.ParseComplete(), m.BindComplete(), m.DataRow((b"1",)), m.DataRow((b"2",))))
    server(relay, be(m.PortalSuspended(), m.ReadyForQuery(b"T")))
    assert not relay.pending
    client(relay, fe(m.Execute("cur", 2), m.Sync()))
    server(relay, be(m.DataRow((b"3",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"T")))
    assert not relay.pending
    assert "cur" in relay.portals
    assert relay.events == []


def test_execute_of_an_empty_query() -> None:
    relay = ready_relay()
    client(relay, fe(m.Parse("", ""), m.Bind("", "", (), (), ()), m.Describe(b"P", ""), m.Execute(""), m.Sync()))
    server(relay, be(m.ParseComplete(), m.BindComplete(), m.NoData(), m.EmptyQueryResponse(), m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert relay.events == []


def test_flush_expects_no_reply() -> None:
    relay = ready_relay()
    client(relay, fe(m.Parse("s1", "SELECT 1"), m.Flush()))
    assert [p.expect for p in relay.pending] == [Expect.PARSE]
    server(relay, be(m.ParseComplete()))
    assert not relay.pending
    assert "s1" in relay.statements


def test_pipelined_statements_before_one_sync() -> None:
    relay = ready_relay()
    batch: list[m.FrontendMessage] = [
        m.Parse("a", "INSERT INTO t VALUES ($1)"),
        m.Bind("", "a", (), (b"1",), ()),
        m.Execute(""),
        m.Parse("b", "SELECT v FROM t"),
        m.Bind("", "b", (), (), (1,)),
        m.Describe(b"P", ""),
        m.Execute(""),
        m.Sync(),
    ]
    client(relay, fe(*batch))
    assert len(relay.pending) == 8
    rd = row_description("v", table_oid=16400)
    server(relay, be(m.ParseComplete(), m.BindComplete(), m.CommandComplete("INSERT 0 1")))
    assert relay.portals[""].statement.name == "a"
    server(relay, be(m.ParseComplete(), m.BindComplete(), rd))
    assert relay.portals[""].statement.name == "b"
    assert relay.portals[""].result_formats == (1,)
    assert relay.portals[""].row_description == raw(rd)
    server(relay, be(m.DataRow((b"x",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert set(relay.statements) == {"a", "b"}
    assert relay.events == []


def test_several_syncs_in_one_pipeline() -> None:
    relay = ready_relay()
    client(relay, fe(m.Parse("a", "SELECT 1"), m.Sync(), m.Parse("b", "SELECT 2"), m.Sync()))
    server(relay, be(m.ParseComplete(), m.ReadyForQuery(b"I")))
    assert [p.expect for p in relay.pending] == [Expect.PARSE, Expect.SYNC]
    server(relay, be(m.ParseComplete(), m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert set(relay.statements) == {"a", "b"}


def test_error_in_a_pipeline_skips_to_the_sync_and_later_replies_still_match() -> None:
    relay = ready_relay()
    client(
        relay,
        fe(
            m.Parse("a", "SELECT 1/0"),
            m.Bind("", "a", (), (), ()),
            m.Execute(""),
            m.Parse("never", "SELECT 2"),  # the server discards this one
            m.Sync(),
            m.Parse("c", "SELECT 3"),
            m.Bind("", "c", (), (), ()),
            m.Execute(""),
            m.Sync(),
        ),
    )
    server(relay, be(m.ParseComplete(), m.BindComplete(), m.ErrorResponse(((b"S", "ERROR"), (b"C", "22012")))))
    assert [p.expect for p in relay.pending] == [Expect.SYNC, Expect.PARSE, Expect.BIND, Expect.EXECUTE, Expect.SYNC]
    server(relay, be(m.ReadyForQuery(b"I")))
    server(
        relay,
        be(
            m.ParseComplete(),
            m.BindComplete(),
            m.DataRow((b"3",)),
            m.CommandComplete("SELECT 1"),
            m.ReadyForQuery(b"I"),
        ),
    )
    assert not relay.pending
    assert set(relay.statements) == {"a", "c"}
    assert relay.events == []


def test_error_before_the_client_sent_its_sync() -> None:
    relay = ready_relay()
    client(relay, fe(m.Parse("bad", "SELEC 1"), m.Bind("", "bad", (), (), ()), m.Execute("")))
    server(relay, be(m.ErrorResponse(((b"S", "ERROR"), (b"C", "42601")))))
    assert not relay.pending
    # Sent after the error: the server discards them, so no reply may be expected for them.
    client(relay, fe(m.Describe(b"P", ""), m.Execute(""), m.Query("SELECT 1"), m.Flush()))
    assert not relay.pending
    client(relay, fe(m.Sync()))
    assert [p.expect for p in relay.pending] == [Expect.SYNC]
    server(relay, be(m.ReadyForQuery(b"I")))
    client(relay, fe(m.Parse("ok", "SELECT 1"), m.Sync()))
    server(relay, be(m.ParseComplete(), m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert set(relay.statements) == {"ok"}
    assert relay.events == []


def test_captured_pipeline_with_a_failing_first_statement() -> None:
    # psycopg's pipeline: two Parse/Bind/Describe/Execute, Sync, Flush; the first fails (division by zero).
    relay = ready_relay()
    start = next(i for i, (t, d) in enumerate(PSYCOPG_FEATURES) if t == "C" and b"SELECT 1/$1" in d)
    exchange = PSYCOPG_FEATURES[start : start + 5]
    assert [t for t, _ in exchange] == ["C", "C", "C", "C", "S"]
    to_server, to_client = replay(relay, exchange)
    assert to_server == b"".join(d for t, d in exchange if t == "C")
    assert to_client == exchange[-1][1]
    assert not relay.pending
    assert relay.events == []


# -- COPY and function calls --------------------------------------------------------------------------


def test_copy_in_via_simple_query() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("COPY t FROM STDIN")))
    server(relay, be(m.CopyInResponse(0, (0, 0))))
    assert relay.copy_in
    data = fe(m.CopyData(b"1\ta\n"), m.CopyData(b"2\tb\n"), m.CopyDone())
    assert client(relay, data) == data
    assert [p.expect for p in relay.pending] == [Expect.QUERY]
    server(relay, be(m.CommandComplete("COPY 2")))
    assert not relay.copy_in
    server(relay, be(m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert relay.events == []


def test_copy_fail_ends_copy_in_with_an_error() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("COPY t FROM STDIN")))
    server(relay, be(m.CopyInResponse(0, (0,))))
    client(relay, fe(m.CopyData(b"1\n"), m.CopyFail("client gave up")))
    server(relay, be(m.ErrorResponse(((b"S", "ERROR"), (b"C", "57014")))))
    assert not relay.copy_in
    server(relay, be(m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert relay.events == []


def test_copy_out_via_simple_query() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("COPY t TO STDOUT")))
    server(relay, be(m.CopyOutResponse(0, (0, 0)), m.CopyData(b"1\ta\n")))
    assert relay.copy_out
    server(relay, be(m.CopyData(b"2\tb\n"), m.CopyDone()))
    assert not relay.copy_out
    server(relay, be(m.CommandComplete("COPY 2"), m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert relay.events == []


def test_copy_out_via_extended_query() -> None:
    relay = ready_relay()
    client(relay, fe(m.Parse("", "COPY t TO STDOUT"), m.Bind("", "", (), (), ()), m.Execute(""), m.Sync()))
    server(relay, be(m.ParseComplete(), m.BindComplete(), m.CopyOutResponse(0, (0,)), m.CopyData(b"x\n")))
    server(relay, be(m.CopyDone(), m.CommandComplete("COPY 1"), m.ReadyForQuery(b"I")))
    assert not relay.pending
    assert relay.events == []


def test_copy_in_via_extended_query_as_libpq_sends_it() -> None:
    # libpq's PQexecParams sends Parse/Bind/Describe/Execute/Sync at once, then PQputCopyEnd sends CopyDone
    # and another Sync. PostgreSQL ignores Sync and Flush in copy-in mode (CopyGetData: "Ignore Flush/Sync
    # for the convenience of client libraries (such as libpq)"), so two Syncs get one ReadyForQuery.
    relay = ready_relay()
    client(relay, fe(m.Parse("", "COPY t FROM STDIN"), m.Bind("", "", (), (), ()), m.Describe(b"P", "")))
    client(relay, fe(m.Execute(""), m.Sync()))
    server(relay, be(m.ParseComplete(), m.BindComplete(), m.NoData(), m.CopyInResponse(0, (0,))))
    client(relay, fe(m.CopyData(b"1\n"), m.CopyDone(), m.Sync()))
    server(relay, be(m.CommandComplete("COPY 1"), m.ReadyForQuery(b"I")))
    client(relay, fe(m.Query("SELECT 1")))
    server(relay, be(row_description("?column?"), m.DataRow((b"1",)), m.CommandComplete("SELECT 1")))
    server(relay, be(m.ReadyForQuery(b"I")))
    assert relay.events == []
    assert not relay.pending


def test_function_call() -> None:
    relay = ready_relay()
    call = fe(m.FunctionCall(1598, (1,), (b"\x00\x00\x00\x10",), 1))
    assert client(relay, call) == call
    assert [p.expect for p in relay.pending] == [Expect.FUNCTION_CALL]
    reply = be(m.FunctionCallResponse(b"\x00\x01"), m.ReadyForQuery(b"I"))
    assert server(relay, reply) == reply
    assert not relay.pending
    assert relay.events == []


def test_large_data_row_streams_through_in_pieces() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("SELECT big")))
    row = be(m.DataRow((b"\xab" * (1 << 20),)))
    head = be(row_description("big"))
    tail = be(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    stream = head + row + tail
    out = b""
    step = 65536 + 7
    for i in range(0, len(stream), step):
        piece = server(relay, stream[i : i + step])
        out += piece
        # A DataRow is never held back whole: what arrived of it is already on its way.
        assert len(out) >= min(i + step, len(head) + len(row)) - 4
    assert out == stream
    assert not relay.pending
    assert relay.client_at_boundary


# -- SQL-level prepared statements ---------------------------------------------------------------------


def test_bind_to_a_statement_prepared_with_sql_prepare() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("PREPARE q AS SELECT 1")))
    server(relay, be(m.CommandComplete("PREPARE"), m.ReadyForQuery(b"I")))
    client(relay, fe(m.Bind("", "q", (), (), ()), m.Execute(""), m.Sync()))
    reply = be(m.BindComplete(), m.DataRow((b"1",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    assert server(relay, reply) == reply
    assert relay.events == []
    assert not relay.pending


# -- violations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        m.ReadyForQuery(b"I"),
        m.ParseComplete(),
        m.BindComplete(),
        m.CloseComplete(),
        m.CommandComplete("SELECT 1"),
        m.EmptyQueryResponse(),
        m.NoData(),
        m.PortalSuspended(),
        m.ParameterDescription(()),
        m.RowDescription(()),
        m.CopyInResponse(0, ()),
        m.CopyOutResponse(0, ()),
    ],
    ids=lambda x: type(x).__name__,
)
def test_reply_with_nothing_outstanding_is_a_server_violation(reply: m.BackendMessage) -> None:
    relay = ready_relay()
    out = server(relay, be(reply))
    error = closed_by(relay, "server")
    assert "no request outstanding" in error.message
    fatal_sent(out)
    assert out == codec.encode_error("FATAL", "08P01", error.message)  # the reply itself is not forwarded


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (m.Parse("s", "SELECT 1"), m.BindComplete()),
        (m.Bind("", "", (), (), ()), m.ParseComplete()),
        (m.Execute(""), m.NoData()),
        (m.Execute(""), m.RowDescription(())),
        (m.Describe(b"P", ""), m.ParameterDescription(())),
        (m.Describe(b"S", "s"), m.CommandComplete("SELECT 1")),
        (m.Parse("s", "SELECT 1"), m.ReadyForQuery(b"I")),
        (m.Close(b"S", "s"), m.CopyInResponse(0, ())),
    ],
    ids=lambda x: type(x).__name__,
)
def test_reply_to_the_wrong_request_is_a_server_violation(request_: m.FrontendMessage, reply: m.BackendMessage) -> None:
    relay = ready_relay()
    client(relay, fe(request_))
    server(relay, be(reply))
    closed_by(relay, "server")


def test_oversized_client_message_is_refused() -> None:
    relay = ready_relay(max_message_size=1000)
    # Refused from its header alone, before the body is buffered.
    assert client(relay, b"Q" + (1001).to_bytes(4, "big") + b"SELECT") == b""
    closed_by(relay, "client")
    fatal_sent(b"".join(relay.to_client))


def test_oversized_copy_data_is_refused_too() -> None:
    relay = ready_relay(max_message_size=1000)
    client(relay, fe(m.CopyData(b"x" * 996)))  # exactly at the limit
    assert relay.phase is Phase.READY
    client(relay, fe(m.CopyData(b"x" * 997)))
    closed_by(relay, "client")


@pytest.mark.parametrize("type_byte", [b"Z", b"p", b"\x00", b"\xff"], ids=["Z", "p", "NUL", "FF"])
def test_unknown_or_misplaced_frontend_type_is_refused(type_byte: bytes) -> None:
    relay = ready_relay()
    assert client(relay, codec.frame(type_byte, b"I")) == b""
    closed_by(relay, "client")
    fatal_sent(b"".join(relay.to_client))


def test_unknown_frontend_type_is_refused_from_its_header() -> None:
    relay = ready_relay()
    client(relay, b"\x01" + (1 << 29).to_bytes(4, "big"))
    closed_by(relay, "client")


def test_huge_password_message_before_authentication_reaches_the_server_as_its_header_only() -> None:
    # PostgreSQL reads authentication messages with a limit of PG_MAX_AUTH_TOKEN_LENGTH (65535 bytes) and
    # answers a longer one in its own words (28P01): it gets the header, and nothing after it is read.
    relay = Relay()
    client(relay, codec.encode_startup(STARTUP))
    take_events(relay)
    header = b"p" + (1 << 29).to_bytes(4, "big")
    assert client(relay, header + b"x" * 70000) == header
    assert relay.client_terminated
    assert client(relay, b"x" * 100) == b""


def test_invalid_message_length_is_refused() -> None:
    relay = ready_relay()
    client(relay, b"S\x00\x00\x00\x03")
    closed_by(relay, "client")


def test_malformed_server_message_is_a_server_violation() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("SELECT 1")))
    server(relay, codec.frame(b"Z", b"Q"))  # transaction status 'Q' does not exist
    closed_by(relay, "server")


def test_violation_inside_a_streamed_message_does_not_corrupt_the_client_stream() -> None:
    relay = ready_relay()
    client(relay, fe(m.Query("SELECT big")))
    row = be(m.DataRow((b"z" * 1000,)))
    out = server(relay, be(row_description("big")) + row[:500])
    assert not relay.client_at_boundary
    relay.fail(ProtocolViolation("client", "test"))
    # Half a DataRow is out: a FATAL appended now would be read as row bytes, so none is sent.
    assert relay.to_client == []
    assert out.endswith(row[:500])
    closed_by(relay, "client")


def test_nothing_is_relayed_after_the_session_closed() -> None:
    relay = ready_relay()
    client(relay, b"\x00" + (5).to_bytes(4, "big") + b"x")
    closed_by(relay, "client")
    relay.to_client.clear()
    assert client(relay, fe(m.Query("SELECT 1"))) == b""
    assert server(relay, be(m.ReadyForQuery(b"I"))) == b""
    assert len(relay.events) == 1


def test_terminate_is_forwarded_and_closes() -> None:
    relay = ready_relay()
    data = fe(m.Terminate())
    assert client(relay, data + fe(m.Query("never"))) == data
    assert relay.events == [CloseConnection()]
    assert relay.phase is Phase.CLOSED


def test_terminate_behind_a_query_lets_the_server_answer_it_first() -> None:
    # The server answers the Query before it reads the Terminate; the client must get that answer.
    relay = ready_relay()
    data = fe(m.Query("SELECT 1"), m.Terminate())
    assert client(relay, data + fe(m.Query("never"))) == data
    assert relay.events == []
    assert relay.client_terminated
    assert client(relay, fe(m.Query("never either"))) == b""
    reply = be(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    assert server(relay, reply) == reply


# -- counters -----------------------------------------------------------------------------------------


def test_message_and_byte_counters() -> None:
    relay = ready_relay()
    c0, s0 = relay.client_messages, relay.server_messages
    assert c0 == 1  # the StartupMessage
    assert s0 == 4
    request = fe(m.Parse("", "SELECT 1"), m.Bind("", "", (), (), ()), m.Execute(""), m.Sync())
    for i in range(len(request)):  # one byte at a time: each message still counts once
        client(relay, request[i : i + 1])
    assert relay.client_messages == c0 + 4
    reply = be(m.ParseComplete(), m.BindComplete(), m.DataRow((b"1" * 100,)), m.CommandComplete("SELECT 1"))
    reply += be(m.NoticeResponse(()), m.ReadyForQuery(b"I"))
    server(relay, reply[:20])
    server(relay, reply[20:])
    assert relay.server_messages == s0 + 6
    assert relay.server_bytes == len(be(m.Authentication(0), m.ParameterStatus("server_version", "15.20"))) + len(
        be(m.BackendKeyData(4242, 99), m.ReadyForQuery(b"I"))
    ) + len(reply)
