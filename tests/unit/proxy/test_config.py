from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    AdminConfig,
    ClientTLSConfig,
    Config,
    HostPort,
    KeystoreConfig,
    LocalMasterKeyConfig,
    LoggingConfig,
    LogLevel,
    Pkcs11MasterKeyConfig,
    ServiceConfig,
    SessionsConfig,
    TLSMode,
    UpstreamConfig,
    check_files,
    dsn_has_password,
    load_config,
    normalize_type_name,
    parse_config,
    parse_host_port,
    read_secret_file,
    read_yaml,
    redact_dsn,
)
from proxy.errors import ConfigError
from proxy.policy.rules import Policy

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "config" / "pgveil.example.yaml"
DEMO = REPO / "config" / "demo.yaml"
BASE = Path("/etc/pgveil")
NO_ENV: dict[str, str] = {}


def parse(data: Any, environ: dict[str, str] | None = None) -> Config:
    return parse_config(data, base_dir=BASE, environ=NO_ENV if environ is None else environ)


def errors_of(data: Any, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, environ)
    return info.value.errors


def one_table(columns: dict[str, Any], name: str = "public.t") -> dict[str, Any]:
    return {"tables": {name: {"columns": columns}}}


# -- defaults and the shipped files ------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, {}])
def test_empty_config_is_the_defaults(data: Any) -> None:
    config = parse(data)
    assert config == Config()
    assert config.listen == (HostPort("127.0.0.1", 6432),)
    assert config.admin.listen == HostPort("127.0.0.1", 9187)
    assert config.keystore is None
    assert config.service is None
    assert config.client_tls is None
    assert config.warnings == ()
    assert config.catalog().empty


def test_example_shows_the_defaults() -> None:
    base = EXAMPLE.parent
    example = parse_config(read_yaml(EXAMPLE), base_dir=base, environ=NO_ENV)
    defaults = parse_config({"keystore": {}}, base_dir=base, environ=NO_ENV)
    for section in (
        "listen",
        "upstream",
        "client_tls",
        "admin",
        "sessions",
        "logging",
        "keystore",
        "service",
        "policy_settings",
        "audit",
    ):
        assert getattr(example, section) == getattr(defaults, section), section
    assert example.keystore == KeystoreConfig(master_key=LocalMasterKeyConfig(path=base / "pgveil-master.key"))


def _dataclasses_under(cls: type[Any]) -> list[type[Any]]:
    found: list[type[Any]] = []

    def walk(tp: Any) -> None:
        if tp is Policy:
            return  # the roles section has its own reference (config/policy.schema.json); not field names
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if tp in found:
                return
            found.append(tp)
            for hint in typing.get_type_hints(tp).values():
                walk(hint)
        elif isinstance(tp, types.UnionType) or typing.get_origin(tp) is not None:
            for arg in typing.get_args(tp):
                walk(arg)

    walk(cls)
    return found


# Fields that are not YAML keys: facts about the loading, and names that are the keys of a mapping.
# Config.policy and Config.policy_settings are the sections roles: and policy: (checked by name below).
NOT_KEYS = {("Config", "source_path"), ("Config", "warnings"), ("Config", "policy"), ("Config", "policy_settings"),
            ("TableConfig", "schema"), ("TableConfig", "name"), ("ColumnConfig", "name"), ("HostPort", "host"),
            ("HostPort", "port")}  # fmt: skip


def test_example_documents_every_setting() -> None:
    text = EXAMPLE.read_text()
    classes = _dataclasses_under(Config)
    assert Pkcs11MasterKeyConfig in classes  # the walk reaches into unions
    assert ClientTLSConfig in classes
    assert re.search(r"(?m)^roles:", text)  # Config.policy
    assert re.search(r"(?m)^policy:", text)  # Config.policy_settings
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in classes
        for f in dataclasses.fields(cls)
        if (cls.__name__, f.name) not in NOT_KEYS
        and not re.search(rf"(?m)(^[ \t#]*|[{{,][ \t]*){re.escape(f.name)}:", text)
    ]
    assert missing == []


