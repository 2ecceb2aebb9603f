"""Bytes ↔ typed messages for the PostgreSQL protocol 3.0. Sans-I/O: no sockets, no state.

Wire format (PostgreSQL docs, "Message Formats"): a regular message is one type byte, an Int32 length that
counts itself but not the type byte, then the body. Startup packets (StartupMessage, SSLRequest,
GSSENCRequest, CancelRequest) have no type byte: Int32 length, Int32 code, payload.

``decode_*`` take the body only (without type byte and length). Every malformation raises
:class:`CodecError` (a :class:`~proxy.errors.ProtocolViolation`) and nothing else, so a peer sending
garbage can only ever produce that error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from proxy.errors import ProtocolViolation
from proxy.protocol import messages as m

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")

# The largest message body we accept (PostgreSQL's own limit for a palloc'd message is 1 GB).
MAX_MESSAGE_SIZE = 0x3FFFFFFF
# A startup packet is at most 10000 bytes (MAX_STARTUP_PACKET_LENGTH in the server's postmaster.c).
MAX_STARTUP_PACKET = 10000


class CodecError(ProtocolViolation):
    """A message could not be decoded. ``peer`` is "client" or "server"."""


class _Reader:
    """Cursor over one message body; every read checks bounds and raises CodecError."""

    __slots__ = ("buf", "peer", "pos", "what")

    def __init__(self, buf: bytes, peer: str, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.peer = peer
        self.what = what

    def fail(self, why: str) -> CodecError:
        return CodecError(self.peer, f"malformed {self.what} message: {why}")

    def int16(self) -> int:
        if self.pos + 2 > len(self.buf):
            raise self.fail("truncated Int16")
        (v,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def uint16(self) -> int:
        if self.pos + 2 > len(self.buf):
            raise self.fail("truncated Int16")
        (v,) = _U16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def int32(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise self.fail("truncated Int32")
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def uint32(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise self.fail("truncated Int32")
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def int8(self) -> int:
        return self.byte()[0]

    def byte(self) -> bytes:
        if self.pos + 1 > len(self.buf):
            raise self.fail("truncated Byte1")
        b = self.buf[self.pos : self.pos + 1]
        self.pos += 1
        return b

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail("truncated value")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def cstring(self) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise self.fail("unterminated string")
        raw = self.buf[self.pos : end]
        self.pos = end + 1
        # Strings are in the client encoding; surrogateescape keeps non-UTF-8 bytes lossless for relaying.
        return raw.decode("utf-8", "surrogateescape")

    def value(self) -> bytes | None:
        n = self.int32()
        if n == -1:
            return None
        if n < -1:
            raise self.fail("negative value length")
        return self.raw(n)

    def rest(self) -> bytes:
        b = self.buf[self.pos :]
        self.pos = len(self.buf)
        return b

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise self.fail("trailing bytes")


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _cstr(s: str) -> bytes:
    return _enc(s) + b"\x00"


def _value(v: bytes | None) -> bytes:
    if v is None:
        return b"\xff\xff\xff\xff"
    return _I32.pack(len(v)) + v


def frame(type_byte: bytes, body: bytes) -> bytes:
    """One regular message: type byte, Int32 length (counting itself), body."""
    return type_byte + _U32.pack(len(body) + 4) + body


# -- startup packets ------------------------------------------------------------------------------------


def decode_startup(packet: bytes) -> m.StartupPacket:
    """``packet`` is the whole startup packet *after* its length word: code · payload."""
    r = _Reader(packet, "client", "startup")
    code = r.int32()
    if code == m.SSL_REQUEST_CODE:
        r.end()
        return m.SSLRequest()
    if code == m.GSSENC_REQUEST_CODE:
        r.end()
        return m.GSSENCRequest()
    if code == m.CANCEL_REQUEST_CODE:
        pid = r.int32()
        key = r.int32()
        r.end()
        return m.CancelRequest(pid, key)
    if code >> 16 != 3:
        raise CodecError("client", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    params: list[tuple[str, str]] = []
    while True:
        name = r.cstring()
        if name == "":
            break
        params.append((name, r.cstring()))
    r.end()
    return m.StartupMessage(code, tuple(params))


def encode_startup(msg: m.StartupPacket) -> bytes:
    if isinstance(msg, m.SSLRequest):
        body = _I32.pack(m.SSL_REQUEST_CODE)
    elif isinstance(msg, m.GSSENCRequest):
        body = _I32.pack(m.GSSENC_REQUEST_CODE)
    elif isinstance(msg, m.CancelRequest):
        body = _I32.pack(m.CANCEL_REQUEST_CODE) + _I32.pack(msg.process_id) + _I32.pack(msg.secret_key)
    else:
        body = _I32.pack(msg.protocol) + b"".join(_cstr(k) + _cstr(v) for k, v in msg.parameters) + b"\x00"
    return _U32.pack(len(body) + 4) + body


# -- frontend -------------------------------------------------------------------------------------------


def _formats(r: _Reader) -> tuple[int, ...]:
    n = r.uint16()
    out = tuple(r.int16() for _ in range(n))
    for f in out:
        if f not in (0, 1):
            raise r.fail("format code must be 0 or 1")
    return out


def _dec_query(r: _Reader) -> m.Query:
    q = r.cstring()
    r.end()
    return m.Query(q)


def _dec_parse(r: _Reader) -> m.Parse:
    name = r.cstring()
    q = r.cstring()
    n = r.uint16()  # counts are read unsigned by the server (pq_getmsgint(msg, 2)): up to 65535
    types = tuple(r.uint32() for _ in range(n))
    r.end()
    return m.Parse(name, q, types)


def _dec_bind(r: _Reader) -> m.Bind:
    portal = r.cstring()
    stmt = r.cstring()
    pf = _formats(r)
    n = r.uint16()
    params = tuple(r.value() for _ in range(n))
    rf = _formats(r)
    r.end()
    return m.Bind(portal, stmt, pf, params, rf)


def _dec_describe(r: _Reader) -> m.Describe:
    kind = r.byte()
    if kind not in (b"S", b"P"):
        raise r.fail("Describe target must be 'S' or 'P'")
    name = r.cstring()
    r.end()
    return m.Describe(kind, name)


def _dec_execute(r: _Reader) -> m.Execute:
    portal = r.cstring()
    rows = r.int32()
    r.end()
    return m.Execute(portal, rows)


def _dec_close(r: _Reader) -> m.Close:
    kind = r.byte()
    if kind not in (b"S", b"P"):
        raise r.fail("Close target must be 'S' or 'P'")
    name = r.cstring()
    r.end()
    return m.Close(kind, name)


def _dec_function_call(r: _Reader) -> m.FunctionCall:
    oid = r.uint32()
    af = _formats(r)
    n = r.int16()
    if n < 0:
        raise r.fail("negative argument count")
    args = tuple(r.value() for _ in range(n))
    rf = r.int16()
    r.end()
    return m.FunctionCall(oid, af, args, rf)


def _empty(msg: object) -> Callable[[_Reader], object]:
    def dec(r: _Reader) -> object:
        r.end()
        return msg

    return dec


def _dec_copy_data(r: _Reader) -> m.CopyData:
    return m.CopyData(r.rest())


def _dec_copy_fail(r: _Reader) -> m.CopyFail:
    s = r.cstring()
    r.end()
    return m.CopyFail(s)


_FRONTEND: dict[int, tuple[str, Callable[[_Reader], object]]] = {
    ord("Q"): ("Query", _dec_query),
    ord("P"): ("Parse", _dec_parse),
    ord("B"): ("Bind", _dec_bind),
    ord("D"): ("Describe", _dec_describe),
    ord("E"): ("Execute", _dec_execute),
    ord("C"): ("Close", _dec_close),
    ord("S"): ("Sync", _empty(m.Sync())),
    ord("H"): ("Flush", _empty(m.Flush())),
    ord("X"): ("Terminate", _empty(m.Terminate())),
    ord("F"): ("FunctionCall", _dec_function_call),
    ord("d"): ("CopyData", _dec_copy_data),
    ord("c"): ("CopyDone", _empty(m.CopyDone())),
    ord("f"): ("CopyFail", _dec_copy_fail),
}

# Frontend message types that are valid after startup. 'p' covers PasswordMessage, SASLInitialResponse,
# SASLResponse and GSSResponse, which are relayed untouched and need no decoding.
FRONTEND_TYPES = frozenset([*_FRONTEND, ord("p")])


def decode_frontend(type_byte: int, body: bytes) -> m.FrontendMessage:
    entry = _FRONTEND.get(type_byte)
    if entry is None:
        raise CodecError("client", f"invalid frontend message type {type_byte}")
    name, dec = entry
    return dec(_Reader(body, "client", name))  # type: ignore[return-value]


def check_frontend(type_byte: int, buf: bytes, start: int, end: int) -> None:
    """Validates the structure of the frontend message body ``buf[start:end]`` without decoding it: the
    frame-level fast path forwards bytes untouched but still refuses what :func:`decode_frontend` would.
    Raises :class:`CodecError`, the same error decode_frontend raises for the same bytes."""
    try:
        _check(type_byte, buf, start, end)
    except (struct.error, IndexError):
        raise CodecError("client", f"malformed message of type {type_byte}") from None


def _cstring_end(buf: bytes, pos: int, end: int, t: int) -> int:
    nul = buf.find(b"\x00", pos, end)
    if nul < 0:
        raise CodecError("client", f"malformed message of type {t}: unterminated string")
    return nul + 1


def _check_formats(buf: bytes, pos: int, end: int, t: int) -> int:
    (n,) = _U16.unpack_from(buf, pos)
    pos += 2
    for _ in range(n):
        (f,) = _I16.unpack_from(buf, pos)
        if f not in (0, 1):
            raise CodecError("client", f"malformed message of type {t}: format code must be 0 or 1")
        pos += 2
    return pos


def _check_values(buf: bytes, pos: int, end: int, t: int) -> int:
    (n,) = _U16.unpack_from(buf, pos)
    pos += 2
    for _ in range(n):
        (ln,) = _I32.unpack_from(buf, pos)
        pos += 4
        if ln < -1:
            raise CodecError("client", f"malformed message of type {t}: negative value length")
        if ln > 0:
            pos += ln
    return pos


def _check(t: int, buf: bytes, start: int, end: int) -> None:
    pos = start
    if t == 0x51 or t == 0x66:  # Query, CopyFail: one string
        pos = _cstring_end(buf, pos, end, t)
    elif t == 0x50:  # Parse: name, query, Int16 count, Int32 OIDs
        pos = _cstring_end(buf, _cstring_end(buf, pos, end, t), end, t)
        (n,) = _U16.unpack_from(buf, pos)
        pos += 2 + 4 * n
    elif t == 0x42:  # Bind: portal, statement, formats, values, result formats
        pos = _cstring_end(buf, _cstring_end(buf, pos, end, t), end, t)
        pos = _check_formats(buf, _check_values(buf, _check_formats(buf, pos, end, t), end, t), end, t)
    elif t == 0x44 or t == 0x43:  # Describe, Close: 'S' or 'P', name
        if buf[pos : pos + 1] not in (b"S", b"P"):
            raise CodecError("client", f"malformed message of type {t}: target must be 'S' or 'P'")
        pos = _cstring_end(buf, pos + 1, end, t)
    elif t == 0x45:  # Execute: portal, Int32 max rows
        pos = _cstring_end(buf, pos, end, t) + 4
    elif t == 0x46:  # FunctionCall: OID, formats, values, Int16 result format
        pos = _check_values(buf, _check_formats(buf, pos + 4, end, t), end, t) + 2
    elif t == 0x64:  # CopyData: any bytes
        return
    elif t == 0x70:  # a password/SASL/GSS message outside authentication
        raise CodecError("client", "unexpected password message")
    # Sync, Flush, Terminate, CopyDone: no body
    if pos != end:
        raise CodecError("client", f"malformed message of type {t}: {'trailing' if pos < end else 'missing'} bytes")


# -- the extended protocol's hot messages, read in place ----------------------------------------------
# A prepared statement runs as Bind, Describe, Execute and Sync, once per transaction, and the relay needs
# only a name or two from each. These functions read that straight from the body without building message
# objects. Each accepts exactly the bodies decode_frontend accepts: anything else is handed to
# decode_frontend, so a malformed message is refused with the decoder's own error, word for word. A
# property test holds each of them to the decoder.


class _Refused(Exception):
    """The fast reader does not accept these bytes; the full decoder says why."""


def _refuse(type_byte: int, body: bytes) -> CodecError:
    try:
        decode_frontend(type_byte, body)
    except CodecError as e:
        return e
    # The fast readers and the decoder disagree (a bug the property tests exist to catch): fail closed.
    return CodecError("client", f"malformed message of type {type_byte}")


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape") if raw else ""


def decode_target(type_byte: int, body: bytes) -> tuple[bytes, str]:
    """Describe or Close (``type_byte``): (b"S" or b"P", name)."""
    kind = body[:1]
    if (kind == b"S" or kind == b"P") and body.find(b"\x00", 1) == len(body) - 1:
        return kind, _name(body[1:-1])
    raise _refuse(type_byte, body)


def decode_execute_portal(body: bytes) -> str:
    """Execute: the portal's name (the row limit matters to the server only)."""
    nul = body.find(b"\x00")
    if nul >= 0 and nul == len(body) - 5:
        return _name(body[:nul])
    raise _refuse(0x45, body)


