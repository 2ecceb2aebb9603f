"""The admin HTTP server: ``/metrics``, ``/healthz``, ``/readyz``, and the mount point of the admin API.

Owns routing, JSON error bodies, readiness caching and the upstream probe. It must not reach into
sessions or keys itself: what it reports comes from the :class:`~proxy.admin.metrics.Metrics` object and
the readiness callable it is given, and the versioned admin API (keys, subjects, ledger, policy reload)
is a separate aiohttp application (:mod:`proxy.admin.api`) mounted under :data:`API_PREFIX`, whose routes
check bearer tokens and scopes themselves. The probes here are open unless the configuration protects
them with a token (``admin.require_token_for_metrics`` / ``_for_health``).

Nothing here writes a query string, a header or an exception message to a log or a response body:
admin URLs may carry tokens, and exceptions from checks may carry DSNs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.admin.auth import Scope
from proxy.admin.metrics import Metrics

if TYPE_CHECKING:
    from proxy.admin.api import Guard

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[tuple[bool, str]]]

API_PREFIX = "/v1"
READINESS_TTL_SECONDS = 1.0
READINESS_TIMEOUT_SECONDS = 5.0
_MAX_REASON_CHARS = 200

# SSLRequest (PostgreSQL docs, "Message Formats"): Int32 length 8, Int32 code 80877103 (1234 << 16 | 5679).
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


@dataclass(frozen=True, slots=True)
class AdminState:
    metrics: Metrics
    readiness: ReadinessCheck
    version: str


ADMIN_STATE = web.AppKey("pgveil_admin_state", AdminState)


class CachedReadiness:
    """Runs a readiness check at most once per ``ttl`` seconds, however many probes arrive at once.

    Concurrent callers wait for the one check in flight and share its result, so a scrape storm costs the
    upstream one probe. A check that raises or outlives ``timeout`` reports "not ready" with a fixed
    reason: its exception text might hold a DSN, so it is never shown.
    """

    def __init__(
        self,
        check: ReadinessCheck,
        *,
        ttl: float = READINESS_TTL_SECONDS,
        timeout: float = READINESS_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._lock = asyncio.Lock()
        self._result: tuple[bool, str] | None = None
        self._checked_at = 0.0

    async def __call__(self) -> tuple[bool, str]:
        async with self._lock:
            if self._result is not None and self._clock() - self._checked_at < self._ttl:
                return self._result
            self._result = await self._run()
            self._checked_at = self._clock()
            return self._result

    async def _run(self) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(self._timeout):
                ready, reason = await self._check()
        except TimeoutError:
            return False, f"readiness check did not finish within {self._timeout:g} s"
        except Exception as exc:
            log.warning("readiness check raised %s", type(exc).__name__)
            return False, "readiness check failed"
        return bool(ready), reason[:_MAX_REASON_CHARS]


# -- handlers ------------------------------------------------------------------------------------------
async def _metrics(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    payload, content_type = state.metrics.render(request.headers.get("Accept", ""))
    # Content types from prometheus_client carry parameters (version, charset), which aiohttp's
    # content_type argument refuses, so the header is set whole.
    return web.Response(body=payload, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": request.app[ADMIN_STATE].version})


async def _readyz(request: web.Request) -> web.Response:
    ready, reason = await request.app[ADMIN_STATE].readiness()
    if ready:
        return web.json_response({"status": "ready", "reason": reason})
    return web.json_response({"status": "not ready", "reason": reason}, status=503)


def route_template(request: web.BaseRequest) -> str:
    """The matched route as declared (``/v1/subjects/{subject}``), never the concrete path: paths may name
    a data subject. Unmatched requests show as "-"."""
    match_info = getattr(request, "match_info", None)
    resource = match_info.route.resource if match_info is not None else None
    return resource.canonical if resource is not None else "-"


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as JSON; the body never echoes the path or query, which may hold a token."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate", "retry-after")}
        return web.json_response({"error": (exc.reason or "error").lower()}, status=exc.status, headers=headers)
    except Exception as exc:
        log.error("admin handler for %s %s raised %s", request.method, route_template(request), type(exc).__name__)
        return web.json_response({"error": "internal error"}, status=500)


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: Route, guard: Guard | None) -> Route:
    """``handler`` behind a metrics:read token when ``guard`` is given (admin.require_token_for_*)."""
    if guard is None:
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        outcome = guard.authorize(request, Scope.METRICS_READ)
        if isinstance(outcome, web.Response):
            return outcome
        return await handler(request)

    return guarded


def build_admin_app(
    metrics: Metrics,
    readiness: ReadinessCheck,
    *,
    version: str,
    api: web.Application | None = None,
    readiness_ttl: float = READINESS_TTL_SECONDS,
    readiness_timeout: float = READINESS_TIMEOUT_SECONDS,
    metrics_guard: Guard | None = None,
    health_guard: Guard | None = None,
) -> web.Application:
    """The admin application.

    ``api`` is the versioned admin API (:mod:`proxy.admin.api`), mounted at :data:`API_PREFIX`. It is a
    separate application whose every route checks its own bearer-token scope and records mutating calls;
    the probes here are open unless ``metrics_guard`` (``/metrics``) or ``health_guard`` (``/healthz``,
    ``/readyz``) is given, which then ask for a token with scope metrics:read. The JSON error middleware of
    this app covers both.
    """
    app = web.Application(middlewares=[_json_errors])
    app[ADMIN_STATE] = AdminState(
        metrics=metrics,
        readiness=CachedReadiness(readiness, ttl=readiness_ttl, timeout=readiness_timeout),
        version=version,
    )
    app.add_routes(
        [
            web.get("/metrics", _guarded(_metrics, metrics_guard)),
            web.get("/healthz", _guarded(_healthz, health_guard)),
            web.get("/readyz", _guarded(_readyz, health_guard)),
        ]
    )
    if api is not None:
        app.add_subapp(API_PREFIX, api)
    return app


# -- server --------------------------------------------------------------------------------------------
class _PathOnlyAccessLogger(AbstractAccessLogger):
    """One line per request naming the route template, never the path or query, which may carry a data
    subject's id or a token."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "admin %s %s %d %.1fms", request.method, route_template(request), response.status, time * 1000.0
        )


