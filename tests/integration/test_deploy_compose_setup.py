"""The docker compose example's setup, run without an engine against the suite's PostgreSQL.

What the containers would do, in their order, with the example's own files: the postgres container's
init script (``deploy/postgres/10-shop.sh``, which runs the guide's ``pgveil-roles.psql``) on a fresh
database ``shop``, then the ``pgveil-schema`` service's command and the ``pgveil`` service's command from
``deploy/docker-compose.yml`` with ``deploy/pgveil/*.yaml``. Only what the containers would provide is
replaced: the host ``postgres`` and its port, ``/run/secrets``, the key volume, the listen addresses. Then
the application role the init script made writes and reads the encrypted column through that pgveil.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy.devcluster import SUPERUSER_PASSWORD, DevCluster, free_port, running_cluster, wait_for_port

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SECRETS = {
    "postgres_password": SUPERUSER_PASSWORD,
    "pgveil_keystore_password": "compose-keystore-secret",
    "pgveil_service_password": "compose-service-secret",
    "shop_app_password": "compose-app-secret",
}


@pytest.fixture
def shop() -> Iterator[DevCluster]:
    """A cluster of its own: the example creates cluster-wide roles (``support``) that other modules'
    fixtures create too."""
    with running_cluster() as pg:
        pg.psql("CREATE DATABASE shop")  # what POSTGRES_DB=shop makes: owned by the superuser
        yield pg


def compose_command(service: str) -> list[str]:
    services: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    command: list[str] = services[service]["command"]
    return command


def test_the_compose_example_sets_up_and_serves(shop: DevCluster, tmp_path: Path) -> None:
    pg = shop
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, value in SECRETS.items():
        (secrets / name).write_text(value + "\n")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)

    # The postgres container's first start: docker-entrypoint-initdb.d/10-shop.sh, as the superuser.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PATH=f"{pg.bin}:{env.get('PATH', '')}",
        PGHOST="127.0.0.1",
        PGPORT=str(pg.port),
        PGPASSWORD=SUPERUSER_PASSWORD,
        POSTGRES_USER="postgres",
        PGVEIL_SECRETS_DIR=str(secrets),
    )
    init = subprocess.run(
        ["sh", str(DEPLOY / "postgres" / "10-shop.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stderr

    # The pgveil containers' /etc/pgveil, with what compose would mount and publish.
    proxy_port, admin_port = free_port(), free_port()
    while admin_port == proxy_port:
        admin_port = free_port()
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("pgveil.yaml", "pgveil-dba.yaml"):
        text = (DEPLOY / "pgveil" / name).read_text()
        text = (
            text.replace("@postgres:5432/", f"@127.0.0.1:{pg.port}/")
            .replace("host: postgres, port: 5432", f"host: 127.0.0.1, port: {pg.port}")
            .replace("/run/secrets/", f"{secrets}/")
            .replace("/var/lib/pgveil/", f"{keys}/")
            .replace("0.0.0.0:6432", f"127.0.0.1:{proxy_port}")
            .replace("0.0.0.0:9187", f"127.0.0.1:{admin_port}")
        )
        assert "postgres:5432" not in text
        (etc / name).write_text(text)

    def argv(service: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "proxy.cli",
            *(a.replace("/etc/pgveil/", f"{etc}/") for a in compose_command(service)),
        ]

    schema = subprocess.run(
        argv("pgveil-schema"), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr
    assert "pgveil_envelope_ssn" in schema.stdout

    log_path = tmp_path / "pgveil.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv("pgveil"), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for_port("127.0.0.1", proxy_port, timeout=20)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=3) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        app = f"postgresql://shop_app:{SECRETS['shop_app_password']}@127.0.0.1:{proxy_port}/shop?sslmode=disable"
        with psycopg.connect(app, autocommit=True) as c:
            c.execute("INSERT INTO customers (name, email, ssn) VALUES ('Di', 'di@example.com', '987-65-4321')")
            assert c.execute("SELECT ssn FROM customers WHERE name = 'Di'").fetchone() == ("987-65-4321",)
            assert c.execute("SELECT count(*) FROM customers").fetchone() == (3,)
        stored = pg.psql("SELECT encode(ssn, 'hex') FROM customers WHERE name = 'Di'", dbname="shop").strip()
        assert stored.startswith("5056")
        assert (keys / "master.key").exists()  # the local provider's key went to the key volume
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "compose-app-secret" not in log_path.read_text()
