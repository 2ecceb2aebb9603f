"""Every ``pgveil`` error path an operator meets on a first run gives one clear message on stderr and its
documented exit code (docs/cli.md), never a traceback, never a password: a bad setting (its dotted path),
a tokens file that is missing or invalid, an unknown or unbuilt key provider (rejected by ``check``), an
unreachable keystore or upstream (host, port, the OS's reason), a refused login, and missing privileges
on the keystore and on the service connection (with the GRANT that fixes them).

The commands run as an operator runs them: ``python -m proxy.cli`` in a subprocess, against the real
PostgreSQL of the test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.devcluster import DevCluster, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DB = "clierr"
ROLE = "cli_noperm"
PASSWORD = "pw-cli-" + uuid.uuid4().hex
WRONG = "pw-wrong-" + uuid.uuid4().hex
TABLES = {"public.cli_cards": {"columns": {"pan": {"type": "text", "encrypt": True}}}}


def pgveil(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PGVEIL_", "PG"))}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=120, env=environ, cwd=cwd
    )


def fails(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """``r`` failed with ``code``, one message on stderr starting ``pgveil:``, naming every needle."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stderr.startswith("pgveil: "), r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)
    for secret in (PASSWORD, WRONG):
        assert secret not in r.stdout + r.stderr
    return r.stderr


@pytest.fixture(scope="module")
def clidb(pg: DevCluster) -> str:
    pg.psql(f"CREATE DATABASE {DB}")  # owned by the superuser: the role below may not create schemas in it
    pg.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
    pg.psql(f"CREATE TABLE cli_cards (id int PRIMARY KEY, pan text); GRANT SELECT ON cli_cards TO {ROLE}", dbname=DB)
    return DB


def write_config(directory: Path, **settings: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "upstream": {"host": "127.0.0.1", "port": 5432, "tls": "disable"},
        "tables": TABLES,
        "roles": {"default": "plaintext"},
        "keystore": {"master_key": {"provider": "local", "path": str(directory / "master.key")}},
    }
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = directory / "pgveil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def keystore_at(pg: DevCluster, directory: Path, password: str, *, port: int | None = None) -> dict[str, Any]:
    pw = directory / "keystore.password"
    directory.mkdir(parents=True, exist_ok=True)
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    return {
        "dsn": f"postgresql://{ROLE}@127.0.0.1:{port or pg.port}/{DB}",
        "password_file": str(pw),
        "master_key": {"provider": "local", "path": str(directory / "master.key")},
    }


# -- configuration (exit 2, rejected by check) -----------------------------------------------------------


def test_a_bad_setting_is_named_by_its_dotted_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, upstream={"port": "not-a-port"}, sessions={"workers": 0})
    stderr = fails(
        pgveil("check", "--config", str(path)), 2, "invalid configuration", "upstream.port", "sessions.workers"
    )
    assert len([ln for ln in stderr.splitlines() if ln.startswith("  ")]) == 2  # one line per problem


def test_a_missing_config_file_is_one_message(tmp_path: Path) -> None:
    fails(pgveil("check", "--config", str(tmp_path / "nope.yaml")), 2, "nope.yaml")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read it"),
        ("- {name: x", "admin.tokens_file"),
        ("- {name: ops, sha256: abc, scopes: [admin:read]}", "admin.tokens_file"),
        ("- {name: ops, sha256: " + "0" * 64 + ", scopes: [admin:everything]}", "admin:everything"),
    ],
    ids=["missing", "not-yaml", "bad-digest", "unknown-scope"],
)
def test_check_rejects_a_tokens_file_it_cannot_use(tmp_path: Path, content: str | None, needle: str) -> None:
    tokens = tmp_path / "tokens.yaml"
    if content is not None:
        tokens.write_text(content)
    path = write_config(tmp_path, admin={"tokens_file": str(tokens)})
    fails(pgveil("check", "--config", str(path)), 2, "admin.tokens_file", needle)


def test_check_accepts_a_good_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump([{"name": "ops", "sha256": "a" * 64, "scopes": ["admin:read"]}]))
    r = pgveil("check", "--config", str(write_config(tmp_path, admin={"tokens_file": str(tokens)})))
    assert r.returncode == 0, r.stderr
    assert "admin.tokens_file: 1 tokens" in r.stdout


def test_check_rejects_an_unknown_provider(tmp_path: Path) -> None:
    path = write_config(tmp_path, keystore={"master_key": {"provider": "kms", "key": "arn:x"}})
    fails(pgveil("check", "--config", str(path)), 2, "keystore.master_key.provider", "kms")


