"""Codec properties: every message round-trips through its exact frame, and no input raises anything but
CodecError (a peer sending garbage can only ever produce a protocol violation)."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol import codec
from proxy.protocol import messages as m

# Protocol strings are NUL-terminated; surrogates cannot come off the wire as UTF-8.
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20)
int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
formats = st.lists(st.sampled_from([0, 1]), max_size=8).map(tuple)
values = st.lists(st.none() | st.binary(max_size=40), max_size=8).map(tuple)
kinds = st.sampled_from([b"S", b"P"])
error_fields = st.lists(st.tuples(st.integers(1, 255).map(lambda b: bytes([b])), text), max_size=8).map(tuple)

frontend_messages: st.SearchStrategy[m.FrontendMessage] = st.one_of(
    st.builds(m.Query, text),
    st.builds(m.Parse, text, text, st.lists(uint32, max_size=8).map(tuple)),
    st.builds(m.Bind, text, text, formats, values, formats),
    st.builds(m.Describe, kinds, text),
    st.builds(m.Execute, text, int32),
    st.builds(m.Close, kinds, text),
    st.just(m.Sync()),
    st.just(m.Flush()),
    st.just(m.Terminate()),
    st.builds(m.FunctionCall, uint32, formats, values, st.sampled_from([0, 1])),
    st.builds(m.CopyData, st.binary(max_size=100)),
    st.just(m.CopyDone()),
    st.builds(m.CopyFail, text),
)

field_descriptions = st.builds(m.FieldDescription, text, uint32, int16, uint32, int16, int32, int16)
copy_formats = st.lists(int16, max_size=8).map(tuple)

backend_messages: st.SearchStrategy[m.BackendMessage] = st.one_of(
    st.builds(m.Authentication, int32, st.binary(max_size=60)),
    st.builds(m.BackendKeyData, int32, int32),
    st.builds(m.ParameterStatus, text, text),
    st.builds(m.ReadyForQuery, st.sampled_from([b"I", b"T", b"E"])),
    st.builds(m.ErrorResponse, error_fields),
    st.builds(m.NoticeResponse, error_fields),
    st.builds(m.RowDescription, st.lists(field_descriptions, max_size=6).map(tuple)),
    st.builds(m.ParameterDescription, st.lists(uint32, max_size=8).map(tuple)),
    st.builds(m.DataRow, values),
    st.builds(m.CommandComplete, text),
    st.sampled_from(
        [
            m.ParseComplete(),
            m.BindComplete(),
            m.CloseComplete(),
            m.NoData(),
            m.PortalSuspended(),
            m.EmptyQueryResponse(),
            m.CopyDone(),
        ]
    ),
    st.builds(m.CopyInResponse, st.sampled_from([0, 1]), copy_formats),
    st.builds(m.CopyOutResponse, st.sampled_from([0, 1]), copy_formats),
    st.builds(m.CopyBothResponse, st.sampled_from([0, 1]), copy_formats),
    st.builds(m.CopyData, st.binary(max_size=100)),
    st.builds(m.NotificationResponse, int32, text, text),
    st.builds(m.FunctionCallResponse, st.none() | st.binary(max_size=40)),
    st.builds(m.NegotiateProtocolVersion, int32, st.lists(text, max_size=4).map(tuple)),
)

startup_packets: st.SearchStrategy[m.StartupPacket] = st.one_of(
    st.builds(
        m.StartupMessage,
        st.integers(0, 0xFFFF).map(lambda minor: (3 << 16) | minor),
        st.lists(st.tuples(names, text), max_size=6).map(tuple),
    ),
    st.just(m.SSLRequest()),
    st.just(m.GSSENCRequest()),
    st.builds(m.CancelRequest, int32, int32),
)


def unframe(frame: bytes) -> tuple[int, bytes]:
    t, n = codec.read_header(frame)
    assert n == len(frame) - 1, "the length word counts itself and the body, not the type byte"
    return t, frame[5:]


@given(frontend_messages)
def test_frontend_messages_round_trip(msg: m.FrontendMessage) -> None:
    t, body = unframe(codec.encode_frontend(msg))
    assert t in codec.FRONTEND_TYPES
    assert codec.decode_frontend(t, body) == msg


@given(backend_messages)
def test_backend_messages_round_trip(msg: m.BackendMessage) -> None:
    t, body = unframe(codec.encode_backend(msg))
    assert t in codec.BACKEND_TYPES
    assert codec.decode_backend(t, body) == msg


@given(startup_packets)
def test_startup_packets_round_trip(msg: m.StartupPacket) -> None:
    packet = codec.encode_startup(msg)
    (n,) = struct.unpack_from("!I", packet)
    assert n == len(packet)
    assert codec.decode_startup(packet[4:]) == msg


@given(st.integers(0, 255), st.binary(max_size=200))
def test_arbitrary_frontend_bytes_raise_only_codec_error(type_byte: int, body: bytes) -> None:
    try:
        codec.decode_frontend(type_byte, body)
    except codec.CodecError as e:
        blamed = e.peer
    else:
        blamed = "client"
    assert blamed == "client"


@given(st.integers(0, 255), st.binary(max_size=200))
def test_arbitrary_backend_bytes_raise_only_codec_error(type_byte: int, body: bytes) -> None:
    try:
        codec.decode_backend(type_byte, body)
    except codec.CodecError as e:
        blamed = e.peer
    else:
        blamed = "server"
    assert blamed == "server"


@given(st.binary(max_size=200))
def test_arbitrary_startup_bytes_raise_only_codec_error(body: bytes) -> None:
    try:
        codec.decode_startup(body)
    except codec.CodecError as e:
        blamed = e.peer
    else:
        blamed = "client"
    assert blamed == "client"


@st.composite
def mutated(draw: st.DrawFn, frame: bytes) -> bytes:
    """``frame`` truncated, extended or with a few bytes overwritten: close to valid, so decoders go deep."""
    data = bytearray(frame)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "append"]))
        if action == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif action == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        else:
            data += draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_frontend_messages_raise_only_codec_error(data: st.DataObject) -> None:
    t, body = unframe(codec.encode_frontend(data.draw(frontend_messages)))
    try:
        codec.decode_frontend(t, data.draw(mutated(body)))
    except codec.CodecError:
        pass


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_backend_messages_raise_only_codec_error(data: st.DataObject) -> None:
    t, body = unframe(codec.encode_backend(data.draw(backend_messages)))
    try:
        codec.decode_backend(t, data.draw(mutated(body)))
    except codec.CodecError:
        pass


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_startup_packets_raise_only_codec_error(data: st.DataObject) -> None:
    packet = codec.encode_startup(data.draw(startup_packets))
    try:
        codec.decode_startup(data.draw(mutated(packet[4:])))
    except codec.CodecError:
        pass


@given(
    st.binary(max_size=40).filter(lambda b: b"\x00" not in b), st.binary(max_size=40).filter(lambda b: b"\x00" not in b)
)
def test_any_string_bytes_survive_decode_then_encode(name: bytes, query: bytes) -> None:
    # Strings are in the client encoding (LATIN1, SJIS, ...): re-encoding must give back the same bytes.
    for frame in (
        codec.frame(b"Q", query + b"\x00"),
        codec.frame(b"P", name + b"\x00" + query + b"\x00\x00\x00"),
        codec.frame(b"D", b"S" + name + b"\x00"),
    ):
        t, body = unframe(frame)
        assert codec.encode_frontend(codec.decode_frontend(t, body)) == frame
    status = codec.frame(b"S", name + b"\x00" + query + b"\x00")
    t, body = unframe(status)
    assert codec.encode_backend(codec.decode_backend(t, body)) == status


def _decodes(t: int, body: bytes) -> bool:
    try:
        codec.decode_frontend(t, body)
    except codec.CodecError:
        return False
    return True


def _checks(t: int, body: bytes) -> bool:
    framed = b"??" + body + b"??"  # the checker works on a slice of a larger buffer
    try:
        codec.check_frontend(t, framed, 2, 2 + len(body))
    except codec.CodecError:
        return False
    return True


@given(frontend_messages)
def test_the_fast_path_checker_accepts_every_valid_message(msg: m.FrontendMessage) -> None:
    t, body = unframe(codec.encode_frontend(msg))
    assert _checks(t, body)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_fast_path_checker_refuses_what_the_decoder_refuses(data: st.DataObject) -> None:
    """check_frontend (fast path, no objects built) and decode_frontend (full model) agree on near-valid
    and arbitrary bodies, so both relay modes refuse the same malformed messages."""
    t, body = unframe(codec.encode_frontend(data.draw(frontend_messages)))
    body = data.draw(st.one_of(mutated(body), st.binary(max_size=40)))
    assert _checks(t, body) == _decodes(t, body)