def check_empty(type_byte: int, body: bytes) -> None:
    """Sync, Flush, Terminate, CopyDone: no body."""
    if body:
        raise _refuse(type_byte, body)


_FORMAT_CODES = frozenset((0, 1))


def decode_bind_frame(body: bytes) -> m.BindFrame:
    """A Bind as a :class:`~proxy.protocol.messages.BindFrame`: names and format codes decoded, parameter
    values located but not copied."""
    try:
        return _bind_frame(body)
    except (_Refused, struct.error, ValueError):
        pass
    raise _refuse(0x42, body)


def _bind_frame(body: bytes) -> m.BindFrame:
    # Bind: String portal · String statement · Int16 n · Int16[n] parameter formats · Int16 n ·
    # n * (Int32 length (-1 = NULL) · Byte[length]) · Int16 n · Int16[n] result formats.
    portal_end = body.index(0)
    names_end = body.index(0, portal_end + 1) + 1
    pos = names_end
    (n,) = _U16.unpack_from(body, pos)
    param_formats: tuple[int, ...] = ()
    if n:
        param_formats = struct.unpack_from(f"!{n}h", body, pos + 2)
        if not _FORMAT_CODES.issuperset(param_formats):
            raise _Refused
    pos += 2 + 2 * n
    (n,) = _U16.unpack_from(body, pos)
    pos += 2
    offsets = [pos] * (n + 1)
    unpack = _I32.unpack_from
    for i in range(n):
        offsets[i] = pos
        (length,) = unpack(body, pos)
        if length > 0:
            pos += 4 + length
        elif length >= -1:
            pos += 4
        else:
            raise _Refused
    offsets[n] = pos
    (n,) = _U16.unpack_from(body, pos)  # struct.error when the last value ran past the end
    result_formats: tuple[int, ...] = ()
    if n:
        result_formats = struct.unpack_from(f"!{n}h", body, pos + 2)
        if not _FORMAT_CODES.issuperset(result_formats):
            raise _Refused
    if pos + 2 + 2 * n != len(body):
        raise _Refused
    return m.BindFrame(
        body,
        _name(body[:portal_end]),
        _name(body[portal_end + 1 : names_end - 1]),
        names_end,
        param_formats,
        tuple(offsets),
        result_formats,
    )


