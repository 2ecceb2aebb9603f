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
        "CREATE ROLE pe_stranger LOGIN; END IF; END $$"
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
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "cannot reach the service connection" in failed.stderr
