"""Typed PostgreSQL protocol messages (protocol 3.0), named as in the PostgreSQL docs, "Message Formats".

Only the messages the proxy acts on have a type here; everything else travels as raw bytes. Frontend
(client → server) and backend (server → client) messages are separate types even where they share a type
byte: ``b"D"`` is Describe from a client and DataRow from a server.

Messages are frozen slotted dataclasses. Those that can carry secrets (query text, parameters, row
values, passwords) show only sizes in ``repr`` so that a logged message never leaks them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

_I32 = struct.Struct("!i")

# -- startup packets (no type byte): length · code · payload ----------------------------------------------

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    parameters: tuple[tuple[str, str], ...]

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.parameters:
            if k == name:
                return v
        return default

    def __repr__(self) -> str:
        return f"StartupMessage(protocol={self.protocol >> 16}.{self.protocol & 0xFFFF}, n={len(self.parameters)})"


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int

    def __repr__(self) -> str:
        return f"CancelRequest(process_id={self.process_id})"


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


# -- frontend messages ----------------------------------------------------------------------------------


class FormatCode(IntEnum):
    TEXT = 0
    BINARY = 1


@dataclass(frozen=True, slots=True)
class Query:
    """'Q': a simple-protocol query string (possibly several statements)."""

    query: str

    def __repr__(self) -> str:
        return f"Query(len={len(self.query)})"


@dataclass(frozen=True, slots=True)
class Parse:
    """'P': ``statement`` ("" is the unnamed statement), query text, parameter type OIDs (0 = unspecified)."""

    statement: str
    query: str
    param_types: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"Parse(statement={self.statement!r}, len={len(self.query)}, params={len(self.param_types)})"


@dataclass(frozen=True, slots=True)
class Bind:
    """'B': binds ``params`` (None = NULL) to ``portal`` from ``statement``.

    ``param_formats`` and ``result_formats`` follow the protocol's compact rule: empty = all text, one code =
    applies to all, else one code per parameter / result column.
    """

    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    def __repr__(self) -> str:
        return (
            f"Bind(portal={self.portal!r}, statement={self.statement!r}, params={len(self.params)}, "
            f"result_formats={self.result_formats!r})"
        )


@dataclass(slots=True)
class BindFrame:
    """A Bind kept as its wire ``body``, with the offsets needed to read or replace single parameters.

    The proxy's hot path (a prepared INSERT per transaction) reads a few parameters and rewrites them;
    copying the untouched parts of ``body`` is cheaper than building every value and re-encoding the
    whole message. ``names_end`` is the offset of the parameter-format count (just after the two names);
    ``param_offsets`` has one entry per parameter, the offset of its Int32 length word, plus a last one,
    the offset of the result-format count, so parameter ``i`` spans ``param_offsets[i:i + 2]``.
    ``codec.decode_bind_frame`` builds it and validates the body exactly as ``decode_frontend`` does.

    Treat it as immutable. It is not a frozen dataclass only because one is built per Bind and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) costs four times as much.
    """

    body: bytes
    portal: str
    statement: str
    names_end: int
    param_formats: tuple[int, ...]
    param_offsets: tuple[int, ...]
    result_formats: tuple[int, ...]

    @property
    def param_count(self) -> int:
        return len(self.param_offsets) - 1

    def param(self, i: int) -> bytes | None:
        """Parameter ``i`` (None = NULL)."""
        off = self.param_offsets[i]
        (n,) = _I32.unpack_from(self.body, off)
        return None if n < 0 else self.body[off + 4 : off + 4 + n]

    @property
    def params(self) -> tuple[bytes | None, ...]:
        return tuple(self.param(i) for i in range(self.param_count))

    def __repr__(self) -> str:
        return (
            f"BindFrame(portal={self.portal!r}, statement={self.statement!r}, params={self.param_count}, "
            f"result_formats={self.result_formats!r})"
        )


@dataclass(frozen=True, slots=True)
class Describe:
    """'D' from a client: ``kind`` is b"S" (statement) or b"P" (portal)."""

    kind: bytes
    name: str


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int = 0


@dataclass(frozen=True, slots=True)
class Close:
    """'C' from a client: ``kind`` is b"S" (statement) or b"P" (portal)."""

    kind: bytes
    name: str


@dataclass(frozen=True, slots=True)
class Sync:
    pass


@dataclass(frozen=True, slots=True)
class Flush:
    pass


@dataclass(frozen=True, slots=True)
class Terminate:
    pass


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """'F': the legacy fast-path function call; relayed, tracked for its ReadyForQuery."""

    function_oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int

    def __repr__(self) -> str:
        return f"FunctionCall(function_oid={self.function_oid}, args={len(self.args)})"


@dataclass(frozen=True, slots=True)
class CopyData:
    """'d' from either side."""

    data: bytes

    def __repr__(self) -> str:
        return f"CopyData(len={len(self.data)})"


@dataclass(frozen=True, slots=True)
class CopyDone:
    pass


@dataclass(frozen=True, slots=True)
class CopyFail:
    message: str


FrontendMessage = (
    Query
    | Parse
    | Bind
    | Describe
    | Execute
    | Close
    | Sync
    | Flush
    | Terminate
    | FunctionCall
    | CopyData
    | CopyDone
    | CopyFail
)


# -- backend messages -----------------------------------------------------------------------------------


class AuthCode(IntEnum):
    OK = 0
    KERBEROS_V5 = 2
    CLEARTEXT_PASSWORD = 3
    MD5_PASSWORD = 5
    GSS = 7
    GSS_CONTINUE = 8
    SSPI = 9
    SASL = 10
    SASL_CONTINUE = 11
    SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class Authentication:
    """'R': ``code`` is an :class:`AuthCode`; ``payload`` is the rest (salt, SASL mechanisms or data)."""

    code: int
    payload: bytes = b""

    def __repr__(self) -> str:
        return f"Authentication(code={self.code}, len={len(self.payload)})"


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    process_id: int
    secret_key: int

    def __repr__(self) -> str:
        return f"BackendKeyData(process_id={self.process_id})"


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """'Z': ``status`` is b"I" (idle), b"T" (in a transaction block) or b"E" (failed transaction block)."""

    status: bytes


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """'E' from a server: ``fields`` are (code byte, value) pairs, e.g. (b"C", "42P01")."""

    fields: tuple[tuple[bytes, str], ...]

    def field(self, code: bytes) -> str | None:
        for k, v in self.fields:
            if k == code:
                return v
        return None

    @property
    def sqlstate(self) -> str:
        return self.field(b"C") or "XX000"

    @property
    def severity(self) -> str:
        return self.field(b"V") or self.field(b"S") or "ERROR"


@dataclass(frozen=True, slots=True)
class NoticeResponse:
    fields: tuple[tuple[bytes, str], ...]


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One column of a RowDescription."""

    name: str
    table_oid: int
    column_attnum: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