_PACKED_FORMATS: dict[tuple[int, ...], bytes] = {}


def _pack_formats(codes: tuple[int, ...]) -> bytes:
    packed = _PACKED_FORMATS.get(codes)
    if packed is None:
        packed = struct.pack(f"!H{len(codes)}h", len(codes), *codes)
        if len(_PACKED_FORMATS) >= 512:
            _PACKED_FORMATS.clear()  # the few shapes an application's statements use; bounded anyway
        _PACKED_FORMATS[codes] = packed
    return packed


def encode_bind_frame(
    bind: m.BindFrame,
    param_formats: tuple[int, ...] | None = None,
    replaced: tuple[tuple[int, bytes], ...] = (),
    result_formats: tuple[int, ...] | None = None,
) -> bytes:
    """The whole Bind message of ``bind`` with the parameters in ``replaced`` ((index, value) pairs, in
    ascending index order) and the format lists that are not None replaced; every other byte is copied
    from the original body. Gives the same bytes as encoding the equivalent :class:`messages.Bind`."""
    body = bind.body
    offsets = bind.param_offsets
    names_end = bind.names_end
    values_start = offsets[0] - 2
    parts = [
        body[:names_end],
        body[names_end:values_start] if param_formats is None else _pack_formats(param_formats),
    ]
    append = parts.append
    pack = _I32.pack
    prev = values_start
    for i, value in replaced:
        start = offsets[i]
        if start != prev:
            append(body[prev:start])
        append(pack(len(value)))
        append(value)
        prev = offsets[i + 1]
    results_start = offsets[-1]
    if result_formats is None:
        append(body[prev:])
    else:
        append(body[prev:results_start])
        append(_pack_formats(result_formats))
    out = b"".join(parts)
    return b"B" + _U32.pack(len(out) + 4) + out


