"""``pgveil policy explain`` and ``pgveil catalog snapshot`` as an operator runs them: online through the
service connection and offline from a snapshot, text and JSON, exit codes 0 (allowed), 1 (refused) and 2
(usage, configuration, snapshot or connection problems), one line on stderr and never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from conftest import APP_PASSWORD

from proxy.cli_policy import ReplayConnection, take_snapshot
from proxy.config import parse_config
from proxy.devcluster import DevCluster
from proxy.schema import apply_schema, plan_schema

pytestmark = pytest.mark.integration

TABLE = "pe_customers"
REPO = Path(__file__).resolve().parents[2]


def config_data(pg: DevCluster, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "upstream": {"host": "127.0.0.1", "port": pg.port, "tls": "disable"},
        "service": {"dsn": pg.dsn(dbname="app")},
        "tables": {
            f"public.{TABLE}": {
                "columns": {
                    "email": {"type": "text", "encrypt": True},
                    "ssn": {"type": "text", "encrypt": True},
                    "phone": {"type": "text"},
                }
            }
        },
    }
    data.update(extra)
    return data


@pytest.fixture(scope="module")
def schema(pg: DevCluster) -> None:
    async def create() -> None:
        app = await asyncpg.connect(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{pg.port}/app")
        try:
            await app.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} (id int PRIMARY KEY, name text, email text, ssn text, phone text)"
            )
        finally:
            await app.close()
        catalog = parse_config(config_data(pg), base_dir=Path.cwd(), environ={}).catalog()
        service = await asyncpg.connect(pg.dsn(dbname="app"))
        try:
            await apply_schema(service, await plan_schema(service, catalog))
        finally:
            await service.close()

    asyncio.run(create())
    pg.psql(
        "DO $$ BEGIN "
        "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pe_support') THEN "
        "CREATE ROLE pe_support NOLOGIN; CREATE ROLE pe_agent LOGIN IN ROLE pe_support; "
        "CREATE ROLE pe_stranger LOGIN; CREATE ROLE pe_contractor LOGIN; END IF; END $$"
    )


def pgveil(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PGVEIL_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "pgveil.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_snapshot_replays_to_the_catalog_read_online(pg: DevCluster, schema: None, tmp_path: Path) -> None:
    config = parse_config(config_data(pg), base_dir=tmp_path, environ={})

    async def both() -> None:
        snap, data = await take_snapshot(config, lambda: asyncpg.connect(pg.dsn(dbname="app")))
        from proxy.catalog_loader import load_catalog

        replayed, problems = await load_catalog(
            ReplayConnection(json.loads(json.dumps(data))["catalog_reads"]), config.catalog()
        )
        assert replayed == snap.catalog
        assert tuple(problems) == snap.problems
        assert snap.catalog.tables[("public", TABLE)].oid
        assert "pe_agent" in snap.membership.roles

    asyncio.run(both())


def test_snapshot_command_writes_a_file_and_fails_cleanly(pg: DevCluster, schema: None, tmp_path: Path) -> None:
    pg.psql(f"INSERT INTO {TABLE} (id, name) VALUES (9001, 'CANARY-NAME-7731') "
            "ON CONFLICT DO NOTHING", dbname="app")  # fmt: skip
    cfg = write_config(tmp_path, config_data(pg))
    out = tmp_path / "catalog.json"
    done = pgveil("catalog", "snapshot", "--config", str(cfg), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "catalog snapshot written" in done.stdout
    data = json.loads(out.read_text())
    assert data["format"] == "pgveil-catalog-snapshot"
    assert any(m["member"] == "pe_agent" and m["role"] == "pe_support" for m in data["membership"]["memberships"])
    # No table contents: the snapshot holds catalog answers only.
    assert "CANARY" not in out.read_text()

    down = write_config(tmp_path, config_data(pg, service={"dsn": "postgresql://x@127.0.0.1:1/app"}))
    failed = pgveil("catalog", "snapshot", "--config", str(down), "--out", str(tmp_path / "x.json"), cwd=tmp_path)
    assert failed.returncode == 3  # unreachable (docs/cli.md's exit codes)
    assert "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "the service connection" in failed.stderr


ROLES = {
    "default": "hidden",
    "pe_support": {
        f"public.{TABLE}.email": "plaintext",
        f"public.{TABLE}.ssn": "masked:last4",
        f"public.{TABLE}.phone": "masked:partial",
    },
    "pe_contractor": {f"public.{TABLE}.*": "deny"},
}


def explain(
    tmp_path: Path, pg: DevCluster, role: str, sql: str, *extra: str, roles: Any = None
) -> subprocess.CompletedProcess[str]:
    cfg = write_config(tmp_path, config_data(pg, roles=ROLES if roles is None else roles))
    return pgveil("policy", "explain", "--config", str(cfg), "--role", role, *extra, sql, cwd=tmp_path)


def as_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_a_member_of_support_gets_the_groups_grants_column_by_column(
    pg: DevCluster, schema: None, tmp_path: Path
) -> None:
    done = explain(tmp_path, pg, "pe_agent", f"SELECT id, email, ssn, phone FROM {TABLE}", "--json")
    assert done.returncode == 0, done.stderr
    data = as_json(done)
    assert data["allowed"] is True
    assert data["policy_roles"] == ["pe_support"]
    cols = data["statements"][0]["columns"]
    assert [c["column"] for c in cols] == [
        None,
        f"public.{TABLE}.email",
        f"public.{TABLE}.ssn",
        f"public.{TABLE}.phone",
    ]
    assert [c["outcome"] for c in cols] == ["as stored", "plaintext", "masked", "masked"]
    assert "last4" in cols[2]["detail"]
    assert cols[2]["source"] == f"pe_support: public.{TABLE}.ssn"
    text = explain(tmp_path, pg, "pe_agent", f"SELECT id, email, ssn, phone FROM {TABLE}")
    assert text.returncode == 0
    assert "last4" in text.stdout
    assert f"pe_support: public.{TABLE}.ssn" in text.stdout


def test_an_unlisted_role_gets_the_default(pg: DevCluster, schema: None, tmp_path: Path) -> None:
    data = as_json(explain(tmp_path, pg, "pe_stranger", f"SELECT ssn, phone FROM {TABLE}", "--json"))
    assert data["policy_roles"] == []
    assert [(c["outcome"], c["source"]) for c in data["statements"][0]["columns"]] == [("NULL", "default")] * 2


@pytest.mark.parametrize(
    ("role", "sql", "sqlstate", "words"),
    [
        ("pe_agent", f"SELECT id FROM {TABLE} ORDER BY phone", "42501", f"public.{TABLE}.phone"),
        ("pe_agent", f"SELECT id FROM {TABLE} WHERE phone LIKE '1%'", "42501", f"public.{TABLE}.phone"),
        ("pe_contractor", f"SELECT * FROM {TABLE}", "42501", "denied"),
        ("pe_agent", f"SELECT id FROM {TABLE} WHERE ssn LIKE '1%'", "0A000", f"public.{TABLE}.ssn"),
        ("pe_agent", f"COPY {TABLE} (id, phone) TO STDOUT (FORMAT binary)", "42501", "binary COPY TO"),
    ],
)
def test_refusals_name_the_sqlstate_and_exit_1(
    pg: DevCluster, schema: None, tmp_path: Path, role: str, sql: str, sqlstate: str, words: str
) -> None:
    done = explain(tmp_path, pg, role, sql)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"refused with SQLSTATE {sqlstate}" in done.stdout
    assert words in done.stdout
    assert "1%" not in done.stdout  # the statement's literals are not echoed


def test_copy_to_in_text_shows_each_column(pg: DevCluster, schema: None, tmp_path: Path) -> None:
    done = explain(tmp_path, pg, "pe_agent", f"COPY {TABLE} (id, ssn) TO STDOUT", "--json")
    assert done.returncode == 0, done.stdout + done.stderr


def test_offline_from_a_snapshot_answers_as_online(pg: DevCluster, schema: None, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, config_data(pg, roles=ROLES))
    snap = tmp_path / "snap.json"
    assert pgveil("catalog", "snapshot", "--config", str(cfg), "--out", str(snap), cwd=tmp_path).returncode == 0
    # Offline: the service connection is unreachable, the snapshot is all there is.
    (tmp_path / "off").mkdir()
    unreachable = {"dsn": "postgresql://x@127.0.0.1:1/app"}
    offline_cfg = write_config(tmp_path / "off", config_data(pg, roles=ROLES, service=unreachable))
    cases = [
        ("pe_agent", f"SELECT * FROM {TABLE}"),
        ("pe_contractor", f"SELECT * FROM {TABLE}"),
        ("pe_agent", f"SELECT id FROM {TABLE} ORDER BY phone"),
    ]
    for role, sql in cases:
        online = pgveil("policy", "explain", "--config", str(cfg), "--role", role, "--json", sql, cwd=tmp_path)
        offline = pgveil(
            "policy", "explain", "--config", str(offline_cfg), "--role", role, "--catalog", str(snap), "--json", sql,
            cwd=tmp_path,
        )  # fmt: skip
        assert (offline.returncode, as_json(offline)) == (online.returncode, as_json(online))


def test_problems_exit_2_with_one_line(pg: DevCluster, schema: None, tmp_path: Path) -> None:
    bad_roles = {"pe_support": {f"public.{TABLE}.ssn": "masked:last5"}}
    done = explain(tmp_path, pg, "pe_agent", f"SELECT ssn FROM {TABLE}", roles=bad_roles)
    assert done.returncode == 2
    assert "roles.pe_support" in done.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    done = explain(tmp_path, pg, "pe_agent", "SELECT 1", "--catalog", str(junk))
    assert (done.returncode, len(done.stderr.strip().splitlines())) == (2, 1)
    assert "not a catalog snapshot" in done.stderr
    done = explain(tmp_path, pg, "pe_agent", "SELECT 1", "--catalog", str(tmp_path / "missing.json"))
    assert done.returncode == 2
    assert "cannot read the catalog snapshot" in done.stderr
    usage = pgveil("policy", "explain", "SELECT 1", cwd=tmp_path)
    assert usage.returncode == 2
    for d in (done, usage):
        assert "Traceback" not in d.stderr
