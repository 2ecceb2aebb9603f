"""Codec: decode and encode of each message against exact bytes, taken from real captures where we have them.

Byte layouts follow the PostgreSQL docs, "Message Formats"; ``protocol_captures`` holds what psycopg 3 and
PostgreSQL 15 really sent.
"""

from __future__ import annotations

import struct

import pytest
from protocol_captures import PSYCOPG_FEATURES, PSYCOPG_SESSION, chunk_containing

from proxy.errors import ProtocolViolation
from proxy.protocol import codec
from proxy.protocol import messages as m


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(type byte, body) of each regular message in ``data``, which must hold whole messages only."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        t, n = codec.read_header(data, pos)
        out.append((t, data[pos + 5 : pos + 1 + n]))
        pos += 1 + n
    assert pos == len(data)
    return out


def body_of(frame: bytes) -> bytes:
    (n,) = struct.unpack_from("!I", frame, 1)
    assert n == len(frame) - 1
    return frame[5:]


# -- startup packets -----------------------------------------------------------------------------------


def test_decode_captured_startup_message() -> None:
    packet = PSYCOPG_SESSION[0][1]
    msg = codec.decode_startup(packet[4:])
    assert msg == m.StartupMessage(
        m.PROTOCOL_3_0, (("user", "postgres"), ("database", "postgres"), ("application_name", "cap"))
    )
    assert isinstance(msg, m.StartupMessage)
    assert msg.get("user") == "postgres"
    assert msg.get("options") is None
    assert msg.get("options", "") == ""
    assert codec.encode_startup(msg) == packet


def test_startup_message_with_options_and_replication() -> None:
    params = (
        ("user", "app"),
        ("database", "app db"),
        ("options", "-c search_path=public -c statement_timeout=5s"),
        ("replication", "false"),
        ("client_encoding", "UTF8"),
    )
    body = struct.pack("!i", 196608) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params) + b"\0"
    packet = struct.pack("!I", len(body) + 4) + body
    msg = codec.decode_startup(body)
    assert msg == m.StartupMessage(m.PROTOCOL_3_0, params)
    assert isinstance(msg, m.StartupMessage)
    assert msg.get("options") == "-c search_path=public -c statement_timeout=5s"
    assert codec.encode_startup(msg) == packet


def test_startup_message_without_parameters() -> None:
    assert codec.decode_startup(b"\x00\x03\x00\x00\x00") == m.StartupMessage(m.PROTOCOL_3_0, ())
    assert codec.encode_startup(m.StartupMessage(m.PROTOCOL_3_0, ())) == b"\x00\x00\x00\x09\x00\x03\x00\x00\x00"


def test_startup_message_newer_minor_version_is_decoded() -> None:
    # 3.2 (PostgreSQL 18): the server, not the proxy, negotiates the minor version.
    msg = codec.decode_startup(b"\x00\x03\x00\x02user\x00u\x00\x00")
    assert msg == m.StartupMessage((3 << 16) | 2, (("user", "u"),))


@pytest.mark.parametrize(
    ("packet", "msg"),
    [
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", m.SSLRequest()),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x30", m.GSSENCRequest()),
        (
            b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x26\x02\xb1\xb3\x50\x8b",
            m.CancelRequest(0x2602, struct.unpack("!i", b"\xb1\xb3\x50\x8b")[0]),
        ),
    ],
    ids=["SSLRequest", "GSSENCRequest", "CancelRequest"],
)
def test_fixed_startup_packets(packet: bytes, msg: m.StartupPacket) -> None:
    assert codec.decode_startup(packet[4:]) == msg
    assert codec.encode_startup(msg) == packet


