"""pgveil's configuration: YAML in, frozen dataclasses out, every problem named by its dotted path.

Theory of operation: ``load_config`` reads the file (I/O), ``parse_config`` validates the decoded YAML
(pure: it reads no files and, unless told otherwise, only the ``PGVEIL_KEYSTORE_DSN`` variable of the
environment) and ``check_files`` verifies that the files the configuration references are readable. The
parser walks every section, collects *all* problems in one pass and raises one ``ConfigError`` with one
line per problem, e.g. ``upstream.port: must be an integer between 1 and 65535, got 'abc'``.

The YAML keys are the dataclass field names, and defaults live only in the dataclasses, so
``config/pgveil.example.yaml`` (checked against these classes by the tests) cannot drift from the code.

Secrets are referenced, never held: a DSN is kept as text (its password, when one is inlined, is never
shown: ``repr`` redacts it), password and PIN files are kept as paths. This module must not open network
connections or read secret files.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml

from proxy.errors import ConfigError
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)

CONFIG_ENV: Final = "PGVEIL_CONFIG"
KEYSTORE_DSN_ENV: Final = "PGVEIL_KEYSTORE_DSN"
DEFAULT_CONFIG_FILE: Final = "pgveil.yaml"

# Settings whose new value a running server cannot adopt on SIGHUP: the sockets are already bound.
RESTART_REQUIRED: Final = ("listen", "admin.listen")

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; a truncated name would silently refer to
# another column, so longer names are refused.
MAX_IDENTIFIER_LENGTH: Final = 63
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*\Z")


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
class AdminConfig:
    listen: HostPort | None = HostPort("127.0.0.1", 9187)


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

    def __repr__(self) -> str:
        return (
            f"KeystoreConfig(dsn={_repr_dsn(self.dsn)}, password_file={self.password_file!r}, "
            f"master_key={self.master_key!r}, cache={self.cache!r})"
        )


@dataclass(frozen=True, slots=True, repr=False)
class ServiceConfig:
    """The proxy's own connection, for reading the catalog. Resolved: falls back to the keystore's."""

    dsn: str | None = None
    password_file: Path | None = None

    def __repr__(self) -> str:
        return f"ServiceConfig(dsn={_repr_dsn(self.dsn)}, password_file={self.password_file!r})"


@dataclass(frozen=True, slots=True)
class ColumnConfig:
    """``type`` is the canonical name of the type the application sees (see ``normalize_type_name``)."""

    name: str
    type: str
    encrypt: bool = True


@dataclass(frozen=True, slots=True)
class TableConfig:
    schema: str
    name: str
    columns: tuple[ColumnConfig, ...]

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
    source_path: Path | None = None
    warnings: tuple[str, ...] = ()

    def catalog(self) -> Catalog:
        """The protected tables as the rewriter sees them; OIDs and attnums stay 0 until the server's
        catalog has been read (``proxy.catalog_loader``)."""
        tables: dict[tuple[str, str], ProtectedTable] = {}
        for t in self.tables:
            columns = {
                c.name: ProtectedColumn(schema=t.schema, table=t.name, name=c.name, declared_type=c.type)
                for c in t.columns
                if c.encrypt
            }
            if columns:
                tables[(t.schema, t.name)] = ProtectedTable(schema=t.schema, name=t.name, columns=columns)
        return Catalog(tables)

    @property
    def protects_anything(self) -> bool:
        return any(c.encrypt for t in self.tables for c in t.columns)

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
        return changes

    def keeping_restart_settings(self, running: Config) -> Config:
        """This configuration with the settings named in ``RESTART_REQUIRED`` taken from ``running``."""
        return dataclasses.replace(
            self,
            listen=running.listen,
            admin=dataclasses.replace(self.admin, listen=running.admin.listen),
        )


# Config fields that are facts about the loading, not settings a file may contain.
_TOP_LEVEL_KEYS: Final = tuple(f.name for f in dataclasses.fields(Config) if f.name not in ("source_path", "warnings"))


def _show_addr(addr: HostPort | None) -> str:
    return "null" if addr is None else str(addr)


def _show_addrs(addrs: Iterable[HostPort]) -> str:
    return ", ".join(str(a) for a in addrs)


# ---------------------------------------------------------------------------------------------------
# Values that other modules parse too
# ---------------------------------------------------------------------------------------------------


def parse_host_port(text: str, *, listening: bool = False) -> HostPort:
    """``HOST:PORT`` or ``[IPV6]:PORT``. Port 0 is accepted only when ``listening``.

    Raises ``ValueError`` with a message that completes ``<setting>: ``.
    """
    lowest = 0 if listening else 1
    expected = f"must be 'HOST:PORT' with a port between {lowest} and 65535, got {_show(text)}"
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or not _is_ipv6(host):
            raise ValueError(expected)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(expected)
    if not host or any(ch.isspace() or ch in "/[]@" for ch in host):
        raise ValueError(expected)
    if not port_text.isascii() or not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise ValueError(expected)
    return HostPort(host, int(port_text))


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


_TYPE_ALIASES: Final[Mapping[str, str]] = {
    "text": "text",
    "varchar": "varchar",
    "character varying": "varchar",
    "char": "char",
    "character": "char",
    "int2": "int2",
    "smallint": "int2",
    "int4": "int4",
    "integer": "int4",
    "int": "int4",
    "int8": "int8",
    "bigint": "int8",
    "numeric": "numeric",
    "decimal": "numeric",
    "float4": "float4",
    "real": "float4",
    "float8": "float8",
    "double precision": "float8",
    "bool": "bool",
    "boolean": "bool",
    "date": "date",
    "timestamp": "timestamp",
    "timestamp without time zone": "timestamp",
    "timestamptz": "timestamptz",
    "timestamp with time zone": "timestamptz",
    "uuid": "uuid",
    "json": "json",
    "jsonb": "jsonb",
    "bytea": "bytea",
}
SUPPORTED_TYPES: Final = tuple(sorted(set(_TYPE_ALIASES.values())))
_TYPE_SYNTAX = re.compile(r"([a-z][a-z0-9 ]*?)\s*(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?\Z")
_MAX_CHAR_LENGTH: Final = 10485760  # PostgreSQL's limit for varchar(n) and char(n)
_MAX_NUMERIC_PRECISION: Final = 1000


def normalize_type_name(text: str) -> str:
    """The canonical spelling of a supported type, as ``ProtectedColumn.declared_type`` carries it.

    Canonical names: ``text``, ``varchar``, ``varchar(N)``, ``char(N)`` (bare ``char`` means ``char(1)``,
    as in PostgreSQL), ``int2``, ``int4``, ``int8``, ``numeric``, ``numeric(P,S)`` (``numeric(P)`` means
    scale 0), ``float4``, ``float8``, ``bool``, ``date``, ``timestamp``, ``timestamptz``, ``uuid``,
    ``json``, ``jsonb``, ``bytea``. Raises ``ValueError``.
    """
    m = _TYPE_SYNTAX.match(" ".join(text.lower().split()))
    base = _TYPE_ALIASES.get(m.group(1)) if m else None
    if m is None or base is None:
        raise ValueError(f"must be one of {', '.join(SUPPORTED_TYPES)}, got {_show(text)}")
    first, second = m.group(2), m.group(3)
    if base in ("varchar", "char"):
        if second is not None:
            raise ValueError(f"{base} takes one length, got {_show(text)}")
        if first is None:
            return "char(1)" if base == "char" else "varchar"
        if not 1 <= int(first) <= _MAX_CHAR_LENGTH:
            raise ValueError(f"{base} length must be between 1 and {_MAX_CHAR_LENGTH}, got {_show(text)}")
        return f"{base}({int(first)})"
    if base == "numeric":
        if first is None:
            return "numeric"
        precision, scale = int(first), int(second or 0)
        if not 1 <= precision <= _MAX_NUMERIC_PRECISION or scale > precision:
            raise ValueError(
                f"numeric(P,S) needs 1 <= P <= {_MAX_NUMERIC_PRECISION} and 0 <= S <= P, got {_show(text)}"
            )
        return f"numeric({precision},{scale})"
    if first is not None:
        raise ValueError(f"{base} takes no modifier, got {_show(text)}")
    return base


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


# ---------------------------------------------------------------------------------------------------
# Validation machinery
# ---------------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A value is wrong; the message completes ``<dotted path>: ``."""


