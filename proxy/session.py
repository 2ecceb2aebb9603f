"""One client session: the only code that reads and writes the client's and the server's sockets.

Each session owns one :class:`~proxy.protocol.relay.Relay` (which decides everything) and two asyncio
transports. It feeds every byte it reads into the relay, writes what the relay queued, and carries out the
relay's events: answer SSLRequest and start TLS, connect upstream and send the StartupMessage, forward a
CancelRequest, close.

Backpressure: each side's write buffer has a high-water mark. When the client's buffer fills, the session
stops reading from the server (and vice versa) until it drains, so a slow reader never makes the proxy
hold a whole result set or COPY stream.

Failures end only this session: a dead upstream becomes FATAL 08006 for the client (naming the server
address), a protocol violation FATAL 08P01, and a client that vanishes closes its server connection, which
makes PostgreSQL abort whatever the client left running (a COPY included). No exception reaches the
transport: one that escapes the relay becomes FATAL (its SQLSTATE, or XX000) at a message boundary, and
the log line names the session and the exception's type, never its text.

Long statements are read and analysed in one worker process (:func:`analysis_pool`) while the relay holds
that client (NeedAnalysis), so a multi-megabyte statement stalls no other session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import multiprocessing
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from proxy.errors import ProxyError
from proxy.logsetup import current_session
from proxy.protocol import codec, relay
from proxy.protocol import messages as m
from proxy.tls import UpstreamTLS, UpstreamTLSSettings

if TYPE_CHECKING:
    from proxy.admin.metrics import Metrics
    from proxy.encrypt.runtime import EncryptionRuntime

log = logging.getLogger(__name__)

_SSL_REQUEST = codec.encode_startup(m.SSLRequest())


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What a session needs from the configuration; rebuilt on reload, used by new sessions."""

    upstream_host: str
    upstream_port: int
    upstream_tls: UpstreamTLSSettings
    connect_timeout: float
    client_tls: ssl.SSLContext | None
    client_tls_required: bool
    max_message_size: int
    startup_timeout: float
    buffer_limit: int
    client_cert_der: bytes | None = None  # the client leg's certificate, to compare with the server's
    track_statements: bool = False  # model the extended protocol even when nothing is protected

    @property
    def upstream_address(self) -> str:
        return f"{self.upstream_host}:{self.upstream_port}"


class UpstreamError(Exception):
    """Connecting to PostgreSQL failed; the message names the server address, never credentials."""


class _UpstreamProtocol(asyncio.Protocol):
    """Server-side protocol. Before TLS it answers the one-byte SSLRequest reply through ``ssl_answer``."""

    def __init__(self, session: Session | None) -> None:
        self.session = session
        self.ssl_answer: asyncio.Future[bytes] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it

    def data_received(self, data: bytes) -> None:
        if self.ssl_answer is not None:
            fut, self.ssl_answer = self.ssl_answer, None
            if not fut.done():
                fut.set_result(data)
            return
        if self.session is not None:
            self.session.on_server_data(data)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ssl_answer is not None and not self.ssl_answer.done():
            self.ssl_answer.set_exception(ConnectionResetError("server closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.session is not None:
            self.session.on_server_lost(exc)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_client_reading("backpressure")

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_client_reading("backpressure")


async def connect_upstream(
    settings: SessionSettings, session: Session | None
) -> tuple[asyncio.Transport, _UpstreamProtocol]:
    """Opens a connection to PostgreSQL, negotiating TLS as configured (SSLRequest, then the handshake)."""
    loop = asyncio.get_running_loop()
    tls = settings.upstream_tls
    try:
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: _UpstreamProtocol(session), settings.upstream_host, settings.upstream_port),
            settings.connect_timeout,
        )
    except TimeoutError:
        raise UpstreamError(f"connection to server at {settings.upstream_address} timed out") from None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UpstreamError(f"could not connect to server at {settings.upstream_address}: {reason}") from None
    if tls.mode is UpstreamTLS.DISABLE or tls.context is None:
        return transport, proto
    try:
        proto.ssl_answer = loop.create_future()
        transport.write(_SSL_REQUEST)
        answer = await asyncio.wait_for(proto.ssl_answer, settings.connect_timeout)
        if answer == b"S":
            new_transport = await asyncio.wait_for(
                loop.start_tls(transport, proto, tls.context, server_hostname=tls.server_hostname),
                settings.connect_timeout,
            )
            proto.transport = cast(asyncio.Transport, new_transport)
            return proto.transport, proto
        if answer == b"N" and tls.mode is UpstreamTLS.PREFER:
            return transport, proto
        if answer == b"N":
            raise UpstreamError(
                f"server at {settings.upstream_address} does not support TLS (upstream.tls requires it)"
            )
        raise UpstreamError(f"server at {settings.upstream_address} sent an invalid reply to SSLRequest")
    except UpstreamError:
        transport.abort()
        raise
    except ssl.SSLError as e:
        transport.abort()
        raise UpstreamError(f"TLS handshake with server at {settings.upstream_address} failed: {e.reason}") from None
    except (OSError, TimeoutError) as e:
        transport.abort()
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise UpstreamError(f"connection to server at {settings.upstream_address} failed: {reason}") from None