def test_demo_config_protects_the_demo_columns() -> None:
    config = load_config(DEMO, environ=NO_ENV)
    table = config.catalog().lookup(None, "customers")
    assert table is not None
    assert table.qualified_name == "public.customers"
    assert {c.name: (c.declared_type, c.encrypted) for c in table.columns.values()} == {
        "email": ("text", True),
        "ssn": ("text", True),
        "birth_date": ("date", True),
        "phone": ("text", False),  # the demo's plain governed column
    }
    assert config.source_path == DEMO
    assert config.policy.role_names == {"app", "billing", "support", "contractor"}
    assert not any(w.startswith("roles") for w in config.warnings)


# -- collecting errors --------------------------------------------------------------------------------


def test_every_error_is_reported_in_one_pass_with_its_dotted_path() -> None:
    errors = errors_of(
        {
            "upstream": {"hots": "db", "port": "abc", "tls": "verify_full"},
            "logging": {"level": "verbose"},
            "sessions": {"max_client_connections": 0},
            "lsiten": "0.0.0.0:1",
        }
    )
    assert errors == [
        "(top level).lsiten: unknown setting (did you mean 'listen'?)",
        "upstream.hots: unknown setting (did you mean 'host'?)",
        "upstream.port: must be an integer between 1 and 65535, got 'abc'",
        "upstream.tls: must be one of disable, prefer, require, verify-full, got 'verify_full'"
        " (did you mean 'verify-full'?)",
        "sessions.max_client_connections: must be an integer >= 1, got 0",
        "logging.level: must be one of debug, info, warning, error, got 'verbose'",
    ]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"upstream": {"port": True}}, "upstream.port: must be an integer between 1 and 65535, got true"),
        ({"upstream": {"port": 70000}}, "upstream.port: must be an integer between 1 and 65535, got 70000"),
        ({"upstream": {"port": None}}, "upstream.port: must be an integer between 1 and 65535, got null"),
        ({"upstream": "db:5432"}, "upstream: must be a mapping, got 'db:5432'"),
        ({"upstream": {"connect_timeout": 0}}, "upstream.connect_timeout: must be a number of seconds > 0, got 0"),
        ({"upstream": {"host": ""}}, "upstream.host: must be a host name or IP address, got ''"),
        ({"sessions": {"shutdown_timeout": -1}}, "sessions.shutdown_timeout: must be a number of seconds >= 0, got -1"),
        (
            {"sessions": {"max_message_size": 2**31}},
            "sessions.max_message_size: must be an integer between 8192 and 2147483647, got 2147483648",
        ),
        ({"client_tls": {"required": "yes"}}, "client_tls.required: must be true or false, got 'yes'"),
        ({"logging": {"format": ["json"]}}, "logging.format: must be one of text, json, got a list"),
        (
            {"keystore": {"cache": {"ttl_seconds": 0}}},
            "keystore.cache.ttl_seconds: must be a number of seconds > 0, got 0",
        ),
        ({"upstream": {"tls": "verify-full"}}, "upstream.ca_file: required when upstream.tls is verify-full"),
        (["listen"], "(top level): must be a mapping, got a list"),
    ],
)
def test_bad_values_are_named(data: Any, error: str) -> None:
    assert errors_of(data) == [error]


def test_enum_values_are_case_insensitive() -> None:
    config = parse({"upstream": {"tls": "REQUIRE"}, "logging": {"level": "Warning", "format": "json"}})
    assert config.upstream.tls is TLSMode.REQUIRE
    assert config.logging.level is LogLevel.WARNING
    assert config.logging.level.number == 30


def test_secret_values_are_never_echoed() -> None:
    errors = errors_of({"keystore": {"dsn": 12345678}, "service": {"dsn": ["hunter2"]}})
    assert errors == ["keystore.dsn: must be a non-empty string", "service.dsn: must be a non-empty string"]


# -- addresses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "listening", "expected"),
    [
        ("127.0.0.1:6432", False, HostPort("127.0.0.1", 6432)),
        ("db.internal:5432", False, HostPort("db.internal", 5432)),
        ("[::1]:6432", False, HostPort("::1", 6432)),
        ("0.0.0.0:0", True, HostPort("0.0.0.0", 0)),
    ],
)
def test_parse_host_port(text: str, listening: bool, expected: HostPort) -> None:
    assert parse_host_port(text, listening=listening) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text", ["6432", "localhost", ":6432", "host:", "host:65536", "::1:6432", "[db]:1", "a b:1", "h:0", "h:+5", "h:٣"]
)
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="must be 'HOST:PORT'"):
        parse_host_port(text)