def _show(value: object) -> str:
    """A value as an error message shows it: short, and never a whole mapping."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _keys(cls: type[Any]) -> tuple[str, ...]:
    """The YAML keys of a section: its dataclass's init fields."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


class _Parser:
    def __init__(self, base_dir: Path, environ: Mapping[str, str]) -> None:
        self.base_dir = base_dir
        self.environ = environ
        self.errors: list[str] = []
        self.warnings: list[str] = []

    # -- structure ------------------------------------------------------------------------------
    def section(self, data: Any, path: str, known: Iterable[str]) -> Mapping[Any, Any]:
        """A mapping whose keys are checked against ``known``; null means "all defaults"."""
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            self.errors.append(f"{path}: must be a mapping, got {_show(data)}")
            return {}
        known = tuple(known)
        for key in data:
            if key not in known:
                hint = _suggest(key, known) if isinstance(key, str) else ""
                self.errors.append(f"{_join(path, key)}: unknown setting{hint}")
        return data

    def get(self, m: Mapping[Any, Any], key: str, path: str, conv: Callable[[Any], T], default: T) -> T:
        if key not in m:
            return default
        try:
            return conv(m[key])
        except _Invalid as e:
            self.errors.append(f"{_join(path, key)}: {e}")
            return default

    # -- value converters -----------------------------------------------------------------------
    @staticmethod
    def integer(lo: int, hi: int | None = None) -> Callable[[Any], int]:
        def conv(v: Any) -> int:
            if isinstance(v, int) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi):
                return v
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise _Invalid(f"must be an integer {bound}, got {_show(v)}")

        return conv

    @staticmethod
    def seconds(*, allow_zero: bool) -> Callable[[Any], float]:
        def conv(v: Any) -> float:
            finite = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if finite and (v > 0 or (allow_zero and v == 0)):
                return float(v)
            bound = ">= 0" if allow_zero else "> 0"
            raise _Invalid(f"must be a number of seconds {bound}, got {_show(v)}")

        return conv

    @staticmethod
    def boolean(v: Any) -> bool:
        if isinstance(v, bool):
            return v
        raise _Invalid(f"must be true or false, got {_show(v)}")

    @staticmethod
    def string(v: Any) -> str:
        if isinstance(v, str) and v.strip():
            return v
        raise _Invalid(f"must be a non-empty string, got {_show(v)}")

    @staticmethod
    def hostname(v: Any) -> str:
        if isinstance(v, str) and v and not any(ch.isspace() for ch in v):
            return v
        raise _Invalid(f"must be a host name or IP address, got {_show(v)}")

    @staticmethod
    def secret_text(v: Any) -> str:
        # The value may contain a password: never echo it.
        if isinstance(v, str) and v.strip():
            return v
        raise _Invalid("must be a non-empty string")

    @staticmethod
    def choice(enum: type[E]) -> Callable[[Any], E]:
        values = [e.value for e in enum]

        def conv(v: Any) -> E:
            if isinstance(v, str) and v.lower() in values:
                return enum(v.lower())
            hint = _suggest(v.lower(), values) if isinstance(v, str) else ""
            raise _Invalid(f"must be one of {', '.join(values)}, got {_show(v)}{hint}")

        return conv

    @staticmethod
    def address(*, listening: bool) -> Callable[[Any], HostPort]:
        def conv(v: Any) -> HostPort:
            if not isinstance(v, str):
                lowest = 0 if listening else 1
                raise _Invalid(f"must be 'HOST:PORT' with a port between {lowest} and 65535, got {_show(v)}")
            try:
                return parse_host_port(v, listening=listening)
            except ValueError as e:
                raise _Invalid(str(e)) from None

        return conv

    def file_path(self, v: Any) -> Path:
        if not isinstance(v, str) or not v.strip():
            raise _Invalid(f"must be a file path, got {_show(v)}")
        p = Path(v).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @staticmethod
    def optional(conv: Callable[[Any], T]) -> Callable[[Any], T | None]:
        def wrapped(v: Any) -> T | None:
            return None if v is None else conv(v)

        return wrapped

    # -- sections -------------------------------------------------------------------------------
    def parse(self, data: Any) -> Config:
        top = self.section(data, "(top level)", _TOP_LEVEL_KEYS)
        defaults = Config()
        listen = self.listen(top.get("listen")) if "listen" in top else defaults.listen
        upstream = self.upstream(top.get("upstream"))
        client_tls = self.client_tls(top.get("client_tls"))
        admin = self.admin(top.get("admin"))
        sessions = self.sessions(top.get("sessions"))
        logging_ = self.logging(top.get("logging"))
        tables = self.tables(top.get("tables"))
        protects = any(c.encrypt for t in tables for c in t.columns)
        keystore = self.keystore(top.get("keystore"), "keystore" in top and top["keystore"] is not None, protects)
        service = self.service(top.get("service"), keystore)
        self.cross_check(listen, client_tls, admin)
        return Config(
            listen=listen,
            upstream=upstream,
            client_tls=client_tls,
            admin=admin,
            sessions=sessions,
            logging=logging_,
            keystore=keystore,
            service=service,
            tables=tables,
            warnings=tuple(self.warnings),
        )

    def listen(self, v: Any) -> tuple[HostPort, ...]:
        conv = self.address(listening=True)
        items = v if isinstance(v, list) else [v]
        if not items:
            self.errors.append("listen: must name at least one 'HOST:PORT'")
            return Config().listen
        out: list[HostPort] = []
        for i, item in enumerate(items):
            path = f"listen[{i}]" if isinstance(v, list) else "listen"
            try:
                addr = conv(item)
            except _Invalid as e:
                self.errors.append(f"{path}: {e}")
                continue
            if addr in out:
                self.errors.append(f"{path}: {addr} is listed twice")
                continue
            out.append(addr)
        return tuple(out) or Config().listen

    def upstream(self, v: Any) -> UpstreamConfig:
        p, d = "upstream", UpstreamConfig()
        m = self.section(v, p, _keys(UpstreamConfig))
        cfg = UpstreamConfig(
            host=self.get(m, "host", p, self.hostname, d.host),
            port=self.get(m, "port", p, self.integer(1, 65535), d.port),
            tls=self.get(m, "tls", p, self.choice(TLSMode), d.tls),
            ca_file=self.get(m, "ca_file", p, self.optional(self.file_path), d.ca_file),
            server_name=self.get(m, "server_name", p, self.optional(self.hostname), d.server_name),
            connect_timeout=self.get(m, "connect_timeout", p, self.seconds(allow_zero=False), d.connect_timeout),
        )
        if cfg.tls is TLSMode.VERIFY_FULL and cfg.ca_file is None:
            self.errors.append("upstream.ca_file: required when upstream.tls is verify-full")
        if cfg.tls is TLSMode.DISABLE and (cfg.ca_file is not None or cfg.server_name is not None):
            self.warnings.append("upstream.tls: disable ignores upstream.ca_file and upstream.server_name")
        return cfg

    def client_tls(self, v: Any) -> ClientTLSConfig | None:
        if v is None:
            return None
        p, d = "client_tls", ClientTLSConfig()
        m = self.section(v, p, _keys(ClientTLSConfig))
        return ClientTLSConfig(
            cert_file=self.get(m, "cert_file", p, self.file_path, self.base_dir / d.cert_file),
            key_file=self.get(m, "key_file", p, self.file_path, self.base_dir / d.key_file),
            required=self.get(m, "required", p, self.boolean, d.required),
        )

    def admin(self, v: Any) -> AdminConfig:
        p, d = "admin", AdminConfig()
        m = self.section(v, p, _keys(AdminConfig))
        return AdminConfig(listen=self.get(m, "listen", p, self.optional(self.address(listening=True)), d.listen))

    def sessions(self, v: Any) -> SessionsConfig:
        p, d = "sessions", SessionsConfig()
        m = self.section(v, p, _keys(SessionsConfig))
        return SessionsConfig(
            max_client_connections=self.get(m, "max_client_connections", p, self.integer(1), d.max_client_connections),
            shutdown_timeout=self.get(m, "shutdown_timeout", p, self.seconds(allow_zero=True), d.shutdown_timeout),
            # The message length field is an Int32; below 8 KiB ordinary statements would be refused.
            max_message_size=self.get(m, "max_message_size", p, self.integer(8192, 2**31 - 1), d.max_message_size),
            startup_timeout=self.get(m, "startup_timeout", p, self.seconds(allow_zero=False), d.startup_timeout),
            idle_buffer_limit=self.get(m, "idle_buffer_limit", p, self.integer(1024), d.idle_buffer_limit),
            track_statements=self.get(m, "track_statements", p, self.choice(StatementTracking), d.track_statements),
            workers=self.get(m, "workers", p, self.integer(1, 64), d.workers),
            max_analyzed_statement_size=self.get(
                m, "max_analyzed_statement_size", p, self.integer(8192, 2**31 - 1), d.max_analyzed_statement_size
            ),
        )

    def logging(self, v: Any) -> LoggingConfig:
        p, d = "logging", LoggingConfig()
        m = self.section(v, p, _keys(LoggingConfig))
        return LoggingConfig(
            level=self.get(m, "level", p, self.choice(LogLevel), d.level),
            format=self.get(m, "format", p, self.choice(LogFormat), d.format),
        )

    def keystore(self, v: Any, present: bool, protects: bool) -> KeystoreConfig | None:
        env_dsn = self.environ.get(KEYSTORE_DSN_ENV) or None
        if not present and env_dsn is None and not protects:
            return None
        p, d = "keystore", KeystoreConfig()
        m = self.section(v, p, _keys(KeystoreConfig))
        file_dsn = self.get(m, "dsn", p, self.optional(self.secret_text), d.dsn)
        if file_dsn is not None and dsn_has_password(file_dsn):
            self.warnings.append(
                f"keystore.dsn: contains an inline password; use keystore.password_file or {KEYSTORE_DSN_ENV} instead"
            )
        if env_dsn is not None and file_dsn is not None:
            self.warnings.append(f"keystore.dsn: overridden by {KEYSTORE_DSN_ENV}")
        dsn = env_dsn or file_dsn
        if dsn is None and protects:
            self.warnings.append(
                f"keystore.dsn: not set (nor {KEYSTORE_DSN_ENV}); protected tables need a keystore connection"
            )
        return KeystoreConfig(
            dsn=dsn,
            password_file=self.get(m, "password_file", p, self.optional(self.file_path), d.password_file),
            master_key=self.master_key(m.get("master_key"), f"{p}.master_key"),
            cache=self.key_cache(m.get("cache"), f"{p}.cache"),
        )

    def master_key(self, v: Any, p: str) -> MasterKeyConfig:
        if v is None:
            return LocalMasterKeyConfig(path=self.base_dir / LocalMasterKeyConfig().path)
        if not isinstance(v, Mapping):
            self.errors.append(f"{p}: must be a mapping, got {_show(v)}")
            return LocalMasterKeyConfig(path=self.base_dir / LocalMasterKeyConfig().path)
        try:
            provider = self.choice(KeyProvider)(v.get("provider", KeyProvider.LOCAL.value))
        except _Invalid as e:
            self.errors.append(f"{p}.provider: {e}")
            return LocalMasterKeyConfig(path=self.base_dir / LocalMasterKeyConfig().path)
        if provider is KeyProvider.PKCS11:
            m = self.section(v, p, ("provider", *_keys(Pkcs11MasterKeyConfig)))
            for required in ("module", "token_label", "key_label"):
                if m.get(required) is None:
                    self.errors.append(f"{p}.{required}: required when provider is pkcs11")
            return Pkcs11MasterKeyConfig(
                module=self.get(m, "module", p, self.file_path, Path()),
                token_label=self.get(m, "token_label", p, self.string, ""),
                key_label=self.get(m, "key_label", p, self.string, ""),
                pin_file=self.get(m, "pin_file", p, self.optional(self.file_path), None),
            )
        m = self.section(v, p, ("provider", *_keys(LocalMasterKeyConfig)))
        default = self.base_dir / LocalMasterKeyConfig().path
        return LocalMasterKeyConfig(path=self.get(m, "path", p, self.file_path, default))

    def key_cache(self, v: Any, p: str) -> KeyCacheConfig:
        d = KeyCacheConfig()
        m = self.section(v, p, _keys(KeyCacheConfig))
        return KeyCacheConfig(
            max_keys=self.get(m, "max_keys", p, self.integer(1), d.max_keys),
            ttl_seconds=self.get(m, "ttl_seconds", p, self.seconds(allow_zero=False), d.ttl_seconds),
        )

    def service(self, v: Any, keystore: KeystoreConfig | None) -> ServiceConfig | None:
        p = "service"
        m = self.section(v, p, _keys(ServiceConfig))
        dsn = self.get(m, "dsn", p, self.optional(self.secret_text), None)
        password_file = self.get(m, "password_file", p, self.optional(self.file_path), None)
        if dsn is not None and dsn_has_password(dsn):
            self.warnings.append("service.dsn: contains an inline password; use service.password_file instead")
        if dsn is None and keystore is not None:
            dsn = keystore.dsn
            password_file = password_file if password_file is not None else keystore.password_file
        if dsn is None:
            if password_file is not None:
                self.warnings.append("service.password_file: ignored because no DSN is configured")
            return None
        return ServiceConfig(dsn=dsn, password_file=password_file)

    def tables(self, v: Any) -> tuple[TableConfig, ...]:
        if v is None:
            return ()
        if not isinstance(v, Mapping):
            self.errors.append(f"tables: must be a mapping of 'schema.table' to settings, got {_show(v)}")
            return ()
        out: dict[tuple[str, str], TableConfig] = {}
        for key, spec in v.items():
            p = _join("tables", key)
            name = self.table_name(key, p)
            m = self.section(spec, p, ("columns",))
            columns = self.columns(m.get("columns"), f"{p}.columns")
            if "columns" not in m and isinstance(spec, Mapping | None):
                self.errors.append(f"{p}.columns: required (a mapping of column name to settings)")
            if name is None:
                continue
            if name in out:
                self.errors.append(f"{p}: names the same table as another entry ({name[0]}.{name[1]})")
                continue
            out[name] = TableConfig(schema=name[0], name=name[1], columns=columns)
        return tuple(out.values())

    def table_name(self, key: Any, p: str) -> tuple[str, str] | None:
        parts = key.split(".") if isinstance(key, str) else []
        if len(parts) == 1:
            parts = ["public", *parts]
        names = [self.identifier(part) for part in parts]
        if len(parts) != 2 or None in names:
            self.errors.append(
                f"{p}: must be 'schema.table' or 'table', each name matching [a-z_][a-z0-9_$]* and at most "
                f"{MAX_IDENTIFIER_LENGTH} characters"
            )
            return None
        schema, table = names[0] or "", names[1] or ""
        if schema.startswith("pg_") or schema in ("information_schema", "pgveil"):
            self.errors.append(f"{p}: schema {schema!r} is reserved and cannot hold protected tables")
            return None
        return schema, table

    @staticmethod
    def identifier(text: str) -> str | None:
        # Unquoted identifiers fold to lower case in PostgreSQL; quoted ones are not supported (yet).
        folded = text.strip().lower()
        if _IDENTIFIER.match(folded) and len(folded.encode()) <= MAX_IDENTIFIER_LENGTH:
            return folded
        return None

    def columns(self, v: Any, p: str) -> tuple[ColumnConfig, ...]:
        if v is None:
            return ()
        if not isinstance(v, Mapping):
            self.errors.append(f"{p}: must be a mapping of column name to settings, got {_show(v)}")
            return ()
        if not v:
            self.errors.append(f"{p}: must list at least one column")
        out: dict[str, ColumnConfig] = {}
        for key, spec in v.items():
            cp = _join(p, key)
            name = self.identifier(key) if isinstance(key, str) else None
            if name is None:
                self.errors.append(
                    f"{cp}: column name must match [a-z_][a-z0-9_$]* and be at most {MAX_IDENTIFIER_LENGTH} characters"
                )
            if not isinstance(spec, Mapping):
                self.errors.append(f"{cp}: must be a mapping like {{type: text, encrypt: true}}, got {_show(spec)}")
                continue
            m = self.section(spec, cp, ("type", "encrypt"))
            if "type" not in m:
                self.errors.append(f"{cp}.type: required (one of {', '.join(SUPPORTED_TYPES)})")
            type_name = self.get(m, "type", cp, self.type_name, "")
            encrypt = self.get(m, "encrypt", cp, self.boolean, True)
            if not encrypt:
                self.warnings.append(f"{cp}.encrypt: false leaves the column unprotected; listing it has no effect")
            if name is None:
                continue
            if name in out:
                self.errors.append(f"{cp}: names the same column as another entry ({name})")
                continue
            out[name] = ColumnConfig(name=name, type=type_name, encrypt=encrypt)
        return tuple(out.values())

    @staticmethod
    def type_name(v: Any) -> str:
        if not isinstance(v, str):
            raise _Invalid(f"must be one of {', '.join(SUPPORTED_TYPES)}, got {_show(v)}")
        try:
            return normalize_type_name(v)
        except ValueError as e:
            raise _Invalid(str(e)) from None

    def cross_check(self, listen: tuple[HostPort, ...], client_tls: ClientTLSConfig | None, admin: AdminConfig) -> None:
        if admin.listen is not None and admin.listen.port != 0 and admin.listen in listen:
            self.errors.append(f"admin.listen: {admin.listen} is also a proxy listen address")
        if client_tls is None:
            for addr in listen:
                if not _is_loopback(addr.host):
                    self.warnings.append(
                        f"listen: {addr} accepts remote clients but client_tls is not configured, so passwords "
                        "and data cross the network unencrypted"
                    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------


def parse_config(data: Any, *, base_dir: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Validates decoded YAML. Relative paths resolve against ``base_dir``; ``environ`` (default:
    ``os.environ``) supplies ``PGVEIL_KEYSTORE_DSN``, which takes precedence over ``keystore.dsn``.

    Raises ``ConfigError`` listing every problem found.
    """
    parser = _Parser(base_dir, os.environ if environ is None else environ)
    config = parser.parse(data)
    if parser.errors:
        raise ConfigError(parser.errors)
    return config


def default_config_path() -> Path:
    """``$PGVEIL_CONFIG`` when set, otherwise ``./pgveil.yaml``."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_FILE)


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Reads, validates and checks a configuration file.

    With ``path`` None: ``$PGVEIL_CONFIG`` (which must exist), else ``./pgveil.yaml`` if it exists, else
    the built-in defaults. ``overrides`` carries command-line settings: ``listen`` and ``upstream``, each
    ``"HOST:PORT"`` (None means "not given"); they replace the file's values. Referenced files (TLS
    certificates, password files, PKCS#11 module and PIN) must be readable. Raises ``ConfigError``.
    """
    env = os.environ if environ is None else environ
    source: Path | None
    if path is not None:
        source = Path(path)
    elif env.get(CONFIG_ENV):
        source = Path(env[CONFIG_ENV])
    else:
        source = Path(DEFAULT_CONFIG_FILE) if Path(DEFAULT_CONFIG_FILE).is_file() else None

    data: Any = read_yaml(source) if source is not None else None
    errors: list[str] = []
    data = _with_overrides(data, overrides or {}, errors)
    base_dir = source.absolute().parent if source is not None else Path.cwd()
    try:
        config = parse_config(data, base_dir=base_dir, environ=env)
    except ConfigError as e:
        raise ConfigError(errors + e.errors) from None
    errors.extend(check_files(config))
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(config, source_path=source.absolute() if source is not None else None)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML would otherwise silently let the last win."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_show(key)}", key_node.start_mark)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> Any:
    """The decoded YAML document at ``path``. Errors give line and column but never echo file content,
    which may hold a DSN with a password."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError([f"{path}: cannot read: {reason}"]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError([f"{where}: YAML syntax error: {e.problem or e.context}"]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{path}: YAML syntax error"]) from None