async def cancel_backend(settings: SessionSettings, raw: bytes) -> None:
    """Sends one CancelRequest packet to the server on a new connection."""
    try:
        transport, proto = await connect_upstream(settings, None)
    except UpstreamError as e:
        log.warning("cancel not forwarded: %s", e)
        return
    transport.write(raw)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proto.closed, settings.connect_timeout)
    transport.close()


_background: set[asyncio.Task[None]] = set()

_analysis: concurrent.futures.ProcessPoolExecutor | None = None


def analysis_pool() -> concurrent.futures.ProcessPoolExecutor:
    """The process's analysis worker (one process, started on first use): long statements are analysed
    there, one at a time, while the event loop goes on serving every session."""
    global _analysis
    if _analysis is None:
        _analysis = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return _analysis


def _reset_analysis_pool() -> None:
    global _analysis
    pool, _analysis = _analysis, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def shutdown_analysis_pool() -> None:
    """Stops the analysis worker (on shutdown); statements still waiting for it are refused."""
    _reset_analysis_pool()


def _detach(coro: Coroutine[Any, Any, None]) -> None:
    """Runs ``coro`` independently of any session (it outlives the session that started it)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


class ClientProtocol(asyncio.Protocol):
    """Client-side protocol; creates its session when the connection is accepted."""

    def __init__(self, factory: Callable[[asyncio.Transport], Session]) -> None:
        self._factory = factory
        self.session: Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session = self._factory(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        assert self.session is not None
        self.session.on_client_data(data)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.on_client_lost(exc)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_server_reading("backpressure")

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_server_reading("backpressure")


class Session:
    """One client connection and its server connection (1:1)."""

    def __init__(
        self,
        sid: int,
        transport: asyncio.Transport,
        settings: SessionSettings,
        metrics: Metrics,
        on_closed: Callable[[Session], None],
        encryption: EncryptionRuntime | None = None,
    ) -> None:
        self.sid = sid
        self.settings = settings
        self.metrics = metrics
        self.encryption = encryption
        self.relay = relay.Relay(
            max_message_size=settings.max_message_size,
            crypto_factory=functools.partial(encryption.session_factory, session_id=sid) if encryption else None,
            track_statements=settings.track_statements,
        )
        self.client = transport
        self.server: asyncio.Transport | None = None
        self._server_proto: _UpstreamProtocol | None = None
        self._on_closed = on_closed
        self._client_pauses: set[str] = set()
        self._server_pauses: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.client_tls = False
        self.closed = False
        self._flushed = (0, 0, 0, 0)
        self.started = time.monotonic()
        self._announced = False  # the session start line was logged (authentication succeeded)
        self._end: tuple[int, str] | None = None  # (level, why) of the session end line, set once
        self._startup_timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            settings.startup_timeout, self._startup_timed_out
        )
        transport.set_write_buffer_limits(high=settings.buffer_limit)
        metrics.session_started()
        self.client_address = _address(transport.get_extra_info("peername"))
        log.debug(
            "client connected from %s",
            self.client_address,
            extra={"session": sid, "event": "connection", "client": self.client_address},
        )

    def _log(self, level: int, message: str, *args: object, event: str | None = None, **fields: object) -> None:
        """A line of this session: its id always, ``event`` and ``fields`` as structured fields."""
        if log.isEnabledFor(level):
            extra: dict[str, object] = {"session": self.sid, **fields}
            if event is not None:
                extra["event"] = event
            log.log(level, message, *args, extra=extra)

    # -- reading ---------------------------------------------------------------------------------------
    def on_client_data(self, data: bytes) -> None:
        token = current_session.set(self.sid)  # lines the relay and the engine log name this session
        try:
            self._on_client_data(data)
        finally:
            current_session.reset(token)

    def _on_client_data(self, data: bytes) -> None:
        r = self.relay
        try:
            r.receive_client(data)
        except Exception as exc:  # no exception reaches the transport (it would drop the client silently)
            self._internal_error(exc, at_boundary=r.client_at_boundary)
            return
        # The common case, spelled out: bytes for the server and nothing else to do.
        out = r.to_server
        if out and not r.to_client and not r.events and self.server is not None and not self.closed:
            r.to_server = []
            if len(out) == 1:
                self.server.write(out[0])
            else:
                self.server.writelines(out)
            return
        self._flush()

    def on_server_data(self, data: bytes) -> None:
        token = current_session.set(self.sid)
        try:
            self._on_server_data(data)
        finally:
            current_session.reset(token)

    def _on_server_data(self, data: bytes) -> None:
        r = self.relay
        at_boundary = r.client_at_boundary
        try:
            r.receive_server(data)
        except Exception as exc:
            self._internal_error(exc, at_boundary=at_boundary)
            return
        out = r.to_client
        if out and not r.to_server and not r.events and not self.closed:
            r.to_client = []
            if len(out) == 1:
                self.client.write(out[0])
            else:
                self.client.writelines(out)
            return
        self._flush()

    def flush_metrics(self) -> None:
        """Adds the relay's byte and message counts since the last call to the metrics.

        Called by the server about once a second and when the session closes, so the hot path pays for
        no metric updates at all."""
        r = self.relay
        c = (r.client_bytes, r.client_messages, r.server_bytes, r.server_messages)
        last = self._flushed
        if c != last:
            self.metrics.add_relayed("client_to_server", c[0] - last[0], c[1] - last[1])
            self.metrics.add_relayed("server_to_client", c[2] - last[2], c[3] - last[3])
            self._flushed = c
        crypto = r.crypto
        if crypto is not None:
            self.metrics.add_values(
                encrypted=crypto.values_encrypted,
                decrypted=crypto.values_decrypted,
                decrypt_failures=crypto.decrypt_failures,
            )
            crypto.values_encrypted = crypto.values_decrypted = crypto.decrypt_failures = 0
            if crypto.refused:
                self.metrics.add_refusals(crypto.refused)
                crypto.refused.clear()
            if crypto.values_served:
                self.metrics.add_served(crypto.values_served)
                crypto.values_served.clear()

    def _flush(self) -> None:
        r = self.relay
        if r.to_server:
            # Before the server is connected the bytes wait (a Terminate pipelined behind the
            # StartupMessage is the server's to answer); _open_server flushes them after the startup.
            if self.server is not None and not self.closed:
                out = r.to_server
                if len(out) == 1:
                    self.server.write(out[0])
                else:
                    self.server.writelines(out)
                r.to_server = []
            elif self.closed:
                r.to_server = []
        if r.to_client:
            if not self.closed:
                out = r.to_client
                if len(out) == 1:
                    self.client.write(out[0])
                else:
                    self.client.writelines(out)
            r.to_client = []
        if r.events:
            events, r.events = r.events, []
            for ev in events:
                self._handle_event(ev)

    # -- events ----------------------------------------------------------------------------------------
    def _handle_event(self, ev: relay.Event) -> None:
        if isinstance(ev, relay.TLSRequested):
            self._handle_tls_request()
        elif isinstance(ev, relay.StartupReceived):
            self._handle_startup(ev)
        elif isinstance(ev, relay.CancelReceived):
            self.metrics.cancel_request()
            self._spawn(self._forward_cancel(ev.raw))
        elif isinstance(ev, relay.Authenticated):
            self._announce(ev.role)
        elif isinstance(ev, relay.NeedKey):
            if ev.side == "client":
                self.pause_client_reading("key")
            else:
                self.pause_server_reading("key")
            self._spawn(self._fetch_key(ev))
        elif isinstance(ev, relay.NeedAnalysis):
            self.pause_client_reading("analysis")
            self._spawn(self._analyze_detached(ev))
        elif isinstance(ev, relay.RolesChanged):
            if self.encryption is not None:
                self.encryption.roles_changed()
        elif isinstance(ev, relay.SessionReady):
            if self._startup_timer is not None:
                self._startup_timer.cancel()
                self._startup_timer = None
        elif isinstance(ev, relay.CloseConnection):
            if ev.error is not None:
                self.metrics.protocol_violation("server" if ev.error.peer == "server" else "client")
                self.metrics.error_sent(ev.error.sqlstate, "proxy")
            if ev.reason is not None:
                self._ending(logging.INFO, ev.reason)
            elif ev.error is not None:
                self._ending(logging.WARNING, ev.error.message)
            self.close()

    def _announce(self, role: str) -> None:
        """The session start line: authentication succeeded (the server's AuthenticationOk)."""
        self._announced = True
        startup = self.relay.startup
        database = (startup.get("database") if startup is not None else None) or role
        self._log(
            logging.INFO,
            "session started: authenticated as role %s",
            role,
            event="session_start",
            role=role,
            database=database,
            client=self.client_address,
            tls=self.client_tls,
        )

    def _handle_tls_request(self) -> None:
        ctx = self.settings.client_tls
        accept = ctx is not None and not self.client_tls
        self.relay.answer_tls(accept)
        self._flush()
        if accept and ctx is not None and self.relay.phase is relay.Phase.STARTUP and not self.closed:
            self.pause_client_reading("tls")
            self._spawn(self._start_client_tls(ctx))

    async def _start_client_tls(self, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        proto = self.client.get_protocol()
        try:
            new = await loop.start_tls(self.client, proto, ctx, server_side=True)
        except (ssl.SSLError, OSError, ConnectionError) as e:
            self.close(f"client TLS handshake failed ({type(e).__name__})")
            return
        if new is None or self.closed:
            self.close()
            return

        self.client = new
        self.client_tls = True
        self.metrics.tls_session("client")
        new.set_write_buffer_limits(high=self.settings.buffer_limit)
        self._client_pauses.discard("tls")
        if not self._client_pauses:
            new.resume_reading()

    def _handle_startup(self, ev: relay.StartupReceived) -> None:
        if self.settings.client_tls_required and not self.client_tls:
            self._send_fatal("28000", "pgveil: TLS is required for this connection")
            return
        self.pause_client_reading("connect")
        self._spawn(self._open_server(ev.raw))

    async def _open_server(self, startup_raw: bytes) -> None:
        t0 = time.perf_counter()
        try:
            transport, proto = await connect_upstream(self.settings, None)
        except UpstreamError as e:
            self.metrics.upstream_connect_failed()
            self._ending(logging.WARNING, str(e))
            self._send_fatal("08006", f"pgveil: {e}")
            return
        self.metrics.upstream_connected(time.perf_counter() - t0)
        if self.settings.upstream_tls.mode is not UpstreamTLS.DISABLE and transport.get_extra_info("ssl_object"):
            self.metrics.tls_session("server")
        if self.closed:
            transport.close()
            return
        self.server = transport
        self._server_proto = proto
        proto.session = self  # only now: a failed connect must report its own reason, not a lost server
        self.relay.strip_channel_binding = not self._same_certificate_on_both_legs(transport)
        transport.set_write_buffer_limits(high=self.settings.buffer_limit)
        if self._server_pauses:
            transport.pause_reading()
        transport.write(startup_raw)
        self._flush()  # anything the relay queued for the server meanwhile
        self.resume_client_reading("connect")

    async def _fetch_key(self, ev: relay.NeedKey) -> None:
        """Loads a key the relay is waiting for, then lets it retry the held message. A failed fetch is
        remembered by the key ring, so the retry reports the key as unavailable instead of waiting again."""
        assert self.encryption is not None
        await self.encryption.keyring.fetch(
            key_id=ev.key_id, column_id=ev.column_id, subject=ev.subject, key_ids=ev.key_ids
        )
        if self.closed:
            return
        r = self.relay
        at_boundary = r.client_at_boundary
        try:
            r.resume(ev.side)
        except Exception as exc:
            self._internal_error(exc, at_boundary=at_boundary)
            return
        self._flush()
        if ev.side == "client":
            self.resume_client_reading("key")
        else:
            self.resume_server_reading("key")

    async def _analyze_detached(self, ev: relay.NeedAnalysis) -> None:
        """Runs a long statement's analysis in the analysis worker process, so this session's statement
        delays no other session; then lets the relay retry the held message. A failed run is delivered as
        its exception (the statement is refused)."""
        miss = ev.miss
        result: object
        try:
            result = await asyncio.get_running_loop().run_in_executor(analysis_pool(), miss.function, *miss.arguments)
        except Exception as exc:  # a broken or killed worker: refuse the statement, start a new pool
            self._log(logging.ERROR, "analysis worker failed (%s); the statement is refused", type(exc).__name__)
            _reset_analysis_pool()
            result = exc
        if self.closed:
            return
        miss.deliver(result)
        r = self.relay
        at_boundary = r.client_at_boundary
        try:
            r.resume("client")
        except Exception as exc:
            self._internal_error(exc, at_boundary=at_boundary)
            return
        self._flush()
        self.resume_client_reading("analysis")

    def _same_certificate_on_both_legs(self, upstream: asyncio.Transport) -> bool:
        if not self.client_tls or self.settings.client_cert_der is None:
            return False
        ssl_object = upstream.get_extra_info("ssl_object")
        if ssl_object is None:
            return False
        peer = ssl_object.getpeercert(binary_form=True)
        return bool(peer) and peer == self.settings.client_cert_der

    async def _forward_cancel(self, raw: bytes) -> None:
        """Forwards a CancelRequest verbatim; PostgreSQL matches pid and secret, we keep no state for it."""
        self.close()
        await cancel_backend(self.settings, raw)

    # -- failure and closing ---------------------------------------------------------------------------
    def _startup_timed_out(self) -> None:
        self._startup_timer = None
        if self.relay.phase is relay.Phase.STARTUP and not self.closed:
            # The server's authentication_timeout ends a connection without its startup packet silently.
            self.close("no startup packet in time")
        elif self.relay.phase is relay.Phase.AUTHENTICATING and not self.closed:
            self._ending(logging.INFO, "startup did not complete in time")
            self._send_fatal("08006", "pgveil: connection startup timed out")

    def _internal_error(self, exc: Exception, *, at_boundary: bool) -> None:
        """An exception escaped the relay while it handled a read: nothing of that read is passed on, the
        client gets FATAL (the exception's SQLSTATE if it is a ProxyError, else XX000) if the bytes it has
        received end on a message boundary, and the session ends. The log line names the session and
        the exception's type, never its text (which may quote a value)."""
        self._ending(logging.ERROR, f"internal error ({type(exc).__name__})")
        r = self.relay
        r.to_client, r.to_server, r.events = [], [], []
        r.phase = relay.Phase.CLOSED
        if isinstance(exc, ProxyError):
            sqlstate, message = exc.sqlstate, exc.message
        else:
            sqlstate, message = "XX000", "pgveil: internal error; the session is closed"
        if not self.closed and at_boundary:
            self.client.write(codec.encode_error("FATAL", sqlstate, message))
            self.metrics.error_sent(sqlstate, "proxy")
        self.close()

    def _send_fatal(self, sqlstate: str, message: str) -> None:
        if not self.closed and self.relay.client_at_boundary:
            self.client.write(codec.encode_error("FATAL", sqlstate, message))
            self.metrics.error_sent(sqlstate, "proxy")
        self.close()

    def on_server_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        r = self.relay
        if r.phase is not relay.Phase.CLOSED and not r.server_fatal and not r.client_terminated:
            self._ending(logging.WARNING, "the server closed the connection unexpectedly")
            self._send_fatal(
                "08006", f"pgveil: server at {self.settings.upstream_address} closed the connection unexpectedly"
            )
        else:
            self.close()

    def on_client_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            r = self.relay
            self._ending(
                logging.INFO, self._default_end() if r.server_fatal or r.client_terminated else "the client went away"
            )
            key = self.relay.backend_key
            if key is not None and self.relay.busy:
                # A busy backend does not read its socket (pg_sleep, a long scan), so closing it is not
                # enough to stop the work: cancel it as the client would have.
                raw = codec.encode_startup(m.CancelRequest(key.process_id, key.secret_key))
                _detach(cancel_backend(self.settings, raw))
        self.close()

    @property
    def idle_outside_transaction(self) -> bool:
        r = self.relay
        return r.phase is relay.Phase.READY and not r.busy and r.transaction_status == b"I"

    def reject(self, sqlstate: str, message: str) -> None:
        """Refuses a new connection (too many clients, shutting down) before reading anything."""
        self._ending(logging.WARNING, f"refused before startup: {message} (SQLSTATE {sqlstate})")
        self._send_fatal(sqlstate, message)

    def terminate(self, message: str = "pgveil is shutting down") -> None:
        """Ends the session on shutdown: FATAL 57P01 if the client is idle at a message boundary."""
        if self.closed:
            return
        self._ending(logging.INFO, f"terminated: {message}")
        if self.relay.phase is relay.Phase.READY and not self.relay.busy:
            self._send_fatal("57P01", f"terminating connection: {message}")
        else:
            self.close()

    def terminate_by_administrator(self) -> None:
        """Ends the session for the admin API (``DELETE /v1/sessions/{id}``), busy or not: FATAL 57P01 to the
        client when its stream is at a message boundary (as PostgreSQL's pg_terminate_backend), the server
        connection closed, and a statement still running on the backend cancelled (closing its socket alone
        would not stop it)."""
        if self.closed:
            return
        self._ending(logging.INFO, "terminated by an administrator")
        key = self.relay.backend_key
        if key is not None and self.relay.busy:
            _detach(
                cancel_backend(self.settings, codec.encode_startup(m.CancelRequest(key.process_id, key.secret_key)))
            )
        self._send_fatal("57P01", "terminating connection due to administrator command (pgveil admin API)")

    def _ending(self, level: int, why: str) -> None:
        """Why the session ends, for its end line; the first reason given stands."""
        if self._end is None:
            self._end = (level, why)

    def close(self, why: str | None = None) -> None:
        if self.closed:
            return
        if why is not None:
            self._ending(logging.INFO, why)
        self.closed = True
        if self._startup_timer is not None:
            self._startup_timer.cancel()
            self._startup_timer = None
        # close() flushes what is buffered (e.g. a FATAL for the client, a Terminate for the server).
        self.client.close()
        if self.server is not None:
            self.server.close()
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self.flush_metrics()
        duration = time.monotonic() - self.started
        self.metrics.session_ended(duration)
        self._log_end(duration)
        self._on_closed(self)

    def _log_end(self, duration: float) -> None:
        """The session end line: why, how long, how many bytes each way (as read from each peer)."""
        r = self.relay
        level, why = self._end if self._end is not None else (logging.INFO, self._default_end())
        if not self._announced and level == logging.INFO and not r.server_fatal:
            level = logging.DEBUG  # a connection that never became a session (a cancel, a probe)
        role = r.login_role or (r.startup.get("user") if r.startup is not None else None)
        self._log(
            level,
            "session ended: %s",
            why,
            event="session_end",
            role=role,
            duration_s=round(duration, 6),
            bytes_client_to_server=r.client_bytes,
            bytes_server_to_client=r.server_bytes,
            messages_client_to_server=r.client_messages,
            messages_server_to_client=r.server_messages,
        )

    def _default_end(self) -> str:
        r = self.relay
        if r.client_terminated:
            return "the client ended the session"
        if r.server_fatal:
            if r.server_fatal_sqlstate == "28P01":
                return "authentication failed (FATAL 28P01)"
            return f"the server ended the session (FATAL {r.server_fatal_sqlstate})"
        return "closed"

    # -- backpressure ----------------------------------------------------------------------------------
    def pause_client_reading(self, reason: str) -> None:
        if not self._client_pauses:
            with contextlib.suppress(RuntimeError):
                self.client.pause_reading()
            if reason == "backpressure":
                self.metrics.backpressure_paused("client_to_server")
        self._client_pauses.add(reason)

    def resume_client_reading(self, reason: str) -> None:
        self._client_pauses.discard(reason)
        if not self._client_pauses and not self.closed:
            with contextlib.suppress(RuntimeError):
                self.client.resume_reading()

    def pause_server_reading(self, reason: str) -> None:
        if not self._server_pauses and self.server is not None:
            with contextlib.suppress(RuntimeError):
                self.server.pause_reading()
            if reason == "backpressure":
                self.metrics.backpressure_paused("server_to_client")
        self._server_pauses.add(reason)

    def resume_server_reading(self, reason: str) -> None:
        self._server_pauses.discard(reason)
        if not self._server_pauses and self.server is not None and not self.closed:
            with contextlib.suppress(RuntimeError):
                self.server.resume_reading()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        token = current_session.set(self.sid)  # the task's context is a copy of this one
        try:
            task = asyncio.get_running_loop().create_task(coro)
        finally:
            current_session.reset(token)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._ending(logging.ERROR, f"session task failed ({type(exc).__name__})")
            if isinstance(exc, Exception):
                self._internal_error(exc, at_boundary=self.relay.client_at_boundary and not self.relay.to_client)
            else:
                self.close()


def _address(peer: object) -> str:
    """The client's address as a log line shows it: host:port, a Unix socket path, or ``?``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if isinstance(peer, str) and peer:
        return peer
    return "?"
