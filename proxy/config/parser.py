"""Validation of the decoded YAML: ``parse_config`` walks every section, collects *all* problems in one
pass and raises one ``ConfigError`` with one line per problem, each named by its dotted path, e.g.
``upstream.port: must be an integer between 1 and 65535, got 'abc'``.

Also the value converters other modules parse with (``parse_host_port``, ``normalize_type_name``).

Must not: read files, open connections, or read the environment beyond the mapping it is given.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, TypeVar

from proxy.config.audit import parse_audit
from proxy.config.roles import parse_roles, uses_hash
from proxy.config.roles import show_value as _show
from proxy.config.roles import suggestion as _suggest
from proxy.config.types import (
    AdminConfig,
    AdminTLSConfig,
    ClientTLSConfig,
    ColumnConfig,
    Config,
    HostPort,
    KeyCacheConfig,
    KeyProvider,
    KeystoreConfig,
    LocalMasterKeyConfig,
    LogFormat,
    LoggingConfig,
    LogLevel,
    MasterKeyConfig,
    Pkcs11MasterKeyConfig,
    PolicySettings,
    ServiceConfig,
    SessionsConfig,
    StatementTracking,
    SubjectConfig,
    TableConfig,
    TLSMode,
    UpstreamConfig,
    dsn_has_password,
)
from proxy.errors import ConfigError

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)

KEYSTORE_DSN_ENV: Final = "PGVEIL_KEYSTORE_DSN"

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; a truncated name would silently refer to
# another column, so longer names are refused.
MAX_IDENTIFIER_LENGTH: Final = 63
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*\Z")

# Config fields that are facts about the loading, not settings a file may contain.
# Config fields whose YAML key differs from their name.
_YAML_KEYS: Final = {"policy": "roles", "policy_settings": "policy"}
_TOP_LEVEL_KEYS: Final = tuple(
    _YAML_KEYS.get(f.name, f.name) for f in dataclasses.fields(Config) if f.name not in ("source_path", "warnings")
)

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


# ---------------------------------------------------------------------------------------------------
# Validation machinery
# ---------------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A value is wrong; the message completes ``<dotted path>: ``."""


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


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
        policy, errors, warnings = parse_roles(top.get("roles"), tables)
        policy_settings = self.policy_settings(top.get("policy"))
        self.errors += errors
        audit, audit_errors = parse_audit(top.get("audit"), tables, policy.role_names)
        self.errors += audit_errors
        self.warnings += warnings
        encrypts = any(c.encrypt for t in tables for c in t.columns)
        needs = " and ".join(
            what for what, needed in (("encrypted columns", encrypts), ("hash masks", uses_hash(policy))) if needed
        )
        keystore = self.keystore(top.get("keystore"), "keystore" in top and top["keystore"] is not None, needs)
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
            policy=policy,
            policy_settings=policy_settings,
            audit=audit,
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
        cfg = AdminConfig(
            listen=self.get(m, "listen", p, self.optional(self.address(listening=True)), d.listen),
            tokens_file=self.get(m, "tokens_file", p, self.optional(self.file_path), d.tokens_file),
            require_token_for_metrics=self.get(m, "require_token_for_metrics", p, self.boolean, False),
            require_token_for_health=self.get(m, "require_token_for_health", p, self.boolean, False),
            auth_failure_limit=self.get(m, "auth_failure_limit", p, self.integer(1, 1_000_000), d.auth_failure_limit),
            auth_failure_window=self.get(m, "auth_failure_window", p, self.seconds(allow_zero=False), 60.0),
            tls=self.admin_tls(m.get("tls")),
        )
        for key in ("require_token_for_metrics", "require_token_for_health"):
            if getattr(cfg, key) and cfg.tokens_file is None:
                self.errors.append(f"admin.{key}: needs admin.tokens_file (no token could be accepted)")
        return cfg

    def admin_tls(self, v: Any) -> AdminTLSConfig | None:
        if v is None:
            return None
        p = "admin.tls"
        m = self.section(v, p, _keys(AdminTLSConfig))
        for key in ("cert_file", "key_file"):
            if key not in m:
                self.errors.append(f"{p}.{key}: required when admin.tls is set")
        return AdminTLSConfig(
            cert_file=self.get(m, "cert_file", p, self.file_path, Path()),
            key_file=self.get(m, "key_file", p, self.file_path, Path()),
            client_ca_file=self.get(m, "client_ca_file", p, self.optional(self.file_path), None),
        )

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

    def policy_settings(self, v: Any) -> PolicySettings:
        p, d = "policy", PolicySettings()
        m = self.section(v, p, _keys(PolicySettings))
        return PolicySettings(
            membership_refresh_seconds=self.get(
                m, "membership_refresh_seconds", p, self.seconds(allow_zero=True), d.membership_refresh_seconds
            ),
        )

    def keystore(self, v: Any, present: bool, needed_by: str) -> KeystoreConfig | None:
        """``needed_by`` names what needs keys ("encrypted columns", "hash masks"), empty if nothing."""
        env_dsn = self.environ.get(KEYSTORE_DSN_ENV) or None
        if not present and env_dsn is None and not needed_by:
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
        if dsn is None and needed_by:
            self.warnings.append(
                f"keystore.dsn: not set (nor {KEYSTORE_DSN_ENV}); {needed_by} need a keystore connection"
            )
        return KeystoreConfig(
            dsn=dsn,
            password_file=self.get(m, "password_file", p, self.optional(self.file_path), d.password_file),
            master_key=self.master_key(m.get("master_key"), f"{p}.master_key"),
            cache=self.key_cache(m.get("cache"), f"{p}.cache"),
            previous_master_keys=self.previous_master_keys(m.get("previous_master_keys"), f"{p}.previous_master_keys"),
        )

    def previous_master_keys(self, v: Any, p: str) -> tuple[MasterKeyConfig, ...]:
        if v is None:
            return ()
        if not isinstance(v, list):
            self.errors.append(f"{p}: must be a list of master_key mappings, got {_show(v)}")
            return ()
        return tuple(self.master_key(x, f"{p}[{i}]") for i, x in enumerate(v) if x is not None)

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
            if (m.get("pin_file") is None) == (m.get("pin_env") is None):
                self.errors.append(f"{p}.pin_file: exactly one of pin_file and pin_env is required")
            return Pkcs11MasterKeyConfig(
                module=self.get(m, "module", p, self.file_path, Path()),
                token_label=self.get(m, "token_label", p, self.string, ""),
                key_label=self.get(m, "key_label", p, self.string, ""),
                pin_file=self.get(m, "pin_file", p, self.optional(self.file_path), None),
                pin_env=self.get(m, "pin_env", p, self.optional(self.string), None),
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
            m = self.section(spec, p, ("columns", "subject"))
            columns = self.columns(m.get("columns"), f"{p}.columns")
            if "columns" not in m and isinstance(spec, Mapping | None):
                self.errors.append(f"{p}.columns: required (a mapping of column name to settings)")
            subject = self.subject(m.get("subject"), f"{p}.subject", columns) if "subject" in m else None
            if name is None:
                continue
            if name in out:
                self.errors.append(f"{p}: names the same table as another entry ({name[0]}.{name[1]})")
                continue
            out[name] = TableConfig(schema=name[0], name=name[1], columns=columns, subject=subject)
        return tuple(out.values())

    def subject(self, v: Any, p: str, columns: tuple[ColumnConfig, ...]) -> SubjectConfig | None:
        """``tables.<t>.subject: {kind: customer, column: id}``. That the column exists and has a subject
        type (integer, bigint, uuid, text) is checked against the database when the catalog is read."""
        if not isinstance(v, Mapping):
            self.errors.append(f"{p}: must be a mapping like {{kind: customer, column: id}}, got {_show(v)}")
            return None
        m = self.section(v, p, ("kind", "column"))
        kind = column = None
        for key in ("kind", "column"):
            if key not in m:
                self.errors.append(f"{p}.{key}: required")
                continue
            raw = m[key]
            name = self.identifier(raw) if isinstance(raw, str) else None
            if name is None:
                self.errors.append(
                    f"{p}.{key}: must match [a-z_][a-z0-9_$]* and be at most {MAX_IDENTIFIER_LENGTH} characters, "
                    f"got {_show(raw)}"
                )
            elif key == "kind":
                kind = name
            else:
                column = name
        if column is not None:
            configured = next((c for c in columns if c.name == column), None)
            if configured is not None and configured.encrypt:
                self.errors.append(
                    f"{p}.column: the subject column {column} must not itself be encrypted (its value chooses the key)"
                )
                column = None
        if kind is None or column is None:
            return None
        if not any(c.encrypt for c in columns):
            self.warnings.append(f"{p}: the table has no encrypted column, so its subject keys are never used")
        return SubjectConfig(kind=kind, column=column)

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
            encrypt = self.get(m, "encrypt", cp, self.boolean, False)
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
        remote_admin = admin.listen is not None and not _is_loopback(admin.listen.host)
        if remote_admin and admin.tokens_file is not None and admin.tls is None:
            self.warnings.append(
                f"admin.listen: {admin.listen} accepts remote clients but admin.tls is not configured, so "
                "admin tokens cross the network unencrypted"
            )
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
# Entry point
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