def _with_overrides(data: Any, overrides: Mapping[str, Any], errors: list[str]) -> Any:
    """``data`` with command-line overrides applied; a bad override is reported under its flag."""
    known = ("listen", "upstream")
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in given:
        if key not in known:
            errors.append(f"--{key}: unknown override{_suggest(key, known)}")
    if not given or not isinstance(data, Mapping | None):
        return data
    out: dict[Any, Any] = dict(data or {})
    for key, listening in (("listen", True), ("upstream", False)):
        if key not in given:
            continue
        value = given[key]
        if key == "listen" and isinstance(value, list | tuple):
            try:
                out["listen"] = [str(parse_host_port(v, listening=True)) for v in value if isinstance(v, str)]
            except ValueError as e:
                errors.append(f"--listen: {e}")
            continue
        try:
            if not isinstance(value, str):
                raise ValueError(f"must be 'HOST:PORT', got {_show(value)}")
            addr = parse_host_port(value, listening=listening)
        except ValueError as e:
            errors.append(f"--{key}: {e}")
            continue
        if key == "listen":
            out["listen"] = str(addr)
        else:
            section = out.get("upstream")
            merged = dict(section) if isinstance(section, Mapping) else {}
            if section is not None and not isinstance(section, Mapping):
                continue  # the parser reports the malformed section itself
            merged.update(host=addr.host, port=addr.port)
            out["upstream"] = merged
    return out


