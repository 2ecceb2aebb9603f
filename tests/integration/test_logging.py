"""pgveil's own log, as an operator reads it, in both formats: one line per event, the session id on every
session line (start, refusal, end), the session's role, database and client at its start, its duration
and bytes each way at its end, and never a statement's text, a value, a password or key bytes.

A real workload goes through a real pgveil (debug level, so that every line that exists is written):
psycopg with parameters, psql with literals, a value the type refuses, refused constructs, a restricted
role's refused predicate, a failed login. Then the log is searched for the canary plaintexts, the
passwords, and the master key and a data key in hex and base64.

The level changes at runtime by a reload of ``logging.level`` (SIGHUP) and by ``PUT /v1/logging``, each
counted in ``pgveil_log_level_changes_total``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import signal
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from conftest import ProxyProcess, proxy_config, wait_until
from encfixtures import apply_tables, run_psql

from keymgmt.providers import LocalKeyProvider
from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

DB = "logtest"
TABLE = "log_people"
TABLES = {
    f"public.{TABLE}": {
        "columns": {
            "secret": {"type": "text", "encrypt": True},
            "born": {"type": "date", "encrypt": True},
            "name": {"type": "text"},  # plain, governed by the policy only
        }
    }
}
ROLES = {
    "default": "hidden",
    "log_user": "plaintext",
    "log_support": {f"public.{TABLE}.secret": "masked:last4", f"public.{TABLE}.name": "masked:partial"},
}
USER_PASSWORD = "pw-user-" + uuid.uuid4().hex
SUPPORT_PASSWORD = "pw-support-" + uuid.uuid4().hex
WRONG_PASSWORD = "pw-wrong-" + uuid.uuid4().hex
CANARY = "canary" + uuid.uuid4().hex[:16]  # a plaintext that only the client and the table ever hold
TOKENS = {"operator": ("tok-op-" + uuid.uuid4().hex, ["policy:reload", "admin:read", "metrics:read"])}
TOKENS["reader"] = ("tok-rd-" + uuid.uuid4().hex, ["admin:read"])
_TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
_TEXT_LINE = re.compile(rf"^({_TIMESTAMP}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+) (?:\[s(\d+)\] )?(.*)$")
_FIELD = re.compile(r' (\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@dataclass
class Line:
    raw: str
    level: str
    logger: str
    msg: str
    session: int | None
    fields: dict[str, Any]


def parse_lines(text: str, fmt: str) -> list[Line]:
    """Every line of the log, parsed; a line that is not a log line of the format fails the test."""
    out = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        if fmt == "json":
            try:
                doc = json.loads(raw)
            except json.JSONDecodeError:
                raise AssertionError(f"not a JSON log line: {raw!r}") from None
            assert set(doc) >= {"ts", "level", "logger", "msg"}, raw
            assert re.fullmatch(_TIMESTAMP, doc["ts"]), raw
            rest = {k: v for k, v in doc.items() if k not in ("ts", "level", "logger", "msg", "session")}
            out.append(Line(raw, doc["level"], doc["logger"], doc["msg"], doc.get("session"), rest))
            continue
        m = _TEXT_LINE.match(raw)
        assert m is not None, f"not a text log line: {raw!r}"
        body = m.group(5)
        fields = {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(body)}
        first = _FIELD.search(body)
        session = int(m.group(4)) if m.group(4) else None
        out.append(Line(raw, m.group(2).lower(), m.group(3), body[: first.start()] if first else body, session, fields))
    return out


def number(value: Any) -> float:
    return float(value)


@pytest.fixture(scope="module")
def logdb(pg: DevCluster) -> str:
    pg.psql(f"CREATE DATABASE {DB} OWNER app")
    pg.psql(
        f"CREATE ROLE log_user LOGIN PASSWORD '{USER_PASSWORD}'; "
        f"CREATE ROLE log_support LOGIN PASSWORD '{SUPPORT_PASSWORD}'"
    )
    pg.psql(
        f"CREATE TABLE {TABLE} (id int PRIMARY KEY, name text, secret text, born date); "
        f"GRANT ALL ON {TABLE} TO log_user; GRANT SELECT ON {TABLE} TO log_support",
        dbname=DB,
    )
    asyncio.run(apply_tables(pg, DB, TABLES))
    return DB


def tokens_file(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokens.yaml"
    path.write_text(
        yaml.safe_dump(
            [
                {"name": n, "sha256": hashlib.sha256(t.encode()).hexdigest(), "scopes": scopes}
                for n, (t, scopes) in TOKENS.items()
            ]
        )
    )
    return path


def logging_proxy(pg: DevCluster, directory: Path, master_key: Path, fmt: str, level: str = "debug") -> ProxyProcess:
    cfg = proxy_config(
        pg,
        keystore={"dsn": pg.dsn(dbname=DB), "master_key": {"provider": "local", "path": str(master_key)}},
        tables=TABLES,
        roles=ROLES,
        logging={"level": level, "format": fmt},
        admin={"tokens_file": str(tokens_file(directory))},
    )
    return ProxyProcess(cfg, directory).start()


def master_key_path(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "logs-master.key"  # one keystore database, so one master key


def dsn(p: ProxyProcess, user: str = "log_user", password: str = USER_PASSWORD) -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{p.port}/{DB}?sslmode=disable"


def wait_until_ready(p: ProxyProcess) -> None:
    def ready() -> bool:
        try:
            with psycopg.connect(dsn(p), autocommit=True, connect_timeout=5) as c:
                c.execute(f"SELECT secret FROM {TABLE} WHERE id = -1").fetchall()
            return True
        except psycopg.Error:
            return False

    assert wait_until(ready, timeout=30), p.logs()


def workload(p: ProxyProcess) -> None:
    """Everything that could leak: parameters, literals, a refused value, refused constructs, a restricted
    role's refused predicate, a wrong password."""
    with psycopg.connect(dsn(p), autocommit=True) as c:
        c.execute(f"DELETE FROM {TABLE}")
        c.execute(
            f"INSERT INTO {TABLE} (id, name, secret, born) VALUES (%s, %s, %s, %s)", (1, "a", CANARY, "1990-01-02")
        )
        assert c.execute(f"SELECT secret FROM {TABLE} WHERE id = 1").fetchone() == (CANARY,)
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute(f"SELECT id FROM {TABLE} WHERE secret LIKE '{CANARY}%'")
        with pytest.raises(psycopg.Error):
            c.execute(f"INSERT INTO {TABLE} (id, born) VALUES (2, %s)", (f"{CANARY}-not-a-date",))
        c.execute("SELECT 1")  # the session stays usable
    done = run_psql(
        dsn(p),
        "-c",
        f"INSERT INTO {TABLE} (id, secret) VALUES (3, '{CANARY}-psql')",
        "-c",
        f"SELECT secret FROM {TABLE} WHERE id = 3",
    )
    assert done.returncode == 0, done.stderr
    assert f"{CANARY}-psql" in done.stdout
    refused = run_psql(dsn(p), "-c", f"SELECT id FROM {TABLE} ORDER BY secret, '{CANARY}'")
    assert refused.returncode != 0
    with psycopg.connect(dsn(p, "log_support", SUPPORT_PASSWORD), autocommit=True) as c:
        (masked,) = c.execute(f"SELECT secret FROM {TABLE} WHERE id = 1").fetchone() or (None,)
        assert isinstance(masked, str)
        assert masked.endswith(CANARY[-4:])
        assert CANARY not in masked
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"SELECT id FROM {TABLE} WHERE name = '{CANARY}'")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn(p, "log_user", WRONG_PASSWORD), connect_timeout=5).close()


