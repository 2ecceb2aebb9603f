"""Admin tokens: the tokens file, constant-time lookup, scopes, the failure limiter and the config options;
and the API in process: every route documented, the guard, the record of mutating calls, the disabled API."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from proxy.admin.api import OPERATIONS, AdminAction, Guard, build_api_app, disabled_api_app, operations
from proxy.admin.app import build_admin_app
from proxy.admin.auth import (
    FailureLimiter,
    Scope,
    TokenFile,
    bearer_token,
    parse_tokens,
    read_tokens_file,
    token_digest,
)
from proxy.admin.metrics import Metrics
from proxy.admin.openapi import build_document
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.services import ReloadOutcome, WorkerSessions, WorkerTermination


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(name: str, token: str, *scopes: str) -> dict[str, object]:
    return {"name": name, "sha256": hashlib.sha256(token.encode()).hexdigest(), "scopes": list(scopes)}


def write(path: Path, entries: object) -> Path:
    path.write_text(yaml.safe_dump(entries))
    return path


# -- the tokens file -----------------------------------------------------------------------------------
def test_a_valid_file_gives_names_digests_and_scopes(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.yaml",
        [entry("secops", "s3cret", "admin:read", "policy:reload"), entry("prom", "p", "metrics:read")],
    )
    tokens = read_tokens_file(path)
    assert [t.name for t in tokens] == ["secops", "prom"]
    assert tokens[0].scopes == {Scope.ADMIN_READ, Scope.POLICY_RELOAD}
    assert tokens[0].digest == hashlib.sha256(b"s3cret").digest()
    assert "s3cret" not in repr(tokens)
    assert tokens[0].digest.hex() not in repr(tokens)


def test_every_problem_is_reported_by_position_without_echoing_digests() -> None:
    pasted_token = "this-is-a-token-pasted-where-its-digest-belongs"
    data = [
        {"name": "a", "sha256": pasted_token, "scopes": ["admin:read"]},
        {"name": "a b", "sha256": "0" * 64, "scopes": []},
        {"name": "c", "sha256": "1" * 64, "scopes": ["admin:write"], "token": "x"},
        entry("d", "same", "admin:read"),
        entry("d", "other", "admin:read"),
        entry("e", "same", "admin:read"),
        "not a mapping",
    ]
    with pytest.raises(ConfigError) as exc:
        parse_tokens(data, "tokens")
    errors = exc.value.errors
    assert errors == [
        "tokens[0].sha256: must be the 64 hex digits of the token's SHA-256 (sha256sum)",
        "tokens[1].name: must be 1-64 letters, digits or _ . @ -",
        "tokens[1].scopes: must be a non-empty list of admin:read, keys:rotate, metrics:read, policy:reload, "
        "sessions:terminate, subjects:export, subjects:shred",
        "tokens[2].token: unknown setting",
        "tokens[2].scopes: unknown scope 'admin:write' (known: admin:read, keys:rotate, metrics:read, "
        "policy:reload, sessions:terminate, subjects:export, subjects:shred)",
        "tokens[4].name: 'd' is listed twice",
        "tokens[5].sha256: the same token is listed twice",
        "tokens[6]: must be a mapping with name, sha256 and scopes",
    ]
    assert pasted_token not in "\n".join(errors)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{name: x}", "must be a YAML list"),
        ("- [unclosed\n- secret-token-value", "is not valid YAML"),
    ],
)
def test_a_file_that_is_not_a_list_is_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        read_tokens_file(path)
    assert message in exc.value.errors[0]
    assert "secret-token-value" not in exc.value.errors[0]


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as exc:
        TokenFile(tmp_path / "absent.yaml")
    assert "cannot read it" in exc.value.errors[0]


def test_lookup_finds_only_the_exact_token(tmp_path: Path) -> None:
    tf = TokenFile(write(tmp_path / "t.yaml", [entry("a", "alpha", "admin:read"), entry("b", "beta", "metrics:read")]))
    found = tf.lookup("alpha")
    assert found is not None
    assert found.name == "a"
    found = tf.lookup("beta")
    assert found is not None
    assert found.name == "b"
    for wrong in ("alph", "alphaa", "ALPHA", "", hashlib.sha256(b"alpha").hexdigest()):
        assert tf.lookup(wrong) is None


@given(st.text(min_size=1, max_size=40))
def test_lookup_matches_exactly_the_tokens_whose_digest_is_listed(presented: str) -> None:
    tokens = parse_tokens([entry("k", "known-token", "admin:read")], "t")
    assert (token_digest(presented) == tokens[0].digest) == (presented == "known-token")


def test_the_file_is_re_read_when_it_changes_and_a_broken_one_accepts_nothing(tmp_path: Path) -> None:
    clock = Clock()
    path = write(tmp_path / "t.yaml", [entry("old", "old-token", "admin:read")])
    tf = TokenFile(path, clock=clock)
    assert tf.lookup("old-token") is not None
    write(path, [entry("new", "new-token", "admin:read")])
    os.utime(path, ns=(1, 1))  # a different modification time, even within the file system's granularity
    assert tf.lookup("old-token") is not None  # not checked again within a second
    clock.now += 1.5
    assert tf.lookup("old-token") is None
    found = tf.lookup("new-token")
    assert found is not None
    assert found.name == "new"
    path.write_text("- {name: broken")
    clock.now += 1.5
    assert not tf.usable
    assert tf.lookup("new-token") is None  # fail closed: a broken file does not keep the old tokens
    write(path, [entry("back", "new-token", "admin:read")])
    clock.now += 1.5
    assert tf.usable
    assert tf.lookup("new-token") is not None


# -- the Authorization header --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc ", "abc"),
        (None, None),
        ("Basic YTpi", None),
        ("Bearer", None),
        ("Bearer a b", None),
        ("abc", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


# -- the failure limiter -------------------------------------------------------------------------------
def test_an_address_is_blocked_after_the_limit_until_its_oldest_failure_leaves_the_window() -> None:
    clock = Clock()
    lim = FailureLimiter(3, 60, clock=clock)
    for _ in range(2):
        lim.failed("10.0.0.1")
        clock.now += 10
    assert lim.retry_after("10.0.0.1") is None
    lim.failed("10.0.0.1")  # failures at 1000, 1010, 1020
    assert lim.retry_after("10.0.0.1") == 40  # the one at 1000 leaves the window at 1060; now is 1020
    assert lim.retry_after("10.0.0.2") is None  # per address
    clock.now = 1059.5
    assert lim.retry_after("10.0.0.1") == 1
    clock.now = 1060.0
    assert lim.retry_after("10.0.0.1") is None
    lim.failed("10.0.0.1")
    assert lim.retry_after("10.0.0.1") == 10  # 1010, 1020, 1060: blocked until 1070


def test_the_limiter_remembers_a_bounded_number_of_addresses() -> None:
    clock = Clock()
    lim = FailureLimiter(1, 60, clock=clock, max_addresses=100)
    for i in range(1000):
        lim.failed(f"10.0.{i // 256}.{i % 256}")
    assert lim.tracked == 100
    assert lim.retry_after("10.0.3.231") == 60  # the most recent are kept
    assert lim.retry_after("10.0.0.0") is None


@given(st.lists(st.floats(min_value=0, max_value=200), max_size=30), st.integers(1, 5))
def test_blocked_exactly_when_limit_failures_lie_within_the_window(gaps: list[float], limit: int) -> None:
    clock = Clock()
    lim = FailureLimiter(limit, 60, clock=clock)
    times: list[float] = []
    for gap in gaps:
        clock.now += gap
        lim.failed("a")
        times.append(clock.now)
        recent = [t for t in times if t > clock.now - 60]
        assert (lim.retry_after("a") is not None) == (len(recent) >= limit)


# -- the configuration ---------------------------------------------------------------------------------
def test_admin_options_parse_and_resolve_paths(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "admin": {
                    "tokens_file": "tokens.yaml",
                    "require_token_for_metrics": True,
                    "auth_failure_limit": 3,
                    "auth_failure_window": 5,
                    "tls": {"cert_file": "a.crt", "key_file": "a.key", "client_ca_file": "ca.crt"},
                }
            }
        )
    )
    admin = load_config(path, environ={}).admin
    assert admin.tokens_file == tmp_path / "tokens.yaml"
    assert admin.require_token_for_metrics
    assert not admin.require_token_for_health
    assert (admin.auth_failure_limit, admin.auth_failure_window) == (3, 5.0)
    assert admin.tls is not None
    assert admin.tls.client_ca_file == tmp_path / "ca.crt"


def test_admin_option_errors_are_named(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text(
        yaml.safe_dump(
            {"admin": {"require_token_for_health": True, "auth_failure_limit": 0, "tls": {"cert_file": "x"}}}
        )
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert exc.value.errors == [
        "admin.auth_failure_limit: must be an integer between 1 and 1000000, got 0",
        "admin.tls.key_file: required when admin.tls is set",
        "admin.require_token_for_health: needs admin.tokens_file (no token could be accepted)",
    ]


def test_a_remote_admin_port_with_tokens_but_without_tls_warns(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text(yaml.safe_dump({"admin": {"listen": "0.0.0.0:9187", "tokens_file": "t.yaml"}}))
    warnings = load_config(path, environ={}).warnings
    assert any("admin tokens cross the network unencrypted" in w for w in warnings)


def test_changing_admin_settings_on_reload_is_reported_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "pgveil.yaml"
    path.write_text(yaml.safe_dump({"admin": {"tokens_file": "a.yaml"}}))
    running = load_config(path, environ={})
    path.write_text(yaml.safe_dump({"admin": {"tokens_file": "b.yaml"}}))
    new = load_config(path, environ={})
    assert any(line.startswith("admin: changed settings need a restart") for line in running.reload_diff(new))
    assert new.keeping_restart_settings(running).admin.tokens_file == tmp_path / "a.yaml"


# -- the API in process: routes, document, guard and the record of actions ----------------------------
class FakeWorkers:
    """One worker process, serving two sessions, that never answers in time."""

    async def sessions(self) -> list[WorkerSessions]:
        return [WorkerSessions(1, None, 2)]

    async def terminate(self, session_id: int) -> WorkerTermination:
        return WorkerTermination(None, (1,))

    async def log_levels(self, level: str | None = None, source: str = "api") -> dict[int, str | None]:
        return {1: None}


class FakeInstance:
    """A running instance with no sessions and a reload that always applies."""

    def __init__(self) -> None:
        self.reloads = 0

    def live_sessions(self) -> list[Any]:
        return []

    def workers(self) -> FakeWorkers:
        return FakeWorkers()

    def reload_reporting(self) -> ReloadOutcome:
        self.reloads += 1
        return ReloadOutcome(True, ("reload: fine",))

    def configured_key_columns(self) -> tuple[str, ...]:
        return ()

    def keystore_connection(self) -> None:
        return None

    def explainer(self) -> None:
        return None


async def api_client(tmp_path: Path, record: Any = None) -> tuple[TestClient[Any, Any], FakeInstance]:
    path = write(
        tmp_path / "t.yaml", [entry("ops", "ops-token", "admin:read", "policy:reload"), entry("ro", "ro", "admin:read")]
    )
    guard = Guard(TokenFile(path), FailureLimiter(100, 60))
    instance = FakeInstance()
    kwargs = {"record": record} if record is not None else {}
    api = build_api_app(instance, guard, **kwargs)
    app = build_admin_app(Metrics("t"), _always_ready, version="t", api=api, metrics_guard=guard)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client, instance


async def _always_ready() -> tuple[bool, str]:
    return True, "ok"


def test_every_route_of_the_app_is_documented_and_nothing_else() -> None:
    app = build_api_app(FakeInstance(), Guard.__new__(Guard))
    routes = {(r.method, "/v1" + (r.resource.canonical if r.resource else "")) for r in app.router.routes()}
    doc = build_document(operations())
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops if p.startswith("/v1/")}
    assert routes == documented
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert {"401", "403", "429"} <= set(op["responses"]), path
            assert op["x-pgveil-scope"] in {s.value for s in Scope}


async def test_mutating_calls_go_to_the_recorder_with_the_token_name(tmp_path: Path) -> None:
    recorded: list[AdminAction] = []

    async def record(action: AdminAction) -> None:
        recorded.append(action)

    client, instance = await api_client(tmp_path, record)
    try:
        r = await client.post("/v1/policy/reload", headers={"Authorization": "Bearer ops-token"})
        assert r.status == 200
        assert await r.json() == {"applied": True, "messages": ["reload: fine"]}
        r = await client.get("/v1/sessions", headers={"Authorization": "Bearer ops-token"})
        assert await r.json() == {
            "covers": "partial",
            "process": 0,
            "sessions": [],
            "other_processes": {"1": 2},
            "unanswered": [1],
            "total": 2,
        }
        r = await client.post("/v1/policy/reload", headers={"Authorization": "Bearer ro"})
        assert r.status == 403
    finally:
        await client.close()
    assert instance.reloads == 1  # the refused call did not reach the instance
    assert recorded == [
        AdminAction("ops", "reloadPolicy", "POST", "/v1/policy/reload", 200, "127.0.0.1", None)
    ]  # reads and refusals are not actions


async def test_a_worker_that_does_not_answer_is_reported_not_waited_for(tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", [entry("t", "t-token", "admin:read", "sessions:terminate")])
    api = build_api_app(FakeInstance(), Guard(TokenFile(path), FailureLimiter(100, 60)))
    client = TestClient(TestServer(build_admin_app(Metrics("t"), _always_ready, version="t", api=api)))
    await client.start_server()
    auth = {"Authorization": "Bearer t-token"}
    try:
        # The session may be the silent worker's: not "there is none" (404) but "ask again" (503).
        r = await client.delete("/v1/sessions/7", headers=auth)
        assert r.status == 503
        body = await r.json()
        assert body["error"] == "worker processes did not answer"
        assert "worker process 1 did not answer" in body["detail"]
        r = await client.get("/v1/logging", headers=auth)
        assert r.status == 200
        assert (await r.json())["workers"] == {"1": None}
    finally:
        await client.close()


async def test_metrics_can_be_guarded_while_health_stays_open(tmp_path: Path) -> None:
    client, _ = await api_client(tmp_path)
    try:
        assert (await client.get("/metrics")).status == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer ro"})).status == 403
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()


async def test_the_disabled_api_says_so_on_every_path() -> None:
    app = build_admin_app(Metrics("t"), _always_ready, version="t", api=disabled_api_app())
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        for method, path in (("GET", "/v1/sessions"), ("DELETE", "/v1/sessions/1"), ("POST", "/v1/x/y")):
            r = await client.request(method, path, headers={"Authorization": "Bearer anything"})
            assert r.status == 404
            assert (await r.json())["error"] == "admin API disabled"
    finally:
        await client.close()


def test_a_tokens_file_others_can_write_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "t.yaml", [entry("a", "alpha", "admin:read")])
    os.chmod(path, 0o600)
    TokenFile(path)
    assert "writable by group or others" not in caplog.text
    os.chmod(path, 0o666)
    TokenFile(path)
    assert "writable by group or others" in caplog.text


class ExplainingInstance(FakeInstance):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, str]] = []

    def explainer(self) -> Any:
        async def explain(role: str, sql: str) -> dict[str, Any]:
            self.asked.append((role, sql))
            return {"role": role, "policy_roles": [], "allowed": True, "statements": []}

        return explain


async def test_explain_is_offered_only_by_an_instance_that_can_explain(tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", [entry("ro", "ro", "admin:read"), entry("m", "m", "metrics:read")])
    guard = Guard(TokenFile(path), FailureLimiter(100, 60))
    assert "/policy/explain" not in {op.path for op in build_api_app(FakeInstance(), guard)[OPERATIONS]}
    instance = ExplainingInstance()
    api = build_api_app(instance, guard)
    ops: tuple[Any, ...] = api[OPERATIONS]
    assert "/v1/policy/explain" in build_document(ops)["paths"]
    client = TestClient(TestServer(build_admin_app(Metrics("t"), _always_ready, version="t", api=api)))
    await client.start_server()
    try:
        ro, m = {"Authorization": "Bearer ro"}, {"Authorization": "Bearer m"}
        body = {"role": "support", "statement": "SELECT ssn FROM customers"}
        assert (await client.post("/v1/policy/explain", json=body)).status == 401
        assert (await client.post("/v1/policy/explain", json=body, headers=m)).status == 403
        r = await client.post("/v1/policy/explain", json=body, headers=ro)
        assert r.status == 200
        assert (await r.json())["role"] == "support"
        for bad in ({"role": "support"}, {"role": "", "statement": "SELECT 1"}, ["x"], {"role": "r", "statement": 1}):
            assert (await client.post("/v1/policy/explain", json=bad, headers=ro)).status == 400
        assert (await client.post("/v1/policy/explain", data=b"{not json", headers=ro)).status == 400
    finally:
        await client.close()
    assert instance.asked == [("support", "SELECT ssn FROM customers")]


class FailingInstance(FakeInstance):
    def reload_reporting(self) -> ReloadOutcome:
        raise RuntimeError("boom with a secret: hunter2")


async def test_a_mutating_call_that_fails_is_recorded_as_500(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorded: list[AdminAction] = []

    async def record(action: AdminAction) -> None:
        recorded.append(action)

    path = write(tmp_path / "t.yaml", [entry("ops", "ops-token", "policy:reload")])
    api = build_api_app(FailingInstance(), Guard(TokenFile(path), FailureLimiter(100, 60)), record=record)
    client = TestClient(TestServer(build_admin_app(Metrics("t"), _always_ready, version="t", api=api)))
    await client.start_server()
    try:
        r = await client.post("/v1/policy/reload", headers={"Authorization": "Bearer ops-token"})
        assert r.status == 500
        assert await r.json() == {"error": "internal error"}
    finally:
        await client.close()
    assert [(a.token, a.operation, a.status) for a in recorded] == [("ops", "reloadPolicy", 500)]
    assert "hunter2" not in caplog.text