def test_listen_accepts_a_list_and_refuses_duplicates() -> None:
    config = parse({"listen": ["127.0.0.1:6432", "[::1]:6432"]})
    assert config.listen == (HostPort("127.0.0.1", 6432), HostPort("::1", 6432))
    assert errors_of({"listen": ["127.0.0.1:1", "127.0.0.1:1", 5]}) == [
        "listen[1]: 127.0.0.1:1 is listed twice",
        "listen[2]: must be 'HOST:PORT' with a port between 0 and 65535, got 5",
    ]
    assert errors_of({"listen": []}) == ["listen: must name at least one 'HOST:PORT'"]


def test_admin_listen_can_be_disabled_but_not_shared() -> None:
    assert parse({"admin": {"listen": None}}).admin == AdminConfig(listen=None)
    assert errors_of({"listen": "127.0.0.1:7000", "admin": {"listen": "127.0.0.1:7000"}}) == [
        "admin.listen: 127.0.0.1:7000 is also a proxy listen address"
    ]


def test_remote_listen_without_client_tls_warns() -> None:
    assert any("0.0.0.0:6432 accepts remote clients" in w for w in parse({"listen": "0.0.0.0:6432"}).warnings)
    assert parse({"listen": "0.0.0.0:6432", "client_tls": {}}).warnings == ()
    assert parse({"listen": "localhost:6432"}).warnings == ()


# -- paths --------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory() -> None:
    config = parse(
        {
            "upstream": {"tls": "verify-full", "ca_file": "certs/ca.pem", "server_name": "db.internal"},
            "client_tls": {"key_file": "/abs/server.key"},
            "keystore": {"password_file": "secrets/ks.pw"},
        }
    )
    assert config.upstream.ca_file == BASE / "certs/ca.pem"
    assert config.upstream.tls_server_name == "db.internal"
    assert config.client_tls == ClientTLSConfig(cert_file=BASE / "server.crt", key_file=Path("/abs/server.key"))
    assert config.keystore is not None
    assert config.keystore.password_file == BASE / "secrets/ks.pw"
    assert config.keystore.master_key == LocalMasterKeyConfig(path=BASE / "pgveil-master.key")


def test_server_name_defaults_to_the_host() -> None:
    assert parse({"upstream": {"host": "db.internal"}}).upstream.tls_server_name == "db.internal"