def key_strings(pg: DevCluster, master_key: Path) -> list[str]:
    """The master key and every data key of the keystore, as hex (both cases) and base64."""
    secrets_ = [bytes.fromhex(master_key.read_text().strip())]

    async def deks() -> list[tuple[bytes, str]]:
        conn = await asyncpg.connect(pg.dsn(dbname=DB))
        try:
            return [(r["wrapped"], r["kek_id"]) for r in await conn.fetch("SELECT wrapped, kek_id FROM pgveil.deks")]
        finally:
            await conn.close()

    provider = LocalKeyProvider(master_key)
    wrapped = asyncio.run(deks())
    assert wrapped, "the workload created data keys"
    secrets_ += [provider.unwrap(w, kek_id) for w, kek_id in wrapped]
    out = []
    for s in secrets_:
        out += [s.hex(), s.hex().upper(), base64.b64encode(s).decode(), base64.urlsafe_b64encode(s).decode()]
    return out


@pytest.fixture(scope="module", params=["text", "json"])
def logged(
    request: pytest.FixtureRequest, pg: DevCluster, logdb: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str, list[str]]:
    fmt = request.param
    p = logging_proxy(pg, tmp_path_factory.mktemp(f"logs-{fmt}"), master_key_path(tmp_path_factory), fmt)
    try:
        wait_until_ready(p)
        workload(p)
    finally:
        p.stop()  # the log is complete: every session has ended
    master_key = Path(p.config["keystore"]["master_key"]["path"])
    return fmt, p.logs(), key_strings(pg, master_key)


def test_no_statement_value_password_or_key_in_the_log(logged: tuple[str, str, list[str]]) -> None:
    fmt, text, keys = logged
    parse_lines(text, fmt)  # every line is a log line of its format: nothing else reaches stderr
    for needle in (CANARY, USER_PASSWORD, SUPPORT_PASSWORD, WRONG_PASSWORD, "not-a-date", "SELECT", "INSERT"):
        assert needle not in text, needle
    for key in keys:
        assert key not in text
    assert "Traceback" not in text