def test_cancel_request_repr_hides_the_secret() -> None:
    assert "secret" not in repr(m.CancelRequest(1234, 987654321))
    assert "987654321" not in repr(m.CancelRequest(1234, 987654321))


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no code
        b"\x04\xd2",  # truncated code
        b"\x04\xd2\x16\x2f\x00",  # SSLRequest with trailing byte
        b"\x04\xd2\x16\x30\x00",  # GSSENCRequest with trailing byte
        b"\x04\xd2\x16\x2e\x00\x00\x00\x01",  # CancelRequest without secret
        b"\x04\xd2\x16\x2e\x00\x00\x00\x01\x00\x00\x00\x02\x00",  # CancelRequest with trailing byte
        b"\x00\x02\x00\x00user\x00u\x00\x00",  # protocol 2.0
        b"\x00\x04\x00\x00\x00",  # protocol 4.0
        b"\x00\x03\x00\x00user\x00u\x00",  # parameter list not terminated
        b"\x00\x03\x00\x00user",  # unterminated name
        b"\x00\x03\x00\x00user\x00u",  # unterminated value
        b"\x00\x03\x00\x00\x00junk",  # trailing bytes after the terminator
        b"\xff\xff\xff\xff",  # negative code
    ],
)
def test_invalid_startup_packets_raise_codec_error(body: bytes) -> None:
    with pytest.raises(codec.CodecError) as exc:
        codec.decode_startup(body)
    assert exc.value.peer == "client"
    assert exc.value.sqlstate == "08P01"


# -- frontend: a captured extended-protocol sequence ---------------------------------------------------


def test_decode_captured_psycopg_parse_bind_describe_execute_sync() -> None:
    chunk = chunk_containing(PSYCOPG_SESSION, "C", b"SELECT $1::int")
    msgs = [codec.decode_frontend(t, body) for t, body in split_frames(chunk)]
    assert msgs == [
        m.Parse("", "SELECT $1::int AS n, $2::text AS t", (21, 0)),
        m.Bind("", "", (1, 0), (b"\x00\x2a", b"hi"), (0,)),
        m.Describe(b"P", ""),
        m.Execute("", 0),
        m.Sync(),
    ]
    assert b"".join(codec.encode_frontend(x) for x in msgs) == chunk


def test_decode_captured_named_statement_and_its_bind() -> None:
    parse_chunk = chunk_containing(PSYCOPG_FEATURES, "C", b"P\x00\x00\x003_pg3_0")
    bind_chunk = chunk_containing(PSYCOPG_FEATURES, "C", b"B\x00\x00\x00\x1c\x00_pg3_0")
    parse = [codec.decode_frontend(t, body) for t, body in split_frames(parse_chunk)]
    bind = [codec.decode_frontend(t, body) for t, body in split_frames(bind_chunk)]
    assert parse == [m.Parse("_pg3_0", "SELECT id, v FROM t WHERE id = $1", (21,)), m.Sync()]
    assert bind[0] == m.Bind("", "_pg3_0", (1,), (b"\x00\x01",), (0,))
    assert bind[1:] == [m.Describe(b"P", ""), m.Execute("", 0), m.Sync()]


def test_decode_captured_copy_data_and_done() -> None:
    chunk = chunk_containing(PSYCOPG_FEATURES, "C", b"1\ta\n")
    msgs = [codec.decode_frontend(t, body) for t, body in split_frames(chunk)]
    assert msgs == [m.CopyData(b"1\ta\n2\tb\n"), m.CopyDone()]


# -- frontend: each message --------------------------------------------------------------------------