def test_pkcs11_master_key_shape() -> None:
    mk = {"provider": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t", "key_label": "k"}
    keystore = parse({"keystore": {"master_key": {**mk, "pin_env": "HSM_PIN"}}}).keystore
    assert keystore is not None
    assert keystore.master_key == Pkcs11MasterKeyConfig(
        module=Path("/usr/lib/softhsm/libsofthsm2.so"), token_label="t", key_label="k", pin_env="HSM_PIN"
    )
    with_file = parse({"keystore": {"master_key": {**mk, "pin_file": "/run/secrets/pin"}}}).keystore
    assert with_file is not None
    assert isinstance(with_file.master_key, Pkcs11MasterKeyConfig)
    assert with_file.master_key.pin_file == Path("/run/secrets/pin")
    both = {**mk, "pin_file": "/run/secrets/pin", "pin_env": "HSM_PIN"}
    for pins in (mk, both):
        assert errors_of({"keystore": {"master_key": pins}}) == [
            "keystore.master_key.pin_file: exactly one of pin_file and pin_env is required"
        ]
    assert errors_of({"keystore": {"master_key": {"provider": "pkcs11", "path": "x", "token_label": 3}}}) == [
        "keystore.master_key.path: unknown setting",
        "keystore.master_key.module: required when provider is pkcs11",
        "keystore.master_key.key_label: required when provider is pkcs11",
        "keystore.master_key.pin_file: exactly one of pin_file and pin_env is required",
        "keystore.master_key.token_label: must be a non-empty string, got 3",
    ]
    assert errors_of({"keystore": {"master_key": {"provider": "vault"}}}) == [
        "keystore.master_key.provider: must be one of local, pkcs11, got 'vault'"
    ]
    assert errors_of({"keystore": {"master_key": {"module": "x.so"}}}) == [
        "keystore.master_key.module: unknown setting"
    ]


def test_previous_master_keys_are_master_key_mappings() -> None:
    previous = [{"provider": "local", "path": "old.key"}]
    keystore = parse({"keystore": {"previous_master_keys": previous}}).keystore
    assert keystore is not None
    assert keystore.previous_master_keys == (LocalMasterKeyConfig(path=BASE / "old.key"),)
    assert errors_of({"keystore": {"previous_master_keys": {"provider": "local"}}}) == [
        "keystore.previous_master_keys: must be a list of master_key mappings, got a mapping"
    ]
    assert errors_of({"keystore": {"previous_master_keys": [{"provider": "local", "oops": 1}]}}) == [
        "keystore.previous_master_keys[0].oops: unknown setting"
    ]


# -- keystore and service connections --------------------------------------------------------------


def test_keystore_is_needed_only_for_encrypted_columns() -> None:
    assert parse({}).keystore is None
    plain = parse(one_table({"phone": {"type": "text"}}))
    assert (plain.keystore, plain.encrypts_anything, plain.governs_anything) == (None, False, True)
    protected = parse(one_table({"email": {"type": "text", "encrypt": True}}) | {"roles": {"default": "hidden"}})
    assert (protected.encrypts_anything, protected.governs_anything) == (True, True)
    assert protected.keystore == KeystoreConfig(master_key=LocalMasterKeyConfig(path=BASE / "pgveil-master.key"))
    assert protected.warnings == (
        "keystore.dsn: not set (nor PGVEIL_KEYSTORE_DSN); encrypted columns need a keystore connection",
    )


def test_inline_password_warns_and_is_redacted() -> None:
    config = parse({"keystore": {"dsn": "postgresql://pgveil:s3cret-pw@db/keys"}})
    assert config.warnings == (
        "keystore.dsn: contains an inline password; use keystore.password_file or PGVEIL_KEYSTORE_DSN instead",
    )
    assert config.keystore is not None
    assert config.service is not None
    for text in (repr(config), repr(config.keystore), repr(config.service), str(config)):
        assert "s3cret-pw" not in text
        assert "postgresql://pgveil:***@db/keys" in text


def test_keystore_dsn_from_the_environment_wins_without_a_warning() -> None:
    env = {"PGVEIL_KEYSTORE_DSN": "host=db user=pgveil password=from-env"}
    config = parse({}, environ=env)
    assert config.keystore is not None
    assert config.keystore.dsn == "host=db user=pgveil password=from-env"
    assert config.warnings == ()
    config = parse({"keystore": {"dsn": "host=other"}}, environ=env)
    assert config.keystore is not None
    assert config.keystore.dsn == env["PGVEIL_KEYSTORE_DSN"]
    assert config.warnings == ("keystore.dsn: overridden by PGVEIL_KEYSTORE_DSN",)


def test_service_falls_back_to_the_keystore_connection() -> None:
    config = parse({"keystore": {"dsn": "postgresql://ks@db/keys", "password_file": "ks.pw"}})
    assert config.service == ServiceConfig(dsn="postgresql://ks@db/keys", password_file=BASE / "ks.pw")
    config = parse(
        {"keystore": {"dsn": "postgresql://ks@db/keys", "password_file": "ks.pw"}, "service": {"dsn": "host=app"}}
    )
    assert config.service == ServiceConfig(dsn="host=app")  # another DSN: the keystore's password is not its
    assert parse({"service": {"dsn": "host=app", "password_file": "svc.pw"}}).service == ServiceConfig(
        dsn="host=app", password_file=BASE / "svc.pw"
    )


@pytest.mark.parametrize(
    ("dsn", "has_password", "redacted"),
    [
        ("postgresql://u@h/db", False, "postgresql://u@h/db"),
        ("postgresql://u:pw@h:5432,h2:5433/db", True, "postgresql://u:***@h:5432,h2:5433/db"),
        (
            "postgres://h/db?user=u&password=pw&sslmode=require",
            True,
            "postgres://h/db?user=u&password=***&sslmode=require",
        ),
        ("host=h user=u", False, "host=h user=u"),
        ("host=h password=pw user=u", True, "host=h password=*** user=u"),
        ("host=h password = 'p w\\'x' user=u", True, "host=h password = *** user=u"),
        ("password=pw", True, "password=***"),
        ("host=h passwordx=1", False, "host=h passwordx=1"),
    ],
)
def test_dsn_passwords(dsn: str, has_password: bool, redacted: str) -> None:
    assert dsn_has_password(dsn) is has_password
    assert redact_dsn(dsn) == redacted


# -- tables -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("text", "text"),
        ("VARCHAR", "varchar"),
        ("varchar( 20 )", "varchar(20)"),
        ("character varying(5)", "varchar(5)"),
        ("char", "char(1)"),
        ("char(3)", "char(3)"),
        ("smallint", "int2"),
        ("integer", "int4"),
        ("int", "int4"),
        ("bigint", "int8"),
        ("numeric", "numeric"),
        ("numeric(10,2)", "numeric(10,2)"),
        ("numeric(7)", "numeric(7,0)"),
        ("decimal(5, 1)", "numeric(5,1)"),
        ("real", "float4"),
        ("double  precision", "float8"),
        ("boolean", "bool"),
        ("timestamp with time zone", "timestamptz"),
        ("timestamp", "timestamp"),
        ("uuid", "uuid"),
        ("jsonb", "jsonb"),
        ("json", "json"),
        ("bytea", "bytea"),
        ("date", "date"),
    ],
)
def test_type_names_are_normalised(given: str, canonical: str) -> None:
    assert normalize_type_name(given) == canonical


