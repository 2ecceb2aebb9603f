"""pgveil's configuration: YAML in, frozen dataclasses out, every problem named by its dotted path.

Theory of operation: ``load_config`` (``loader``) reads the file (I/O), ``parse_config`` (``parser``)
validates the decoded YAML (pure: it reads no files and, unless told otherwise, only the
``PGVEIL_KEYSTORE_DSN`` variable of the environment) and ``check_files`` verifies that the files the
configuration references are readable. The parser walks every section, collects *all* problems in one
pass and raises one ``ConfigError`` with one line per problem, e.g.
``upstream.port: must be an integer between 1 and 65535, got 'abc'``.

The YAML keys are the dataclass field names (``types``), and defaults live only in the dataclasses, so
``config/pgveil.example.yaml`` (checked against these classes by the tests) cannot drift from the code.

Secrets are referenced, never held: a DSN is kept as text (its password, when one is inlined, is never
shown: ``repr`` redacts it), password and PIN files are kept as paths. This package must not open network
connections, and reads a secret file only when ``read_secret_file`` is called.
"""

from proxy.config.loader import (
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    check_files,
    default_config_path,
    load_config,
    read_secret_file,
    read_yaml,
)
from proxy.config.parser import (
    KEYSTORE_DSN_ENV,
    MAX_IDENTIFIER_LENGTH,
    SUPPORTED_TYPES,
    normalize_type_name,
    parse_config,
    parse_host_port,
)
from proxy.config.types import (
    RESTART_REQUIRED,
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
    redact_dsn,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_FILE",
    "KEYSTORE_DSN_ENV",
    "MAX_IDENTIFIER_LENGTH",
    "RESTART_REQUIRED",
    "SUPPORTED_TYPES",
    "AdminConfig",
    "AdminTLSConfig",
    "ClientTLSConfig",
    "ColumnConfig",
    "Config",
    "HostPort",
    "KeyCacheConfig",
    "KeyProvider",
    "KeystoreConfig",
    "LocalMasterKeyConfig",
    "LogFormat",
    "LogLevel",
    "LoggingConfig",
    "MasterKeyConfig",
    "Pkcs11MasterKeyConfig",
    "PolicySettings",
    "ServiceConfig",
    "SessionsConfig",
    "StatementTracking",
    "SubjectConfig",
    "TLSMode",
    "TableConfig",
    "UpstreamConfig",
    "check_files",
    "default_config_path",
    "dsn_has_password",
    "load_config",
    "normalize_type_name",
    "parse_config",
    "parse_host_port",
    "read_secret_file",
    "read_yaml",
    "redact_dsn",
]