FRONTEND_FRAMES: list[tuple[m.FrontendMessage, bytes]] = [
    (m.Query("SELECT 1 AS one"), b"Q\x00\x00\x00\x14SELECT 1 AS one\x00"),
    (m.Query(""), b"Q\x00\x00\x00\x05\x00"),
    (m.Parse("s1", "SELECT $1", ()), b"P\x00\x00\x00\x13s1\x00SELECT $1\x00\x00\x00"),
    (m.Parse("", "x", (0xFFFFFFFF,)), b"P\x00\x00\x00\x0d\x00x\x00\x00\x01\xff\xff\xff\xff"),
    (m.Bind("", "", (), (), ()), b"B\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00"),
    (
        m.Bind("p1", "s1", (1,), (None, b""), (1, 0)),
        b"B\x00\x00\x00\x1ep1\x00s1\x00\x00\x01\x00\x01\x00\x02\xff\xff\xff\xff\x00\x00\x00\x00"
        b"\x00\x02\x00\x01\x00\x00",
    ),
    (m.Describe(b"S", "s1"), b"D\x00\x00\x00\x08Ss1\x00"),
    (m.Describe(b"P", ""), b"D\x00\x00\x00\x06P\x00"),
    (m.Execute("p1", 10), b"E\x00\x00\x00\x0bp1\x00\x00\x00\x00\x0a"),
    (m.Close(b"S", "s1"), b"C\x00\x00\x00\x08Ss1\x00"),
    (m.Close(b"P", ""), b"C\x00\x00\x00\x06P\x00"),
    (m.Sync(), b"S\x00\x00\x00\x04"),
    (m.Flush(), b"H\x00\x00\x00\x04"),
    (m.Terminate(), b"X\x00\x00\x00\x04"),
    (
        m.FunctionCall(1598, (1,), (b"\x00\x00\x00\x01", None), 1),
        b"F\x00\x00\x00\x1c\x00\x00\x06\x3e\x00\x01\x00\x01\x00\x02\x00\x00\x00\x04\x00\x00\x00\x01"
        b"\xff\xff\xff\xff\x00\x01",
    ),
    (m.CopyData(b"1\ta\n"), b"d\x00\x00\x00\x081\ta\n"),
    (m.CopyData(b""), b"d\x00\x00\x00\x04"),
    (m.CopyDone(), b"c\x00\x00\x00\x04"),
    (m.CopyFail("client gave up"), b"f\x00\x00\x00\x13client gave up\x00"),
]


@pytest.mark.parametrize(("msg", "frame"), FRONTEND_FRAMES, ids=[repr(x) for x, _ in FRONTEND_FRAMES])
def test_frontend_message_encode_and_decode(msg: m.FrontendMessage, frame: bytes) -> None:
    assert codec.encode_frontend(msg) == frame
    assert codec.decode_frontend(frame[0], body_of(frame)) == msg


def test_frame_counts_the_length_word_but_not_the_type_byte() -> None:
    assert codec.frame(b"Q", b"abc") == b"Q\x00\x00\x00\x07abc"
    assert codec.read_header(b"xxQ\x00\x00\x00\x07abc", 2) == (ord("Q"), 7)


def test_non_utf8_strings_survive_decode_then_encode() -> None:
    # A LATIN1 client's 'café': strings are in the client encoding, which the codec must not reinterpret.
    frame = b"Q\x00\x00\x00\x09caf\xe9\x00"
    msg = codec.decode_frontend(frame[0], body_of(frame))
    assert isinstance(msg, m.Query)
    assert codec.encode_frontend(msg) == frame
    startup = b"\x00\x00\x00\x15\x00\x03\x00\x00user\x00j\xfcrgen\x00\x00"
    decoded = codec.decode_startup(startup[4:])
    assert codec.encode_startup(decoded) == startup


def test_parse_and_bind_with_more_than_32767_parameters() -> None:
    # Counts are Int16 on the wire but read unsigned by the server (pq_getmsgint): libpq allows 65535.
    n = 40000
    parse = m.Parse("", "SELECT", (23,) * n)
    parse_body = b"\x00SELECT\x00" + struct.pack("!H", n) + b"\x00\x00\x00\x17" * n
    assert codec.decode_frontend(ord("P"), parse_body) == parse
    assert codec.encode_frontend(parse) == codec.frame(b"P", parse_body)
    bind = m.Bind("", "", (1,) * n, (b"",) * n, ())
    bind_body = b"\x00\x00" + struct.pack("!H", n) + b"\x00\x01" * n + struct.pack("!H", n)
    bind_body += b"\x00\x00\x00\x00" * n + b"\x00\x00"
    assert codec.decode_frontend(ord("B"), bind_body) == bind
    assert codec.encode_frontend(bind) == codec.frame(b"B", bind_body)