@pytest.mark.parametrize(
    "bad",
    ["money", "varchar(0)", "varchar(1,2)", "numeric(5,6)", "numeric(0)", "int4(3)", "text[]", "", "timestamp(3)"],
)
def test_unsupported_types_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        normalize_type_name(bad)


def test_tables_build_the_catalog() -> None:
    config = parse(
        {
            "keystore": {"dsn": "host=db"},
            "tables": {
                "Customers": {
                    "columns": {
                        "Email": {"type": "character varying(200)", "encrypt": True},
                        "note": {"type": "text", "encrypt": False},
                    }
                },
                "billing.cards": {"columns": {"pan": {"type": "text", "encrypt": True}}},
                "plain": {"columns": {"x": {"type": "int"}}},
            },
            "roles": {"default": "plaintext"},
        }
    )
    assert [t.qualified_name for t in config.tables] == ["public.customers", "billing.cards", "public.plain"]
    assert config.warnings == ()
    catalog = config.catalog()
    # Every table with a governed column, plain ones included: the visibility policy governs them too.
    assert sorted(catalog.tables) == [("billing", "cards"), ("public", "customers"), ("public", "plain")]
    email = catalog.tables[("public", "customers")].columns["email"]
    assert (email.column_id, email.declared_type, email.attnum, email.table_oid, email.encrypted) == (
        "public.customers.email",
        "varchar(200)",
        0,
        0,
        True,
    )
    customers = catalog.tables[("public", "customers")].columns
    assert {name: c.encrypted for name, c in customers.items()} == {"email": True, "note": False}
    x = catalog.tables[("public", "plain")].columns["x"]
    assert (x.column_id, x.declared_type, x.encrypted) == ("public.plain.x", "int4", False)


def test_encrypt_defaults_to_false() -> None:
    config = parse(one_table({"phone": {"type": "text"}}))
    assert config.tables[0].columns[0].encrypt is False
    assert not config.encrypts_anything
    assert config.catalog().tables[("public", "t")].columns["phone"].encrypted is False
    assert parse({}).governs_anything is False