def encode_frontend(msg: m.FrontendMessage) -> bytes:
    if isinstance(msg, m.Query):
        return frame(b"Q", _cstr(msg.query))
    if isinstance(msg, m.Parse):
        body = _cstr(msg.statement) + _cstr(msg.query) + _U16.pack(len(msg.param_types))
        body += b"".join(_U32.pack(t) for t in msg.param_types)
        return frame(b"P", body)
    if isinstance(msg, m.Bind):
        return frame(b"B", encode_bind_body(msg))
    if isinstance(msg, m.Describe):
        return frame(b"D", msg.kind + _cstr(msg.name))
    if isinstance(msg, m.Execute):
        return frame(b"E", _cstr(msg.portal) + _I32.pack(msg.max_rows))
    if isinstance(msg, m.Close):
        return frame(b"C", msg.kind + _cstr(msg.name))
    if isinstance(msg, m.Sync):
        return b"S\x00\x00\x00\x04"
    if isinstance(msg, m.Flush):
        return b"H\x00\x00\x00\x04"
    if isinstance(msg, m.Terminate):
        return b"X\x00\x00\x00\x04"
    if isinstance(msg, m.FunctionCall):
        body = _U32.pack(msg.function_oid) + _I16.pack(len(msg.arg_formats))
        body += b"".join(_I16.pack(f) for f in msg.arg_formats)
        body += _I16.pack(len(msg.args)) + b"".join(_value(a) for a in msg.args) + _I16.pack(msg.result_format)
        return frame(b"F", body)
    if isinstance(msg, m.CopyData):
        return frame(b"d", msg.data)
    if isinstance(msg, m.CopyDone):
        return b"c\x00\x00\x00\x04"
    return frame(b"f", _cstr(msg.message))


