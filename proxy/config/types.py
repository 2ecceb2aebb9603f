"""The configuration's types: frozen dataclasses and enums, one per section of the YAML file.

The YAML keys are the dataclass field names and the defaults live only here, so
``config/pgveil.example.yaml`` (checked against these classes by the tests) cannot drift from the code.
A DSN may hold a password: the classes that carry one redact it in ``repr``.

Must not: read files or the environment, or validate input (``proxy.config.parser`` does).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from proxy.policy.model import MaskFunction
from proxy.policy.rules import Pattern, Policy, parse_pattern
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable, SubjectColumn

# Settings whose new value a running server cannot adopt on SIGHUP: the sockets are already bound (and the
# admin server is built once; its tokens file is watched instead).
RESTART_REQUIRED: Final = ("listen", "admin")

# ---------------------------------------------------------------------------------------------------
# The configuration's types
# ---------------------------------------------------------------------------------------------------


class TLSMode(StrEnum):
    """How the proxy talks TLS to PostgreSQL; the names and meanings are libpq's ``sslmode``."""

    DISABLE = "disable"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_FULL = "verify-full"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def number(self) -> int:
        """The ``logging`` module's level number."""
        return int(logging.getLevelName(self.value.upper()))


class StatementTracking(StrEnum):
    """How much of the extended protocol a session models. ``auto``: every statement, portal and reply
    when tables are protected, else only framing, transaction status and COPY state (the pass-through
    fast path). ``always``: the full model in every session."""

    AUTO = "auto"
    ALWAYS = "always"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class KeyProvider(StrEnum):
    LOCAL = "local"
    PKCS11 = "pkcs11"


@dataclass(frozen=True, slots=True)
class HostPort:
    """A TCP address. ``host`` is a name or an IP address (IPv6 without brackets); port 0 means "any free
    port" and is allowed only for addresses the proxy listens on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    tls: TLSMode = TLSMode.PREFER
    ca_file: Path | None = None
    server_name: str | None = None
    connect_timeout: float = 10.0

    @property
    def address(self) -> HostPort:
        return HostPort(self.host, self.port)

    @property
    def tls_server_name(self) -> str:
        """The name sent as SNI and verified against the server certificate."""
        return self.server_name if self.server_name is not None else self.host


@dataclass(frozen=True, slots=True)
class ClientTLSConfig:
    cert_file: Path = Path("server.crt")
    key_file: Path = Path("server.key")
    required: bool = False


@dataclass(frozen=True, slots=True)
class AdminTLSConfig:
    """TLS on the admin port; with ``client_ca_file`` every client must present a certificate it signed."""

    cert_file: Path = Path("admin.crt")
    key_file: Path = Path("admin.key")
    client_ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: HostPort | None = HostPort("127.0.0.1", 9187)
    # The admin API (/v1) is disabled without a tokens file (YAML list of {name, sha256, scopes}).
    tokens_file: Path | None = None
    require_token_for_metrics: bool = False  # /metrics then needs a token with scope metrics:read
    require_token_for_health: bool = False  # /healthz and /readyz then need one too
    auth_failure_limit: int = 10  # failed authentications per client address and window, then 429
    auth_failure_window: float = 60.0
    tls: AdminTLSConfig | None = None


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    max_client_connections: int = 1000
    shutdown_timeout: float = 30.0
    max_message_size: int = 1073741824
    startup_timeout: float = 30.0
    idle_buffer_limit: int = 262144
    track_statements: StatementTracking = StatementTracking.AUTO
    workers: int = 1
    max_analyzed_statement_size: int = 16777216


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = LogLevel.INFO
    format: LogFormat = LogFormat.TEXT


@dataclass(frozen=True, slots=True)
class LocalMasterKeyConfig:
    """A key file, generated on first run by the key provider (development only)."""

    path: Path = Path("pgveil-master.key")
    provider: KeyProvider = field(default=KeyProvider.LOCAL, init=False)


@dataclass(frozen=True, slots=True)
class Pkcs11MasterKeyConfig:
    """A key in an HSM reached through a PKCS#11 module. Only the shape is validated here."""

    module: Path
    token_label: str
    key_label: str
    pin_file: Path | None = None
    pin_env: str | None = None
    provider: KeyProvider = field(default=KeyProvider.PKCS11, init=False)


MasterKeyConfig = LocalMasterKeyConfig | Pkcs11MasterKeyConfig


