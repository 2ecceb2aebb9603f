"""docs/existing-database.md, followed to the letter against the suite's PostgreSQL.

The test reads the guide itself: its ``sql`` block is run as the superuser (so the roles get exactly the
privileges the guide lists, none of them a superuser), its two ``yaml`` blocks become the configuration
files, and the ``pgveil`` lines of its ``sh`` blocks run in the guide's order, with only the host, the
port and the file locations replaced by this machine's. Then an application logs in through the pgveil
the guide started and reads and writes the encrypted column; a support agent gets the masks the guide
promises; and PostgreSQL itself holds only envelopes.

Before the guide runs, the test makes the "existing database" the guide starts from: ``shop`` owned by
``shop_owner``, ``public.customers`` with rows, ``shop_app`` with DML on it, and ``support`` with a member.
``CONNECT`` is revoked from PUBLIC on ``shop``, so a missing ``GRANT CONNECT`` in the guide shows.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from encfixtures import run_psql

from proxy.devcluster import SUPERUSER_PASSWORD, DevCluster, free_port, running_cluster, wait_for_port

pytestmark = pytest.mark.integration

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "existing-database.md"
APP_PASSWORD = "shop-app-secret"
AGENT_PASSWORD = "sue-secret"
SSN = "123-45-6789"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def guide_blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(GUIDE.read_text()) if kind == lang]


@dataclass
class Machine:
    """Where this run puts what the guide puts on db.internal, in /etc/pgveil and /var/lib/pgveil."""

    pg: DevCluster
    root: Path
    proxy_port: int
    admin_port: int

    def localise(self, text: str) -> str:
        out = (
            text.replace("db.internal:5432", f"127.0.0.1:{self.pg.port}")
            .replace("host: db.internal, port: 5432", f"host: 127.0.0.1, port: {self.pg.port}")
            .replace("0.0.0.0:6432", f"127.0.0.1:{self.proxy_port}")
            .replace("127.0.0.1:9187", f"127.0.0.1:{self.admin_port}")
        )
        for directory in ("/etc/pgveil/", "/var/lib/pgveil/", "/root/"):
            out = out.replace(directory, f"{self.root}{directory}")
        assert "db.internal" not in out, "the test does not know every host the guide names"
        return out

    def dsn(self, user: str, password: str, *, port: int | None = None) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{port or self.pg.port}/shop?sslmode=disable"


def make_existing_database(pg: DevCluster) -> None:
    pg.psql(
        f"""
        CREATE ROLE shop_owner LOGIN PASSWORD 'shop-owner-secret';
        CREATE ROLE shop_app LOGIN PASSWORD '{APP_PASSWORD}';
        CREATE ROLE support NOLOGIN;
        CREATE ROLE sue LOGIN PASSWORD '{AGENT_PASSWORD}' IN ROLE support;
        """
    )
    pg.psql("CREATE DATABASE shop OWNER shop_owner")
    pg.psql("REVOKE CONNECT, TEMPORARY ON DATABASE shop FROM PUBLIC; GRANT CONNECT ON DATABASE shop TO shop_app, sue")
    pg.psql(
        """
        SET ROLE shop_owner;
        CREATE TABLE public.customers (id bigserial PRIMARY KEY, name text, email text);
        GRANT SELECT, INSERT, UPDATE, DELETE ON public.customers TO shop_app, support;
        GRANT USAGE ON SEQUENCE public.customers_id_seq TO shop_app;
        INSERT INTO public.customers (name, email) VALUES ('Ann', 'ann@example.com'), ('Bob', 'bob@example.org');
        """,
        dbname="shop",
    )


def pgveil_argv(line: str) -> list[str]:
    words = shlex.split(line)
    assert words[0] == "pgveil"
    return [sys.executable, "-m", "proxy.cli", *words[1:]]


def guide_commands() -> list[str]:
    lines = [line.strip() for block in guide_blocks("sh") for line in block.splitlines()]
    return [line for line in lines if line.startswith("pgveil ")]


@pytest.fixture
def own_pg() -> Iterator[DevCluster]:
    """A cluster of its own: the guide creates cluster-wide roles (``support``) that other modules' fixtures
    create too, and dropping them at the end must not touch theirs."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def machine(own_pg: DevCluster, tmp_path: Path) -> Iterator[Machine]:
    pg = own_pg
    make_existing_database(pg)
    m = Machine(pg, tmp_path, free_port(), free_port())
    while m.admin_port == m.proxy_port:
        m.admin_port = free_port()
    for d in ("etc/pgveil", "var/lib/pgveil", "root"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "var/lib/pgveil").chmod(0o700)
    yield m
    pg.psql("DROP DATABASE IF EXISTS shop WITH (FORCE)")
    pg.psql("DROP ROLE IF EXISTS sue, support, shop_app, shop_owner, pgveil_keystore, pgveil_service")