class AdminServer:
    """A running admin server; :attr:`port` is the bound port (useful when asked for port 0)."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port

    async def stop(self) -> None:
        await self._runner.cleanup()


def admin_tls_context(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> ssl.SSLContext:
    """The admin port's TLS: its certificate, and with ``client_ca_file`` mutual TLS (a client without a
    certificate that CA signed fails the handshake, before any HTTP is read)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_admin_server(
    app: web.Application,
    host: str,
    port: int,
    *,
    access_log: bool = False,
    shutdown_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AdminServer:
    """Starts serving ``app`` on ``host``:``port`` (over TLS with ``ssl_context``); access logging (path
    only) when ``access_log``."""
    if access_log:
        runner = web.AppRunner(
            app,
            access_log_class=_PathOnlyAccessLogger,
            access_log=logging.getLogger("proxy.admin.access"),
            shutdown_timeout=shutdown_timeout,
        )
    else:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    log.info("admin server listening on %s:%d%s", host, bound, " (TLS)" if ssl_context is not None else "")
    return AdminServer(runner, bound)


# -- upstream probe ------------------------------------------------------------------------------------
def _tls_probe_context() -> ssl.SSLContext:
    # The probe sends no data and reads none after the handshake; it completes TLS only so the server
    # sees a clean close_notify rather than logging "could not accept SSL connection: EOF detected" for
    # every probe. There is nothing to protect, so the server's certificate is not checked.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def upstream_reachable(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Whether a PostgreSQL postmaster answers at ``host``:``port``, within ``timeout`` seconds in all.

    Sends SSLRequest and expects the one-byte answer 'S' or 'N' ("SSL Session Encryption"), which a
    listening port of anything else does not give. After 'N' the connection is closed before a
    StartupMessage, which the server does not log; after 'S' a TLS handshake is completed first (see
    :func:`_tls_probe_context`). It proves the postmaster answers, not that it accepts logins: a server
    still in recovery or at max_connections answers SSLRequest too.
    The reason names no address, so it can be shown on an unauthenticated endpoint.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(SSL_REQUEST)
            await writer.drain()
            answer = await reader.readexactly(1)
            if answer not in (b"S", b"N"):
                return False, f"upstream answered SSLRequest with 0x{answer[0]:02x}: not a PostgreSQL server"
            # From here the verdict is "ready": a failed goodbye does not change what the server said.
            try:
                if answer == b"S":
                    await writer.start_tls(_tls_probe_context())
                writer.close()
                await writer.wait_closed()
            except (OSError, EOFError) as exc:
                log.debug("upstream probe: closing after %r failed: %s", answer, type(exc).__name__)
            return True, "upstream answered SSLRequest"
    except TimeoutError:
        return False, f"upstream did not answer within {timeout:g} s"
    except asyncio.IncompleteReadError:
        return False, "upstream closed the connection without answering SSLRequest"
    except socket.gaierror:
        return False, "upstream host name does not resolve"
    except OSError as exc:
        return False, f"upstream unreachable: {_describe_os_error(exc)}"
    finally:
        if writer is not None and not writer.transport.is_closing():
            writer.transport.abort()


def _describe_os_error(exc: OSError) -> str:
    # str(exc) from asyncio names the address ("Connect call failed ('10.0.0.5', 5432)"); the errno's
    # text does not.
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return type(exc).__name__
