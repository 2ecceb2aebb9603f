"""The listener: accepts clients, owns the live sessions, reloads on SIGHUP, drains on SIGTERM.

Reload re-reads the configuration file; an invalid file is rejected with every error logged and the
running configuration stays. Settings that need a new socket (``listen``, ``admin.listen``) are reported
and kept until restart; everything else applies to sessions that start after the reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.admin.app import AdminServer, build_admin_app, start_admin_server, upstream_reachable
from proxy.admin.metrics import Metrics
from proxy.config import Config, load_config
from proxy.encrypt.runtime import EncryptionRuntime
from proxy.errors import ConfigError
from proxy.logsetup import setup_logging
from proxy.session import ClientProtocol, Session, SessionSettings
from proxy.tls import client_leg_context, first_certificate_der, upstream_settings
from proxy.workers import Supervisor, report_metrics

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
        worker_metrics_fd: int | None = None,
        listen_fds: Sequence[int] = (),
    ) -> None:
        self.config = config
        self.listen_fds = list(listen_fds)  # a worker: the supervisor's listening sockets
        # A worker process (``pgveil serve --worker``): no admin server, metrics go to the supervisor.
        self.worker_metrics_fd = worker_metrics_fd
        self.supervisor: Supervisor | None = None
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
        self._reporter: asyncio.Task[None] | None = None
        self.encryption: EncryptionRuntime | None = None
        if config.protects_anything:
            self.encryption = EncryptionRuntime(config)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.encryption is not None:
            await self.encryption.start()
        if self.listen_fds:
            # A worker accepts on the supervisor's listening sockets: whichever process is free accepts
            # the next client, so a busy worker does not get more than its share.
            for fd in self.listen_fds:
                sock = socket.socket(fileno=fd)
                srv = await loop.create_server(lambda: ClientProtocol(self._new_session), sock=sock, backlog=1024)
                self._servers.append(srv)
        for hp in () if self.listen_fds else self.config.listen:
            srv = await loop.create_server(
                lambda: ClientProtocol(self._new_session), hp.host, hp.port, reuse_address=True, backlog=1024
            )
        for srv in self._servers:
            for sock in srv.sockets:
                addr = sock.getsockname()
                self.bound.append((str(addr[0]), int(addr[1])))
        log.info("listening on %s, upstream %s", ", ".join(f"{h}:{p}" for h, p in self.bound),
                 self.settings.upstream_address)  # fmt: skip
        self._flusher = asyncio.get_running_loop().create_task(self._flush_metrics_periodically())
        if self.worker_metrics_fd is not None:
            self._reporter = loop.create_task(
                report_metrics(self.metrics.registry, self.worker_metrics_fd, self.request_stop)
            )
            return
        if self.config.sessions.workers > 1:
            if self.config.source_path is None:
                raise ValueError("sessions.workers > 1 needs a configuration file")
            fds = [sock.fileno() for srv in self._servers for sock in srv.sockets]
            self.supervisor = Supervisor(
                self.config.source_path, fds, self.overrides.get("upstream"), self.config.sessions.workers
            )
            self.metrics.exposed = self.supervisor.attach(self.metrics.registry)
        if self.config.admin.listen is not None:
            app = build_admin_app(self.metrics, self.readiness, version=__version__)
            self._admin = await start_admin_server(app, self.config.admin.listen.host, self.config.admin.listen.port)
            log.info("admin server on %s:%d", self.config.admin.listen.host, self._admin.port)
        if self.supervisor is not None:
            await self.supervisor.start()  # last: by the time workers run, the admin port answers

    async def _flush_metrics_periodically(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.flush_all_metrics()

    def flush_all_metrics(self) -> None:
        for s in list(self.sessions):
            s.flush_metrics()

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

    def _new_session(self, transport: asyncio.Transport) -> Session:
        sid = next(self._ids)
        session = Session(sid, transport, self.settings, self.metrics, self.sessions.discard, self.encryption)
        if self.shutting_down or len(self.sessions) >= self.config.sessions.max_client_connections:
            reason = "pgveil is shutting down" if self.shutting_down else "sorry, too many clients already"
            code = "57P03" if self.shutting_down else "53300"
            session.reject(code, reason)
            return session
        self.sessions.add(session)
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
        if self._reporter is not None:
            self.flush_all_metrics()
            self._reporter.cancel()
        if self.encryption is not None:
            await self.encryption.stop()
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
            self.metrics.config_reloaded(False)
            return
        except (OSError, ValueError) as e:
            log.error("reload rejected: %s", e)
            self.metrics.config_reloaded(False)
            return
        if (new.tables, new.keystore, new.service) != (self.config.tables, self.config.keystore, self.config.service):
            # Half-applying these could leave a newly protected column passing in plaintext: refuse loudly.
            log.error("reload rejected: tables, keystore and service settings need a restart of pgveil")
            self.metrics.config_reloaded(False)
            return
        for line in self.config.reload_diff(new):
            log.warning("reload: %s", line)
        self.config = new.keeping_restart_settings(self.config)
        self.settings = settings
        setup_logging(new.logging.level, new.logging.format)
        self.metrics.config_reloaded(True)
        log.info("configuration reloaded from %s", Path(path))


async def run(
    config: Config,
    overrides: Mapping[str, Any] | None = None,
    *,
    worker_metrics_fd: int | None = None,
    listen_fds: Sequence[int] = (),
) -> None:
    server = ProxyServer(config, overrides=overrides, worker_metrics_fd=worker_metrics_fd, listen_fds=listen_fds)
    server.install_signal_handlers()
    await server.start()
    await server.serve_until_stopped()