def check_files(config: Config) -> list[str]:
    """One line per referenced file that cannot be read. The local master key is not checked: the
    provider creates it on first run."""
    wanted: list[tuple[str, Path]] = []
    if config.upstream.ca_file is not None:
        wanted.append(("upstream.ca_file", config.upstream.ca_file))
    if config.client_tls is not None:
        wanted += [("client_tls.cert_file", config.client_tls.cert_file)]
        wanted += [("client_tls.key_file", config.client_tls.key_file)]
    if config.keystore is not None:
        if config.keystore.password_file is not None:
            wanted.append(("keystore.password_file", config.keystore.password_file))
        mk = config.keystore.master_key
        if isinstance(mk, Pkcs11MasterKeyConfig):
            wanted.append(("keystore.master_key.module", mk.module))
            if mk.pin_file is not None:
                wanted.append(("keystore.master_key.pin_file", mk.pin_file))
    if config.service is not None and config.service.password_file is not None:
        wanted.append(("service.password_file", config.service.password_file))
    problems: list[str] = []
    seen: set[Path] = set()
    for name, path in wanted:
        if path in seen:
            continue
        seen.add(path)
        if not path.is_file():
            problems.append(f"{name}: {path} does not exist or is not a file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{name}: {path} is not readable")
    return problems


def read_secret_file(path: Path) -> str:
    """The first line of a password or PIN file, without its line ending. Raises ``ConfigError``
    naming the file but never its content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigError([f"{path}: cannot read secret file"]) from None
    first = text.splitlines()[0] if text else ""
    if not first:
        raise ConfigError([f"{path}: secret file is empty"])
    return first
