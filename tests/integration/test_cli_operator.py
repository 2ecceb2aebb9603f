"""The operator commands against a real cluster: ``pgveil keystore init``, ``pgveil schema apply``,
and the legacy FunctionCall path (libpq's large-object functions) through both relay modes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml
from conftest import APP_PASSWORD, ProxyProcess

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration


def pgveil(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def db(pg: DevCluster) -> str:
    name = f"cli_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name} OWNER app")
    return name


def write_config(tmp_path: Path, pg: DevCluster, db: str) -> Path:
    cfg = {
        "upstream": {"host": "127.0.0.1", "port": pg.port, "tls": "disable"},
        "keystore": {
            "dsn": f"postgresql://postgres@127.0.0.1:{pg.port}/{db}",
            "password_file": "ks.pw",
            "master_key": {"provider": "local", "path": "master.key"},
        },
        "tables": {
            "public.people": {
                "columns": {"email": {"type": "text", "encrypt": True}, "born": {"type": "date", "encrypt": True}}
            }
        },
        "roles": {"default": "plaintext"},
    }
    (tmp_path / "ks.pw").write_text("pgveil-super\n")
    path = tmp_path / "pgveil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_keystore_init_is_idempotent(tmp_path: Path, pg: DevCluster, db: str) -> None:
    config = write_config(tmp_path, pg, db)
    first = pgveil("keystore", "init", "--config", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "applied migrations" in first.stdout
    second = pgveil("keystore", "init", "--config", str(config), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert "pgveil-super" not in first.stdout + first.stderr + second.stdout + second.stderr
    tables = pg.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname='pgveil'",
                     dbname=db)  # fmt: skip
    assert "deks" in tables


def column_type(pg: DevCluster, db: str, column: str) -> str:
    sql = "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'people'::regclass AND attname = "
    return pg.psql(f"{sql}'{column}'", dbname=db).strip()


def test_schema_apply_dry_run_then_apply(tmp_path: Path, pg: DevCluster, db: str) -> None:
    pg.psql("CREATE TABLE people (id serial PRIMARY KEY, name text, email text, born date)", dbname=db)
    config = write_config(tmp_path, pg, db)
    dry = pgveil("schema", "apply", "--dry-run", "--config", str(config), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "would run" in dry.stdout
    assert column_type(pg, db, "email") == "text"
    applied = pgveil("schema", "apply", "--config", str(config), cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert column_type(pg, db, "email") == "bytea"
    again = pgveil("schema", "apply", "--config", str(config), cwd=tmp_path)
    assert "nothing to do" in again.stdout
    with pytest.raises(RuntimeError, match="pgveil_envelope_email"):
        pg.psql("INSERT INTO people (email) VALUES ('plain'::bytea)", dbname=db)


def test_schema_apply_refuses_a_column_with_data(tmp_path: Path, pg: DevCluster, db: str) -> None:
    pg.psql("CREATE TABLE people (id serial PRIMARY KEY, email text, born date)", dbname=db)
    pg.psql("INSERT INTO people (email) VALUES ('someone@example.com')", dbname=db)
    config = write_config(tmp_path, pg, db)
    out = pgveil("schema", "apply", "--config", str(config), cwd=tmp_path)
    assert out.returncode != 0
    assert "people.email" in out.stderr
    assert "someone@example.com" not in out.stderr + out.stdout


@pytest.mark.parametrize("which", ["proxy", "light_proxy"])
def test_large_objects_use_function_call(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """psql's \\lo_import / \\lo_export go through libpq's PQfn, i.e. the FunctionCall message."""
    p: ProxyProcess = request.getfixturevalue(which)
    data = os.urandom(300_000)
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    env = dict(os.environ, PGPASSWORD=APP_PASSWORD)
    base = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", p.host, "-p", str(p.port), "-U", "app", "app"]
    out = subprocess.run([*base, "-c", f"\\lo_import {src}"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    oid = out.stdout.split()[-1]
    out = subprocess.run([*base, "-c", f"\\lo_export {oid} {dst}"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert dst.read_bytes() == data
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        conn.execute("SELECT lo_unlink(%s)", (int(oid),))
        assert conn.execute("SELECT 1").fetchone() == (1,)
