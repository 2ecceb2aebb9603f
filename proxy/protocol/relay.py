"""The per-connection relay: a sans-I/O state machine between one client and one server.

Theory of operation
-------------------
The session (the only code that touches sockets) feeds bytes in with :meth:`Relay.receive_client` and
:meth:`Relay.receive_server` and drains the bytes to write from :attr:`Relay.to_server` and
:attr:`Relay.to_client`. Things the session must do beyond writing bytes (start TLS, connect upstream,
forward a cancel, close) come out as :attr:`Relay.events`. Nothing here awaits or touches a socket, so
every behaviour is testable with bytes in, bytes out.

Framing. Both directions are scanned message by message from the headers (type byte, Int32 length). A
message the relay must act on is buffered until complete and decoded; any other message is forwarded
untouched, and if it is only partly here its bytes are passed on as they arrive (``_skip``), so a huge
DataRow or CopyData never sits whole in memory. Consecutive untouched messages leave as one slice of the
input, never re-encoded.

Startup (PostgreSQL docs, "Message Flow: Start-up"): the client's first packets have no type byte:
SSLRequest (the session answers 'S' and starts TLS, or 'N'), GSSENCRequest (always 'N': we terminate
TLS ourselves and cannot relay GSS encryption), CancelRequest (handed to the session, which forwards it to
the server; the server matches pid and secret, so any instance can forward it) and StartupMessage (handed
to the session, which connects upstream and sends it verbatim). Authentication is relayed untouched, except
that SASL mechanisms ending in ``-PLUS`` are removed from AuthenticationSASL: channel binding would bind
the client's TLS leg, which is not the leg PostgreSQL sees. AuthenticationOk records the login role.

Extended protocol ("Extended Query"): each frontend message that the server answers pushes a
:class:`Pending` entry on a FIFO; each backend reply is matched against the head. ParseComplete creates
the statement, BindComplete the portal, CloseComplete removes one, ReadyForQuery pops a Sync (or a simple
Query or FunctionCall). After an ErrorResponse in the extended protocol the server discards messages until
Sync: the relay pops every entry up to the next Sync, and if that Sync has not been sent yet it stops
queueing (``_discarding``) until the client sends it. Portals die at the end of their transaction, so
ReadyForQuery with status 'I' drops them all. A reply that matches nothing means client, server and
relay disagree about the conversation: the relay fails closed with a protocol violation. The messages of
every execution of a prepared statement (Bind, Describe, Execute, Sync, and Close) are read in place by
the codec's readers, which check them exactly as the decoder does; their replies are acted on from the
type byte. Neither side builds message objects for them.

Encryption. The relay knows nothing about columns or keys. A session with protected tables has an
encryption layer, reached only through :class:`~proxy.protocol.encryption.SessionEncryption`: each
frontend message the relay acts on is offered to it (one client path, with or without it) and may come
back rewritten or refused; the state it returns rides on the Pending entry and goes back to it with the
reply. Without a layer, no call is made and nothing per message is added.

Statement state follows the server. The model of statements and portals (and the encryption layer's
state for each, committed through the layer's ``set_*``/``close*`` calls) changes only when a reply says
it did: ParseComplete, BindComplete, CloseComplete; the CommandComplete of SQL PREPARE, DEALLOCATE [ALL]
and DISCARD ALL (their names come from the statement text); the first reply to a simple Query (which
destroys the unnamed statement and portal); an error for a Parse of the unnamed statement (the server
drops the old one first). A Parse that fails or is skipped changes nothing. A message sent before
earlier ones are answered is decided on every version its name may have when the server runs it
(:meth:`Relay._versions`): within its own segment every earlier message succeeded if it runs at all;
one of an earlier segment may have failed, so it adds a version and keeps the others. The encryption
layer refuses a Bind or Execute whose versions disagree and carry protected values, and a Bind of a name
the model does not know, rather than guessing.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import ClassVar

from keymgmt import native
from proxy.errors import ProtocolViolation, ProxyError, RefusalReason
from proxy.protocol import codec
from proxy.protocol import messages as m
from proxy.protocol.encryption import (
    REFUSED_QUERY,
    AnalysisMiss,
    CryptoState,
    NamespaceAction,
    NamespaceOp,
    SessionEncryption,
    ValuesMiss,
    Version,
    refused_bind,
)
from proxy.protocol.encryption import KeyMiss as KeyMiss

log = logging.getLogger(__name__)

_U32 = struct.Struct("!I")
_HDR = struct.Struct("!BI")


class Phase(Enum):
    STARTUP = auto()  # waiting for SSLRequest / StartupMessage / CancelRequest
    AUTHENTICATING = auto()  # StartupMessage sent upstream; relaying authentication
    READY = auto()  # ReadyForQuery seen once: normal operation
    CLOSED = auto()


class Expect(Enum):
    PARSE = auto()
    BIND = auto()
    DESCRIBE_STATEMENT = auto()
    DESCRIBE_PORTAL = auto()
    EXECUTE = auto()
    CLOSE = auto()
    SYNC = auto()
    QUERY = auto()
    FUNCTION_CALL = auto()


@dataclass(slots=True)
class PreparedStatement:
    name: str
    query: str
    param_types: tuple[int, ...]
    parameter_description: m.ParameterDescription | None = None
    row_description: bytes | None = None  # raw RowDescription body; decode_backend(ord('T'), ...)
    ops: tuple[NamespaceOp, ...] = ()  # what running it does to the statement namespace (SQL DEALLOCATE...)


@dataclass(slots=True)
class Portal:
    name: str
    statement: PreparedStatement
    result_formats: tuple[int, ...]
    row_description: bytes | None = None  # raw RowDescription body; decode_backend(ord('T'), ...)


@dataclass(slots=True)
class Pending:
    """One frontend message whose reply has not arrived yet. (The hot paths build it with positional
    arguments: keyword arguments make this, several times per statement, twice as slow.)"""

    expect: Expect
    name: str = ""
    kind: bytes = b""
    parse: m.Parse | None = None
    bind: m.BindFrame | None = None
    state: CryptoState | None = None  # the encryption layer's plan for this message's replies
    refusal: bytes | None = None  # an ErrorResponse that replaces the server's error for a refused message
    # A Query's or Parse's SQL-level namespace operations (PREPARE, DEALLOCATE...); a Query's are consumed
    # as their CommandCompletes arrive.
    ops: list[NamespaceOp] | None = None


@dataclass(slots=True)
class _ValuesRun:
    """A query of pgveil's own run on the server connection for the held client message (see ValuesMiss):
    Parse, Bind, Execute and Close of a statement and portal named ``name``, then Flush (no Sync, so the
    client's transaction and pipeline are as they were), sent once every earlier reply is in."""

    miss: ValuesMiss
    held: int  # the held message's type (Query or Bind)
    name: str
    sent: bool = False
    values: list[str] = field(default_factory=list)
    null: bool = False
    closes: int = 0


# -- events for the session -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSRequested:
    """The client sent SSLRequest; the session answers 'S' (and starts TLS) or 'N'."""


@dataclass(frozen=True, slots=True)
class StartupReceived:
    message: m.StartupMessage
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CancelReceived:
    raw: bytes = field(repr=False)
    process_id: int = 0


@dataclass(frozen=True, slots=True)
class Authenticated:
    role: str


@dataclass(frozen=True, slots=True)
class SessionReady:
    """The first ReadyForQuery: startup is complete."""


@dataclass(frozen=True, slots=True)
class NeedKey:
    """The relay stopped reading ``side`` ("client" or "server") until this key is in memory; the
    session fetches it and feeds ``b""`` to that side to resume."""

    side: str
    key_id: bytes | None = None
    column_id: str | None = None
    subject: object = None  # a data subject's key (opaque here, see KeyMiss)
    key_ids: tuple[bytes, ...] = ()  # further key ids to fetch with key_id, in one keystore query


@dataclass(frozen=True, slots=True)
class NeedAnalysis:
    """The relay stopped reading the client until ``miss``'s analysis has run off the event loop; the
    session runs it, delivers the result and resumes the client side."""

    miss: AnalysisMiss = field(repr=False)  # carries the statement text


@dataclass(frozen=True, slots=True)
class RolesChanged:
    """Statements that can change role membership (GRANT/REVOKE of a role, CREATE/ALTER/DROP ROLE)
    completed in this session and its transaction has ended: the membership is worth reading again."""


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close both sides after writing what is queued. ``error`` is what the client was told, if anything;
    ``reason`` says why the session ends when that is no error of a peer (the session's end line)."""

    error: ProtocolViolation | None = None
    reason: str | None = field(default=None, compare=False)  # for the log, not what the peers see


Event = (
    TLSRequested
    | StartupReceived
    | CancelReceived
    | Authenticated
    | SessionReady
    | NeedKey
    | NeedAnalysis
    | RolesChanged
    | CloseConnection
)

# Backend message types the relay must see whole. Everything else (DataRow, CopyData, NoticeResponse,
# NotificationResponse, FunctionCallResponse, NegotiateProtocolVersion) streams through untouched.
_BACKEND_WATCHED = frozenset(b"RKSZET t C 1 2 3 n s I G H W c".replace(b" ", b""))
# While a result with protected columns streams, its DataRows are watched too; while a suppressed reply
# is being dropped (after the proxy reported an error in the middle of it), everything is.
_BACKEND_WATCHED_ROWS = _BACKEND_WATCHED | frozenset(b"D")
_BACKEND_WATCHED_COPY = _BACKEND_WATCHED | frozenset(b"d")
_BACKEND_ALL = frozenset(range(256))
_LIGHT_WATCHED = frozenset(b"ZEGHcCSK")
_FLUSH = b"H\x00\x00\x00\x04"
_SYNC = b"S\x00\x00\x00\x04"
# What a ReadyForQuery may answer.
_READY_ANSWERS = (Expect.SYNC, Expect.QUERY, Expect.FUNCTION_CALL)
# The first bytes of the CommandComplete tags of PREPARE, DEALLOCATE [ALL] and DISCARD ALL.
_NAMESPACE_TAG_STARTS = (0x50, 0x44)
# CommandComplete tags of statements that can change role membership (cmdtaglist.h), and their first bytes.
_ROLE_TAGS = frozenset({b"GRANT ROLE\x00", b"REVOKE ROLE\x00", b"CREATE ROLE\x00", b"DROP ROLE\x00", b"ALTER ROLE\x00"})
_ROLE_TAG_STARTS = frozenset(b"GRCDA")
# What ends a pipeline segment: after an error the server skips messages up to the next Sync, and a
# simple Query or FunctionCall is a segment of its own.
_SEGMENT_ENDS = _READY_ANSWERS
# The members the hot paths compare against, as module globals: on Python 3.11 reading an enum member
# through its class costs several times as much, and these are read a few dozen times per statement.
_STARTUP = Phase.STARTUP
_AUTHENTICATING = Phase.AUTHENTICATING
_READY = Phase.READY
_CLOSED = Phase.CLOSED
_EXPECT_BIND = Expect.BIND
_EXPECT_EXECUTE = Expect.EXECUTE
_EXPECT_SYNC = Expect.SYNC
_EXPECT_DESCRIBE_PORTAL = Expect.DESCRIBE_PORTAL
_EXPECT_DESCRIBE_STATEMENT = Expect.DESCRIBE_STATEMENT
_EXPECT_CLOSE = Expect.CLOSE
_EXPECT_QUERY = Expect.QUERY
_EXPECT_PARSE = Expect.PARSE
# Frontend messages streamed untouched: CopyData only (PasswordMessage and friends are small and complete).
_FRONTEND_STREAMED = frozenset(b"d")
_NOTHING_STREAMED: frozenset[int] = frozenset()
# The server's own limits (src/backend/tcop/postgres.c, SocketBackend; PG_MAX_AUTH_TOKEN_LENGTH):
# only Query, Parse, Bind, FunctionCall, CopyData and the password messages may be large.
_SMALL_MESSAGE_LIMIT = 10000
_AUTH_MESSAGE_LIMIT = 65535 + 4
_LARGE_FRONTEND_TYPES = frozenset(b"QPBFdp")
_MITM = "This could be either a client-software bug or evidence of an attempted man-in-the-middle attack."
# Pieces of one read up to this size are joined before they are written (see _coalesce); larger ones are
# not copied again.
_COALESCE_LIMIT = 65536


class Relay:
    """State of one client ⇄ server conversation. See the module docstring."""

    def __init__(
        self,
        *,
        max_message_size: int = codec.MAX_MESSAGE_SIZE,
        crypto_factory: Callable[[str], SessionEncryption] | None = None,
        track_statements: bool = True,
    ) -> None:
        self.max_message_size = max_message_size
        # Without an encryption layer nothing is ever rewritten, and the session may choose the
        # frame-level fast path after startup: see _receive_client_light.
        self.light = not track_statements and crypto_factory is None
        self.outstanding = 0  # light mode: Query/Sync/FunctionCall sent and not yet answered by ReadyForQuery
        # The encryption layer, created once the login role is known; None = pure pass-through.
        self._crypto_factory = crypto_factory
        self.crypto: SessionEncryption | None = None
        self._rows = False  # the DataRows streaming now are rewritten by the encryption layer
        self._copy_out_rewritten = False  # so is the server's COPY TO STDOUT data
        self._suppress = False  # drop server replies up to the next ReadyForQuery (after an injected error)
        self._watched: frozenset[int] = _BACKEND_WATCHED
        self._c_streamed: frozenset[int] = _FRONTEND_STREAMED
        self._c_hold = False  # waiting for a key before the next client message can be rewritten
        self._client_copying = False  # the client is sending COPY data (its Syncs are ignored by the server)
        self._copy_ended_early = 0  # client CopyDone/CopyFail sent before the server's CopyInResponse
        self._s_hold = False
        self.phase = Phase.STARTUP
        self.to_client: list[bytes] = []
        self.to_server: list[bytes] = []
        self.events: list[Event] = []
        self._values: _ValuesRun | None = None  # pgveil's own query for the held client message
        self._resume_client = False  # that query is over: retry (or drop) the held message

        self.startup: m.StartupMessage | None = None
        self.login_role: str | None = None
        self.backend_key: m.BackendKeyData | None = None
        self.parameters: dict[str, str] = {}
        self.transaction_status: bytes = b"I"
        self._role_ddl = False  # role DDL completed in the current transaction (see RolesChanged)
        self.server_fatal = False  # the server sent FATAL/PANIC: its closing the connection is expected
        self.server_fatal_sqlstate: str | None = None  # its SQLSTATE (28P01: authentication failed), for the log
        # Startup negotiation as postmaster.c tracks it (ssl_done, gss_done), and authentication: the
        # client's Terminate (or the first byte of a message the server refuses) has been passed on, so
        # the server's answer and its closing the connection are the end of the session, told by the server.
        self._ssl_done = False
        self._gss_done = False
        self._auth_request_open = False  # the server asked for a password/SASL response not sent yet
        self.client_terminated = False
        # SCRAM channel binding (-PLUS) binds the TLS leg the client sees. It can be relayed only when that
        # leg presents the very certificate PostgreSQL has (tls-server-end-point hashes the certificate);
        # the session clears this flag when it finds them identical.
        self.strip_channel_binding = True

        self.statements: dict[str, PreparedStatement] = {}
        self.portals: dict[str, Portal] = {}
        self.pending: deque[Pending] = deque()
        self._discarding = False
        self.copy_in = False
        self.copy_out = False
        # The raw RowDescription of the simple Query result streaming now (an Execute's rows are described
        # by its portal's row_description instead).
        self.current_result: bytes | None = None

        # framing state per direction
        self._c_buf = b""
        self._c_more = _Parts()  # the rest of the partial message in _c_buf, joined once it is complete
        self._c_skip = 0
        self._s_buf = b""
        self._s_more = _Parts()
        self._s_skip = 0

        # counters the session flushes into metrics once per read
        self.client_bytes = 0
        self.client_messages = 0
        self.server_bytes = 0
        self.server_messages = 0

    def resume(self, side: str) -> None:
        """Continues a side held by :class:`NeedKey`, once the session has fetched the key (or given up:
        then the retry reports the key as unavailable)."""
        if side == "client":
            self._c_hold = False
            buf, self._c_buf = self._c_buf, b""
            if buf:
                self.client_bytes -= len(buf)
                self.receive_client(buf)
        else:
            self._s_hold = False
            buf, self._s_buf = self._s_buf, b""
            if buf:
                self.server_bytes -= len(buf)
                self.receive_server(buf)

    @property
    def busy(self) -> bool:
        """Something is outstanding: a reply is owed, a COPY is running, or pgveil's own query is."""
        return bool(self.pending) or self.outstanding > 0 or self.copy_in or self.copy_out or self._values is not None

    # -- framing shared by both modes ------------------------------------------------------------------
    def _client_frames(self, data: bytes) -> bytes:
        """Passes on the rest of a streamed message, then prepends what was kept of a partial one:
        the bytes that start on a message boundary, b"" if there are none yet."""
        if self._c_skip:
            n = len(data)
            if n <= self._c_skip:
                self._c_skip -= n
                self.to_server.append(data)
                return b""
            self.to_server.append(data[: self._c_skip])
            data = data[self._c_skip :]
            self._c_skip = 0
        if self._c_buf:
            if _still_partial(self._c_buf, self._c_more, data):
                return b""
            data = b"".join((self._c_buf, *self._c_more.parts, data))
            self._c_buf = b""
            self._c_more.clear()
        return data

    def _server_frames(self, data: bytes) -> bytes:
        """:meth:`_client_frames` for the server's bytes."""
        if self._s_skip:
            n = len(data)
            if n <= self._s_skip:
                self._s_skip -= n
                self.to_client.append(data)
                return b""
            self.to_client.append(data[: self._s_skip])
            data = data[self._s_skip :]
            self._s_skip = 0
        if self._s_buf:
            if _still_partial(self._s_buf, self._s_more, data):
                return b""
            data = b"".join((self._s_buf, *self._s_more.parts, data))
            self._s_buf = b""
            self._s_more.clear()
        return data

    # -- light mode: framing, transaction status and COPY state only -----------------------------------
    # Used when no table is protected (and sessions.track_statements is auto): frontend messages are
    # checked (type, length, size limits, body structure: codec.check_frontend) and forwarded without
    # being decoded or re-encoded. Of the backend messages only ReadyForQuery, ErrorResponse,
    # ParameterStatus, BackendKeyData and the COPY messages are looked at.

    def _receive_client_light(self, data: bytes) -> None:
        if self._c_skip or self._c_buf:
            data = self._client_frames(data)
            if not data:
                return
        n = len(data)
        pos = 0
        limit = self.max_message_size
        count = 0
        unpack = _HDR.unpack_from
        check = codec.check_frontend
        while n - pos >= 5:
            t, ln = unpack(data, pos)
            if ln < 4:
                raise codec.CodecError("client", f"invalid message length {ln}")
            if ln > limit or (ln > _SMALL_MESSAGE_LIMIT and t not in _LARGE_FRONTEND_TYPES):
                raise codec.CodecError("client", f"message of {ln} bytes exceeds the limit for its type")
            if t not in codec.FRONTEND_TYPES:
                raise codec.CodecError("client", f"invalid frontend message type {t}")
            end = pos + 1 + ln
            if t == 0x64:  # CopyData streams through, whole or in parts
                count += 1
                if end > n:
                    self._c_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            if end > n:
                break  # the rest of this message first: its body is checked before anything is sent
            check(t, data, pos + 5, end)
            count += 1
            if t == 0x53:  # Sync (ignored by the server during COPY FROM STDIN)
                if not self._client_copying:
                    self.outstanding += 1
            elif t == 0x51 or t == 0x46:  # Query, FunctionCall
                self.outstanding += 1
            elif t == 0x63 or t == 0x66:  # CopyDone, CopyFail
                self._client_copy_ended()
            elif t == 0x58:  # Terminate
                self._client_terminate(self.outstanding > 0)
                pos = end
                break
            pos = end
        self.client_messages += count
        if pos:
            self.to_server.append(data if pos == n else data[:pos])
        if pos < n:
            self._c_buf = data[pos:]

    def _receive_server_light(self, data: bytes) -> None:
        if self._s_skip or self._s_buf:
            data = self._server_frames(data)
            if not data:
                return
        n = len(data)
        pos = 0
        count = 0
        unpack = _HDR.unpack_from
        watched = _LIGHT_WATCHED
        while n - pos >= 5:
            t, ln = unpack(data, pos)
            if ln < 4:
                raise codec.CodecError("server", f"invalid message length {ln}")
            end = pos + 1 + ln
            if t in watched:
                if end > n:
                    break
                self._light_server_message(t, data, pos + 5, end)
            elif end > n:
                count += 1
                self._s_skip = end - n
                pos = n
                break
            count += 1
            pos = end
        self.server_messages += count
        if pos:
            self.to_client.append(data if pos == n else data[:pos])
        if pos < n:
            self._s_buf = data[pos:]

    def _light_server_message(self, t: int, data: bytes, start: int, end: int) -> None:
        if t == 0x5A:  # ReadyForQuery
            status = data[start:end]
            if status not in (b"I", b"T", b"E"):
                raise codec.CodecError("server", "malformed ReadyForQuery message")
            if self.outstanding:
                self.outstanding -= 1
            if not self.outstanding:
                self._copy_ended_early = 0
            self.transaction_status = status
            self.copy_in = self.copy_out = self._client_copying = False
        elif t == 0x45:  # ErrorResponse
            msg = codec.decode_backend(t, data[start:end])
            assert isinstance(msg, m.ErrorResponse)
            if msg.severity in ("FATAL", "PANIC"):
                self.server_fatal = True
                self.server_fatal_sqlstate = msg.sqlstate
            self.copy_in = self.copy_out = False
        elif t == 0x47:  # CopyInResponse
            self.copy_in = True
            self._client_copy_started()
        elif t == 0x48:  # CopyOutResponse
            self.copy_out = True
        elif t == 0x63 or t == 0x43:  # CopyDone, CommandComplete
            self.copy_out = False
            if t == 0x43:
                self.copy_in = False
        elif t == 0x53:
            self._on_parameter_status(data[start:end])
        elif t == 0x4B:
            self._on_backend_key_data(data[start:end])

    # -- properties for the session --------------------------------------------------------------------
    @property
    def client_at_boundary(self) -> bool:
        """True when the bytes sent to the client so far end on a message boundary."""
        return self._s_skip == 0

    @property
    def has_buffered_client_bytes(self) -> bool:
        return bool(self._c_buf)

    # -- client → server -------------------------------------------------------------------------------
    def receive_client(self, data: bytes) -> None:
        self.client_bytes += len(data)
        if self.client_terminated:
            return  # after Terminate: the server reads nothing more
        if self._c_hold:
            self._c_buf += data
            return
        try:
            if self.phase is _STARTUP:
                self._c_buf += data
                self._receive_startup()
            elif self.phase is _AUTHENTICATING:
                self._receive_client_authenticating(data)
            elif self.phase is _READY and self.light:
                self._receive_client_light(data)
            elif self.phase is not _CLOSED:
                self._receive_client_messages(data)
        except ProtocolViolation as e:
            self._fail(e)

    def _receive_startup(self) -> None:
        """The packets before authentication, answered as PostgreSQL's ProcessStartupPacket (postmaster.c)
        answers them: a length that cannot be a startup packet (a Terminate sent first, an HTTP request,
        any stray bytes) is logged and the connection closed without a word, as are a CancelRequest and an
        incomplete packet at EOF; an unsupported protocol version gets FATAL 0A000."""
        buf = self._c_buf
        while self.phase is Phase.STARTUP and len(buf) >= 4:
            (n,) = _U32.unpack_from(buf, 0)
            # The limit applies to the packet after its length word (MAX_STARTUP_PACKET_LENGTH).
            if n < 8 or n - 4 > codec.MAX_STARTUP_PACKET:
                self._close_silently("invalid length of startup packet")
                return
            if len(buf) < n:
                break
            raw, buf = buf[:n], buf[n:]
            self._c_buf = buf
            self.client_messages += 1
            (code,) = _U32.unpack_from(raw, 4)
            if code == m.CANCEL_REQUEST_CODE:
                if n != 16:
                    self._close_silently("invalid length of startup packet")
                    return
                msg = codec.decode_startup(raw[4:])
                assert isinstance(msg, m.CancelRequest)
                self.phase = Phase.CLOSED
                self.events.append(CancelReceived(raw, msg.process_id))
                return
            if code == m.SSL_REQUEST_CODE and not self._ssl_done:
                self._ssl_done = True
                self.events.append(TLSRequested())
                # The session answers through answer_tls. Bytes sent before the TLS handshake would be
                # injected into the encrypted session (CVE-2021-23214): answer_tls refuses them.
                return
            if code == m.GSSENC_REQUEST_CODE and not self._gss_done:
                # Always 'N': pgveil terminates the client's encryption itself and cannot relay GSSAPI's.
                self.to_client.append(b"N")
                self._gss_done = True
                if buf:
                    self._startup_fatal("received unencrypted data after GSSAPI encryption request", _MITM)
                    return
                continue
            major, minor = code >> 16, code & 0xFFFF
            if major != 3:
                self._startup_fatal(
                    f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
                    sqlstate="0A000",
                    old_style=code > 0 and major < 3,  # FrontendProtocol set: the server's format for it
                )
                return
            try:
                msg = codec.decode_startup(raw[4:])
            except codec.CodecError:
                self._startup_fatal("invalid startup packet layout: expected terminator as last byte")
                return
            assert isinstance(msg, m.StartupMessage)
            self.startup = msg
            self.phase = Phase.AUTHENTICATING
            self.events.append(StartupReceived(msg, raw))
        self._c_buf = buf
        if self.phase is Phase.AUTHENTICATING and buf:
            self._c_buf = b""
            self._receive_client_authenticating(buf)

    def answer_tls(self, accept: bool) -> None:
        """The session's answer to TLSRequested: 'S' (it starts the handshake next) or 'N' (startup goes
        on in plaintext). Bytes the client sent behind its SSLRequest end the session either way."""
        if self._c_buf:
            # PostgreSQL answers first and then reports the bytes; with 'S' that report would come after
            # a handshake the client cannot start, so pgveil refuses before answering.
            if not accept:
                self.to_client.append(b"N")
            self._startup_fatal("received unencrypted data after SSL request", _MITM)
            return
        self.to_client.append(b"S" if accept else b"N")
        self._gss_done = self._gss_done or accept  # no GSSAPI encryption inside TLS

    def _receive_client_authenticating(self, data: bytes) -> None:
        """The client's messages while the server authenticates it: password and SASL responses pass on
        untouched. A Terminate passes on too, and so does the first byte of any other message while the
        server awaits a response: the server then ends the session in its own words ("expected password
        response, got message type 88"), reading nothing after that byte (auth.c recv_password_packet,
        CheckSASLAuth). Any other message is refused: the server could read it as a command once
        authenticated, before the encryption layer exists."""
        buf = self._c_buf + data if self._c_buf else data
        self._c_buf = b""
        n = len(buf)
        pos = 0
        out = self.to_server
        while pos < n and not self.client_terminated:
            t = buf[pos]
            if (t != 0x70 and t != 0x58 and self._auth_request_open) or t not in codec.FRONTEND_TYPES:
                # Also a byte that is no message type, even sent before the server has asked for anything
                # (in the StartupMessage's write): the server reports it in its own words, whatever the
                # authentication method, and one byte can run nothing.
                out.append(buf[pos : pos + 1])
                self.client_terminated = True
                break
            if n - pos < 5:
                break
            (ln,) = _U32.unpack_from(buf, pos + 1)
            if ln < 4 or ln > _AUTH_MESSAGE_LIMIT:
                # A length the server rejects (PG_MAX_AUTH_TOKEN_LENGTH): it reads the header, nothing else,
                # and answers as it answers a client connected directly.
                out.append(buf[pos : pos + 5])
                self.client_terminated = True
                break
            end = pos + 1 + ln
            if end > n:
                break
            self._handle_client_message_authenticating(t, buf[pos + 5 : end])
            self.client_messages += 1
            out.append(buf[pos:end])
            pos = end
        if self.client_terminated:
            pos = n  # nothing the client sends after that is read by the server
        if pos < n:
            self._c_buf = buf[pos:]

    def _startup_fatal(
        self, message: str, detail: str | None = None, *, sqlstate: str = "08P01", old_style: bool = False
    ) -> None:
        """FATAL as the server sends it during startup; to a client speaking a protocol older than 3 in
        the old format (type 'E', the text, a NUL), which is all such a client can read."""
        if old_style:
            self.to_client.append(b"E" + f"FATAL:  {message}\n".encode() + b"\x00")
        else:
            self.to_client.append(codec.encode_error("FATAL", sqlstate, message, detail=detail))
        error = ProtocolViolation("client", message)
        error.sqlstate = sqlstate
        error.message = message  # as the client was told it
        self.phase = Phase.CLOSED
        self.events.append(CloseConnection(error, f"startup refused: {message}"))

    def _close_silently(self, reason: str) -> None:
        """Ends the connection without a word, as the server does where it logs COMMERROR."""
        self._c_buf = b""
        self.phase = Phase.CLOSED
        self.events.append(CloseConnection(reason=f"client connection closed during startup: {reason}"))

    def _receive_client_messages(self, data: bytes) -> None:
        if self._c_skip or self._c_buf:
            data = self._client_frames(data)
            if not data:
                return
        n = len(data)
        pos = 0
        start = 0
        out = self.to_server
        first = len(out)
        limit = self.max_message_size
        unpack = _HDR.unpack_from
        frontend_types = codec.FRONTEND_TYPES
        # Only the server's messages move the phase on (and create the encryption layer), so the handler
        # is chosen once per read; Terminate ends the loop.
        authenticating = self.phase is _AUTHENTICATING
        handle: Callable[[int, bytes], bytes | None] = (
            self._handle_client_message_authenticating if authenticating else self._handle_client_message
        )
        while n - pos >= 5:
            t, ln = unpack(data, pos)
            if ln < 4:
                raise codec.CodecError("client", f"invalid message length {ln}")
            if ln > limit or (ln > _SMALL_MESSAGE_LIMIT and t not in _LARGE_FRONTEND_TYPES):
                raise codec.CodecError("client", f"message of {ln} bytes exceeds the limit for its type")
            if t not in frontend_types:
                raise codec.CodecError("client", f"invalid frontend message type {t}")
            if ln > _AUTH_MESSAGE_LIMIT and authenticating:
                raise codec.CodecError("client", "authentication message too long")
            end = pos + 1 + ln
            self.client_messages += 1
            if t in self._c_streamed:
                if end > n:
                    self._c_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            if end > n:
                self.client_messages -= 1
                break
            try:
                replacement = handle(t, data[pos + 5 : end])
            except KeyMiss as miss:
                # Keep this message and the rest until the session has fetched the key.
                self.client_messages -= 1
                self._c_hold = True
                self.events.append(NeedKey("client", miss.key_id, miss.column_id, miss.subject))
                break
            except AnalysisMiss as analysis:
                self.client_messages -= 1
                self._c_hold = True
                self.events.append(NeedAnalysis(analysis))
                break
            except ValuesMiss as need:
                if self._discarding:
                    # The server skips this message (an earlier one of its pipeline failed): its stand-in
                    # is skipped too, and nothing needs to be made for it.
                    replacement = self._refuse_failed_message(
                        t, data[pos + 5 : end], ProxyError("pgveil: skipped after an earlier error")
                    )
                else:
                    self.client_messages -= 1
                    self._c_hold = True
                    if start < pos:  # what passes before the held message goes before pgveil's query
                        out.append(data[start:pos])
                        start = pos
                    self._start_values(need, t)
                    break
            except ProtocolViolation:
                raise
            except Exception as exc:  # every exception becomes an ErrorResponse
                replacement = self._refuse_failed_message(t, data[pos + 5 : end], exc)
            if replacement is not None:
                if start < pos:
                    out.append(data[start:pos])
                if replacement:
                    out.append(replacement)
                start = end
            pos = end
            if self.phase is _CLOSED or self.client_terminated:
                break
        if start < pos:
            out.append(data[start:pos] if start or pos != n else data)
        if len(out) - first > 1:
            _coalesce(out, first)
        if pos < n and self.phase is not _CLOSED and not self.client_terminated:
            self._c_buf = data[pos:]

    def _handle_client_message_authenticating(self, t: int, body: bytes) -> bytes | None:
        if t == 0x70:  # 'p' password/SASL/GSS response
            self._auth_request_open = False
            return None
        if t == 0x58:  # Terminate: the server answers it (see _receive_client_authenticating)
            self.client_terminated = True
            return None
        raise codec.CodecError("client", f"unexpected message type {t} during authentication")

    def _handle_client_message(self, t: int, body: bytes) -> bytes | None:
        """Acts on one complete frontend message; returns replacement bytes, or None to forward it as is.

        With an encryption layer each message is offered to it first. Nothing is queued before the layer
        has accepted the message, so a KeyMiss can retry it from scratch."""
        crypto = self.crypto
        if crypto is not None and crypto.copy_in_armed:
            if t == 0x64:  # 'd' CopyData while a COPY FROM STDIN of a protected table streams
                try:
                    return crypto.copy_in_data(body)
                except ProtocolViolation:
                    raise
                except ProxyError as e:
                    return self._fail_copy_in(e)
            if not self._client_copying and t not in (0x63, 0x66, 0x53, 0x48):
                # A rewriter armed for a COPY that never started (the server refused the statement): the
                # client has moved on to another command.
                crypto.disarm_copy_in()
                self._c_streamed = _FRONTEND_STREAMED
        # The messages of a prepared statement's every execution are read in place (see codec).
        if t == 0x42:  # Bind
            bind = codec.decode_bind_frame(body)
            if len(bind.portal) > _SHORT_NAME or len(bind.statement) > _SHORT_NAME:
                bind = _bind_with_server_names(bind)
            if crypto is None:
                self._expect(Pending(_EXPECT_BIND, bind.portal, b"", None, bind))
                return None
            if not (bind.portal.isascii() and bind.statement.isascii()):
                raise _non_ascii_name()
            out = crypto.handle_bind(bind, self._versions(b"S", bind.statement, _EXPECT_PARSE))
            self._expect(Pending(_EXPECT_BIND, bind.portal, b"", None, bind, out.state, out.refusal))
            return out.replacement
        if t == 0x45:  # Execute
            name = server_name(codec.decode_execute_portal(body))
            if crypto is None:
                self._expect(Pending(_EXPECT_EXECUTE, name))
                return None
            out = crypto.handle_execute(name, self._portal_states(name))
            if crypto.copy_in_armed:
                self._c_streamed = _NOTHING_STREAMED
            self._expect(Pending(_EXPECT_EXECUTE, name, b"", None, None, out.state, out.refusal))
            # If nothing else was outstanding (Bind + Flush, then Execute: asyncpg cursors, JDBC fetch
            # sizes), this Execute is the head now and its rows must be watched from the first one.
            self._refresh_watch()
            return out.replacement
        if t == 0x53:  # Sync
            codec.check_empty(t, body)
            self._on_client_sync()
            return None
        if t == 0x44:  # Describe
            kind, name = codec.decode_target(t, body)
            name = server_name(name)
            if kind == b"S":
                self._expect(Pending(_EXPECT_DESCRIBE_STATEMENT, name))
            else:
                if crypto is not None:
                    crypto.describe_portal(self._portal_states(name))
                self._expect(Pending(_EXPECT_DESCRIBE_PORTAL, name))
            return None
        if t == 0x43:  # Close
            kind, name = codec.decode_target(t, body)
            self._expect(Pending(_EXPECT_CLOSE, server_name(name), kind))
            return None
        if t == 0x70:  # 'p' after authentication is a protocol violation the server would report too
            raise codec.CodecError("client", "unexpected password message")
        msg = codec.decode_frontend(t, body)
        if isinstance(msg, m.Query):
            if crypto is None:
                self._expect(Pending(_EXPECT_QUERY))
                return None
            ops = crypto.sql_namespace(msg.query)
            refusal = self._execute_refusal(crypto, ops, deferred=False) if ops else None
            if refusal is not None:
                self._expect(Pending(_EXPECT_QUERY, "", b"", None, None, None, refusal))
                return codec.encode_frontend(m.Query(REFUSED_QUERY))
            crypto.in_flight = bool(self.pending)
            out = crypto.query(msg.query)
            if out.refusal is None:
                crypto.arm_copy_in(out.state)
                if crypto.copy_in_armed:
                    self._c_streamed = _NOTHING_STREAMED
            self._expect(Pending(_EXPECT_QUERY, "", b"", None, None, out.state, out.refusal, list(ops) or None))
            return out.replacement
        if isinstance(msg, m.Parse):
            if len(msg.statement) > _SHORT_NAME:
                msg = m.Parse(server_name(msg.statement), msg.query, msg.param_types)
            if crypto is None:
                self._expect(Pending(_EXPECT_PARSE, msg.statement, b"", msg))
                return None
            if not msg.statement.isascii():
                raise _non_ascii_name()
            ops = crypto.sql_namespace(msg.query)
            refusal = self._execute_refusal(crypto, ops, deferred=True) if ops else None
            if refusal is not None:
                self._expect(Pending(_EXPECT_PARSE, msg.statement, b"", msg, None, None, refusal))
                return codec.encode_frontend(m.Parse(msg.statement, REFUSED_QUERY, ()))
            crypto.in_flight = bool(self.pending)
            out = crypto.parse(msg)
            self._expect(
                Pending(_EXPECT_PARSE, msg.statement, b"", msg, None, out.state, out.refusal, list(ops) or None)
            )
            return out.replacement
        if isinstance(msg, m.FunctionCall):
            self._expect(Pending(Expect.FUNCTION_CALL))
        elif isinstance(msg, m.Terminate):
            self._client_terminate(bool(self.pending))
        elif isinstance(msg, m.CopyDone | m.CopyFail):
            self._client_copy_ended()
            if crypto is not None and crypto.copy_in_armed:
                self._c_streamed = _FRONTEND_STREAMED
                try:
                    return crypto.copy_in_end(t == 0x63)
                except ProtocolViolation:
                    raise
                except ProxyError as e:
                    return self._fail_copy_in(e)  # the client's COPY is over: nothing more of it will come
        # Flush needs no bookkeeping, CopyDone and CopyFail are answered as part of the running command.
        return None

    # -- what a name may be when the server runs the message being sent -------------------------------
    # The model (statements, portals and their crypto state) changes only when the server confirms it.
    # A message sent before earlier ones are answered runs under a state that depends on their outcome:
    # these walks list every version the name may have then. Within the segment of the message being
    # sent, every earlier message succeeded if this one runs at all (after an error the server skips to
    # Sync); a message of an earlier segment may have failed, so it adds a version and keeps the others.

    def _portal_states(self, name: str) -> list[CryptoState | None]:
        """:meth:`_versions` of portal ``name``, as crypto states."""
        return [v[0] for v in self._versions(b"P", name, _EXPECT_BIND)]

    def _versions(self, kind: bytes, name: str, creates: Expect) -> list[Version]:
        """The versions statement (``b"S"``, ``creates`` PARSE) or portal (``b"P"``, BIND) ``name`` may
        have when the server runs the message being sent; none if it may exist in no version."""
        pending = self.pending
        # The usual case first: a Parse (Bind) or Close of the name earlier in this segment decides alone.
        i = len(pending)
        while i:
            i -= 1
            p = pending[i]
            e = p.expect
            if e in _SEGMENT_ENDS:
                break
            if p.name == name:
                if e is creates:
                    # A refused message's stand-in fails, and the server skips the message being sent.
                    return [(None, None)] if p.refusal is not None else [(p.state, None)]
                if e is _EXPECT_CLOSE and p.kind == kind:
                    return []
        crypto = self.crypto
        assert crypto is not None
        if kind == b"S":
            known = self.statements.get(name)
            base: Version | None = None if known is None else (crypto.statement_state(name), known.row_description)
        else:
            base = (crypto.portal_state(name), None) if name in self.portals else None
        if not pending:
            return [] if base is None else [base]
        return _distinct(self._walk([base], kind, name, creates))

    def _walk(self, versions: list[Version | None], kind: bytes, name: str, creates: Expect) -> list[Version | None]:
        """``versions`` (None: the name does not exist) after every pending message. A Parse (Bind) of the
        name that succeeds replaces the version, a named one fails when the name exists; a Close or
        DEALLOCATE removes it; a simple Query destroys the unnamed statement and portal."""
        pending = self.pending
        current = len(pending)  # index of the first entry of the segment the message being sent is in
        while current and pending[current - 1].expect not in _SEGMENT_ENDS:
            current -= 1
        for i, p in enumerate(pending):
            e = p.expect
            if e is creates:
                if p.name != name:
                    continue
                if p.refusal is not None:
                    # A refused message's stand-in always fails: in an earlier segment it changes nothing,
                    # in this one the server skips the message being sent, so no version applies to it.
                    if i >= current:
                        versions = [(None, None)]
                else:
                    versions = [(p.state, None)] if i >= current else [*versions, (p.state, None)]
            elif e is _EXPECT_CLOSE:
                if p.name == name and p.kind == kind:
                    versions = [None] if i >= current else [*versions, None]
            elif e is _EXPECT_QUERY:
                if name == "":
                    versions = [None]
                elif p.ops and kind == b"S":
                    versions = _apply_ops(versions, p.ops, name, certain=False)
        return versions

    def _execute_refusal(
        self, crypto: SessionEncryption, ops: tuple[NamespaceOp, ...], *, deferred: bool
    ) -> bytes | None:
        """The refusal of a statement text whose SQL-level EXECUTE may run a statement that takes
        encrypted parameters (or one pgveil does not know), or None."""
        for j, op in enumerate(ops):
            if op.action is not NamespaceAction.EXECUTE:
                continue
            if not op.name:  # an EXECUTE the layer could not name: no version is known
                refusal = crypto.execute_refusal(op.name, (), deferred=deferred)
                if refusal is not None:
                    return refusal
                continue
            known = self.statements.get(op.name)
            versions: list[Version | None] = [
                None if known is None else (crypto.statement_state(op.name), known.row_description)
            ]
            if self.pending:
                versions = self._walk(versions, b"S", op.name, _EXPECT_PARSE)
            # The statements before it in the same text ran, or it does not run.
            versions = _apply_ops(versions, ops[:j], op.name, certain=True)
            refusal = crypto.execute_refusal(op.name, _distinct(versions), deferred=deferred)
            if refusal is not None:
                return refusal
        return None

    def _refuse_failed_message(self, t: int, body: bytes, exc: Exception) -> bytes:
        """A frontend message whose handling raised. Query, Parse, Bind and Execute are replaced by their
        stand-ins, so the server fails at the same protocol step and the client gets ERROR in place of
        the server's error (the session goes on, as after any refusal); for Bind and Execute only when
        the error is a refusal (a ``ProxyError``), since a bug may have left their portal's state half
        changed. Anything else ends the session with FATAL. Only the exception's type is logged."""
        if isinstance(exc, ProxyError):
            sqlstate, message, detail, hint = exc.sqlstate, exc.message, exc.detail, exc.hint
        else:
            log.error("internal error handling a frontend message (%s)", type(exc).__name__)
            sqlstate, message, detail, hint = "XX000", "pgveil: internal error while handling the message", None, None
        refusal = codec.encode_error("ERROR", sqlstate, message, detail=detail, hint=hint)
        refusable = t in (0x51, 0x50) or (t in (0x42, 0x45) and isinstance(exc, ProxyError))
        if not refusable or self.crypto is None:
            self._fail_internal(sqlstate, message)
            return b""
        if isinstance(exc, ProxyError):
            log.info(
                "refused: %s", message, extra={"event": "refusal", "sqlstate": sqlstate, "reason": exc.reason.value}
            )
        if t == 0x51:
            self._expect(Pending(_EXPECT_QUERY, "", b"", None, None, None, refusal))
            return codec.encode_frontend(m.Query(REFUSED_QUERY))
        if t == 0x50:
            parse = codec.decode_frontend(t, body)
            assert isinstance(parse, m.Parse)
            parse = m.Parse(server_name(parse.statement), parse.query, parse.param_types)
            # The stand-in fails on the server, so the name keeps whatever version it had (see _versions).
            self._expect(Pending(_EXPECT_PARSE, parse.statement, b"", parse, None, None, refusal))
            return codec.encode_frontend(m.Parse(parse.statement, REFUSED_QUERY, ()))
        if t == 0x42:
            bind = _bind_with_server_names(codec.decode_bind_frame(body))
            self._expect(Pending(_EXPECT_BIND, bind.portal, b"", None, bind, None, refusal))
            return codec.encode_frontend(refused_bind(bind.portal))
        name = server_name(codec.decode_execute_portal(body))
        self._expect(Pending(_EXPECT_EXECUTE, name, b"", None, None, None, refusal))
        return codec.encode_frontend(refused_bind())

    def _fail_internal(self, sqlstate: str, message: str) -> None:
        """Ends the session with FATAL for an error that no stand-in can report."""
        if self.client_at_boundary:
            self.to_client.append(codec.encode_error("FATAL", sqlstate, message))
        error = ProtocolViolation("client", message)
        error.sqlstate, error.message = sqlstate, message
        self.phase = Phase.CLOSED
        self.events.append(CloseConnection(error))

    def _client_terminate(self, answers_due: bool) -> None:
        """The client's Terminate. With nothing outstanding the session closes both sides now (the server
        reads the Terminate before its EOF). With replies still due (a Query pipelined before Terminate)
        the server sends them first, as it would to the client directly: the Terminate goes on, nothing
        the client sends after it is read, and the session ends when the server closes."""
        if answers_due:
            self.client_terminated = True
        else:
            self.phase = Phase.CLOSED
            self.events.append(CloseConnection(reason="the client ended the session"))

    def _on_client_sync(self) -> None:
        if self._client_copying:
            return  # ignored by the server during COPY FROM STDIN
        self._discarding = False
        self.pending.append(Pending(_EXPECT_SYNC))

    def _fail_copy_in(self, e: ProxyError) -> bytes:
        """A row the proxy cannot encrypt: abort the server's COPY with CopyFail, report our error in place
        of the server's (the encryption layer drops the rest of the client's rows)."""
        for p in self.pending:
            if p.expect in (Expect.QUERY, Expect.EXECUTE):
                p.refusal = self._refusal(e)
                break
        return codec.encode_frontend(m.CopyFail(e.message))

    def _expect(self, p: Pending) -> None:
        if not self._discarding:
            self.pending.append(p)

    # -- pgveil's own query on the session's server connection (ValuesMiss) ------------------------------
    def _start_values(self, need: ValuesMiss, t: int) -> None:
        """Holds the client's message until ``need.query`` has run: now if no reply is outstanding, else
        after a Flush has made the server send what it owes (see _values_progress)."""
        self._values = _ValuesRun(need, t, f"pgveil_values_{secrets.token_hex(8)}")
        if self.pending:
            self.to_server.append(_FLUSH)
        else:
            self._send_values()

    def _send_values(self) -> None:
        v = self._values
        assert v is not None
        encode = codec.encode_frontend
        self.to_server.extend(
            (
                encode(m.Parse(v.name, v.miss.query, ())),
                encode(m.Bind(v.name, v.name, (), (), ())),
                encode(m.Execute(v.name, 0)),
                encode(m.Close(b"P", v.name)),
                encode(m.Close(b"S", v.name)),
                _FLUSH,
            )
        )
        v.sent = True

    def _values_progress(self) -> None:
        """After a read from the server: send the waiting query once nothing is outstanding; retry the
        held message once it is over."""
        v = self._values
        if v is not None and not v.sent and not self.pending and self.phase is _READY:
            if self._discarding:
                # The server will skip the held message: it is retried and replaced by its stand-in.
                self._values = None
                self._resume_client = True
            else:
                self._send_values()
        if self._resume_client:
            self._resume_client = False
            self.resume("client")

    def _values_replies(self, data: bytes) -> int:
        """Reads the replies to pgveil's own query from ``data``; returns where they (or the whole
        messages of ``data``) end. None of them reaches the client but notices and parameter reports."""
        pos = 0
        n = len(data)
        while self._values is not None and n - pos >= 5:
            t, ln = _HDR.unpack_from(data, pos)
            if ln < 4:
                raise codec.CodecError("server", f"invalid message length {ln}")
            end = pos + 1 + ln
            if end > n:
                break
            self.server_messages += 1
            self._values_message(t, data, pos, end)
            pos = end
        return pos

    def _values_message(self, t: int, data: bytes, pos: int, end: int) -> None:
        v = self._values
        assert v is not None
        body = data[pos + 5 : end]
        if t == 0x44:  # DataRow
            row = codec.decode_backend(t, body)
            assert isinstance(row, m.DataRow)
            if len(row.values) != 1 or len(v.values) >= v.miss.rows:
                raise ProtocolViolation("server", "unexpected rows in reply to pgveil's own query")
            value = row.values[0]
            if value is None:
                v.null = True
            else:
                # In the client_encoding: kept in the protocol codec's form (see pgtypes.statement_text).
                v.values.append(value.decode("utf-8", "surrogateescape"))
        elif t in (0x31, 0x32, 0x43):  # ParseComplete, BindComplete, CommandComplete
            pass
        elif t == 0x33:  # CloseComplete: the portal's, then the statement's
            v.closes += 1
            if v.closes == 2:
                self._values = None
                # A NULL or a short answer is delivered short: the retried message is then refused.
                v.miss.deliver([] if v.null or len(v.values) != v.miss.rows else v.values)
                self._resume_client = True
        elif t == 0x45:  # ErrorResponse: the server now skips to the next Sync
            self._values_failed(data[pos:end], body)
        elif t in (0x4E, 0x41):  # NoticeResponse, NotificationResponse
            self.to_client.append(data[pos:end])
        elif t == 0x53:  # ParameterStatus
            self._on_parameter_status(body)
            self.to_client.append(data[pos:end])
        else:
            raise ProtocolViolation("server", f"unexpected message type {t} in reply to pgveil's own query")

    def _values_failed(self, raw: bytes, body: bytes) -> None:
        """pgveil's own query failed (an aborted transaction, a permission on the sequence, a cancel): the
        client gets the server's error in place of its held message's replies, and the message is dropped,
        as the server would have failed it."""
        v = self._values
        assert v is not None
        self._values = None
        msg = codec.decode_backend(0x45, body)
        assert isinstance(msg, m.ErrorResponse)
        if msg.severity in ("FATAL", "PANIC"):
            self.server_fatal = True
            self.server_fatal_sqlstate = msg.sqlstate
        fields = self.crypto.server_error(msg.fields) if self.crypto is not None else None
        self.to_client.append(raw if fields is None else codec.encode_backend(m.ErrorResponse(fields)))
        buf = self._c_buf
        if len(buf) >= 5:
            (ln,) = struct.unpack_from("!I", buf, 1)
            self._c_buf = buf[1 + ln :]
        if v.held == 0x51:
            # A simple Query is answered by ReadyForQuery: the server sends it for a Sync of pgveil's.
            self.to_server.append(_SYNC)
            self.pending.append(Pending(_EXPECT_SYNC))
        else:
            self._discarding = True  # the client's Execute and the rest are skipped up to its Sync
        self._resume_client = True

    # -- server → client -------------------------------------------------------------------------------
    def receive_server(self, data: bytes) -> None:
        self.server_bytes += len(data)
        if self.phase is _CLOSED:
            return
        if self._s_hold:
            self._s_buf += data
            return
        try:
            if self.light and self.phase is _READY:
                self._receive_server_light(data)
            else:
                self._receive_server_messages(data)
        except ProtocolViolation as e:
            self._fail(e)
        if self._values is not None or self._resume_client:
            self._values_progress()

    def _receive_server_messages(self, data: bytes) -> None:
        if self._s_skip or self._s_buf:
            data = self._server_frames(data)
            if not data:
                return
        if self._values is not None and self._values.sent:
            done = self._values_replies(data)
            if self._values is not None or done == len(data):
                if done < len(data):
                    self._s_buf = data[done:]
                return
            data = data[done:]
        n = len(data)
        pos = 0
        start = 0
        out = self.to_client
        count = 0
        unpack = _HDR.unpack_from
        handlers = self._server_handlers
        # Both change only through an authentication-phase message (see below).
        authenticating = self.phase is _AUTHENTICATING
        crypto = self.crypto
        while n - pos >= 5:
            t, ln = unpack(data, pos)
            if ln < 4:
                raise codec.CodecError("server", f"invalid message length {ln}")
            end = pos + 1 + ln
            count += 1
            if t not in self._watched:
                if end > n:
                    self._s_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            if end > n:
                count -= 1
                break
            was_suppressing = self._suppress
            replacement: bytes | None
            try:
                if t == 0x44 and self._rows and not was_suppressing:
                    # A run of DataRows of a protected result: one call rewrites them all.
                    run_end, rows = _data_row_run(data, end, n)
                    assert crypto is not None
                    replacement = crypto.data_rows_current(data, pos, run_end, rows)
                    end = run_end
                    count += rows - 1
                elif authenticating:
                    replacement = self._handle_auth_message(t, data[pos + 5 : end])
                    authenticating = self.phase is _AUTHENTICATING
                    crypto = self.crypto
                else:
                    handler = handlers.get(t)
                    replacement = None if handler is None else handler(self, data[pos + 5 : end])
                    if crypto is not None:
                        self._refresh_watch()
            except KeyMiss as miss:
                count -= 1
                self._s_hold = True
                self.events.append(NeedKey("server", miss.key_id, miss.column_id, miss.subject, miss.key_ids))
                break
            except ProtocolViolation:
                raise
            except ProxyError as e:
                # The proxy cannot deliver this reply (a value failed to decrypt): the client gets the
                # error in its place and the rest of the reply is dropped up to ReadyForQuery.
                partial: bytes = getattr(e, "partial", b"")
                replacement = partial + codec.encode_error("ERROR", e.sqlstate, e.message, detail=e.detail, hint=e.hint)
                self._start_suppressing()
            if was_suppressing and t != 0x5A:
                replacement = b""  # the rest of a reply the client was told failed: nothing of it may pass
            if replacement is not None:
                if start < pos:
                    out.append(data[start:pos])
                if replacement:
                    out.append(replacement)
                start = end
            pos = end
        self.server_messages += count
        if start < pos:
            out.append(data[start:pos] if start or pos != n else data)
        if pos < n:
            self._s_buf = data[pos:]

    def _handle_auth_message(self, t: int, body: bytes) -> bytes | None:
        msg = codec.decode_backend(t, body)
        if isinstance(msg, m.ErrorResponse) and msg.severity in ("FATAL", "PANIC"):
            self.server_fatal = True
            self.server_fatal_sqlstate = msg.sqlstate
        return self._handle_auth_phase(msg)

    def _refresh_watch(self) -> None:
        """Chooses which backend messages the scanner must stop at, so that results and COPY streams
        without protected columns pass without per-row work."""
        if self._suppress:
            self._watched = _BACKEND_ALL
            return
        rows = self._rows
        if not rows and self.pending:
            head = self.pending[0]
            if head.expect is _EXPECT_EXECUTE and head.state is not None:
                assert self.crypto is not None
                rows = self._rows = self.crypto.execute_rows(head.state)
        if rows:
            self._watched = _BACKEND_WATCHED_ROWS
        elif self._copy_out_rewritten and self.copy_out:
            self._watched = _BACKEND_WATCHED_COPY
        else:
            self._watched = _BACKEND_WATCHED

    def _start_suppressing(self) -> None:
        self._suppress = True
        self._rows = self._copy_out_rewritten = False
        self._watched = _BACKEND_ALL

    # The hot replies (one of each per statement) are acted on from their type byte and a field or two,
    # without building message objects; RowDescription is kept as its raw body and decoded only on demand.
    def _on_ready(self, body: bytes) -> bytes | None:
        if len(body) != 1 or body not in (b"I", b"T", b"E"):
            raise codec.CodecError("server", "malformed ReadyForQuery message")
        pending = self.pending
        head = pending[0] if pending else self._head(None, "ReadyForQuery")
        if head.expect not in _READY_ANSWERS:
            raise ProtocolViolation("server", f"ReadyForQuery in reply to {head.expect.name}")
        pending.popleft()
        if not pending:
            self._copy_ended_early = 0  # a COPY the server refused before it started leaves none behind
        self.transaction_status = body
        self.copy_in = self.copy_out = False
        self.current_result = None
        self._rows = self._copy_out_rewritten = False
        self._suppress = False
        if head.expect is _EXPECT_QUERY and ("" in self.statements or "" in self.portals):
            self._on_query_started()
        if body == b"I" and self.portals:
            # Portals live until the end of their transaction ("Extended Query", Bind).
            self.portals.clear()
            if self.crypto is not None:
                self.crypto.close_all(b"P")
        if self.crypto is not None:
            self.crypto.ready_for_query(body)
        if self._role_ddl and body == b"I":
            self._role_ddl = False
            self.events.append(RolesChanged())
        return None

    def _on_query_started(self) -> None:
        """A reply to the simple Query at the head of the queue: the server destroyed the unnamed statement
        when it started the Query, and ran it in an unnamed portal of its own (exec_simple_query)."""
        if "" in self.statements or "" in self.portals:
            self._forget(b"S", "")
            self._forget(b"P", "")

    def _forget(self, kind: bytes, name: str) -> None:
        """The server confirmed that statement (``b"S"``) or portal ``name`` is gone."""
        (self.statements if kind == b"S" else self.portals).pop(name, None)
        if self.crypto is not None:
            self.crypto.close(kind, name)

    def _on_error(self, body: bytes) -> bytes | None:
        msg = codec.decode_backend(0x45, body)
        assert isinstance(msg, m.ErrorResponse)
        if msg.severity in ("FATAL", "PANIC"):
            self.server_fatal = True
            self.server_fatal_sqlstate = msg.sqlstate
        self.copy_in = self.copy_out = False
        self.current_result = None
        self._rows = self._copy_out_rewritten = False
        if not self.pending:
            return None  # e.g. a FATAL from an administrator command, with nothing outstanding
        head = self.pending[0]
        # A refused message was replaced by a stand-in that fails: the client gets the refusal instead.
        replacement = head.refusal
        if replacement is None and self.crypto is not None:
            fields = self.crypto.server_error(msg.fields)
            if fields is not None:
                replacement = codec.encode_backend(m.ErrorResponse(fields))
        if head.expect in (Expect.QUERY, Expect.FUNCTION_CALL, Expect.SYNC):
            if head.expect is Expect.QUERY:
                self._on_query_started()
            return replacement  # ReadyForQuery follows and pops it
        if head.name == "" and (head.expect is _EXPECT_PARSE or head.expect is _EXPECT_BIND):
            # A Parse of the unnamed statement drops the old one before it can fail (exec_parse_message);
            # after a failed Bind the unnamed portal can no longer run (skipped to Sync, or an aborted
            # transaction that ends with it).
            self._forget(b"S" if head.expect is _EXPECT_PARSE else b"P", "")
        # Extended protocol: the server now skips every message up to the next Sync.
        while self.pending and self.pending[0].expect is not Expect.SYNC:
            self.pending.popleft()
        if not self.pending:
            self._discarding = True
        return replacement

    def _on_parse_complete(self, body: bytes) -> bytes | None:
        p = self._pop(Expect.PARSE, "ParseComplete")
        assert p.parse is not None
        ops = tuple(p.ops) if p.ops else ()
        self.statements[p.name] = PreparedStatement(p.name, p.parse.query, p.parse.param_types, None, None, ops)
        if self.crypto is not None:
            self.crypto.set_statement(p.name, p.state)
        return None

    def _on_bind_complete(self, body: bytes) -> bytes | None:
        pending = self.pending
        p = (
            pending.popleft()
            if pending and pending[0].expect is _EXPECT_BIND
            else self._pop(_EXPECT_BIND, "BindComplete")
        )
        assert p.bind is not None
        stmt = self.statements.get(p.bind.statement)
        if stmt is None:
            # Prepared with SQL PREPARE, which shares the protocol's statement namespace.
            stmt = self.statements[p.bind.statement] = PreparedStatement(p.bind.statement, "", ())
        self.portals[p.name] = Portal(p.name, stmt, p.bind.result_formats, stmt.row_description)
        if self.crypto is not None:
            self.crypto.set_portal(p.name, p.state)
        return None

    def _on_close_complete(self, body: bytes) -> bytes | None:
        p = self._pop(Expect.CLOSE, "CloseComplete")
        self._forget(p.kind, p.name)
        return None

    def _on_parameter_description(self, body: bytes) -> bytes | None:
        msg = codec.decode_backend(0x74, body)
        assert isinstance(msg, m.ParameterDescription)
        p = self._head(Expect.DESCRIBE_STATEMENT, "ParameterDescription")
        stmt = self.statements.get(p.name)
        if stmt is not None:
            stmt.parameter_description = msg
        crypto = self.crypto
        if crypto is not None:
            # The statement the server describes is the confirmed one: every earlier reply is in.
            state = crypto.statement_state(p.name)
            if state is not None:
                return crypto.parameter_description(body, state)
        return None

    def _on_row_description(self, body: bytes) -> bytes | None:
        head = self._head(None, "RowDescription")
        crypto = self.crypto
        if head.expect is Expect.DESCRIBE_STATEMENT:
            stmt = self.statements.get(head.name)
            if stmt is not None:
                stmt.row_description = body
            self.pending.popleft()
            return None if crypto is None else crypto.statement_row_description(body, crypto.statement_state(head.name))
        if head.expect is Expect.DESCRIBE_PORTAL:
            portal = self.portals.get(head.name)
            if portal is not None:
                portal.row_description = body
            self.pending.popleft()
            if crypto is None:
                return None
            formats = portal.result_formats if portal is not None else ()
            return crypto.portal_row_description(body, crypto.portal_state(head.name), formats)
        if head.expect is not Expect.QUERY:
            raise ProtocolViolation("server", f"RowDescription in reply to {head.expect.name}")
        self.current_result = body
        if "" in self.statements or "" in self.portals:
            self._on_query_started()
        if crypto is None:
            return None
        replacement, self._rows = crypto.result_row_description(body, head.state)
        return replacement

    def _on_copy_data(self, body: bytes) -> bytes | None:
        if not self._copy_out_rewritten or not self.copy_out or self._suppress:
            return None
        assert self.crypto is not None
        return self.crypto.copy_out_data(body)

    def _on_no_data(self, body: bytes) -> bytes | None:
        pending = self.pending
        head = pending[0] if pending else self._head(None, "NoData")
        if head.expect is not _EXPECT_DESCRIBE_PORTAL and head.expect is not _EXPECT_DESCRIBE_STATEMENT:
            raise ProtocolViolation("server", f"NoData in reply to {head.expect.name}")
        pending.popleft()
        return None

    def _on_command_complete(self, body: bytes) -> bytes | None:
        if body and body[0] in _ROLE_TAG_STARTS and body in _ROLE_TAGS and self.crypto is not None:
            self._role_ddl = True
        self.copy_in = self.copy_out = False
        self.current_result = None
        self._rows = self._copy_out_rewritten = False
        pending = self.pending
        head = pending[0] if pending else self._head(None, "CommandComplete")
        if head.expect is _EXPECT_EXECUTE:
            pending.popleft()
            if body and body[0] in _NAMESPACE_TAG_STARTS:
                portal = self.portals.get(head.name)
                if portal is not None and portal.statement.ops:
                    self._on_namespace_tag(body, list(portal.statement.ops))
        elif head.expect is not _EXPECT_QUERY:
            raise ProtocolViolation("server", f"CommandComplete in reply to {head.expect.name}")
        else:
            if "" in self.statements or "" in self.portals:
                self._on_query_started()
            if head.state is not None:
                assert self.crypto is not None
                self.crypto.statement_done(head.state)
            if body and body[0] in _NAMESPACE_TAG_STARTS:
                self._on_namespace_tag(body, head.ops)
        return None

    def _on_namespace_tag(self, tag: bytes, ops: list[NamespaceOp] | None) -> None:
        """An SQL-level PREPARE, DEALLOCATE [ALL] or DISCARD ALL completed: the model follows. The
        names come from the statement text (``ops``, consumed in order); one pgveil could not read
        leaves the model as it was, which every later decision treats as unconfirmed."""
        if tag == b"DO\x00":
            if ops and NamespaceOp(NamespaceAction.REPLACE_ALL) in ops:
                # Server-side code may have replaced any statement or cursor: none is trusted now. A Bind
                # of a statement prepared before is refused (prepare it again), as one pgveil never saw.
                ops.remove(NamespaceOp(NamespaceAction.REPLACE_ALL))
                self.statements.clear()
                self.portals.clear()
                if self.crypto is not None:
                    self.crypto.close_all(b"S")
                    self.crypto.close_all(b"P")
            return
        if tag in (b"DEALLOCATE ALL\x00", b"DISCARD ALL\x00"):
            self.statements.clear()
            if self.crypto is not None:
                self.crypto.close_all(b"S")
            if tag == b"DISCARD ALL\x00":  # also CLOSE ALL
                self.portals.clear()
                if self.crypto is not None:
                    self.crypto.close_all(b"P")
            if ops:
                for i, op in enumerate(ops):
                    if op.action is NamespaceAction.DEALLOCATE_ALL:
                        del ops[i]
                        break
            return
        if tag == b"PREPARE\x00":
            action = NamespaceAction.PREPARE
        elif tag == b"DEALLOCATE\x00":
            action = NamespaceAction.DEALLOCATE
        else:
            return
        if not ops:
            return
        for i, op in enumerate(ops):
            if op.action is action:
                del ops[i]
                break
        else:
            return
        if action is NamespaceAction.PREPARE:
            self.statements[op.name] = PreparedStatement(op.name, "", ())
            if self.crypto is not None:
                self.crypto.set_statement(op.name, None)
        else:
            self._forget(b"S", op.name)

    def _on_portal_suspended(self, body: bytes) -> bytes | None:
        self.current_result = None
        self._rows = False
        self._pop(Expect.EXECUTE, "PortalSuspended")
        return None

    def _on_copy_in(self, body: bytes) -> bytes | None:
        head = self._head_in((Expect.QUERY, Expect.EXECUTE), "CopyInResponse")
        if head.expect is Expect.QUERY:
            self._on_query_started()
        crypto = self.crypto
        if crypto is not None:
            try:
                crypto.copy_in_response(head.state, body)
            except ProtocolViolation:
                raise
            except ProxyError as e:
                return self._refuse_copy_in(head, e)
            if crypto.copy_in_armed:
                self._c_streamed = _NOTHING_STREAMED
        self.copy_in = True
        if self._client_copy_started() and head.expect is Expect.EXECUTE:
            # The server ignores Sync and Flush while it copies in (CopyGetData in copyfromparse.c): libpq
            # pipelines Execute, Sync and, after the data, CopyDone and another Sync, with one ReadyForQuery.
            while len(self.pending) > 1 and self.pending[1].expect is Expect.SYNC:
                del self.pending[1]
        return None

    def _client_copy_started(self) -> bool:
        """CopyInResponse arrived: True if the client is copying now, False if it already sent its
        CopyDone/CopyFail (clients such as asyncpg send the data without waiting for the response)."""
        if self._copy_ended_early:
            self._copy_ended_early -= 1
            return False
        self._client_copying = True
        return True

    def _client_copy_ended(self) -> None:
        if self._client_copying:
            self._client_copying = False
        else:
            self._copy_ended_early += 1

    def _refuse_copy_in(self, head: Pending, e: ProxyError) -> bytes:
        """A COPY FROM STDIN the proxy cannot rewrite: the server's COPY is aborted with CopyFail (its
        error is replaced by ours) and the client never sees the CopyInResponse. In the extended protocol
        the server ignored the client's Sync while copying, so the proxy sends one in its place."""
        self.to_server.append(codec.encode_frontend(m.CopyFail(e.message)))
        if head.expect is Expect.EXECUTE:
            self.to_server.append(codec.encode_frontend(m.Sync()))
        head.refusal = self._refusal(e)
        return b""

    def _refusal(self, e: ProxyError) -> bytes:
        if self.crypto is not None:
            return self.crypto.refusal(e)  # counted for the metrics
        return codec.encode_error("ERROR", e.sqlstate, e.message, detail=e.detail, hint=e.hint)

    def _on_copy_out(self, body: bytes) -> bytes | None:
        head = self._head_in((Expect.QUERY, Expect.EXECUTE), "CopyOutResponse")
        if head.expect is Expect.QUERY:
            self._on_query_started()
        self.copy_out = True
        if self.crypto is not None:
            self._copy_out_rewritten = self.crypto.copy_out_response(head.state, body)
        return None

    def _on_copy_both(self, body: bytes) -> bytes | None:
        self._head_in((Expect.QUERY, Expect.EXECUTE), "CopyBothResponse")
        return None

    def _on_copy_done(self, body: bytes) -> bytes | None:
        rewritten = self._copy_out_rewritten
        self.copy_out = self._copy_out_rewritten = False
        if rewritten and not self._suppress:
            assert self.crypto is not None
            return self.crypto.copy_out_done()
        return None

    def _on_parameter_status(self, body: bytes) -> bytes | None:
        msg = codec.decode_backend(0x53, body)
        assert isinstance(msg, m.ParameterStatus)
        self.parameters[msg.name] = msg.value
        if self.crypto is not None:
            self.crypto.set_parameter(msg.name, msg.value)
        return None

    def _on_backend_key_data(self, body: bytes) -> bytes | None:
        msg = codec.decode_backend(0x4B, body)
        assert isinstance(msg, m.BackendKeyData)
        self.backend_key = msg
        return None

    def _on_authentication(self, body: bytes) -> bytes | None:
        raise ProtocolViolation("server", "authentication request after startup")

    _server_handlers: ClassVar[dict[int, Callable[[Relay, bytes], bytes | None]]] = {
        ord("Z"): _on_ready,
        ord("E"): _on_error,
        ord("1"): _on_parse_complete,
        ord("2"): _on_bind_complete,
        ord("3"): _on_close_complete,
        ord("t"): _on_parameter_description,
        ord("T"): _on_row_description,
        ord("n"): _on_no_data,
        ord("C"): _on_command_complete,
        ord("I"): _on_command_complete,
        ord("s"): _on_portal_suspended,
        ord("G"): _on_copy_in,
        ord("H"): _on_copy_out,
        ord("W"): _on_copy_both,
        ord("c"): _on_copy_done,
        ord("S"): _on_parameter_status,
        ord("K"): _on_backend_key_data,
        ord("R"): _on_authentication,
        ord("d"): _on_copy_data,
    }

    def _handle_auth_phase(self, msg: m.BackendMessage) -> bytes | None:
        if isinstance(msg, m.Authentication):
            if msg.code == m.AuthCode.OK:
                assert self.startup is not None
                self.login_role = self.startup.get("user")
                self.events.append(Authenticated(self.login_role or ""))
                if self._crypto_factory is not None:
                    self.crypto = self._crypto_factory(self.login_role or "")
            else:
                # Every request but SASLFinal waits for the client's response.
                self._auth_request_open = msg.code != m.AuthCode.SASL_FINAL
                if msg.code == m.AuthCode.SASL:
                    return _strip_channel_binding(msg) if self.strip_channel_binding else None
            return None
        if isinstance(msg, m.ReadyForQuery):
            self.transaction_status = msg.status
            self.phase = Phase.READY
            self.events.append(SessionReady())
        elif isinstance(msg, m.ParameterStatus):
            self.parameters[msg.name] = msg.value
            if self.crypto is not None:
                self.crypto.set_parameter(msg.name, msg.value)
        elif isinstance(msg, m.BackendKeyData):
            self.backend_key = msg
        elif isinstance(msg, m.ErrorResponse | m.NoticeResponse | m.NegotiateProtocolVersion):
            pass
        else:
            raise ProtocolViolation("server", f"unexpected {type(msg).__name__} during authentication")
        return None

    def _head(self, expect: Expect | None, what: str) -> Pending:
        if not self.pending:
            raise ProtocolViolation("server", f"unexpected {what}: no request outstanding")
        head = self.pending[0]
        if expect is not None and head.expect is not expect:
            raise ProtocolViolation("server", f"{what} in reply to {head.expect.name}")
        return head

    def _head_in(self, expects: tuple[Expect, ...], what: str) -> Pending:
        head = self._head(None, what)
        if head.expect not in expects:
            raise ProtocolViolation("server", f"{what} in reply to {head.expect.name}")
        return head

    def _pop(self, expect: Expect, what: str) -> Pending:
        head = self._head(expect, what)
        self.pending.popleft()
        return head

    # -- failure ---------------------------------------------------------------------------------------
    def _fail(self, e: ProtocolViolation) -> None:
        if self.client_at_boundary:
            self.to_client.append(codec.encode_error("FATAL", e.sqlstate, e.message))
        self.phase = Phase.CLOSED
        self.events.append(CloseConnection(e))

    def fail(self, e: ProtocolViolation) -> None:
        """Ends the conversation because of ``e`` (used by the session for errors it detects)."""
        self._fail(e)


class _Parts:
    """The reads that continue a partial message. Joining each read to the buffer would copy the
    message once per read (a 1 GB Query in 64 KiB reads: terabytes); they are joined once, when the
    message is complete."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def clear(self) -> None:
        self.parts = []
        self.size = 0


def _still_partial(buf: bytes, more: _Parts, data: bytes) -> bool:
    """Whether ``buf`` (the start of a message, header included) with ``more`` and ``data`` is still short
    of the whole message; then ``data`` is kept in ``more``."""
    if len(buf) < 5:
        return False
    (length,) = _U32.unpack_from(buf, 1)
    if len(buf) + more.size + len(data) >= 1 + length:
        return False
    more.parts.append(data)
    more.size += len(data)
    return True


def _coalesce(out: list[bytes], first: int) -> None:
    """Joins the small pieces ``out[first:]`` of one read (a rewritten message between untouched ones)
    into one buffer: the session then writes it with one plain write instead of a scatter write."""
    pieces = out[first:]
    if sum(map(len, pieces)) <= _COALESCE_LIMIT:
        out[first:] = [b"".join(pieces)]


def data_row_run_py(data: bytes, end: int, n: int) -> tuple[int, int]:
    """(end, count) of the run of complete DataRow messages that starts with the one ending at ``end``.
    The reference; the accelerator's ``data_row_run`` (held to it by tests and the fuzzer) runs when built."""
    rows = 1
    unpack = _HDR.unpack_from
    while n - end >= 5:
        t, ln = unpack(data, end)
        if t != 0x44 or ln < 4 or end + 1 + ln > n:
            break
        end += 1 + ln
        rows += 1
    return end, rows


_data_row_run: Callable[[bytes, int, int], tuple[int, int]] = (
    data_row_run_py if native.accel is None else native.accel.data_row_run
)


def _strip_channel_binding(msg: m.Authentication) -> bytes | None:
    """AuthenticationSASL without ``*-PLUS`` mechanisms, or None when there were none to strip."""
    mechs = [x for x in msg.payload.split(b"\x00") if x]
    kept = [x for x in mechs if not x.endswith(b"-PLUS")]
    if len(kept) == len(mechs):
        return None
    payload = b"".join(x + b"\x00" for x in kept) + b"\x00"
    return codec.encode_backend(m.Authentication(msg.code, payload))


# PostgreSQL keys prepared statements and portals by their first NAMEDATALEN - 1 bytes (hash tables with
# NAMEDATALEN-byte string keys: commands/prepare.c, utils/mmgr/portalmem.c); a longer name sent in Parse,
# Bind, Describe, Close or Execute is not refused but means the statement or portal of its first 63 bytes.
# Two names that agree on those bytes are one name to the server, so they are one name in the model too.
# (SQL-level names are cut by the parser, at a character boundary, before they reach the server.)
MAX_NAME_BYTES = 63
_SHORT_NAME = MAX_NAME_BYTES // 4  # no string of this many characters encodes to more than 63 bytes


def server_name(name: str) -> str:
    """The name the server stores for statement or portal ``name`` (its first 63 bytes)."""
    if len(name) <= _SHORT_NAME:
        return name
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_NAME_BYTES:
        return name
    return raw[:MAX_NAME_BYTES].decode("utf-8", "surrogateescape")


def _non_ascii_name() -> ProxyError:
    """The server converts a statement or portal name from the session's client_encoding, so bytes that
    differ (a LATIN1 e9 and a UTF-8 c3 a9, or two SJIS codes of one character) can be one name to it.
    pgveil keys names by their bytes; a statement a Bind may carry encrypted values to has an ASCII name,
    which reads the same in every client encoding."""
    e = ProxyError(
        "pgveil: statement and portal names with non-ASCII characters are not supported while tables are "
        "encrypted (the server reads them in the session's client_encoding)",
        hint="use ASCII statement and portal names",
        reason=RefusalReason.STATEMENT_STATE,
    )
    e.sqlstate = "0A000"
    return e


def _bind_with_server_names(bind: m.BindFrame) -> m.BindFrame:
    """``bind`` naming its portal and statement as the server stores them (the body is unchanged)."""
    portal, statement = server_name(bind.portal), server_name(bind.statement)
    if portal == bind.portal and statement == bind.statement:
        return bind
    return m.BindFrame(
        bind.body, portal, statement, bind.names_end, bind.param_formats, bind.param_offsets, bind.result_formats
    )


def _distinct(versions: list[Version | None]) -> list[Version]:
    """The versions of a name that exist, each once."""
    out: list[Version] = []
    for v in versions:
        if v is not None and v not in out:
            out.append(v)
    return out


_DROPS_ALL = frozenset({NamespaceAction.DEALLOCATE_ALL, NamespaceAction.REPLACE_ALL})


def _apply_ops(
    versions: list[Version | None], ops: Sequence[NamespaceOp], name: str, *, certain: bool
) -> list[Version | None]:
    """``versions`` after SQL-level namespace operations that succeeded (``certain``) or may have."""
    for op in ops:
        action = op.action
        v: Version | None
        if action is NamespaceAction.PREPARE and op.name == name:
            v = (None, None)  # the analysis refuses an SQL-level PREPARE with encrypted parameters
        elif (action is NamespaceAction.DEALLOCATE and op.name == name) or action in _DROPS_ALL:
            v = None
        else:
            continue
        versions = [v] if certain else [*versions, v]
    return versions
