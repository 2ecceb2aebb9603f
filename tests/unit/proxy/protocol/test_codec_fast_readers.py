"""The in-place readers of the extended protocol's hot messages (Bind, Describe, Close, Execute, Sync and
the other empty messages) against the full decoder: on valid messages they read the same fields; on
near-valid and arbitrary bodies they accept exactly what the decoder accepts and refuse the rest with the
decoder's own error, word for word. The Bind rewriter gives the bytes encoding the equivalent Bind gives.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol import codec
from proxy.protocol import messages as m

text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
formats = st.lists(st.sampled_from([0, 1]), max_size=6).map(tuple)
values = st.lists(st.none() | st.binary(max_size=30), max_size=6).map(tuple)
binds = st.builds(m.Bind, text, text, formats, values, formats)
kinds = st.sampled_from([b"S", b"P"])


def body_of(msg: m.FrontendMessage) -> bytes:
    return codec.encode_frontend(msg)[5:]


@st.composite
def near(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` truncated, extended or with bytes overwritten; or arbitrary bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=40))
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["flip", "cut", "append", "nul"]))
        if action in ("flip", "nul") and data:
            data[draw(st.integers(0, len(data) - 1))] = 0 if action == "nul" else draw(st.integers(0, 255))
        elif action == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        else:
            data += draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def outcome(f: Callable[[], object]) -> tuple[str, object]:
    """("ok", value) or ("refused", (error class, peer, message))."""
    try:
        return "ok", f()
    except codec.CodecError as e:
        return "refused", (type(e), e.peer, e.message)


def decoder(t: int, body: bytes) -> tuple[str, object]:
    return outcome(lambda: codec.decode_frontend(t, body))


def same_verdict(fast: tuple[str, object], full: tuple[str, object]) -> None:
    assert fast[0] == full[0]
    if fast[0] == "refused":
        assert fast[1] == full[1]  # the decoder's own error, word for word


# -- Bind -----------------------------------------------------------------------------------------------


@given(binds)
def test_bind_frame_reads_what_the_decoder_reads(msg: m.Bind) -> None:
    body = body_of(msg)
    frame = codec.decode_bind_frame(body)
    assert (frame.portal, frame.statement, frame.param_formats, frame.result_formats) == (
        msg.portal,
        msg.statement,
        msg.param_formats,
        msg.result_formats,
    )
    assert frame.param_count == len(msg.params)
    assert frame.params == msg.params
    assert frame.body is body


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bind_frame_refuses_exactly_what_the_decoder_refuses(data: st.DataObject) -> None:
    body = data.draw(near(body_of(data.draw(binds))))
    fast = outcome(lambda: codec.decode_bind_frame(body))
    full = decoder(0x42, body)
    same_verdict(fast, full)
    if fast[0] == "ok":
        frame, msg = fast[1], full[1]
        assert isinstance(frame, m.BindFrame)
        assert isinstance(msg, m.Bind)
        assert (frame.portal, frame.statement, frame.param_formats, frame.params, frame.result_formats) == (
            msg.portal,
            msg.statement,
            msg.param_formats,
            msg.params,
            msg.result_formats,
        )


@st.composite
def rewrites(draw: st.DrawFn) -> tuple[m.Bind, tuple[int, ...] | None, dict[int, bytes], tuple[int, ...] | None]:
    msg = draw(binds)
    n = len(msg.params)
    chosen = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n)) if n else []
    replaced = {i: draw(st.binary(max_size=80)) for i in chosen}
    param_formats = draw(st.none() | st.lists(st.sampled_from([0, 1]), max_size=8).map(tuple))
    result_formats = draw(st.none() | st.lists(st.sampled_from([0, 1]), max_size=8).map(tuple))
    return msg, param_formats, replaced, result_formats


@given(rewrites())
def test_bind_rewriter_gives_the_bytes_of_the_equivalent_bind(
    case: tuple[m.Bind, tuple[int, ...] | None, dict[int, bytes], tuple[int, ...] | None],
) -> None:
    msg, param_formats, replaced, result_formats = case
    frame = codec.decode_bind_frame(body_of(msg))
    rewritten = codec.encode_bind_frame(
        frame, param_formats=param_formats, replaced=tuple(sorted(replaced.items())), result_formats=result_formats
    )
    expected = m.Bind(
        msg.portal,
        msg.statement,
        msg.param_formats if param_formats is None else param_formats,
        tuple(replaced.get(i, v) for i, v in enumerate(msg.params)),
        msg.result_formats if result_formats is None else result_formats,
    )
    assert rewritten == codec.encode_frontend(expected)


def test_bind_rewriter_copies_names_in_any_client_encoding() -> None:
    body = b"p\xe9\x00st\xff\x00\x00\x00\x00\x02\x00\x00\x00\x01a\xff\xff\xff\xff\x00\x00"
    frame = codec.decode_bind_frame(body)
    assert frame.params == (b"a", None)
    assert codec.encode_bind_frame(frame) == codec.frame(b"B", body)
    assert codec.encode_bind_frame(frame, replaced=((1, b"xyz"),)) == codec.frame(
        b"B", body[:-6] + b"\x00\x00\x00\x03xyz\x00\x00"
    )


def test_null_and_empty_parameters_are_told_apart() -> None:
    frame = codec.decode_bind_frame(body_of(m.Bind("", "s", (), (None, b"", b"x"), ())))
    assert [frame.param(i) for i in range(3)] == [None, b"", b"x"]


def test_bind_frame_repr_shows_no_values() -> None:
    frame = codec.decode_bind_frame(body_of(m.Bind("p", "s", (), (b"zq-secret-9",), ())))
    assert "zq-secret-9" not in repr(frame)
    assert "params=1" in repr(frame)


def test_more_than_32767_parameters_are_located() -> None:
    n = 40000
    msg = m.Bind("", "", (1,), tuple(struct.pack("!i", i) for i in range(n)), ())
    frame = codec.decode_bind_frame(body_of(msg))
    assert frame.param_count == n
    assert frame.param(n - 1) == struct.pack("!i", n - 1)


# -- Describe, Close, Execute, empty messages -----------------------------------------------------------


@given(st.sampled_from([0x44, 0x43]), kinds, text)
def test_target_reader_reads_what_the_decoder_reads(t: int, kind: bytes, name: str) -> None:
    msg = m.Describe(kind, name) if t == 0x44 else m.Close(kind, name)
    assert codec.decode_target(t, body_of(msg)) == (kind, name)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([0x44, 0x43]), kinds, text, st.data())
def test_target_reader_refuses_exactly_what_the_decoder_refuses(
    t: int, kind: bytes, name: str, data: st.DataObject
) -> None:
    body = data.draw(near(body_of(m.Describe(kind, name))))
    fast = outcome(lambda: codec.decode_target(t, body))
    full = decoder(t, body)
    same_verdict(fast, full)
    if fast[0] == "ok":
        msg = full[1]
        assert isinstance(msg, m.Describe | m.Close)
        assert fast[1] == (msg.kind, msg.name)


@given(text, st.integers(-(2**31), 2**31 - 1))
def test_execute_reader_reads_the_portal(name: str, max_rows: int) -> None:
    assert codec.decode_execute_portal(body_of(m.Execute(name, max_rows))) == name


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(text, st.integers(-(2**31), 2**31 - 1), st.data())
def test_execute_reader_refuses_exactly_what_the_decoder_refuses(name: str, max_rows: int, data: st.DataObject) -> None:
    body = data.draw(near(body_of(m.Execute(name, max_rows))))
    fast = outcome(lambda: codec.decode_execute_portal(body))
    full = decoder(0x45, body)
    same_verdict(fast, full)
    if fast[0] == "ok":
        msg = full[1]
        assert isinstance(msg, m.Execute)
        assert fast[1] == msg.portal


@pytest.mark.parametrize(
    ("t", "body"),
    [
        (0x45, b"abcd"),  # four bytes and no NUL: as long as a row count, but no portal name
        (0x45, b"\x00\x00\x00\x00"),
        (0x45, b"\x00\x00\x00\x00\x00\x00"),
        (0x44, b"S"),
        (0x44, b"X\x00"),
        (0x43, b""),
        (0x43, b"P\x00\x00"),
        (0x42, b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # value length -2
        (0x42, b"\x00\x00\x00\x01\x00\x02\x00\x00\x00\x00"),  # format code 2
        (0x42, b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x05ab\x00\x00"),  # value runs past the end
    ],
)
def test_known_malformations_get_the_decoders_error(t: int, body: bytes) -> None:
    readers: dict[int, Callable[[], object]] = {
        0x42: lambda: codec.decode_bind_frame(body),
        0x43: lambda: codec.decode_target(t, body),
        0x44: lambda: codec.decode_target(t, body),
        0x45: lambda: codec.decode_execute_portal(body),
    }
    full = decoder(t, body)
    assert full[0] == "refused"
    same_verdict(outcome(readers[t]), full)


@given(st.sampled_from([0x53, 0x48, 0x58, 0x63]), st.binary(max_size=8))
def test_empty_message_check_agrees_with_the_decoder(t: int, body: bytes) -> None:
    same_verdict(outcome(lambda: codec.check_empty(t, body)), decoder(t, body))