def encode_bind_body(msg: m.Bind) -> bytes:
    parts = [_cstr(msg.portal), _cstr(msg.statement), _U16.pack(len(msg.param_formats))]
    parts.extend(_I16.pack(f) for f in msg.param_formats)
    parts.append(_U16.pack(len(msg.params)))
    parts.extend(_value(p) for p in msg.params)
    parts.append(_U16.pack(len(msg.result_formats)))
    parts.extend(_I16.pack(f) for f in msg.result_formats)
    return b"".join(parts)


# -- backend --------------------------------------------------------------------------------------------


def _dec_auth(r: _Reader) -> m.Authentication:
    code = r.int32()
    return m.Authentication(code, r.rest())


def _dec_key_data(r: _Reader) -> m.BackendKeyData:
    pid = r.int32()
    key = r.int32()
    r.end()
    return m.BackendKeyData(pid, key)


def _dec_param_status(r: _Reader) -> m.ParameterStatus:
    k = r.cstring()
    v = r.cstring()
    r.end()
    return m.ParameterStatus(k, v)


def _dec_ready(r: _Reader) -> m.ReadyForQuery:
    s = r.byte()
    r.end()
    if s not in (b"I", b"T", b"E"):
        raise r.fail("unknown transaction status")
    return m.ReadyForQuery(s)


def _fields(r: _Reader) -> tuple[tuple[bytes, str], ...]:
    out: list[tuple[bytes, str]] = []
    while True:
        code = r.byte()
        if code == b"\x00":
            break
        out.append((code, r.cstring()))
    r.end()
    return tuple(out)


def _dec_error(r: _Reader) -> m.ErrorResponse:
    return m.ErrorResponse(_fields(r))