def serve(argv: list[str], m: Machine) -> subprocess.Popen[bytes]:
    log = open(m.root / "pgveil.log", "ab")  # noqa: SIM115 - owned by the child process
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=m.root)
    log.close()
    try:
        wait_for_port("127.0.0.1", m.proxy_port, timeout=20)
    except OSError:
        proc.kill()
        raise AssertionError("pgveil serve did not start:\n" + (m.root / "pgveil.log").read_text()) from None
    return proc


def ready(m: Machine, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{m.admin_port}/readyz", timeout=3) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def test_the_guide_in_its_order_with_its_grants(machine: Machine) -> None:
    m = machine
    pg = m.pg
    superuser_shop = m.dsn("postgres", SUPERUSER_PASSWORD)

    # 1. Roles and grants: the guide's SQL, as the superuser, with the passwords as psql variables.
    (roles_sql,) = guide_blocks("sql")
    run = run_psql(
        superuser_shop, "-v", "keystore_password=ks-secret", "-v", "service_password=svc-secret", stdin=roles_sql
    )
    assert run.returncode == 0, run.stderr
    plain = pg.psql(
        "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname LIKE 'pgveil\\_%' AND rolcanlogin"
        " AND NOT (rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls)"
    ).strip()
    assert plain == "pgveil_keystore,pgveil_service"

    # 2. Configuration: the two files, and the password files they reference.
    main_yaml, dba_yaml = guide_blocks("yaml")
    (m.root / "etc/pgveil/pgveil.yaml").write_text(m.localise(main_yaml))
    (m.root / "etc/pgveil/pgveil-dba.yaml").write_text(m.localise(dba_yaml))
    for path, secret in (
        ("etc/pgveil/keystore.password", "ks-secret"),
        ("etc/pgveil/service.password", "svc-secret"),
        ("root/.pgveil-dba.password", SUPERUSER_PASSWORD),
    ):
        (m.root / path).write_text(secret + "\n")
        (m.root / path).chmod(0o600)

    # 3.-5. The commands, in the guide's order; serve is the last and keeps running.
    commands = guide_commands()
    verbs = [shlex.split(c)[1:3] for c in commands]
    assert verbs == [["check", "--config"], ["keystore", "init"], ["schema", "apply"], ["schema", "apply"],
                     ["serve", "--config"]]  # fmt: skip
    proc: subprocess.Popen[bytes] | None = None
    try:
        for line in commands:
            argv = pgveil_argv(m.localise(line))
            if argv[3] == "serve":
                proc = serve(argv, m)
                continue
            done = subprocess.run(argv, cwd=m.root, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            if "--dry-run" in line:
                assert "would run" in done.stdout
                assert "ssn" in done.stdout
        assert proc is not None
        assert ready(m), (m.root / "pgveil.log").read_text()

        # 6. The application through pgveil: it writes and reads ssn as text, email as before.
        with psycopg.connect(m.dsn("shop_app", APP_PASSWORD, port=m.proxy_port), autocommit=True) as app:
            app.execute("INSERT INTO customers (name, email, ssn) VALUES (%s, %s, %s)", ("Cy", "cy@example.net", SSN))
            rows = app.execute("SELECT name, email, ssn FROM customers ORDER BY id").fetchall()
        assert rows == [("Ann", "ann@example.com", None), ("Bob", "bob@example.org", None),
                        ("Cy", "cy@example.net", SSN)]  # fmt: skip

        # A support agent: the masks of the guide, and no ordering by a column it sees masked.
        with psycopg.connect(m.dsn("sue", AGENT_PASSWORD, port=m.proxy_port), autocommit=True) as agent:
            seen = agent.execute("SELECT email, ssn FROM customers WHERE name = 'Cy'").fetchone()
            assert seen == ("****@example.net", "*" * (len(SSN) - 4) + SSN[-4:])
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                agent.execute("SELECT name FROM customers ORDER BY email")

        # PostgreSQL holds an envelope, and refuses plaintext written around pgveil.
        stored = pg.psql("SELECT encode(ssn, 'hex') FROM customers WHERE name = 'Cy'", dbname="shop").strip()
        assert stored.startswith("5056")
        assert SSN.encode().hex() not in stored
        bypass = run_psql(m.dsn("shop_app", APP_PASSWORD), "-c", f"UPDATE customers SET ssn = '{SSN}'::bytea")
        assert bypass.returncode != 0
        assert "pgveil_envelope_ssn" in bypass.stderr
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log = (m.root / "pgveil.log").read_text()
    for secret in ("ks-secret", "svc-secret", SSN, APP_PASSWORD):
        assert secret not in log