def test_session_lines_carry_the_session_id(logged: tuple[str, str, list[str]]) -> None:
    fmt, text, _ = logged
    lines = parse_lines(text, fmt)
    starts = [ln for ln in lines if ln.fields.get("event") == "session_start"]
    by_role: dict[str, list[int]] = {}
    for ln in starts:
        assert ln.session is not None, ln.raw
        assert ln.fields["database"] == DB
        assert re.fullmatch(r"127\.0\.0\.1:\d+", ln.fields["client"]), ln.raw
        by_role.setdefault(ln.fields["role"], []).append(ln.session)
    assert len(by_role["log_user"]) >= 3
    assert len(by_role["log_support"]) == 1
    ends = {ln.session: ln for ln in lines if ln.fields.get("event") == "session_end"}
    for sid in (s for sessions in by_role.values() for s in sessions):
        end = ends[sid]
        assert number(end.fields["duration_s"]) >= 0
        assert int(end.fields["bytes_client_to_server"]) > 0
        assert int(end.fields["bytes_server_to_client"]) > 0
        assert end.fields["role"] in ("log_user", "log_support")
        assert end.msg == "session ended: the client ended the session", end.raw
    failed = [ln for ln in lines if ln.fields.get("event") == "session_end" and "authentication failed" in ln.msg]
    assert [ln.fields["role"] for ln in failed] == ["log_user"]  # the wrong password, once
    refusals = [ln for ln in lines if ln.fields.get("event") == "refusal"]
    assert all(ln.session is not None for ln in refusals)
    construct = [ln for ln in refusals if ln.fields["sqlstate"] == "0A000" and ln.fields["reason"] == "construct"]
    assert {ln.session for ln in construct} & set(by_role["log_user"])
    assert any(f"{TABLE}.secret" in ln.msg for ln in construct)
    denied = [ln for ln in refusals if ln.fields["sqlstate"] == "42501"]
    assert [ln.session for ln in denied] == by_role["log_support"]
    assert denied[0].fields["reason"] == "policy_denied"
    assert f"{TABLE}.name" in denied[0].msg
    value = [ln for ln in refusals if ln.fields["reason"] == "value"]
    assert value, "the value the date type refused is logged as a refusal (without the value)"


def test_every_line_of_a_session_names_it(logged: tuple[str, str, list[str]]) -> None:
    fmt, text, _ = logged
    for ln in parse_lines(text, fmt):
        if ln.logger in ("proxy.session", "proxy.protocol.relay", "proxy.encrypt.engine"):
            assert ln.session is not None, ln.raw


# -- the level at runtime ------------------------------------------------------------------------------


def metric(p: ProxyProcess, source: str) -> float:
    with urllib.request.urlopen(p.admin_url + "/metrics", timeout=10) as r:
        body = r.read().decode()
    m = re.search(rf'^pgveil_log_level_changes_total\{{source="{source}"\}} (\S+)$', body, re.M)
    assert m is not None, body
    return float(m.group(1))


def put_level(p: ProxyProcess, level: Any, token: str) -> tuple[int, Any]:
    req = urllib.request.Request(
        p.admin_url + "/v1/logging",
        data=json.dumps({"level": level}).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def session_starts(p: ProxyProcess) -> int:
    return sum(1 for ln in parse_lines(p.logs(), "json") if ln.fields.get("event") == "session_start")


def one_session(p: ProxyProcess) -> None:
    with psycopg.connect(dsn(p), autocommit=True) as c:
        c.execute("SELECT 1")


def test_the_level_changes_by_reload_and_by_the_api(
    pg: DevCluster, logdb: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    p = logging_proxy(pg, tmp_path / "level", master_key_path(tmp_path_factory), "json", level="info")
    try:
        wait_until_ready(p)
        assert metric(p, "reload") == 0
        assert metric(p, "api") == 0
        p.config["logging"]["level"] = "warning"
        p.write_config()
        p.signal(signal.SIGHUP)
        assert wait_until(lambda: "log level changed from info to warning (reload)" in p.logs(), timeout=20), p.logs()
        assert metric(p, "reload") == 1
        before = session_starts(p)
        one_session(p)  # at warning, a session start (info) is not logged

        assert put_level(p, "debug", TOKENS["reader"][0])[0] == 403  # admin:read may not change it
        assert put_level(p, "verbose", TOKENS["operator"][0])[0] == 400
        status, body = put_level(p, "info", TOKENS["operator"][0])
        assert (status, body) == (200, {"level": "info", "previous": "warning", "changed": True})
        assert "log level changed from warning to info (api)" in p.logs()
        assert session_starts(p) == before  # the warning-level session left no start line
        assert metric(p, "api") == 1
        one_session(p)
        assert wait_until(lambda: session_starts(p) == before + 1, timeout=10), p.logs()
        assert put_level(p, "info", TOKENS["operator"][0])[1]["changed"] is False
        assert metric(p, "api") == 1  # not a change
        action = [ln for ln in parse_lines(p.logs(), "json") if "admin action setLogLevel" in ln.msg]
        assert action
        assert "'operator'" in action[-1].msg
    finally:
        p.stop()