def _dec_notice(r: _Reader) -> m.NoticeResponse:
    return m.NoticeResponse(_fields(r))


def _dec_row_description(r: _Reader) -> m.RowDescription:
    n = r.int16()
    if n < 0:
        raise r.fail("negative field count")
    fields = []
    for _ in range(n):
        name = r.cstring()
        fields.append(m.FieldDescription(name, r.uint32(), r.int16(), r.uint32(), r.int16(), r.int32(), r.int16()))
    r.end()
    return m.RowDescription(tuple(fields))


def _dec_param_description(r: _Reader) -> m.ParameterDescription:
    n = r.uint16()
    oids = tuple(r.uint32() for _ in range(n))
    r.end()
    return m.ParameterDescription(oids)


def _dec_data_row(r: _Reader) -> m.DataRow:
    n = r.int16()
    if n < 0:
        raise r.fail("negative column count")
    vals = tuple(r.value() for _ in range(n))
    r.end()
    return m.DataRow(vals)


def _dec_command_complete(r: _Reader) -> m.CommandComplete:
    t = r.cstring()
    r.end()
    return m.CommandComplete(t)


def _copy_response(r: _Reader) -> tuple[int, tuple[int, ...]]:
    fmt = r.int8()
    n = r.int16()
    if n < 0:
        raise r.fail("negative column count")
    cols = tuple(r.int16() for _ in range(n))
    r.end()
    return fmt, cols


def _dec_copy_in(r: _Reader) -> m.CopyInResponse:
    return m.CopyInResponse(*_copy_response(r))


def _dec_copy_out(r: _Reader) -> m.CopyOutResponse:
    return m.CopyOutResponse(*_copy_response(r))


def _dec_copy_both(r: _Reader) -> m.CopyBothResponse:
    return m.CopyBothResponse(*_copy_response(r))


def _dec_notification(r: _Reader) -> m.NotificationResponse:
    pid = r.int32()
    ch = r.cstring()
    payload = r.cstring()
    r.end()
    return m.NotificationResponse(pid, ch, payload)


def _dec_fc_response(r: _Reader) -> m.FunctionCallResponse:
    v = r.value()
    r.end()
    return m.FunctionCallResponse(v)


def _dec_negotiate(r: _Reader) -> m.NegotiateProtocolVersion:
    minor = r.int32()
    n = r.int32()
    if n < 0:
        raise r.fail("negative option count")
    opts = tuple(r.cstring() for _ in range(n))
    r.end()
    return m.NegotiateProtocolVersion(minor, opts)


_BACKEND: dict[int, tuple[str, Callable[[_Reader], object]]] = {
    ord("R"): ("Authentication", _dec_auth),
    ord("K"): ("BackendKeyData", _dec_key_data),
    ord("S"): ("ParameterStatus", _dec_param_status),
    ord("Z"): ("ReadyForQuery", _dec_ready),
    ord("E"): ("ErrorResponse", _dec_error),
    ord("N"): ("NoticeResponse", _dec_notice),
    ord("T"): ("RowDescription", _dec_row_description),
    ord("t"): ("ParameterDescription", _dec_param_description),
    ord("D"): ("DataRow", _dec_data_row),
    ord("C"): ("CommandComplete", _dec_command_complete),
    ord("1"): ("ParseComplete", _empty(m.ParseComplete())),
    ord("2"): ("BindComplete", _empty(m.BindComplete())),
    ord("3"): ("CloseComplete", _empty(m.CloseComplete())),
    ord("n"): ("NoData", _empty(m.NoData())),
    ord("s"): ("PortalSuspended", _empty(m.PortalSuspended())),
    ord("I"): ("EmptyQueryResponse", _empty(m.EmptyQueryResponse())),
    ord("G"): ("CopyInResponse", _dec_copy_in),
    ord("H"): ("CopyOutResponse", _dec_copy_out),
    ord("W"): ("CopyBothResponse", _dec_copy_both),
    ord("d"): ("CopyData", _dec_copy_data),
    ord("c"): ("CopyDone", _empty(m.CopyDone())),
    ord("A"): ("NotificationResponse", _dec_notification),
    ord("V"): ("FunctionCallResponse", _dec_fc_response),
    ord("v"): ("NegotiateProtocolVersion", _dec_negotiate),
}