def pkcs11_key(tmp_path: Path, module: Path) -> dict[str, Any]:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    return {
        "master_key": {
            "provider": "pkcs11",
            "module": str(module),
            "token_label": "pgveil",
            "key_label": "kek",
            "pin_file": str(pin),
        }
    }


def test_check_rejects_a_pkcs11_module_that_is_not_there(tmp_path: Path) -> None:
    path = write_config(tmp_path, keystore=pkcs11_key(tmp_path, tmp_path / "missing" / "libsofthsm2.so"))
    fails(pgveil("check", "--config", str(path)), 2, "keystore.master_key.module", "does not exist")


def test_check_rejects_pkcs11_without_python_pkcs11(tmp_path: Path) -> None:
    # An installation without the python-pkcs11 package: a package of that name that cannot be imported
    # shadows the real one.
    shim = tmp_path / "shim" / "pkcs11"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('python-pkcs11 is not installed here')\n")
    module = tmp_path / "libpkcs11.so"
    module.write_bytes(b"\x7fELF")
    path = write_config(tmp_path, keystore=pkcs11_key(tmp_path, module))
    r = pgveil("check", "--config", str(path), env={"PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"})
    fails(r, 2, "keystore.master_key.provider", "python-pkcs11")


def test_usage_errors_are_one_message(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    fails(pgveil("serve", "--worker", "--config", str(path)), 2, "started by a supervisor")


# -- servers (exit 3) ------------------------------------------------------------------------------------


def test_an_unreachable_keystore_names_host_port_and_reason(tmp_path: Path, pg: DevCluster) -> None:
    dead = free_port()
    path = write_config(tmp_path, keystore=keystore_at(pg, tmp_path, PASSWORD, port=dead))
    for command in (("keystore", "init"), ("keys", "list-keks"), ("jobs", "status"), ("admin", "keys")):
        fails(
            pgveil(*command, "--config", str(path)),
            3,
            f"cannot connect to the keystore at 127.0.0.1:{dead}: Connection refused",
        )


def test_check_connect_names_an_unreachable_upstream(tmp_path: Path, pg: DevCluster, clidb: str) -> None:
    dead = free_port()
    path = write_config(
        tmp_path, upstream={"port": dead, "connect_timeout": 2}, keystore=keystore_at(pg, tmp_path, PASSWORD)
    )
    fails(pgveil("check", "--connect", "--config", str(path)), 3, f"upstream: cannot connect to 127.0.0.1:{dead}")
    r = pgveil("check", "--config", str(path))  # offline, check does not reach the servers
    assert r.returncode == 0, r.stderr


def test_a_refused_login_names_the_role_and_not_the_password(tmp_path: Path, pg: DevCluster, clidb: str) -> None:
    path = write_config(tmp_path, keystore=keystore_at(pg, tmp_path, WRONG))
    fails(
        pgveil("keystore", "init", "--config", str(path)),
        3,
        f"the keystore at 127.0.0.1:{pg.port} (role {ROLE}, database {DB}) refused the login",
        "28P01",
    )


# -- privileges (exit 4) ---------------------------------------------------------------------------------


def test_missing_privileges_on_the_keystore_say_which_grants_fix_them(
    tmp_path: Path, pg: DevCluster, clidb: str
) -> None:
    path = write_config(tmp_path, upstream={"port": pg.port}, keystore=keystore_at(pg, tmp_path, PASSWORD))
    # keystore init: the role may not create schema pgveil in a database it does not own.
    stderr = fails(pgveil("keystore", "init", "--config", str(path)), 4, "permission denied for database clierr")
    assert f"GRANT CREATE ON DATABASE {DB} TO {ROLE};" in stderr
    r = pgveil("check", "--connect", "--config", str(path))
    fails(r, 4, f"GRANT CREATE ON DATABASE {DB} TO {ROLE};")
    # Once a superuser created it, the role still needs its grants on schema pgveil.
    pg.psql("SELECT 1", dbname=DB)
    superuser = write_config(tmp_path / "su", keystore={"dsn": pg.dsn(dbname=DB)})
    done = pgveil("keystore", "init", "--config", str(superuser))
    assert done.returncode == 0, done.stderr
    stderr = fails(pgveil("jobs", "status", "--config", str(path)), 4, "permission denied for schema pgveil")
    assert f"GRANT USAGE ON SCHEMA pgveil TO {ROLE};" in stderr
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgveil TO {ROLE};" in stderr
    fails(pgveil("check", "--connect", "--config", str(path)), 4, "lacks USAGE on schema pgveil")
    # With the grants the message named, the same commands work.
    pg.psql(
        f"GRANT USAGE ON SCHEMA pgveil TO {ROLE}; "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgveil TO {ROLE}; "
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pgveil TO {ROLE};",
        dbname=DB,
    )
    r = pgveil("jobs", "status", "--config", str(path))
    assert r.returncode == 0, r.stderr
    r = pgveil("check", "--connect", "--config", str(path.parent / "pgveil.yaml"))
    assert "schema pgveil readable and writable" in r.stdout, r.stdout + r.stderr


def test_missing_privileges_on_the_service_connection_say_what_fixes_them(
    tmp_path: Path, pg: DevCluster, clidb: str
) -> None:
    ks = keystore_at(pg, tmp_path, PASSWORD)
    path = write_config(
        tmp_path,
        keystore={"dsn": pg.dsn(dbname=DB), "master_key": ks["master_key"]},
        service={"dsn": ks["dsn"], "password_file": ks["password_file"]},
    )
    stderr = fails(pgveil("schema", "apply", "--config", str(path)), 4, "permission denied for table cli_cards")
    assert f"OWNER TO {ROLE}" in stderr
    assert "the service connection" in stderr


def test_serve_names_the_grant_its_keystore_role_lacks_and_recovers_once_granted(
    tmp_path: Path, pg: DevCluster
) -> None:
    """``pgveil serve`` does not exit on a missing privilege (it retries, so a grant given later takes):
    its log line names the privilege and the GRANT, as the commands' messages do."""
    from conftest import ProxyProcess, wait_until

    suffix = uuid.uuid4().hex[:8]
    db, role, password = f"cliserve_{suffix}", f"cli_serve_{suffix}", "pw-serve-" + uuid.uuid4().hex
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    pg.psql(f"CREATE DATABASE {db}")  # owned by the superuser: the role may not create schema pgveil in it
    pg.psql("CREATE TABLE serve_cards (id int PRIMARY KEY, pan text)", dbname=db)
    pw = tmp_path / "keystore.password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    cfg: dict[str, Any] = {
        "upstream": {"host": "127.0.0.1", "port": pg.port, "tls": "disable"},
        "tables": {"public.serve_cards": {"columns": {"pan": {"type": "text", "encrypt": True}}}},
        "roles": {"default": "plaintext"},
        "keystore": {
            "dsn": f"postgresql://{role}@127.0.0.1:{pg.port}/{db}",
            "password_file": str(pw),
            "master_key": {"provider": "local", "path": str(tmp_path / "master.key")},
        },
        "service": {"dsn": pg.dsn(dbname=db)},
    }
    (tmp_path / "apply.yaml").write_text(yaml.safe_dump(cfg))
    applied = pgveil("schema", "apply", "--config", str(tmp_path / "apply.yaml"))
    assert applied.returncode == 0, applied.stderr
    p = ProxyProcess(cfg, tmp_path / "serve")
    p.start()
    try:
        grant = f"GRANT CREATE ON DATABASE {db} TO {role};"
        assert wait_until(lambda: grant in p.logs(), timeout=30), p.logs()
        line = next(ln for ln in p.logs().splitlines() if grant in ln)
        assert "WARNING proxy.encrypt.runtime cannot load keys from the keystore (KeystoreError: the keystore" in line
        assert f"(role {role}, database {db}) lacks a privilege: permission denied for database {db}" in line
        assert "(SQLSTATE 42501); as the owner or a superuser, run:" in line
        assert "Traceback" not in p.logs()
        assert password not in p.logs()

        def ready() -> bool:
            try:
                with urllib.request.urlopen(p.admin_url + "/readyz", timeout=5) as r:
                    return int(r.status) == 200
            except (urllib.error.URLError, OSError):
                return False

        # The operator runs what the line says; the next line (if any) names what is still missing (here the
        # grants on schema pgveil, which schema apply created as the superuser), until pgveil is ready.
        assert not ready()
        done: list[str] = []
        for _ in range(4):
            hinted = [ln for ln in p.logs().splitlines() if "as the owner or a superuser, run: " in ln]
            statements = hinted[-1].split("run: ", 1)[1].rsplit("); retrying", 1)[0]
            if statements not in done:
                pg.psql(statements, dbname=db)
                done.append(statements)
            if wait_until(ready, timeout=10):
                break
        assert ready(), p.logs()
        assert done[0].startswith(grant)
        assert len(done) == 2  # then the grants on schema pgveil (or its ownership, for the migrations)
        assert f"ALTER SCHEMA pgveil OWNER TO {role};" in done[1]
    finally:
        p.stop()
