"""The encryption runtime of one proxy process: reads the server's catalog through the proxy's own
service connection (never a client's session), opens the keystore, loads the protected columns' keys,
and keeps retrying in the background while either is unavailable.

Until both are loaded the proxy fails closed: statements that touch a protected table are refused
(SQLSTATE 55000, naming the reason), statements that don't pass through, and ``/readyz`` says not ready.

Once loaded, the catalog is read again whenever it may be stale: when a session's DDL on a protected
relation has ended its transaction, when a RowDescription disagrees with it (both through
``CryptoContext.request_reload``: statements on protected relations get 55000 until the new catalog is
installed), and when the event trigger that ``pgveil schema apply`` installs notifies channel
``pgveil_catalog`` after DDL made anywhere. That notification is only a hint (any role may NOTIFY): it
starts a reload but does not mark the catalog stale, so a flood of them costs catalog reads, one at a
time, and never refuses statements. Reloads are coalesced: one runs at a time, and requests made while
it runs cause one more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import asyncpg

from keymgmt.column_migration import open_migrations
from keymgmt.errors import KeyManagementError
from keymgmt.keystore import Keystore, init_keystore
from keymgmt.providers import KeyProvider, ProviderChain, make_provider
from proxy.audit_runtime import AuditRuntime
from proxy.catalog_loader import load_catalog, read_subject_defaults
from proxy.cli_errors import missing_privilege
from proxy.config import Config, LocalMasterKeyConfig, MasterKeyConfig, read_secret_file, redact_dsn
from proxy.encrypt.engine import CryptoContext, SessionCrypto
from proxy.encrypt.keyring import KeyRing
from proxy.policy.rules import Policy
from proxy.policy_runtime import PolicyRuntime

log = logging.getLogger(__name__)

RETRY_SECONDS = 2.0
CATALOG_CHANNEL = "pgveil_catalog"
# Role DDL seen by one pgveil process is announced here, so every process and instance reads the role
# membership again at once (the periodic read catches changes made without pgveil). Like the catalog
# channel, a hint only: any role may NOTIFY, and a notification costs one coalesced membership read.
ROLES_CHANNEL = "pgveil_roles"
_MAX_HINT_NAMES = 256


def provider_from_config(config: Config) -> KeyProvider:
    """``master_key`` (wraps new keys), chained with ``previous_master_keys`` (unwrap only) if any."""
    assert config.keystore is not None
    base = config.source_path.parent if config.source_path else Path.cwd()
    primary, *previous = (
        make_provider(master_key_spec(mk), base)
        for mk in (config.keystore.master_key, *config.keystore.previous_master_keys)
    )
    return ProviderChain(primary, *previous) if previous else primary


def master_key_spec(mk: MasterKeyConfig) -> dict[str, Any]:
    if isinstance(mk, LocalMasterKeyConfig):
        return {"type": "local", "path": str(mk.path)}
    spec = {"type": "pkcs11", "module": str(mk.module), "token_label": mk.token_label, "key_label": mk.key_label}
    return spec | ({"pin_file": str(mk.pin_file)} if mk.pin_file is not None else {"pin_env": mk.pin_env})


def connect_kwargs(dsn: str, password_file: Path | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"dsn": dsn}
    if password_file is not None:
        kw["password"] = read_secret_file(password_file)
    return kw


class EncryptionRuntime:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keystore: Keystore | None = None
        self.keyring = KeyRing(None)
        self.context = CryptoContext(
            config.catalog(), self.keyring, max_analyzed_statement=config.sessions.max_analyzed_statement_size
        )
        self.context.unavailable = "pgveil is still loading the catalog and keys"
        self._task: asyncio.Task[None] | None = None
        self._pool: Any = None  # our own pool, when a password file is used (the keystore borrows it)
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._listener: Any = None  # the service connection that LISTENs on CATALOG_CHANNEL
        self._listen_task: asyncio.Task[None] | None = None
        self._announcing: set[asyncio.Task[None]] = set()
        self.reloads = 0
        self._keyed_columns: set[str] = set()
        self._ready_shape: tuple[int, int] | None = None
        self.context.on_reload = self.schedule_reload
        # The visibility policy and the role membership it is applied through (read with the catalog).
        self.roles = PolicyRuntime(
            config.policy, self._service_connect, refresh_seconds=config.policy_settings.membership_refresh_seconds
        )
        self.audit: AuditRuntime | None = None  # the access audit, set by the listener when it is on

    @property
    def ready(self) -> bool:
        return self.context.unavailable is None

    async def _service_connect(self) -> Any:
        cfg = self.config
        assert cfg.service is not None
        assert cfg.service.dsn is not None
        return await asyncpg.connect(**connect_kwargs(cfg.service.dsn, cfg.service.password_file), timeout=10)

    def roles_changed(self) -> None:
        """A session's role DDL completed and its transaction ended: read the membership again, here and
        (through ROLES_CHANNEL) in every other pgveil process on this database."""
        self.roles.role_ddl_completed()
        listener = self._listener
        if listener is not None:
            task = asyncio.get_running_loop().create_task(self._announce_roles_changed(listener))
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)

    async def _announce_roles_changed(self, listener: Any) -> None:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await listener.execute(f"NOTIFY {ROLES_CHANNEL}")

    def _on_roles_notification(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self.roles.schedule_refresh()

    def session_factory(self, role: str, session_id: int = 0) -> SessionCrypto:
        """The session of login role ``role``: its view is the policy runtime's for that role, asked
        before every statement (SET ROLE cannot change which role it is); with the access audit's seam
        when the audit is on (``session_id`` goes into its records)."""
        crypto = SessionCrypto(self.context, role, self.roles.view_source(role))
        if self.audit is not None:
            crypto.audit = self.audit.session(session_id, role)
        return crypto

    def install_policy(self, policy: Policy, refresh_seconds: float) -> bool:
        """A reloaded policy (validated already); whether it differs from the running one."""
        self.roles.set_refresh_seconds(refresh_seconds)
        return self.roles.install_policy(policy)

    async def start(self) -> None:
        """Tries once now (so a healthy start is ready at once), then keeps trying in the background."""
        await self._try_load()
        if not self.ready:
            self._task = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        while not self.ready:
            await asyncio.sleep(RETRY_SECONDS)
            await self._try_load()

    async def _try_load(self) -> None:
        cfg = self.config
        epoch = self.context.reload_epoch
        keys_needed = cfg.needs_keystore
        if (
            cfg.service is None
            or cfg.service.dsn is None
            or (keys_needed and (cfg.keystore is None or cfg.keystore.dsn is None))
        ):
            self.context.unavailable = "pgveil has no service/keystore DSN configured for protected tables"
            log.error("%s", self.context.unavailable)
            return
        try:
            conn = await asyncpg.connect(**connect_kwargs(cfg.service.dsn, cfg.service.password_file), timeout=10)
        except (OSError, asyncpg.PostgresError, TimeoutError) as e:
            log.warning("service connection %s failed", redact_dsn(cfg.service.dsn))
            self._unavailable("cannot reach its service connection to read the catalog", e)
            return
        try:
            migrating = await self._open_migrations(conn)
            catalog, problems = await load_catalog(conn, cfg.catalog(), self.context.catalog, migrating)
            subject_defaults = await read_subject_defaults(conn, catalog)
            # A column being decrypted is still served encrypted (keys needed) until its swap.
            keys_needed = keys_needed or any(c.encrypted for t in catalog.tables.values() for c in t.columns.values())
            # A failed read keeps the last good membership; without one, governed columns wait for it.
            await self.roles.refresh_with(conn)
        except (OSError, asyncpg.PostgresError) as e:
            self._unavailable("cannot read the catalog", e, ("the service connection", cfg.service.dsn))
            return
        finally:
            await conn.close()
        if not self.roles.loaded:
            self.context.unavailable = "pgveil: role membership not loaded yet"
            return
        if problems:
            # Details (which table, which column, which type) go to the operator's log; clients learn only
            # that protected tables are not ready.
            log.error("protected tables are not ready: %s", "; ".join(problems))
            self.context.unavailable = "pgveil: protected tables are not ready (see the pgveil log)"
            return
        if not keys_needed:
            # Plain governed columns only (and no hash mask): the policy needs the catalog, never a key.
            self.context.install(catalog, epoch, subject_defaults)
            self._ready(0, len(catalog.tables))
            return
        assert cfg.keystore is not None
        assert cfg.keystore.dsn is not None
        try:
            if self.keystore is None:
                provider = provider_from_config(cfg)
                kw = connect_kwargs(cfg.keystore.dsn, cfg.keystore.password_file)
                if "password" in kw:
                    self._pool = await asyncpg.create_pool(
                        dsn=kw["dsn"], password=kw["password"], min_size=1, max_size=4
                    )
                    source: Any = self._pool
                else:
                    source = kw["dsn"]
                keystore = Keystore(
                    source, provider, max_keys=cfg.keystore.cache.max_keys, ttl_seconds=cfg.keystore.cache.ttl_seconds
                )
                try:
                    await keystore.initialize()
                except BaseException:  # kept, it would never run its migrations again: the next try starts over
                    await keystore.close()
                    if self._pool is not None:
                        await self._pool.close()
                        self._pool = None
                    raise
                self.keystore = keystore
                with contextlib.suppress(KeyManagementError, OSError, asyncpg.PostgresError):
                    await self.keystore.listen()
            # Family members share their root's column ids: one key set per configured column.
            columns = sorted({c.column_id for t in catalog.tables.values() for c in t.columns.values()})
            if set(columns) != self._keyed_columns:  # a catalog reload after DDL needs no key work
                for column_id in columns:
                    await self.keystore.active_key(column_id)  # creates version 1 on first use
                await self.keystore.preload(columns)
                self._keyed_columns = set(columns)
        except (KeyManagementError, OSError, asyncpg.PostgresError) as e:
            self._unavailable("cannot load keys from the keystore", e, ("the keystore", cfg.keystore.dsn))
            return
        self.keyring.source = self.keystore
        self.context.install(catalog, epoch, subject_defaults)
        self._ready(len(columns), len(catalog.tables))

    async def _open_migrations(self, service_conn: Any) -> dict[str, str]:
        """Columns with an unfinished ``pgveil encrypt``/``decrypt`` job, from the keystore (the service
        connection when the keystore is the same database). A keystore that cannot be read gives none:
        such a column then does not match its configuration, and pgveil is not ready (fail closed)."""
        cfg = self.config
        if cfg.keystore is None or cfg.keystore.dsn is None or cfg.service is None:
            return {}
        same = (cfg.keystore.dsn, cfg.keystore.password_file) == (cfg.service.dsn, cfg.service.password_file)
        try:
            conn = (
                service_conn
                if same
                else await asyncpg.connect(**connect_kwargs(cfg.keystore.dsn, cfg.keystore.password_file), timeout=10)
            )
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return {}
        try:
            return {column: d.value for column, d in (await open_migrations(conn)).items()}
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return {}
        finally:
            if not same:
                await conn.close()

    def _ready(self, keyed_columns: int, relations: int) -> None:
        shape = (keyed_columns, relations)
        if shape != self._ready_shape:
            log.info("encryption ready: %d protected columns in %d relations", *shape)
            self._ready_shape = shape
        else:
            log.debug("catalog read again: %d protected relations", relations)
        if self._listen_task is None:
            self._listen_task = asyncio.get_running_loop().create_task(self._listen())
        self.roles.start_polling()

    # -- catalog reloads -------------------------------------------------------------------------------
    def schedule_reload(self) -> None:
        """Reads the catalog again soon (coalesced); called from the sessions' synchronous code."""
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._reload_task = loop.create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            await self._try_load()
            self.reloads += 1
            if not self.ready:
                if self._task is None or self._task.done():  # the retry loop takes over
                    self._task = asyncio.get_running_loop().create_task(self._retry())
                return
            if not self._reload_again:
                return

    async def _listen(self) -> None:
        """Keeps a service connection LISTENing on CATALOG_CHANNEL; every notification (and every
        reconnection, which may have missed some) schedules a reload."""
        cfg = self.config
        assert cfg.service is not None
        assert cfg.service.dsn is not None
        while True:
            try:
                conn = await asyncpg.connect(**connect_kwargs(cfg.service.dsn, cfg.service.password_file), timeout=10)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                await asyncio.sleep(RETRY_SECONDS)
                continue
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CATALOG_CHANNEL, self._on_catalog_notification)
                await conn.add_listener(ROLES_CHANNEL, self._on_roles_notification)
                self._listener = conn
                self.schedule_reload()
                await lost.wait()
            except (OSError, asyncpg.PostgresError):
                pass
            finally:
                self._listener = None
                with contextlib.suppress(Exception):
                    await conn.close()
            await asyncio.sleep(RETRY_SECONDS)

    def _on_catalog_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        # A hint only: the payload (the names of the relations the DDL touched) is bounded, never
        # logged, and only makes statements naming them wait for the reload.
        parts = payload[:8000].split(",")
        names = [n.lower() for n in parts[:_MAX_HINT_NAMES] if 0 < len(n) <= 63 and n != "*"]
        log.debug("catalog change notified (%d relation names)", len(names))
        if "*" in parts or len(parts) > _MAX_HINT_NAMES:
            self.context.request_reload(names)  # more relations than the hint could name
        elif names:
            self.context.suspect(names)
        else:
            self.schedule_reload()

    def _unavailable(self, what: str, e: BaseException, connection: tuple[str, str | None] | None = None) -> None:
        self.context.unavailable = f"pgveil: {what}"
        # A missing privilege is named with the GRANT that fixes it (the server's message names objects only).
        fix = missing_privilege(e, *connection) if connection is not None else None
        detail = type(e).__name__ + (f": {fix}" if fix else "")
        log.warning("%s (%s); retrying every %.0f s", what, detail, RETRY_SECONDS)

    async def stop(self) -> None:
        for task in (self._task, self._reload_task, self._listen_task):
            if task is not None:
                task.cancel()
        await self.roles.stop()
        if self.keystore is not None:
            await self.keystore.close()
        if self._pool is not None:
            await self._pool.close()


async def keystore_init(config: Config) -> list[str]:
    """``pgveil keystore init``: creates or migrates schema ``pgveil`` in the keystore database."""
    if config.keystore is None or config.keystore.dsn is None:
        raise ValueError("keystore.dsn (or PGVEIL_KEYSTORE_DSN) is not set")
    conn = await asyncpg.connect(**connect_kwargs(config.keystore.dsn, config.keystore.password_file))
    try:
        return await init_keystore(conn)
    finally:
        await conn.close()