BACKEND_TYPES = frozenset(_BACKEND)


def decode_backend(type_byte: int, body: bytes) -> m.BackendMessage:
    entry = _BACKEND.get(type_byte)
    if entry is None:
        raise CodecError("server", f"invalid backend message type {type_byte}")
    name, dec = entry
    return dec(_Reader(body, "server", name))  # type: ignore[return-value]


def _enc_fields(fields: tuple[tuple[bytes, str], ...]) -> bytes:
    return b"".join(k + _cstr(v) for k, v in fields) + b"\x00"


def encode_backend(msg: m.BackendMessage) -> bytes:
    if isinstance(msg, m.Authentication):
        return frame(b"R", _I32.pack(msg.code) + msg.payload)
    if isinstance(msg, m.BackendKeyData):
        return frame(b"K", _I32.pack(msg.process_id) + _I32.pack(msg.secret_key))
    if isinstance(msg, m.ParameterStatus):
        return frame(b"S", _cstr(msg.name) + _cstr(msg.value))
    if isinstance(msg, m.ReadyForQuery):
        return frame(b"Z", msg.status)
    if isinstance(msg, m.ErrorResponse):
        return frame(b"E", _enc_fields(msg.fields))
    if isinstance(msg, m.NoticeResponse):
        return frame(b"N", _enc_fields(msg.fields))
    if isinstance(msg, m.RowDescription):
        return frame(b"T", encode_row_description_body(msg))
    if isinstance(msg, m.ParameterDescription):
        return frame(b"t", _U16.pack(len(msg.type_oids)) + b"".join(_U32.pack(o) for o in msg.type_oids))
    if isinstance(msg, m.DataRow):
        return frame(b"D", _I16.pack(len(msg.values)) + b"".join(_value(v) for v in msg.values))
    if isinstance(msg, m.CommandComplete):
        return frame(b"C", _cstr(msg.tag))
    if isinstance(msg, m.CopyData):
        return frame(b"d", msg.data)
    if isinstance(msg, m.NotificationResponse):
        return frame(b"A", _I32.pack(msg.process_id) + _cstr(msg.channel) + _cstr(msg.payload))
    if isinstance(msg, m.FunctionCallResponse):
        return frame(b"V", _value(msg.result))
    if isinstance(msg, m.NegotiateProtocolVersion):
        body = _I32.pack(msg.newest_minor) + _I32.pack(len(msg.unrecognized))
        return frame(b"v", body + b"".join(_cstr(o) for o in msg.unrecognized))
    if isinstance(msg, m.CopyInResponse | m.CopyOutResponse | m.CopyBothResponse):
        t = {m.CopyInResponse: b"G", m.CopyOutResponse: b"H", m.CopyBothResponse: b"W"}[type(msg)]
        body = bytes([msg.format]) + _I16.pack(len(msg.column_formats))
        return frame(t, body + b"".join(_I16.pack(f) for f in msg.column_formats))
    simple = {
        m.ParseComplete: b"1",
        m.BindComplete: b"2",
        m.CloseComplete: b"3",
        m.NoData: b"n",
        m.PortalSuspended: b"s",
        m.EmptyQueryResponse: b"I",
        m.CopyDone: b"c",
    }
    return frame(simple[type(msg)], b"")


def encode_row_description_body(msg: m.RowDescription) -> bytes:
    parts = [_I16.pack(len(msg.fields))]
    for f in msg.fields:
        parts.append(_cstr(f.name))
        parts.append(
            struct.pack("!IhIhih", f.table_oid, f.column_attnum, f.type_oid, f.type_size, f.type_modifier, f.format)
        )
    return b"".join(parts)


# -- errors the proxy itself sends ----------------------------------------------------------------------


def encode_error(
    severity: str, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> bytes:
    """An ErrorResponse from the proxy. ``message`` must not contain data values (see STYLE.md)."""
    fields: list[tuple[bytes, str]] = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    if detail:
        fields.append((b"D", detail))
    if hint:
        fields.append((b"H", hint))
    return frame(b"E", _enc_fields(tuple(fields)))


def read_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """(type byte, length) of the regular message at ``pos``; the caller checks there are 5 bytes."""
    t, n = _HEADER.unpack_from(buf, pos)
    return t[0], int(n)