def test_table_and_column_errors() -> None:
    errors = errors_of(
        {
            "tables": {
                "a.b.c": {"columns": {"x": {"type": "text"}}},
                '"Quoted"': {"columns": {"x": {"type": "text"}}},
                "pg_catalog.pg_class": {"columns": {"x": {"type": "text"}}},
                "customers": {"columns": {"e-mail": {"type": "text"}, "ssn": "text", "dob": {"encrypt": True}}},
                "public.customers": {"columns": {"x": {"type": "money", "length": 1}}},
                "empty": {"columns": {}},
                "none": None,
            }
        }
    )
    assert errors == [
        "tables.a.b.c: must be 'schema.table' or 'table', each name matching [a-z_][a-z0-9_$]* and at most"
        " 63 characters",
        "tables.\"Quoted\": must be 'schema.table' or 'table', each name matching [a-z_][a-z0-9_$]* and at most"
        " 63 characters",
        "tables.pg_catalog.pg_class: schema 'pg_catalog' is reserved and cannot hold protected tables",
        "tables.customers.columns.e-mail: column name must match [a-z_][a-z0-9_$]* and be at most 63 characters",
        "tables.customers.columns.ssn: must be a mapping like {type: text, encrypt: true}, got 'text'",
        "tables.customers.columns.dob.type: required (one of bool, bytea, char, date, float4, float8, int2, int4,"
        " int8, json, jsonb, numeric, text, timestamp, timestamptz, uuid, varchar)",
        "tables.public.customers.columns.x.length: unknown setting",
        "tables.public.customers.columns.x.type: must be one of bool, bytea, char, date, float4, float8, int2, int4,"
        " int8, json, jsonb, numeric, text, timestamp, timestamptz, uuid, varchar, got 'money'",
        "tables.public.customers: names the same table as another entry (public.customers)",
        "tables.empty.columns: must list at least one column",
        "tables.none.columns: required (a mapping of column name to settings)",
    ]


def test_duplicate_columns_after_case_folding() -> None:
    assert errors_of(one_table({"Email": {"type": "text"}, "email": {"type": "text"}})) == [
        "tables.public.t.columns.email: names the same column as another entry (email)"
    ]


def test_long_identifiers_are_refused() -> None:
    assert parse(one_table({"c" * 63: {"type": "text"}}, name="t" * 63)).tables[0].columns[0].name == "c" * 63
    assert errors_of(one_table({"c" * 64: {"type": "text"}}))[0].startswith("tables.public.t.columns.cccc")


# -- reload -------------------------------------------------------------------------------------------


def test_reload_diff_lists_only_settings_that_need_a_restart() -> None:
    old = parse({})
    new = parse({"listen": "127.0.0.1:7000", "admin": {"listen": None}, "logging": {"level": "debug"}})
    assert old.reload_diff(new) == [
        "listen: changing 127.0.0.1:6432 to 127.0.0.1:7000 needs a restart; keeping the running value",
        "admin.listen: changing 127.0.0.1:9187 to null needs a restart; keeping the running value",
    ]
    assert old.reload_diff(parse({"logging": {"level": "debug"}})) == []
    kept = new.keeping_restart_settings(old)
    assert kept.listen == old.listen
    assert kept.admin == old.admin
    assert kept.logging == LoggingConfig(level=LogLevel.DEBUG)