@dataclass(frozen=True, slots=True)
class RowDescription:
    fields: tuple[FieldDescription, ...]


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    type_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DataRow:
    values: tuple[bytes | None, ...]

    def __repr__(self) -> str:
        return f"DataRow(columns={len(self.values)})"


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str


@dataclass(frozen=True, slots=True)
class ParseComplete:
    pass


@dataclass(frozen=True, slots=True)
class BindComplete:
    pass


@dataclass(frozen=True, slots=True)
class CloseComplete:
    pass


@dataclass(frozen=True, slots=True)
class NoData:
    pass


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    pass


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    pass


@dataclass(frozen=True, slots=True)
class CopyInResponse:
    format: int
    column_formats: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class CopyOutResponse:
    format: int
    column_formats: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class CopyBothResponse:
    format: int
    column_formats: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    process_id: int
    channel: str
    payload: str

    def __repr__(self) -> str:
        return f"NotificationResponse(process_id={self.process_id}, len={len(self.payload)})"


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:
    result: bytes | None

    def __repr__(self) -> str:
        return f"FunctionCallResponse(len={-1 if self.result is None else len(self.result)})"


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized: tuple[str, ...]


BackendMessage = (
    Authentication
    | BackendKeyData
    | ParameterStatus
    | ReadyForQuery
    | ErrorResponse
    | NoticeResponse
    | RowDescription
    | ParameterDescription
    | DataRow
    | CommandComplete
    | ParseComplete
    | BindComplete
    | CloseComplete
    | NoData
    | PortalSuspended
    | EmptyQueryResponse
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | CopyData
    | CopyDone
    | NotificationResponse
    | FunctionCallResponse
    | NegotiateProtocolVersion
)
