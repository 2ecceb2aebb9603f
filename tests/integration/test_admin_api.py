"""The admin API of a running ``pgveil serve``: every /v1 route without a token, with a wrong one, with one
lacking the scope and with the right one; sessions listed and terminated through real drivers; the policy
reload; the keystore's key versions; the failure limit; the disabled API; protected probes; and the log,
which must name tokens but never contain one.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from conftest import ProxyProcess, proxy_config, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.admin.auth import Scope
from proxy.config import parse_config
from proxy.devcluster import DevCluster, free_port
from proxy.schema import apply_schema, plan_schema

pytestmark = pytest.mark.integration

# Tokens as an operator would make them (random, long); the file holds only their SHA-256.
TOKENS = {
    "root": ("tok-root-" + uuid.uuid4().hex, [s.value for s in Scope]),
    "reader": ("tok-reader-" + uuid.uuid4().hex, ["admin:read"]),
    "prom": ("tok-prom-" + uuid.uuid4().hex, ["metrics:read"]),
    "operator": ("tok-operator-" + uuid.uuid4().hex, ["sessions:terminate", "policy:reload"]),
}
WRONG = "tok-wrong-" + uuid.uuid4().hex
TABLE = "admin_cards"
COLUMN = f"public.{TABLE}.card"
KEYSTORE_DB = "admin_api_keys"


def token(name: str) -> str:
    return TOKENS[name][0]


def write_tokens(path: Path, names: list[str] | None = None) -> Path:
    entries = [
        {"name": n, "sha256": hashlib.sha256(t.encode()).hexdigest(), "scopes": scopes}
        for n, (t, scopes) in TOKENS.items()
        if names is None or n in names
    ]
    path.write_text(yaml.safe_dump(entries))
    return path


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


def call(
    url: str,
    method: str = "GET",
    bearer: str | None = None,
    headers: dict[str, str] | None = None,
    body: Any = None,
    **kw: Any,
) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if bearer is not None:
        req.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(req, timeout=15, **kw) as r:
            status, hdrs, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read()
    ctype = hdrs.get("Content-Type", "")
    return Reply(status, hdrs, json.loads(raw) if ctype.startswith("application/json") else raw.decode())


@dataclass
class AdminEnv:
    pg: DevCluster
    proxy: ProxyProcess

    @property
    def url(self) -> str:
        return self.proxy.admin_url

    def v1(self, path: str) -> str:
        return f"{self.url}/v1{path}"


def admin_config(pg: DevCluster, tokens_file: Path, master_key: Path, **admin: Any) -> dict[str, Any]:
    """A pgveil with one encrypted column and a keystore database of its own (so its master key meets no
    other test's keys). Every such pgveil of a test run shares that keystore, hence one master key."""
    return proxy_config(
        pg,
        keystore={"dsn": pg.dsn(dbname=KEYSTORE_DB), "master_key": {"provider": "local", "path": str(master_key)}},
        service={"dsn": pg.dsn(dbname="app")},
        tables={f"public.{TABLE}": {"columns": {"card": {"type": "text", "encrypt": True}}}},
        roles={"default": "plaintext"},
        admin={"tokens_file": str(tokens_file), "auth_failure_limit": 1000, **admin},
    )


async def _create_table(pg: DevCluster) -> None:
    conn = await asyncpg.connect(pg.dsn(dbname="postgres"))
    try:
        if not await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", KEYSTORE_DB):
            await conn.execute(f"CREATE DATABASE {KEYSTORE_DB}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(pg.dsn(dbname="app"))
    try:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id int PRIMARY KEY, card text)")
        await conn.execute(f"GRANT ALL ON {TABLE} TO app")
        catalog = parse_config(
            {"tables": {f"public.{TABLE}": {"columns": {"card": {"type": "text", "encrypt": True}}}}},
            base_dir=Path.cwd(),
            environ={},
        ).catalog()
        await apply_schema(conn, await plan_schema(conn, catalog))
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def env(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminEnv]:
    asyncio.run(_create_table(pg))
    workdir = tmp_path_factory.mktemp("admin-api")
    master_key = tmp_path_factory.getbasetemp() / "admin-api-master.key"
    proxy = ProxyProcess(admin_config(pg, write_tokens(workdir / "tokens.yaml"), master_key), workdir)
    proxy.start()
    try:
        yield AdminEnv(pg, proxy)
    finally:
        proxy.stop()


def insert_card(proxy: ProxyProcess, row_id: int, card: str) -> None:
    """Writes through pgveil, retrying while it is still loading the catalog and keys (55000)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as c:
                c.execute(f"INSERT INTO {TABLE} (id, card) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING", (row_id, card))
                return
        except psycopg.errors.ObjectNotInPrerequisiteState:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def connect(env: AdminEnv, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(env.proxy.dsn(), connect_timeout=10, **kw)


def local_port(conn: psycopg.Connection[Any]) -> int:
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as s:
        return int(s.getsockname()[1])


# -- every route, every kind of caller -----------------------------------------------------------------
# method, path, the scope it needs, a token without it, a token with it, the right token's answer
ROUTES = [
    ("GET", "/sessions", "admin:read", "operator", "reader", 200),
    ("DELETE", "/sessions/999999", "sessions:terminate", "reader", "operator", 404),
    ("POST", "/policy/reload", "policy:reload", "reader", "operator", 200),
    ("GET", "/keys", "admin:read", "operator", "reader", 200),
    ("GET", "/openapi.json", "admin:read", "prom", "reader", 200),
    ("POST", "/policy/explain", "admin:read", "operator", "reader", 200),
]
EXPLAIN = {"role": "app", "statement": f"SELECT card FROM {TABLE} WHERE id = 7"}
BODIES = {"/policy/explain": EXPLAIN}


@pytest.mark.parametrize(("method", "path", "scope", "lacking", "right", "expected"), ROUTES)
def test_no_token_wrong_token_and_missing_scope_are_refused(
    env: AdminEnv, method: str, path: str, scope: str, lacking: str, right: str, expected: int
) -> None:
    body = BODIES.get(path)
    r = call(env.v1(path), method, body=body)
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="pgveil"'
    assert r.body["error"] == "unauthorized"

    r = call(env.v1(path), method, WRONG, body=body)
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="pgveil", error="invalid_token"'

    r = call(env.v1(path), method, headers={"Authorization": f"Basic {WRONG}"}, body=body)
    assert r.status == 401
    assert 'error="invalid_request"' in r.headers["WWW-Authenticate"]

    r = call(env.v1(path), method, token(lacking), body=body)
    assert r.status == 403
    assert r.headers["WWW-Authenticate"] == f'Bearer realm="pgveil", error="insufficient_scope", scope="{scope}"'
    assert r.body == {"error": "forbidden", "detail": f"the token lacks scope {scope}"}


@pytest.mark.parametrize(("method", "path", "scope", "lacking", "right", "expected"), ROUTES)
def test_the_right_token_is_let_through(
    env: AdminEnv, method: str, path: str, scope: str, lacking: str, right: str, expected: int
) -> None:
    assert scope in TOKENS[right][1]
    r = call(env.v1(path), method, token(right), body=BODIES.get(path))
    assert r.status == expected, r.body
    assert isinstance(r.body, dict)
    assert r.body.get("error") != "forbidden"


def test_probes_are_open_by_default(env: AdminEnv) -> None:
    assert call(env.url + "/healthz").status == 200
    assert call(env.url + "/metrics").status == 200
    assert call(env.url + "/readyz").status in (200, 503)


# -- sessions ------------------------------------------------------------------------------------------
def test_sessions_lists_role_database_address_start_and_state(env: AdminEnv) -> None:
    before = time.time()
    with connect(env, autocommit=True) as idle, connect(env) as in_tx:
        in_tx.execute("SELECT 1")  # psycopg opens a transaction: idle in transaction afterwards
        after = time.time()
        r = call(env.v1("/sessions"), bearer=token("reader"))
        assert r.status == 200
        assert r.body["covers"] == "process"
        assert r.body["process"] == 0
        assert r.body["other_processes"] == {}
        by_port = {s["client_port"]: s for s in r.body["sessions"]}
        assert r.body["total"] == len(r.body["sessions"])
        s_idle, s_tx = by_port[local_port(idle)], by_port[local_port(in_tx)]
        for s in (s_idle, s_tx):
            assert (s["role"], s["database"], s["client_address"], s["tls"]) == ("app", "app", "127.0.0.1", False)
            started = time.mktime(time.strptime(s["started_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            assert int(before) - 1 <= started <= after + 1
            assert s["started_at"].endswith("+00:00")
        assert s_idle["state"] == "idle"
        assert s_tx["state"] == "idle in transaction"
        assert s_idle["id"] != s_tx["id"]


def _session_id(env: AdminEnv, conn: psycopg.Connection[Any]) -> int:
    port = local_port(conn)
    r = call(env.v1("/sessions"), bearer=token("reader"))
    return int(next(s["id"] for s in r.body["sessions"] if s["client_port"] == port))


def test_terminating_an_idle_session_sends_fatal_57p01(env: AdminEnv) -> None:
    with connect(env, autocommit=True) as victim, connect(env, autocommit=True) as bystander:
        sid = _session_id(env, victim)
        r = call(env.v1(f"/sessions/{sid}"), "DELETE", token("operator"))
        assert r.status == 200
        assert r.body == {"id": sid, "terminated": True, "process": 0}
        with pytest.raises(psycopg.OperationalError) as exc:
            victim.execute("SELECT 1")
        assert victim.closed
        assert bystander.execute("SELECT 1").fetchone() == (1,)
    # The FATAL reached the client before the close (libpq reports it with the next command).
    assert "terminating connection due to administrator command" in str(exc.value)
    assert call(env.v1(f"/sessions/{sid}"), "DELETE", token("operator")).status == 404
    assert call(env.v1("/sessions/abc"), "DELETE", token("operator")).status == 400


def test_terminating_a_busy_session_ends_its_statement_on_the_server(env: AdminEnv) -> None:
    marker = f"admin_busy_{uuid.uuid4().hex[:8]}"
    errors: list[BaseException] = []
    victim = connect(env, autocommit=True)
    sid = _session_id(env, victim)

    def run() -> None:
        try:
            victim.execute(f"SELECT pg_sleep(60) AS {marker}")
        except psycopg.Error as e:
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    direct = psycopg.connect(env.pg.dsn(dbname="app"), autocommit=True)
    try:

        def sleeping() -> int:
            row = direct.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s", (f"%{marker}%",)
            ).fetchone()
            return int(row[0]) if row else 0

        assert wait_until(lambda: sleeping() == 1, timeout=20)
        r = call(env.v1(f"/sessions/{sid}"), "DELETE", token("operator"))
        assert r.status == 200
        worker.join(30)
        assert not worker.is_alive()
        assert len(errors) == 1
        assert getattr(errors[0], "sqlstate", None) == "57P01"
        assert wait_until(lambda: sleeping() == 0, timeout=20)  # cancelled, not left running for a minute
    finally:
        direct.close()
        victim.close()


@pytest.mark.asyncio
async def test_asyncpg_sessions_are_listed_and_a_busy_one_gets_57p01(env: AdminEnv) -> None:
    conn = await asyncpg.connect(env.proxy.dsn())
    try:
        port = conn._transport.get_extra_info("sockname")[1]
        r = await asyncio.to_thread(call, env.v1("/sessions"), "GET", token("reader"))
        mine = [s for s in r.body["sessions"] if s["client_port"] == port]
        assert len(mine) == 1
        assert mine[0]["state"] == "idle"
        assert (mine[0]["role"], mine[0]["database"]) == ("app", "app")
        marker = f"admin_asyncpg_{uuid.uuid4().hex[:8]}"
        query = asyncio.ensure_future(conn.fetchval(f"SELECT pg_sleep(60) AS {marker}"))
        direct = await asyncpg.connect(env.pg.dsn(dbname="app"))
        try:
            # Running on the server (not merely being prepared): the session is at its longest wait.
            sql = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1"
            for _ in range(400):
                if await direct.fetchval(sql, f"%{marker}%") == 1:
                    break
                await asyncio.sleep(0.05)
            r = await asyncio.to_thread(call, env.v1("/sessions"), "GET", token("reader"))
            assert [s["state"] for s in r.body["sessions"] if s["client_port"] == port] == ["active"]
        finally:
            await direct.close()
        r = await asyncio.to_thread(call, env.v1(f"/sessions/{mine[0]['id']}"), "DELETE", token("operator"))
        assert r.status == 200
        # asyncpg reports the FATAL's message on the operation the close interrupted.
        with pytest.raises(
            (asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError), match="due to administrator command"
        ):
            await asyncio.wait_for(query, 30)
    finally:
        await conn.close()


# -- policy reload -------------------------------------------------------------------------------------
def test_policy_reload_applies_a_valid_file_and_rejects_an_invalid_one(env: AdminEnv) -> None:
    r = call(env.v1("/policy/reload"), "POST", token("operator"))
    assert r.status == 200
    assert r.body["applied"] is True
    original = env.proxy.config_path.read_text()
    try:
        broken = yaml.safe_load(original)
        broken["sessions"]["max_client_connections"] = -1
        env.proxy.config_path.write_text(yaml.safe_dump(broken))
        r = call(env.v1("/policy/reload"), "POST", token("operator"))
        assert r.status == 409
        assert r.body["applied"] is False
        assert any("sessions.max_client_connections" in m for m in r.body["messages"]), r.body
    finally:
        env.proxy.config_path.write_text(original)
    assert call(env.v1("/policy/reload"), "POST", token("operator")).status == 200


# -- policy explain ------------------------------------------------------------------------------------
def test_policy_explain_answers_for_the_running_policy_and_never_logs_the_statement(env: AdminEnv) -> None:
    secret = "literal-" + uuid.uuid4().hex
    body = {"role": "app", "statement": f"SELECT card FROM {TABLE} WHERE id = 7 AND '{secret}' <> ''"}
    r = call(env.v1("/policy/explain"), "POST", token("reader"), body=body)
    assert r.status == 200, r.body
    assert r.body["role"] == "app"
    assert r.body["allowed"] is True
    (statement,) = r.body["statements"]
    assert [(c["column"], c["outcome"]) for c in statement["columns"]] == [(COLUMN, "plaintext")]
    r = call(
        env.v1("/policy/explain"),
        "POST",
        token("reader"),
        body={"role": "app", "statement": f"SELECT card FROM {TABLE} ORDER BY card"},
    )
    assert r.status == 200
    assert r.body["allowed"] is False
    assert r.body["statements"][0]["sqlstate"] == "0A000"  # ordering by an encrypted column: refused for all
    assert call(env.v1("/policy/explain"), "POST", token("reader"), body={"role": "app"}).status == 400
    assert secret not in env.proxy.logs()


# -- keys ----------------------------------------------------------------------------------------------
def test_keys_lists_versions_matching_the_stored_envelopes_and_never_key_bytes(env: AdminEnv) -> None:
    insert_card(env.proxy, 1, "4111111111111111")
    with psycopg.connect(env.pg.dsn(dbname="app"), autocommit=True) as direct:
        row = direct.execute(f"SELECT card FROM {TABLE} WHERE id = 1").fetchone()
        assert row is not None
        stored_key_id = str(uuid.UUID(bytes=bytes(row[0])[4:20]))
    with psycopg.connect(env.pg.dsn(dbname=KEYSTORE_DB), autocommit=True) as keystore:
        wrapped = [bytes(w[0]) for w in keystore.execute("SELECT wrapped FROM pgveil.deks WHERE wrapped IS NOT NULL")]
    r = call(env.v1("/keys"), bearer=token("reader"))
    assert r.status == 200
    assert r.body["keystore"] is True
    col = next(c for c in r.body["columns"] if c["column"] == COLUMN)
    assert col["configured"] is True
    assert col["subject_keys"] is None
    assert [v["key_id"] for v in col["versions"]] == [stored_key_id]
    (v,) = col["versions"]
    assert (v["version"], v["state"], v["current"], v["destroyed_at"]) == (1, "ENABLED", True, None)
    text = json.dumps(r.body)
    assert wrapped
    for w in wrapped:
        assert w.hex() not in text
        assert w.hex()[:16] not in text


# -- the OpenAPI document ------------------------------------------------------------------------------
def test_the_document_describes_exactly_the_routes_that_exist(env: AdminEnv) -> None:
    doc = call(env.v1("/openapi.json"), bearer=token("reader")).body
    assert doc["openapi"] == "3.1.0"
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    from proxy.admin.api import operations

    assert documented == {(op.method, f"/v1{op.path}") for op in operations(explain=True)} | {
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    }
    # Every documented route answers something other than "no such route" (404 "not found" / 405).
    for method, path in documented:
        concrete = re.sub(r"\{[^}]+\}", "0", path)
        r = call(env.url + concrete, method, token("root"))
        assert r.status != 405
        assert r.body != {"error": "not found"}, path
        assert str(r.status) in doc["paths"][path][method.lower()]["responses"], (path, r.status)
    # And a route that is not documented does not exist.
    assert call(env.v1("/nothing"), bearer=token("root")).body == {"error": "not found"}


def test_mutating_calls_are_logged_by_token_name_and_no_token_reaches_the_log(env: AdminEnv) -> None:
    with connect(env, autocommit=True) as c:
        sid = _session_id(env, c)
        assert call(env.v1(f"/sessions/{sid}"), "DELETE", token("operator")).status == 200
    call(env.v1("/policy/reload"), "POST", token("operator"))
    call(env.v1("/sessions"), bearer=WRONG)
    call(env.v1("/sessions"), bearer=token("prom"))
    logs = env.proxy.logs()
    assert "admin action terminateSession by token 'operator' from 127.0.0.1: DELETE /v1/sessions/{id}" in logs
    assert f"(target {sid}) -> 200" in logs
    assert "admin action reloadPolicy by token 'operator'" in logs
    assert "admin authentication failed from 127.0.0.1: unknown token" in logs
    assert "admin request by token 'prom' refused: it lacks scope admin:read" in logs
    for t, _ in TOKENS.values():
        assert t not in logs
        assert hashlib.sha256(t.encode()).hexdigest() not in logs
    assert WRONG not in logs
    metrics = call(env.url + "/metrics").body
    assert re.search(r'pgveil_admin_requests_total\{operation="terminateSession",status="200"\} [1-9]', metrics)
    assert re.search(r'pgveil_admin_requests_total\{operation="listSessions",status="403"\} [1-9]', metrics)
    assert re.search(r"pgveil_admin_auth_failures_total [1-9]", metrics)


# -- other configurations ------------------------------------------------------------------------------
def test_without_a_tokens_file_the_api_is_disabled_not_open(make_proxy: Any) -> None:
    p = make_proxy()
    for method, path, *_ in ROUTES:
        r = call(f"{p.admin_url}/v1{path}", method, token("root"))
        assert r.status == 404
        assert r.body["error"] == "admin API disabled"
        assert "admin.tokens_file" in r.body["detail"]
    assert call(p.admin_url + "/metrics").status == 200


def test_a_missing_tokens_file_stops_pgveil_from_starting(pg: DevCluster, tmp_path: Path) -> None:
    p = ProxyProcess(proxy_config(pg, admin={"tokens_file": str(tmp_path / "absent.yaml")}), tmp_path / "p")
    with pytest.raises(RuntimeError, match="did not start"):
        p.start()
    assert "admin.tokens_file" in p.logs()
    assert "cannot read it" in p.logs()


def test_probes_can_require_a_metrics_token(make_proxy: Any, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml")
    p = make_proxy(
        admin={"tokens_file": str(tokens), "require_token_for_metrics": True, "require_token_for_health": True}
    )
    for path in ("/metrics", "/healthz", "/readyz"):
        assert call(p.admin_url + path).status == 401
        assert call(p.admin_url + path, bearer=WRONG).status == 401
        assert call(p.admin_url + path, bearer=token("reader")).status == 403
        assert call(p.admin_url + path, bearer=token("prom")).status in (200, 503)
    assert "pgveil_" in call(p.admin_url + "/metrics", bearer=token("prom")).body


def test_repeated_failures_from_one_address_get_429_even_with_a_good_token(make_proxy: Any, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml")
    p = make_proxy(admin={"tokens_file": str(tokens), "auth_failure_limit": 3, "auth_failure_window": 600})
    url = f"{p.admin_url}/v1/sessions"
    assert call(url, bearer=token("reader")).status == 200
    for _ in range(3):
        assert call(url, bearer=WRONG).status == 401
    r = call(url, bearer=token("reader"))
    assert r.status == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 600
    assert r.body["error"] == "too many failed authentications"
    assert call(url).status == 429
    # Missing tokens are not guesses: another proxy's clean state shows a tokenless call is not counted.
    q = make_proxy(admin={"tokens_file": str(tokens), "auth_failure_limit": 1, "auth_failure_window": 600})
    for _ in range(3):
        assert call(f"{q.admin_url}/v1/sessions").status == 401
    assert call(f"{q.admin_url}/v1/sessions", bearer=token("reader")).status == 200


def test_a_revoked_token_stops_working_without_a_restart(make_proxy: Any, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml")
    p = make_proxy(admin={"tokens_file": str(tokens)})
    url = f"{p.admin_url}/v1/sessions"
    assert call(url, bearer=token("reader")).status == 200
    write_tokens(tokens, ["root"])
    assert wait_until(lambda: call(url, bearer=token("reader")).status == 401, timeout=10)
    assert call(url, bearer=token("root")).status == 200


def test_sessions_of_worker_processes_are_counted(make_proxy: Any, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml")
    p = make_proxy(admin={"tokens_file": str(tokens)}, sessions={"workers": 2, "shutdown_timeout": 5})
    conns = [psycopg.connect(p.dsn(), autocommit=True, connect_timeout=10) for _ in range(4)]
    try:
        for c in conns:
            c.execute("SELECT 1")

        def listing() -> dict[str, Any]:
            body: dict[str, Any] = call(f"{p.admin_url}/v1/sessions", bearer=token("reader")).body
            return body

        assert wait_until(lambda: listing()["total"] == 4, timeout=15), listing()
        body = listing()
        assert set(body["other_processes"]) == {"1"}
        assert len(body["sessions"]) + body["other_processes"]["1"] == 4
    finally:
        for c in conns:
            c.close()


# -- mutual TLS ----------------------------------------------------------------------------------------
def _issue(
    subject: str, issuer_key: Any, issuer: x509.Name | None, *, ca: bool = False, server: bool = False
) -> tuple[Any, x509.Certificate]:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return key, builder.sign(issuer_key if issuer is not None else key, hashes.SHA256())


def _write_pair(directory: Path, stem: str, key: Any, cert: x509.Certificate) -> tuple[Path, Path]:
    crt, pem = directory / f"{stem}.crt", directory / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(pem, 0o600)
    return crt, pem


def test_mutual_tls_accepts_a_client_certificate_of_its_ca_and_refuses_others(make_proxy: Any, tmp_path: Path) -> None:
    ca_key, ca = _issue("admin test CA", None, None, ca=True)
    rogue_key, rogue = _issue("rogue CA", None, None, ca=True)
    ca_file, _ = _write_pair(tmp_path, "ca", ca_key, ca)
    server = _write_pair(tmp_path, "server", *_issue("localhost", ca_key, ca.subject, server=True))
    client = _write_pair(tmp_path, "client", *_issue("secops", ca_key, ca.subject))
    stranger = _write_pair(tmp_path, "stranger", *_issue("secops", rogue_key, rogue.subject))
    tokens = write_tokens(tmp_path / "tokens.yaml")
    p = make_proxy(
        admin={
            "tokens_file": str(tokens),
            "tls": {"cert_file": str(server[0]), "key_file": str(server[1]), "client_ca_file": str(ca_file)},
        }
    )
    url = f"https://127.0.0.1:{p.admin_port}"

    def context(pair: tuple[Path, Path] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        if pair is not None:
            ctx.load_cert_chain(*pair)
        return ctx

    r = call(url + "/v1/sessions", bearer=token("reader"), context=context(client))
    assert r.status == 200
    assert r.body["covers"] == "process"
    # A certificate is not a token: the API still asks for one.
    assert call(url + "/v1/sessions", context=context(client)).status == 401
    assert call(url + "/healthz", context=context(client)).status == 200
    for pair in (None, stranger):
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            call(url + "/healthz", context=context(pair))
    # Plain HTTP on the TLS port gets no answer from the API.
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        call(f"http://127.0.0.1:{p.admin_port}/healthz")


# -- the CLI -------------------------------------------------------------------------------------------
def pgveil(
    *args: str, token_name: str | None = "root", tmp: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGVEIL_ADMIN")}
    environ.update(env)
    if token_name is not None:
        environ["PGVEIL_ADMIN_TOKEN"] = token(token_name)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=60, env=environ
    )


def test_cli_lists_terminates_reloads_and_shows_keys(env: AdminEnv, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(token("root") + "\n")
    with connect(env, autocommit=True) as c:
        port = local_port(c)
        r = pgveil("admin", "sessions", "--admin", env.url, "--token-file", str(token_file), token_name=None)
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if f"127.0.0.1:{port}" in ln)
        assert line.split()[1:3] == ["app", "app"]
        r = pgveil("admin", "sessions", "--json", PGVEIL_ADMIN_URL=env.url)
        sid = next(s["id"] for s in json.loads(r.stdout)["sessions"] if s["client_port"] == port)
        r = pgveil("admin", "terminate", str(sid), "--admin", env.url)
        assert (r.returncode, r.stdout.strip()) == (0, f"session {sid} terminated")
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    r = pgveil("admin", "terminate", str(sid), "--admin", env.url)
    assert r.returncode == 1
    assert r.stderr.startswith("pgveil: the admin API answered 404: not found")
    r = pgveil("admin", "reload", "--admin", env.url)
    assert (r.returncode, r.stdout.strip()) == (0, "configuration reloaded")

    via_api = pgveil("admin", "keys", "--json", "--admin", env.url)
    direct = pgveil("admin", "keys", "--json", "--config", str(env.proxy.config_path))
    assert via_api.returncode == direct.returncode == 0, (via_api.stderr, direct.stderr)
    assert json.loads(via_api.stdout) == json.loads(direct.stdout)  # one service, two ways to reach it
    assert COLUMN in pgveil("admin", "keys", "--config", str(env.proxy.config_path)).stdout


def test_cli_errors_are_one_line_with_an_exit_code_and_no_token(env: AdminEnv) -> None:
    r = pgveil("admin", "sessions", "--admin", env.url, token_name=None, PGVEIL_ADMIN_TOKEN=WRONG)
    assert r.returncode == 1
    assert r.stderr.strip() == "pgveil: the admin API answered 401: unauthorized (the token is not valid)"
    assert WRONG not in r.stdout + r.stderr
    r = pgveil("admin", "reload", "--admin", env.url, token_name="reader")
    assert r.returncode == 1
    assert "answered 403: forbidden (the token lacks scope policy:reload)" in r.stderr
    r = pgveil("admin", "sessions", "--admin", env.url, token_name=None)
    assert r.returncode == 2
    assert "no admin token" in r.stderr
    r = pgveil("admin", "sessions")
    assert (r.returncode, r.stderr.strip()) == (2, "pgveil: no admin URL: use --admin URL or $PGVEIL_ADMIN_URL")
    r = pgveil("admin", "sessions", "--admin", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3  # unreachable (docs/cli.md)
    assert r.stderr.startswith("pgveil: cannot reach the admin API at http://127.0.0.1:")
    for out in (r.stdout, r.stderr):
        assert "Traceback" not in out


def test_cli_token_makes_an_entry_the_api_accepts(make_proxy: Any, tmp_path: Path) -> None:
    r = pgveil("admin", "token", "--name", "fresh", "--scope", "admin:read", token_name=None)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    new_token = lines[1].removeprefix("#").strip()
    entry = yaml.safe_load("\n".join(ln for ln in lines if not ln.startswith("#")))
    assert entry[0]["name"] == "fresh"
    assert new_token not in yaml.safe_dump(entry)
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump(entry))
    p = make_proxy(admin={"tokens_file": str(tmp_path / "tokens.yaml")})
    assert call(f"{p.admin_url}/v1/sessions", bearer=new_token).status == 200
    assert call(f"{p.admin_url}/v1/policy/reload", "POST", new_token).status == 403
    r = pgveil("admin", "token", "--name", "x", "--scope", "admin:write", token_name=None)
    assert r.returncode == 2
    assert "unknown scope 'admin:write'" in r.stderr