# -- loading files ------------------------------------------------------------------------------------


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", environ=NO_ENV)
    assert info.value.errors == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_yaml_syntax_error_gives_line_and_column_but_no_content(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text("keystore:\n  dsn: postgresql://u:hunter2@db/k\n  cache: [1, 2\nlogging: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=NO_ENV)
    [error] = info.value.errors
    assert re.fullmatch(rf"{re.escape(str(path))}:4:\d+: YAML syntax error: .+", error), error
    assert "hunter2" not in str(info.value)


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text("upstream:\n  port: 5432\n  port: 5433\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=NO_ENV)
    assert info.value.errors == [f"{path}:3:3: YAML syntax error: duplicate key 'port'"]


def test_load_resolves_paths_and_checks_referenced_files(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "server.crt").write_text("cert")
    path = tmp_path / "pgveil.yaml"
    path.write_text("client_tls:\n  cert_file: tls/server.crt\n  key_file: tls/server.key\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=NO_ENV)
    assert info.value.errors == [
        f"client_tls.key_file: {tmp_path / 'tls' / 'server.key'} does not exist or is not a file"
    ]
    (tmp_path / "tls" / "server.key").write_text("key")
    config = load_config(path, environ=NO_ENV)
    assert config.client_tls == ClientTLSConfig(tmp_path / "tls/server.crt", tmp_path / "tls/server.key")
    assert config.source_path == path
    assert check_files(config) == []


def test_overrides_replace_listen_and_upstream(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text("listen: 127.0.0.1:1111\nupstream:\n  host: a\n  port: 1\n  tls: disable\n")
    config = load_config(path, overrides={"listen": "[::1]:0", "upstream": "db.internal:6543"}, environ=NO_ENV)
    assert config.listen == (HostPort("::1", 0),)
    assert config.upstream == UpstreamConfig(host="db.internal", port=6543, tls=TLSMode.DISABLE)
    same = load_config(path, overrides={"listen": None, "upstream": None}, environ=NO_ENV)
    assert same.listen == (HostPort("127.0.0.1", 1111),)


def test_bad_overrides_are_named_by_their_flag(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text("upstream: {prot: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides={"listen": "nowhere", "upstream": "db:0", "lisen": "x"}, environ=NO_ENV)
    assert info.value.errors == [
        "--lisen: unknown override (did you mean 'listen'?)",
        "--listen: must be 'HOST:PORT' with a port between 0 and 65535, got 'nowhere'",
        "--upstream: must be 'HOST:PORT' with a port between 1 and 65535, got 'db:0'",
        "upstream.prot: unknown setting (did you mean 'port'?)",
    ]


def test_default_path_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None, environ=NO_ENV) == Config()
    (tmp_path / "pgveil.yaml").write_text("logging: {level: debug}\n")
    assert load_config(None, environ=NO_ENV).logging.level is LogLevel.DEBUG
    other = tmp_path / "other.yaml"
    other.write_text("logging: {level: error}\n")
    assert load_config(None, environ={"PGVEIL_CONFIG": str(other)}).logging.level is LogLevel.ERROR
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, environ={"PGVEIL_CONFIG": str(tmp_path / "missing.yaml")})


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text("# nothing yet\n")
    assert dataclasses.replace(load_config(path, environ=NO_ENV), source_path=None) == Config()


def test_read_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\nignored\n")
    assert read_secret_file(secret) == "s3cret"
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        read_secret_file(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret_file(tmp_path / "absent")


def test_sessions_section_round_trip() -> None:
    values = {
        "max_client_connections": 5,
        "shutdown_timeout": 0,
        "max_message_size": 8192,
        "startup_timeout": 2.5,
        "idle_buffer_limit": 4096,
    }
    assert parse({"sessions": values}).sessions == SessionsConfig(**values)  # type: ignore[arg-type]


# -- tables.<t>.subject ------------------------------------------------------------------------------


def _subject_table(subject: Any, columns: dict[str, Any] | None = None) -> dict[str, Any]:
    cols = columns if columns is not None else {"email": {"type": "text", "encrypt": True}}
    return {"tables": {"public.customers": {"subject": subject, "columns": cols}}}


def test_subject_is_parsed_and_reaches_the_catalog() -> None:
    config = parse(_subject_table({"kind": "Customer", "column": "id"}))
    (table,) = config.tables
    assert table.subject is not None
    assert (table.subject.kind, table.subject.column) == ("customer", "id")
    protected = config.catalog().tables[("public", "customers")]
    assert protected.subject is not None
    assert protected.subject.kind == "customer"
    assert protected.columns["email"].subject_kind == "customer"


def test_without_subject_columns_have_column_keys() -> None:
    config = parse(one_table({"email": {"type": "text", "encrypt": True}}))
    protected = config.catalog().tables[("public", "t")]
    assert protected.subject is None
    assert protected.columns["email"].subject_kind is None


def test_plain_columns_of_a_subject_table_have_no_subject_kind() -> None:
    cols = {"email": {"type": "text", "encrypt": True}, "phone": {"type": "text"}}
    protected = parse(_subject_table({"kind": "c", "column": "id"}, cols)).catalog().tables[("public", "customers")]
    assert protected.columns["phone"].subject_kind is None


@pytest.mark.parametrize(
    ("subject", "columns", "expected"),
    [
        ("id", None, "tables.public.customers.subject: must be a mapping"),
        ({"column": "id"}, None, "tables.public.customers.subject.kind: required"),
        ({"kind": "customer"}, None, "tables.public.customers.subject.column: required"),
        ({"kind": "a b", "column": "id"}, None, "tables.public.customers.subject.kind: must match"),
        ({"kind": "c", "column": 5}, None, "tables.public.customers.subject.column: must match"),
        ({"kind": "c", "column": "id", "extra": 1}, None, "tables.public.customers.subject"),
        (
            {"kind": "c", "column": "email"},
            None,
            "tables.public.customers.subject.column: the subject column email must not itself be encrypted",
        ),
    ],
)
def test_subject_errors_name_the_dotted_path(subject: Any, columns: Any, expected: str) -> None:
    errors = errors_of(_subject_table(subject, columns))
    assert any(e.startswith(expected) for e in errors), errors