@dataclass(frozen=True, slots=True)
class KeyCacheConfig:
    max_keys: int = 10000
    ttl_seconds: float = 300.0


@dataclass(frozen=True, slots=True, repr=False)
class KeystoreConfig:
    """Where wrapped keys live. ``dsn`` may hold a password (from the environment), hence the repr."""

    dsn: str | None = None
    password_file: Path | None = None
    master_key: MasterKeyConfig = field(default_factory=LocalMasterKeyConfig)
    cache: KeyCacheConfig = field(default_factory=KeyCacheConfig)
    # Older KEKs' providers, for unwrapping only (the migration from one provider to another).
    previous_master_keys: tuple[MasterKeyConfig, ...] = ()

    def __repr__(self) -> str:
        return (
            f"KeystoreConfig(dsn={_repr_dsn(self.dsn)}, password_file={self.password_file!r}, "
            f"master_key={self.master_key!r}, cache={self.cache!r}, previous_master_keys={self.previous_master_keys!r})"
        )


@dataclass(frozen=True, slots=True, repr=False)
class ServiceConfig:
    """The proxy's own connection, for reading the catalog. Resolved: falls back to the keystore's."""

    dsn: str | None = None
    password_file: Path | None = None

    def __repr__(self) -> str:
        return f"ServiceConfig(dsn={_repr_dsn(self.dsn)}, password_file={self.password_file!r})"


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """How the running policy follows the server (YAML ``policy:``; the policy itself is ``roles:``).
    ``membership_refresh_seconds``: how often role membership is read again; 0 = only on reload, on role
    DDL seen through pgveil and for a login role the cached membership does not know."""

    membership_refresh_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class AnomalyRule:
    """One ``audit.anomaly`` entry: a role (a key of ``roles:``) reading more than ``plaintext_per_minute``
    plaintext values of a column (a pattern as in ``roles:``; each governed column it covers counts on its
    own) within the window is flagged; with ``refuse`` its further plaintext reads of it are refused."""

    role: str
    column: str
    plaintext_per_minute: int
    refuse: bool = False

    @property
    def pattern(self) -> Pattern:
        return parse_pattern(self.column)


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The access audit (YAML ``audit:``): per session, role, governed column and outcome, how many values
    were read; flushed every ``flush_seconds`` to the keystore table ``pgveil.access_audit`` and the
    ``pgveil.audit`` logger. ``instance`` names this pgveil in the records (default: host name and pid).
    ``max_pending_records``: records kept for the keystore while it is unreachable (oldest dropped)."""

    enabled: bool = True
    flush_seconds: float = 10.0
    window_seconds: float = 60.0
    instance: str | None = None
    max_pending_records: int = 100000
    anomaly: tuple[AnomalyRule, ...] = ()


@dataclass(frozen=True, slots=True)
class ColumnConfig:
    """A governed column. ``type`` is the canonical name of the type the application sees (see
    ``normalize_type_name``). ``encrypt``: stored as ``bytea`` envelopes (the keystore holds its keys);
    otherwise a plain column in the database, governed by the visibility policy only."""

    name: str
    type: str
    encrypt: bool = False


@dataclass(frozen=True, slots=True)
class SubjectConfig:
    """``tables.<t>.subject``: per-subject keys. ``column`` names the row's data subject (integer,
    bigint, uuid or text in the database, not itself encrypted); ``kind`` groups tables whose rows
    belong to the same subjects (``customers.id`` and ``orders.customer_id``): each (kind, subject id)
    has one data key, shared by every encrypted column of every table of that kind."""

    kind: str
    column: str


@dataclass(frozen=True, slots=True)
class TableConfig:
    schema: str
    name: str
    columns: tuple[ColumnConfig, ...]
    subject: SubjectConfig | None = None

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 6432),)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    client_tls: ClientTLSConfig | None = None
    admin: AdminConfig = field(default_factory=AdminConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    keystore: KeystoreConfig | None = None
    service: ServiceConfig | None = None
    tables: tuple[TableConfig, ...] = ()
    policy: Policy = field(default_factory=Policy)  # the ``roles:`` section
    policy_settings: PolicySettings = field(default_factory=PolicySettings)  # the ``policy:`` section
    audit: AuditConfig = field(default_factory=AuditConfig)
    source_path: Path | None = None
    warnings: tuple[str, ...] = ()

    def catalog(self) -> Catalog:
        """The governed tables as the rewriter sees them: every table with at least one governed column,
        plain columns with ``encrypted=False``. OIDs and attnums stay 0 until the server's catalog has
        been read (``proxy.catalog_loader``)."""
        tables: dict[tuple[str, str], ProtectedTable] = {}
        for t in self.tables:
            kind = t.subject.kind if t.subject is not None else None
            columns = {
                c.name: ProtectedColumn(
                    schema=t.schema,
                    table=t.name,
                    name=c.name,
                    declared_type=c.type,
                    encrypted=c.encrypt,
                    subject_kind=kind if c.encrypt else None,
                )
                for c in t.columns
            }
            subject = SubjectColumn(t.subject.kind, t.subject.column) if t.subject is not None else None
            if columns:
                tables[(t.schema, t.name)] = ProtectedTable(
                    schema=t.schema, name=t.name, columns=columns, subject=subject
                )
        return Catalog(tables)

    @property
    def encrypts_anything(self) -> bool:
        """Whether any column is encrypted: then a keystore is needed."""
        return any(c.encrypt for t in self.tables for c in t.columns)

    @property
    def governs_anything(self) -> bool:
        """Whether any column is governed (encrypted or plain) or a ``roles:`` section is configured:
        then statements must be tracked and analysed so that the visibility policy can be applied."""
        return any(t.columns for t in self.tables) or self.policy.configured

    @property
    def needs_keystore(self) -> bool:
        """Whether keys are needed: for encrypted columns, or for a ``hash`` mask (keyed by the keystore)."""
        return self.encrypts_anything or any(m.function is MaskFunction.HASH for m in self.policy.masks)

    def reload_diff(self, new: Config) -> list[str]:
        """One line per setting that ``new`` changes but a running server cannot adopt on reload."""
        changes: list[str] = []
        if self.listen != new.listen:
            changes.append(
                f"listen: changing {_show_addrs(self.listen)} to {_show_addrs(new.listen)} needs a restart;"
                " keeping the running value"
            )
        if self.admin.listen != new.admin.listen:
            changes.append(
                f"admin.listen: changing {_show_addr(self.admin.listen)} to {_show_addr(new.admin.listen)}"
                " needs a restart; keeping the running value"
            )
        if dataclasses.replace(self.admin, listen=None) != dataclasses.replace(new.admin, listen=None):
            changes.append(
                "admin: changed settings need a restart (the tokens file's contents are re-read when it changes)"
            )
        return changes

    def keeping_restart_settings(self, running: Config) -> Config:
        """This configuration with the settings named in ``RESTART_REQUIRED`` taken from ``running``."""
        return dataclasses.replace(
            self,
            listen=running.listen,
            admin=running.admin,
        )


def _show_addr(addr: HostPort | None) -> str:
    return "null" if addr is None else str(addr)


def _show_addrs(addrs: Iterable[HostPort]) -> str:
    return ", ".join(str(a) for a in addrs)


# ---------------------------------------------------------------------------------------------------
# DSNs, shown without their password
# ---------------------------------------------------------------------------------------------------


def dsn_has_password(dsn: str) -> bool:
    """Whether a libpq connection string (URI or ``key=value`` form) carries a password inline."""
    if re.match(r"postgres(?:ql)?://", dsn, re.IGNORECASE):
        try:
            parts = urlsplit(dsn)
            if parts.password is not None:
                return True
        except ValueError:
            return True  # cannot tell, so assume the worst and warn
        return any(k == "password" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return re.search(r"(?:^|\s)password\s*=", dsn) is not None


def redact_dsn(dsn: str) -> str:
    """The DSN with any inline password replaced by ``***``, for logs and ``repr``."""
    if re.match(r"postgres(?:ql)?://", dsn, re.IGNORECASE):
        try:
            parts = urlsplit(dsn)
            netloc = parts.netloc
            if parts.password is not None:
                userinfo, _, hosts = netloc.rpartition("@")
                netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
            query = urlencode(
                [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
                safe="*",
            )
            return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        except ValueError:
            return f"<dsn of {len(dsn)} characters>"
    return re.sub(r"((?:^|\s)password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)", r"\1***", dsn)


def _repr_dsn(dsn: str | None) -> str:
    return "None" if dsn is None else repr(redact_dsn(dsn))