@pytest.mark.parametrize(
    ("type_byte", "body"),
    [
        (ord("Q"), b"SELECT 1"),  # unterminated string
        (ord("Q"), b"SELECT 1\x00\x00"),  # trailing bytes
        (ord("P"), b"s1\x00SELECT 1\x00"),  # missing parameter count
        (ord("P"), b"s1\x00SELECT 1\x00\x00\x02\x00\x00\x00\x17"),  # one type OID short
        (ord("P"), b"s1\x00SELECT 1\x00\xff\xff"),  # 65535 type OIDs announced, none sent
        (ord("P"), b"s1\x00SELECT 1\x00\x00\x00\x00"),  # trailing byte
        (ord("B"), b"\x00\x00\x00\x01\x00\x02\x00\x00\x00\x00"),  # format code 2
        (ord("B"), b"\x00\x00\x00\x01\xff\xff\x00\x00\x00\x00"),  # format code -1
        (ord("B"), b"\x00\x00\xff\xff\x00\x00\x00\x00"),  # 65535 format codes announced
        (ord("B"), b"\x00\x00\x00\x00\xff\xff\x00\x00"),  # 65535 parameters announced
        (ord("B"), b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # value length -2
        (ord("B"), b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x05abc\x00\x00"),  # value longer than the body
        (ord("B"), b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x03"),  # result format code 3
        (ord("B"), b"\x00\x00\x00\x00\x00\x00"),  # result format count missing
        (ord("B"), b"\x00\x00\x00\x00\x00\x00\x00\x00\x00"),  # trailing byte
        (ord("B"), b"p"),  # unterminated portal name
        (ord("D"), b"Xs1\x00"),  # Describe target neither S nor P
        (ord("D"), b""),  # Describe without target
        (ord("D"), b"Ss1"),  # unterminated name
        (ord("E"), b"\x00\x00\x00"),  # truncated max_rows
        (ord("E"), b"\x00\x00\x00\x00\x00\x00"),  # trailing byte
        (ord("C"), b"Q\x00"),  # Close target neither S nor P
        (ord("S"), b"\x00"),  # Sync with a body
        (ord("H"), b"\x00"),  # Flush with a body
        (ord("X"), b"\x00"),  # Terminate with a body
        (ord("c"), b"\x00"),  # CopyDone with a body
        (ord("f"), b"oops"),  # unterminated CopyFail message
        (ord("F"), b"\x00\x00\x06"),  # truncated function OID
        (ord("F"), b"\x00\x00\x06\x3e\x00\x01\x00\x05\x00\x00\x00\x00"),  # argument format code 5
        (ord("F"), b"\x00\x00\x06\x3e\x00\x00\xff\xff\x00\x00"),  # negative argument count
        (ord("F"), b"\x00\x00\x06\x3e\x00\x00\x00\x00"),  # missing result format
        (ord("p"), b"secret\x00"),  # PasswordMessage is relayed, never decoded
        (ord("Z"), b""),  # a backend type from the client
        (0, b""),
    ],
)
def test_invalid_frontend_messages_raise_codec_error(type_byte: int, body: bytes) -> None:
    with pytest.raises(codec.CodecError) as exc:
        codec.decode_frontend(type_byte, body)
    assert exc.value.peer == "client"
    assert isinstance(exc.value, ProtocolViolation)


def test_frontend_types_cover_decoders_and_password_message() -> None:
    assert {chr(t) for t in codec.FRONTEND_TYPES} == set("QPBDECSHXFdcfp")


def test_repr_of_secret_bearing_frontend_messages_shows_sizes_only() -> None:
    secret = "4111-1111-1111-1111"
    shown = [
        repr(m.Query(f"SELECT '{secret}'")),
        repr(m.Parse("s", f"SELECT '{secret}'")),
        repr(m.Bind("", "", (), (secret.encode(),), ())),
        repr(m.FunctionCall(1, (), (secret.encode(),), 0)),
        repr(m.CopyData(secret.encode())),
    ]
    assert all(secret not in r for r in shown)


# -- backend: captured replies -----------------------------------------------------------------------


def test_decode_captured_authentication_and_startup_reply() -> None:
    sasl = codec.decode_backend(*split_frames(PSYCOPG_SESSION[1][1])[0])
    assert sasl == m.Authentication(m.AuthCode.SASL, b"SCRAM-SHA-256\x00\x00")
    final_chunk = chunk_containing(PSYCOPG_SESSION, "S", b"server_version")
    final = [codec.decode_backend(t, body) for t, body in split_frames(final_chunk)]
    assert isinstance(final[0], m.Authentication)
    assert final[0].code == m.AuthCode.SASL_FINAL
    assert final[1] == m.Authentication(m.AuthCode.OK)
    assert m.ParameterStatus("server_version", "15.20 (Debian 15.20-0+deb12u1)") in final
    assert m.ParameterStatus("DateStyle", "ISO, MDY") in final
    assert final[-2] == m.BackendKeyData(0x2602, struct.unpack("!i", b"\xb1\xb3\x50\x8b")[0])
    assert final[-1] == m.ReadyForQuery(b"I")
    assert b"".join(codec.encode_backend(x) for x in final) == final_chunk


def test_decode_captured_extended_reply() -> None:
    chunk = chunk_containing(PSYCOPG_SESSION, "S", b"hiC")
    msgs = [codec.decode_backend(t, body) for t, body in split_frames(chunk)]
    assert msgs == [
        m.ParseComplete(),
        m.BindComplete(),
        m.RowDescription(
            (
                m.FieldDescription("n", 0, 0, 23, 4, -1, 0),
                m.FieldDescription("t", 0, 0, 25, -1, -1, 0),
            )
        ),
        m.DataRow((b"42", b"hi")),
        m.CommandComplete("SELECT 1"),
        m.ReadyForQuery(b"T"),
    ]
    assert b"".join(codec.encode_backend(x) for x in msgs) == chunk


def test_decode_captured_row_description_of_a_table() -> None:
    chunk = chunk_containing(PSYCOPG_FEATURES, "S", b"SELECT 0")
    msgs = [codec.decode_backend(t, body) for t, body in split_frames(chunk)]
    row_description = msgs[1]
    assert isinstance(row_description, m.RowDescription)
    table_oid = row_description.fields[0].table_oid
    assert table_oid >= 16384  # FirstNormalObjectId: a user table
    assert row_description.fields == (
        m.FieldDescription("id", table_oid, 1, 23, 4, -1, 0),
        m.FieldDescription("v", table_oid, 2, 25, -1, -1, 0),
    )
    assert msgs[2:] == [m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")]


def test_decode_captured_notice_notification_and_error() -> None:
    notice_chunk = [
        codec.decode_backend(t, b) for t, b in split_frames(chunk_containing(PSYCOPG_FEATURES, "S", b"NOTICE"))
    ]
    notice = notice_chunk[2]
    assert isinstance(notice, m.NoticeResponse)
    assert (b"M", "note") in notice.fields
    assert (b"V", "NOTICE") in notice.fields
    notify_chunk = [
        codec.decode_backend(t, b) for t, b in split_frames(chunk_containing(PSYCOPG_FEATURES, "S", b"hello"))
    ]
    notification = notify_chunk[1]
    assert isinstance(notification, m.NotificationResponse)
    assert (notification.channel, notification.payload) == ("ch", "hello")
    error_chunk = [
        codec.decode_backend(t, b) for t, b in split_frames(chunk_containing(PSYCOPG_FEATURES, "S", b"22012"))
    ]
    error = error_chunk[1]
    assert isinstance(error, m.ErrorResponse)
    assert (error.sqlstate, error.severity, error.field(b"M")) == ("22012", "ERROR", "division by zero")
    assert error.field(b"D") is None


def test_decode_captured_copy_responses() -> None:
    copy_in = [codec.decode_backend(t, b) for t, b in split_frames(chunk_containing(PSYCOPG_FEATURES, "S", b"G\x00"))]
    assert copy_in == [m.CopyInResponse(0, (0, 0))]
    copy_out = [codec.decode_backend(t, b) for t, b in split_frames(chunk_containing(PSYCOPG_FEATURES, "S", b"H\x00"))]
    assert copy_out == [
        m.CopyOutResponse(0, (0, 0)),
        m.CopyData(b"1\ta\n"),
        m.CopyData(b"2\tb\n"),
        m.CopyDone(),
        m.CommandComplete("COPY 2"),
        m.ReadyForQuery(b"I"),
    ]


# -- backend: each message ---------------------------------------------------------------------------

BACKEND_FRAMES: list[tuple[m.BackendMessage, bytes]] = [
    (m.Authentication(m.AuthCode.OK), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (m.Authentication(m.AuthCode.CLEARTEXT_PASSWORD), b"R\x00\x00\x00\x08\x00\x00\x00\x03"),
    (
        m.Authentication(m.AuthCode.MD5_PASSWORD, b"\x01\x02\x03\x04"),
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04",
    ),
    (
        m.Authentication(m.AuthCode.SASL, b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"),
        b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00",
    ),
    (m.BackendKeyData(1234, -5), b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xff\xff\xff\xfb"),
    (m.ParameterStatus("TimeZone", "UTC"), b"S\x00\x00\x00\x11TimeZone\x00UTC\x00"),
    (m.ReadyForQuery(b"E"), b"Z\x00\x00\x00\x05E"),
    (
        m.ErrorResponse(((b"S", "ERROR"), (b"C", "42P01"))),
        b"E\x00\x00\x00\x13SERROR\x00C42P01\x00\x00",
    ),
    (m.NoticeResponse(()), b"N\x00\x00\x00\x05\x00"),
    (m.RowDescription(()), b"T\x00\x00\x00\x06\x00\x00"),
    (
        m.RowDescription((m.FieldDescription("b", 16390, 3, 17, -1, -1, 1),)),
        b"T\x00\x00\x00\x1a\x00\x01b\x00\x00\x00\x40\x06\x00\x03\x00\x00\x00\x11\xff\xff\xff\xff\xff\xff\x00\x01",
    ),
    (m.ParameterDescription((23, 25)), b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19"),
    (m.ParameterDescription(()), b"t\x00\x00\x00\x06\x00\x00"),
    (m.DataRow((None, b"", b"x")), b"D\x00\x00\x00\x13\x00\x03\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x01x"),
    (m.CommandComplete("INSERT 0 1"), b"C\x00\x00\x00\x0fINSERT 0 1\x00"),
    (m.ParseComplete(), b"1\x00\x00\x00\x04"),
    (m.BindComplete(), b"2\x00\x00\x00\x04"),
    (m.CloseComplete(), b"3\x00\x00\x00\x04"),
    (m.NoData(), b"n\x00\x00\x00\x04"),
    (m.PortalSuspended(), b"s\x00\x00\x00\x04"),
    (m.EmptyQueryResponse(), b"I\x00\x00\x00\x04"),
    (m.CopyInResponse(1, (1, 1)), b"G\x00\x00\x00\x0b\x01\x00\x02\x00\x01\x00\x01"),
    (m.CopyOutResponse(0, ()), b"H\x00\x00\x00\x07\x00\x00\x00"),
    (m.CopyBothResponse(1, ()), b"W\x00\x00\x00\x07\x01\x00\x00"),
    (m.CopyData(b"\x00\xff"), b"d\x00\x00\x00\x06\x00\xff"),
    (m.CopyDone(), b"c\x00\x00\x00\x04"),
    (m.NotificationResponse(77, "ch", ""), b"A\x00\x00\x00\x0c\x00\x00\x00\x4dch\x00\x00"),
    (m.FunctionCallResponse(None), b"V\x00\x00\x00\x08\xff\xff\xff\xff"),
    (m.FunctionCallResponse(b"ok"), b"V\x00\x00\x00\x0a\x00\x00\x00\x02ok"),
    (
        m.NegotiateProtocolVersion(0, ("_pq_.x",)),
        b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00",
    ),
]


@pytest.mark.parametrize(("msg", "frame"), BACKEND_FRAMES, ids=[repr(x) for x, _ in BACKEND_FRAMES])
def test_backend_message_encode_and_decode(msg: m.BackendMessage, frame: bytes) -> None:
    assert codec.encode_backend(msg) == frame
    assert codec.decode_backend(frame[0], body_of(frame)) == msg


def test_backend_types_match_the_decoders() -> None:
    assert {chr(t) for t in codec.BACKEND_TYPES} == set("RKSZENTtDC123nsIGHWdcAVv")


def test_error_response_defaults() -> None:
    bare = m.ErrorResponse(((b"M", "x"),))
    assert (bare.sqlstate, bare.severity) == ("XX000", "ERROR")
    # 'V' (never localised) wins over 'S'.
    localised = m.ErrorResponse(((b"S", "FEHLER"), (b"V", "ERROR")))
    assert localised.severity == "ERROR"


def test_encode_error_builds_a_fatal_error_response() -> None:
    frame = codec.encode_error("FATAL", "08P01", "bad", detail="d", hint="h")
    msg = codec.decode_backend(frame[0], body_of(frame))
    assert msg == m.ErrorResponse(
        ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", "08P01"), (b"M", "bad"), (b"D", "d"), (b"H", "h"))
    )
    assert codec.encode_error("ERROR", "0A000", "no") == (b"E\x00\x00\x00\x1eSERROR\x00VERROR\x00C0A000\x00Mno\x00\x00")


@pytest.mark.parametrize(
    ("type_byte", "body"),
    [
        (ord("R"), b"\x00\x00"),  # truncated auth code
        (ord("K"), b"\x00\x00\x04\xd2"),  # no secret
        (ord("K"), b"\x00\x00\x04\xd2\x00\x00\x00\x01\x00"),  # trailing byte
        (ord("S"), b"TimeZone\x00UTC"),  # unterminated value
        (ord("Z"), b"X"),  # unknown transaction status
        (ord("Z"), b""),  # no status
        (ord("Z"), b"II"),  # trailing byte
        (ord("E"), b"SERROR\x00"),  # fields not terminated
        (ord("E"), b"SERROR"),  # unterminated field
        (ord("E"), b"\x00\x00"),  # trailing byte
        (ord("N"), b""),  # no terminator
        (ord("T"), b"\xff\xff"),  # negative field count
        (ord("T"), b"\x00\x01a\x00\x00\x00"),  # truncated field
        (ord("T"), b"\x00\x01a"),  # unterminated name
        (ord("t"), b"\x00\x02\x00\x00\x00\x17"),  # one OID short
        (ord("D"), b"\xff\xfe"),  # negative column count
        (ord("D"), b"\x00\x01\xff\xff\xff\xfe"),  # value length -2
        (ord("D"), b"\x00\x01\x00\x00\x00\x09abc"),  # value longer than the body
        (ord("D"), b"\x00\x00\x00"),  # trailing byte
        (ord("C"), b"SELECT 1"),  # unterminated tag
        (ord("1"), b"\x00"),  # ParseComplete with a body
        (ord("I"), b"\x00"),  # EmptyQueryResponse with a body
        (ord("G"), b"\x00\xff\xff"),  # negative column count
        (ord("H"), b"\x00\x00\x01"),  # one column format short
        (ord("W"), b""),  # empty
        (ord("A"), b"\x00\x00\x00\x01ch\x00"),  # no payload
        (ord("V"), b"\x00\x00\x00\x05ab"),  # result longer than the body
        (ord("V"), b"\xff\xff\xff\xfd"),  # result length -3
        (ord("v"), b"\x00\x00\x00\x00\xff\xff\xff\xff"),  # negative option count
        (ord("v"), b"\x00\x00\x00\x00\x00\x00\x00\x02a\x00"),  # one option short
        (ord("Q"), b"SELECT 1\x00"),  # a frontend type from the server
    ],
)
def test_invalid_backend_messages_raise_codec_error(type_byte: int, body: bytes) -> None:
    with pytest.raises(codec.CodecError) as exc:
        codec.decode_backend(type_byte, body)
    assert exc.value.peer == "server"


def test_repr_of_secret_bearing_backend_messages_shows_sizes_only() -> None:
    secret = "s3cr3t-value"
    shown = [
        repr(m.DataRow((secret.encode(),))),
        repr(m.Authentication(m.AuthCode.SASL_CONTINUE, secret.encode())),
        repr(m.NotificationResponse(1, "ch", secret)),
        repr(m.FunctionCallResponse(secret.encode())),
        repr(m.BackendKeyData(1, 424242)),
    ]
    assert all(secret not in r for r in shown)
    assert "424242" not in shown[-1]
