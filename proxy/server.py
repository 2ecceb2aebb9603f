"""The listener: accepts clients, owns the live sessions, reloads on SIGHUP, drains on SIGTERM.

Reload re-reads the configuration file; an invalid file is rejected with every error logged and the
running configuration stays. Settings that need a new socket (``listen``, ``admin.listen``) are reported
and kept until restart; everything else applies to sessions that start after the reload, except the
visibility policy (``roles:``), which is swapped in one step for every session, from its next statement
(see ``proxy.policy_runtime``), and the role membership, which is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from keymgmt.keystore import init_keystore
from proxy import __version__
from proxy.admin.api import admin_wiring
from proxy.admin.app import AdminServer, build_admin_app, start_admin_server, upstream_reachable
from proxy.admin.metrics import AdminMetrics, Metrics
from proxy.audit_runtime import AuditRuntime
from proxy.config import Config, load_config
from proxy.encrypt.engine import SessionCrypto
from proxy.encrypt.runtime import EncryptionRuntime, connect_kwargs
from proxy.errors import ConfigError
from proxy.logsetup import current_level, loop_exception_handler, reconfigure, set_level
from proxy.services import (
    Explainer,
    ExplainUnavailable,
    ReloadOutcome,
    WorkerControl,
    as_json,
    captured_log_lines,
    key_columns,
    local_sessions,
    terminate_local_session,
)
from proxy.session import ClientProtocol, Session, SessionSettings, shutdown_analysis_pool
from proxy.tls import client_leg_context, first_certificate_der, upstream_settings
from proxy.workers import Supervisor, WorkerChannel

log = logging.getLogger(__name__)


def session_settings(config: Config) -> SessionSettings:
    up = config.upstream
    client_tls = None
    required = False
    cert_der = None
    if config.client_tls is not None:
        client_tls = client_leg_context(config.client_tls.cert_file, config.client_tls.key_file)
        required = config.client_tls.required
        cert_der = first_certificate_der(config.client_tls.cert_file)
    return SessionSettings(
        upstream_host=up.host,
        upstream_port=up.port,
        upstream_tls=upstream_settings(up.tls, up.host, up.ca_file, up.server_name),
        connect_timeout=up.connect_timeout,
        client_tls=client_tls,
        client_tls_required=required,
        max_message_size=config.sessions.max_message_size,
        startup_timeout=config.sessions.startup_timeout,
        buffer_limit=config.sessions.idle_buffer_limit,
        client_cert_der=cert_der,
        track_statements=config.sessions.track_statements == "always",
    )


class ProxyServer:
    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        worker_fds: tuple[int, int] | None = None,
        control_fd: int | None = None,
    ) -> None:
        self.config = config
        # A worker process (``pgveil serve --worker``): no listening socket and no admin server; clients
        # arrive from the supervisor and reports go back to it over these (report pipe, hand-off socket),
        # and it answers the supervisor's requests arriving on ``control_fd``.
        self.worker_fds = worker_fds
        self.control_fd = control_fd
        self.channel: WorkerChannel | None = None
        self.supervisor: Supervisor | None = None
        self._listening: list[socket.socket] = []  # a supervisor's own accept loops
        self._accepting: list[asyncio.Task[None]] = []
        self._adopting: set[asyncio.Task[None]] = set()
        self._starting = 0  # connections adopted whose session does not exist yet
        self.overrides = dict(overrides or {})  # command-line settings that also hold after a reload
        self.metrics = metrics or Metrics(version=__version__)
        self.settings = session_settings(config)
        self.sessions: set[Session] = set()
        self._ids = itertools.count(1)
        self._servers: list[asyncio.Server] = []
        self._admin: AdminServer | None = None
        self._stopping = asyncio.Event()
        self.shutting_down = False
        self.bound: list[tuple[str, int]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.encryption: EncryptionRuntime | None = None
        if any(t.columns for t in config.tables):
            # Plain governed columns need the runtime too: it applies the visibility policy to them.
            self.encryption = EncryptionRuntime(config)
            self.metrics.watch_encryption(self.encryption)
            self.metrics.watch_membership(self.encryption.roles)
        self.metrics.set_policy_roles(config.policy.role_names)
        self.audit: AuditRuntime | None = None
        if self.encryption is not None and config.audit.enabled:
            self.audit = self.encryption.audit = audit_runtime(config, self.metrics, worker=worker_fds is not None)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.encryption is not None:
            await self.encryption.start()
        self._flusher = loop.create_task(self._flush_metrics_periodically())
        if self.audit is not None:
            self.audit.start()
        if self.worker_fds is not None:
            report_fd, handoff_fd = self.worker_fds
            self.channel = WorkerChannel(
                self.metrics.registry,
                report_fd,
                handoff_fd,
                self._adopt,
                self.request_stop,
                control_fd=self.control_fd,
                on_request=self._answer_supervisor,
            )
            await self.channel.start()
            log.info("worker serving clients of its supervisor, upstream %s", self.settings.upstream_address)
            return
        if self.config.sessions.workers > 1:
            if self.config.source_path is None:
                raise ValueError("sessions.workers > 1 needs a configuration file")
            self.supervisor = Supervisor(
                self.config.source_path,
                self.overrides.get("upstream"),
                self.config.sessions.workers,
                on_balance=self._balance_changed,
            )
            self.metrics.exposed = self.supervisor.attach(self.metrics.registry)
        # The admin port opens before the listen port, so a client that can connect finds it answering.
        if self.config.admin.listen is not None:
            wiring = admin_wiring(self.config.admin, self, AdminMetrics(self.metrics.registry))
            app = build_admin_app(self.metrics, self.readiness, version=__version__, **wiring.app_options)
            self._admin = await start_admin_server(
                app, self.config.admin.listen.host, self.config.admin.listen.port, ssl_context=wiring.ssl_context
            )
            log.info("admin server on %s:%d", self.config.admin.listen.host, self._admin.port)
        if self.supervisor is not None:
            # Accepting here, not in an asyncio.Server: each client is placed before a byte is read.
            for hp in self.config.listen:
                for sock in listening_sockets(hp.host, hp.port):
                    self._listening.append(sock)
                    self._accepting.append(loop.create_task(self._accept_loop(sock)))
            self._balance_changed()
        else:
            for hp in self.config.listen:
                srv = await loop.create_server(
                    lambda: ClientProtocol(self._new_session), hp.host, hp.port, reuse_address=True, backlog=1024
                )
                self._servers.append(srv)
        socks = [*self._listening, *(sock for srv in self._servers for sock in srv.sockets)]
        for sock in socks:
            addr = sock.getsockname()
            self.bound.append((str(addr[0]), int(addr[1])))
        log.info("listening on %s, upstream %s", ", ".join(f"{h}:{p}" for h, p in self.bound),
                 self.settings.upstream_address)  # fmt: skip
        if self.supervisor is not None:
            await self.supervisor.start()  # last: by the time workers run, the admin port answers

    async def _flush_metrics_periodically(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.flush_all_metrics()

    def flush_all_metrics(self) -> None:
        for s in list(self.sessions):
            s.flush_metrics()
            _audit_take(s)

    @property
    def admin_port(self) -> int | None:
        return self._admin.port if self._admin else None

    async def readiness(self) -> tuple[bool, str]:
        if self.shutting_down:
            return False, "shutting down"
        if self.encryption is not None and not self.encryption.ready:
            return False, "encryption not ready (catalog or keys not loaded)"
        s = self.settings
        return await upstream_reachable(s.upstream_host, s.upstream_port, timeout=min(s.connect_timeout, 2.0))

    # -- what the admin API sees (proxy.services.Instance) ----------------------------------------------
    def live_sessions(self) -> Iterable[Session]:
        return list(self.sessions)

    def workers(self) -> WorkerControl | None:
        return self.supervisor

    def _answer_supervisor(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """A worker's answer to a checked request of its supervisor (:mod:`proxy.control`)."""
        kind = request["t"]
        if kind == "sessions":
            return {"sessions": as_json(local_sessions(list(self.sessions)))}
        if kind == "terminate":
            return {"terminated": terminate_local_session(list(self.sessions), request["session"])}
        if request["level"] is not None:  # log_level; counted by the supervisor, not here
            set_level(request["level"], source=request["source"])
        return {"level": current_level()}

    def reload_reporting(self) -> ReloadOutcome:
        """:meth:`reload` (as on SIGHUP), with what it logged: applied when the configuration was replaced."""
        before = self.config
        with captured_log_lines(log) as lines:
            self.reload()
        return ReloadOutcome(applied=self.config is not before, messages=tuple(lines))

    def configured_key_columns(self) -> tuple[str, ...]:
        return key_columns(self.config)

    def keystore_connection(self) -> Callable[[], Awaitable[Any]] | None:
        ks = self.config.keystore
        if ks is None or ks.dsn is None:
            return None
        dsn, password_file = ks.dsn, ks.password_file

        async def connect() -> Any:
            import asyncpg

            return await asyncpg.connect(**connect_kwargs(dsn, password_file), timeout=10)

        return connect

    def explainer(self) -> Explainer | None:
        """``pgveil policy explain`` against what this process runs: its catalog (as read from the server),
        its policy and its role membership; nothing is sent to the server."""
        enc = self.encryption
        if enc is None:
            return None

        async def explain_for(role: str, sql: str) -> Mapping[str, Any]:
            from proxy.cli_policy import explain

            graph = enc.roles.graph
            if graph is None or not enc.ready:
                raise ExplainUnavailable("pgveil has not loaded the catalog and role membership yet")
            return explain(enc.context.catalog, self.config.policy, graph, role, sql).to_json()

        return explain_for

    # -- clients ---------------------------------------------------------------------------------------
    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # out of file descriptors, a connection reset before accept()
                log.error("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self._place(conn)

    def _place(self, conn: socket.socket) -> None:
        """A supervisor's choice for a new client: the process with the fewest sessions. Clients over the
        limit, and any a worker cannot take, are served (or refused) here."""
        sup = self.supervisor
        assert sup is not None
        sid = next(self._ids)  # numbered here for every process, so ids are unique over all of them
        if (
            not self.shutting_down
            and self._local_load() + sup.worker_sessions() < self.config.sessions.max_client_connections
        ):
            link = sup.pick(self._local_load())
            if link is not None and sup.hand_off(link, conn, sid):
                conn.close()  # the worker holds its own descriptor now
                return
        self._adopt(conn, sid)

    def _adopt(self, conn: socket.socket, sid: int) -> None:
        """Serves an accepted connection in this process, as session ``sid``."""

        async def adopt() -> None:
            try:
                await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: ClientProtocol(lambda transport: self._new_adopted_session(transport, sid)), conn
                )
            except OSError as exc:  # the client left already
                log.debug("could not serve an accepted connection: %s", exc)
                self._starting -= 1
                conn.close()
                if self.channel is not None:
                    self.channel.session_closed()

        # Counted until its session exists (connection_made may come a loop iteration after the await).
        self._starting += 1

        task = asyncio.get_running_loop().create_task(adopt())
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def _local_load(self) -> int:
        """Sessions served here, counting clients accepted but not yet started (a burst of connections
        arrives before the first session exists)."""
        return len(self.sessions) + self._starting

    def _new_adopted_session(self, transport: asyncio.Transport, sid: int) -> Session:
        self._starting -= 1
        return self._new_session(transport, sid)

    def _session_count(self) -> int:
        """Sessions of every process (a worker knows only its own; the supervisor enforces the limit)."""
        return len(self.sessions) + (self.supervisor.worker_sessions() if self.supervisor is not None else 0)

    def _balance_changed(self) -> None:
        """``pgveil_process_sessions``: how the supervisor (process 0) and each worker are loaded."""
        sup = self.supervisor
        if sup is None:
            return
        counts = dict.fromkeys(range(sup.count), 0)
        counts[0] = len(self.sessions)
        for slot, link in sup.links.items():
            counts[slot] = link.sessions
        self.metrics.set_process_sessions(counts)

    def _session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        if _audit_take(session) and self.audit is not None:
            self.audit.session_ended()
        if self.channel is not None:
            self.channel.session_closed()
        self._balance_changed()

    def _new_session(self, transport: asyncio.Transport, sid: int | None = None) -> Session:
        sid = next(self._ids) if sid is None else sid
        session = Session(sid, transport, self.settings, self.metrics, self._session_closed, self.encryption)
        if self.shutting_down or self._session_count() >= self.config.sessions.max_client_connections:
            reason = "pgveil is shutting down" if self.shutting_down else "sorry, too many clients already"
            code = "57P03" if self.shutting_down else "53300"
            session.reject(code, reason)
            return session
        self.sessions.add(session)
        self._balance_changed()
        return session

    def request_stop(self) -> None:
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads. Installed before anything starts, so a signal that arrives
        while the proxy is still starting (binding, starting workers) is handled, not fatal."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def serve_until_stopped(self) -> None:
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stops accepting, lets sessions finish for ``sessions.shutdown_timeout``, then ends the rest."""
        self.shutting_down = True
        for srv in self._servers:
            srv.close()
        for task in self._accepting:
            task.cancel()
        for sock in self._listening:
            sock.close()
        if self.channel is not None:
            self.channel.stop_taking_clients()
        stopping_workers = None
        if self.supervisor is not None:
            stopping_workers = asyncio.get_running_loop().create_task(
                self.supervisor.stop(self.config.sessions.shutdown_timeout + 5)
            )
        log.info("shutting down: %d sessions open", len(self.sessions))
        deadline = asyncio.get_running_loop().time() + self.config.sessions.shutdown_timeout
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            # Idle sessions outside a transaction can be ended at once; the others get the grace period.
            for s in list(self.sessions):
                if s.idle_outside_transaction:
                    s.terminate()
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            s.terminate()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        if stopping_workers is not None:
            await stopping_workers
        if self._flusher is not None:
            self._flusher.cancel()
        if self.channel is not None:
            self.flush_all_metrics()
            self.channel.close()
        if self.audit is not None:
            await self.audit.stop()  # the sessions have ended: their last counts are flushed
        if self.encryption is not None:
            await self.encryption.stop()
        shutdown_analysis_pool()
        if self._admin is not None:
            await self._admin.stop()
        await asyncio.sleep(0)  # let transports flush their final writes
        log.info("stopped")

    def reload(self) -> None:
        if self.supervisor is not None:
            self.supervisor.signal(signal.SIGHUP)
        path = self.config.source_path
        if path is None:
            log.warning("reload requested but the configuration did not come from a file")
            return
        try:
            new = load_config(path, overrides=self.overrides)
            settings = session_settings(new)
        except ConfigError as e:
            for line in e.errors:
                log.error("reload rejected: %s", line)
            self._reload_failed()
            return
        except (OSError, ValueError) as e:
            log.error("reload rejected: %s", e)
            self._reload_failed()
            return
        if (new.tables, new.keystore, new.service) != (self.config.tables, self.config.keystore, self.config.service):
            # Half-applying these could leave a newly protected column passing in plaintext: refuse loudly.
            log.error("reload rejected: tables, keystore and service settings need a restart of pgveil")
            self._reload_failed()
            return
        for line in self.config.reload_diff(new):
            log.warning("reload: %s", line)
        if new.audit != self.config.audit:
            log.warning("reload: audit: changed settings need a restart; the running access audit keeps its own")
        if self.audit is not None:
            self.audit.role_names = new.policy.role_names  # metric labels: a role the policy dropped is default
        self.config = new.keeping_restart_settings(self.config)
        self.settings = settings
        reconfigure(new.logging.level, new.logging.format, source="reload")
        self.metrics.config_reloaded(True)
        self._install_policy(new)
        log.info("configuration reloaded from %s", Path(path))

    def _reload_failed(self) -> None:
        self.metrics.config_reloaded(False)
        self.metrics.policy_reloaded(False)
        log.error("reload rejected: the running configuration and visibility policy stay")

    def _install_policy(self, new: Config) -> None:
        """The new policy for every session from its next statement, and a fresh read of the membership."""
        self.metrics.set_policy_roles(new.policy.role_names)
        if self.encryption is not None:
            changed = self.encryption.install_policy(new.policy, new.policy_settings.membership_refresh_seconds)
            self.encryption.roles.schedule_refresh()
        else:
            changed = False
        self.metrics.policy_reloaded(True)
        log.info(
            "visibility policy reloaded (%s): %d policy roles",
            "changed" if changed else "unchanged",
            len(new.policy.role_names),
        )


def audit_runtime(config: Config, metrics: Metrics, *, worker: bool = False) -> AuditRuntime:
    """The access audit of this process: to the keystore table when a keystore is configured. A worker
    process (``sessions.workers``) numbers its sessions on its own, so a configured instance name gets
    its pid appended (``name/pid``)."""
    audit = config.audit
    if worker and audit.instance is not None:
        audit = dataclasses.replace(audit, instance=f"{audit.instance}/{os.getpid()}")
    ks = config.keystore
    connect: Callable[[], Awaitable[Any]] | None = None
    if ks is not None and ks.dsn is not None:
        dsn, password_file = ks.dsn, ks.password_file

        async def connect() -> Any:
            import asyncpg

            return await asyncpg.connect(**connect_kwargs(dsn, password_file), timeout=10)

    column_ids = [f"{t.schema}.{t.name}.{c.name}" for t in config.tables for c in t.columns]
    return AuditRuntime(
        audit,
        column_ids,
        metrics.registry,
        connect=connect,
        role_names=config.policy.role_names,
        prepare=init_keystore,
    )


def _audit_take(session: Session) -> bool:
    """Hands a session's values read since the last call to the access audit; whether it has an audit."""
    crypto = session.relay.crypto
    if not isinstance(crypto, SessionCrypto):
        return False
    if crypto.audit is None:
        crypto.values_read.clear()
        return False
    crypto.audit.take(crypto.values_read)
    return True


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets for every address ``host`` resolves to (as asyncio's create_server
    binds them: SO_REUSEADDR, IPv6 sockets IPv6-only)."""
    socks: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _, addr in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if (family, *addr[:2]) in seen:
                continue
            seen.add((family, *addr[:2]))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


async def run(
    config: Config,
    overrides: Mapping[str, Any] | None = None,
    *,
    worker_fds: tuple[int, int] | None = None,
    control_fd: int | None = None,
) -> None:
    asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
    server = ProxyServer(config, overrides=overrides, worker_fds=worker_fds, control_fd=control_fd)
    server.install_signal_handlers()
    await server.start()
    await server.serve_until_stopped()
